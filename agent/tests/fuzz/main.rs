//! Property-based fuzz targets (proptest) for everything that parses text or requests the agent
//! does not control: kernel text (cgroup, PSI, io.stat, /proc, os-release,
//! cgroup paths), the config loader, the RTP/UDP classifier and RFC 3550 state machine (the
//! user-space twin of the eBPF code) and the gRPC request validation.
//!
//! Each target has a committed corpus under `agent/tests/corpus/<target>/` of real samples (taken
//! from a Debian 12 / kernel 6.18 host) and hand-made tricky ones. File name prefixes say what
//! the parser must do: `ok-` parses (and yields something), `bad-` is rejected with an error,
//! `tricky-`/`none-` only must not panic (or, for paths, must not be recognised). Every corpus
//! file is also parsed truncated at each line and at a spread of byte offsets.
//!
//! The number of generated cases is `PROPTEST_CASES` (default 64, so `cargo test` stays quick);
//! `cargo xtask test --fuzz` raises it.

use std::path::{Path, PathBuf};

use proptest::test_runner::Config;

mod config;
mod kernel_text;
mod requests;
mod rtp;
mod sock_diag;

/// Cases per property: `PROPTEST_CASES`, else a small default for ordinary test runs.
fn cases() -> Config {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    Config::with_cases(n)
}

/// `(file name, text)` of every file in `agent/tests/corpus/<target>/`, sorted by name.
fn corpus(target: &str) -> Vec<(String, String)> {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target);
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let name = path
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            let bytes = std::fs::read(&path).expect("corpus file readable");
            (name, String::from_utf8_lossy(&bytes).into_owned())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "corpus {} is empty", dir.display());
    out
}

/// Every prefix of `text` that ends at a line break, and prefixes cut at up to 64 byte offsets
/// spread over the text (at char boundaries): the shapes a file read mid-write takes.
fn truncations(text: &str) -> Vec<&str> {
    let mut out: Vec<&str> = text.match_indices('\n').map(|(i, _)| &text[..i]).collect();
    let step = (text.len() / 64).max(1);
    out.extend(
        (0..text.len())
            .step_by(step)
            .filter(|&i| text.is_char_boundary(i))
            .map(|i| &text[..i]),
    );
    out
}
