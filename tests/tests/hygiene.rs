//! No tracked file names a package registry or mirror host: the hosts are taken from this
//! machine's own configuration (apt's sources, npm's registry, pip's index settings), so the
//! project can be built against whatever mirrors a site uses without carrying any of them.

use std::{path::Path, process::Command};

use nodeward_tests::{mirrors::configured_hosts, skip};

#[test]
fn no_tracked_file_names_a_configured_registry_or_mirror_host() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let hosts = configured_hosts();
    if hosts.is_empty() {
        skip(
            "no_tracked_file_names_a_configured_registry_or_mirror_host",
            "this machine configures no apt, npm or pip host to look for",
        );
        return;
    }
    let listed = match Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["ls-files", "-z"])
        .output()
    {
        Ok(out) if out.status.success() => out.stdout,
        _ => {
            skip(
                "no_tracked_file_names_a_configured_registry_or_mirror_host",
                "not a git checkout (or no git): the tracked files cannot be listed",
            );
            return;
        }
    };
    let files: Vec<String> = listed
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert!(!files.is_empty(), "git lists no tracked files");
    let mut found = Vec::new();
    for file in &files {
        // A file deleted in the working tree but still in the index has nothing to read.
        let Ok(bytes) = std::fs::read(root.join(file)) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
        for host in &hosts {
            if text.contains(host.as_str()) {
                found.push(format!("{file}: {host}"));
            }
        }
    }
    println!(
        "checked {} tracked files for {} configured hosts: {}",
        files.len(),
        hosts.len(),
        hosts.join(", ")
    );
    assert!(
        found.is_empty(),
        "tracked files name registry or mirror hosts (take them from the machine's \
         configuration instead):\n{}",
        found.join("\n")
    );
}

fn read(root: &Path, file: &str) -> String {
    std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("read {file}: {e}"))
}

/// The `key = "value"` of the first line with that key (rust-toolchain.toml, Cargo.toml, and
/// a Rust `const NAME: &str = "value";`).
fn quoted_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        let k = k
            .trim()
            .trim_start_matches("pub ")
            .trim_start_matches("const ");
        (k == key || k.split(':').next() == Some(key))
            .then(|| v.trim().trim_end_matches(';').trim_matches('"'))
    })
}

/// The toolchain pins agree with each other and with what the docs tell a user: the stable
/// channel is the workspace's rust-version, the eBPF nightly is dated and is what build.rs
/// hands to aya-build and xtask installs, and bpf-linker is one exact version, the one README
/// names.
#[test]
fn toolchain_pins_agree_with_each_other_and_the_docs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let stable = read(&root, "rust-toolchain.toml");
    let stable = quoted_value(&stable, "channel").expect("rust-toolchain.toml has a channel");
    let workspace = read(&root, "Cargo.toml");
    let rust_version = quoted_value(&workspace, "rust-version").expect("workspace rust-version");
    assert!(
        stable.starts_with(&format!("{rust_version}.")) && stable.split('.').count() == 3,
        "rust-toolchain.toml pins {stable}, an exact release of rust-version {rust_version}"
    );

    let ebpf_file = read(&root, "agent-ebpf/rust-toolchain.toml");
    let nightly = quoted_value(&ebpf_file, "channel").expect("the eBPF toolchain has a channel");
    let date = nightly
        .strip_prefix("nightly-")
        .unwrap_or_else(|| panic!("the eBPF toolchain {nightly} is not a dated nightly"));
    let parts: Vec<&str> = date.split('-').collect();
    assert!(
        parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok()),
        "{nightly} is not nightly-YYYY-MM-DD"
    );
    assert!(ebpf_file.contains("rust-src"), "aya-build needs rust-src");

    let build = read(&root, "agent/build.rs");
    assert!(
        build.contains("rust-toolchain.toml") && build.contains("Toolchain::Custom"),
        "agent/build.rs hands the pinned channel to aya-build"
    );
    assert!(
        !build.contains("Toolchain::default()") && !build.contains("Toolchain::Nightly"),
        "agent/build.rs must not build with an unpinned nightly"
    );
    let setup = read(&root, "xtask/src/setup.rs");
    assert!(
        setup.contains("agent-ebpf/rust-toolchain.toml"),
        "xtask installs the toolchain the file names"
    );
    assert!(
        !setup.contains("\"+nightly\""),
        "xtask asks the pinned nightly, not whatever `nightly` is"
    );
    let linker = quoted_value(&setup, "BPF_LINKER_VERSION").expect("xtask pins bpf-linker");
    assert!(
        linker.split('.').count() == 3 && linker.split('.').all(|p| p.parse::<u32>().is_ok()),
        "bpf-linker is pinned to an exact version, not {linker}"
    );
    assert!(
        setup.contains("--locked") && setup.contains("format!(\"={BPF_LINKER_VERSION}\")"),
        "xtask installs exactly that version with its lock file"
    );

    let readme = read(&root, "README.md");
    for (what, pin) in [
        ("stable toolchain", stable),
        ("eBPF nightly", nightly),
        ("bpf-linker", linker),
    ] {
        assert!(
            readme.contains(pin),
            "README.md names the {what} {pin} (it is what xtask installs)"
        );
    }
}
