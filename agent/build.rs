//! Builds the eBPF programs in `agent-ebpf/` for the bpf target with aya-build and leaves the
//! object file in `OUT_DIR`, where `src/ebpf/mod.rs` embeds it with `include_bytes_aligned!`.
//!
//! Builds with the dated nightly that `agent-ebpf/rust-toolchain.toml` names (aya-build runs
//! `rustup run <channel> cargo build`), so the bytecode does not change with whatever `nightly`
//! is installed. Needs that toolchain with `rust-src` and the pinned `bpf-linker` on PATH:
//! `cargo xtask run` and `cargo xtask test` install both when missing.

use std::path::Path;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = Path::new(&manifest_dir).join("..").join("agent-ebpf");
    let ebpf_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("eBPF crate not found at {}", ebpf_dir.display()))?;
    let root_dir = ebpf_dir
        .to_str()
        .context("path of agent-ebpf is not UTF-8")?;
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let toml = std::fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {}", toolchain_file.display()))?;
    let channel = toml
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once('=')?;
            (key.trim() == "channel").then(|| value.trim().trim_matches('"').to_owned())
        })
        .with_context(|| format!("no channel in {}", toolchain_file.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&channel),
    )
    .context(
        "building the eBPF programs failed; `cargo xtask test` installs the pinned nightly \
         with rust-src and the bpf-linker they need",
    )
}
