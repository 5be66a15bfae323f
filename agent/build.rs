//! Builds the eBPF programs in `agent-ebpf/` for the bpf target with aya-build and leaves the
//! object file in `OUT_DIR`, where `src/ebpf/mod.rs` embeds it with `include_bytes_aligned!`.
//!
//! Needs the nightly toolchain with `rust-src` and `bpf-linker` on PATH: `cargo xtask run` and
//! `cargo xtask test` install both when missing.

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
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed; `cargo xtask test` installs the nightly rust-src \
         component and bpf-linker they need",
    )
}
