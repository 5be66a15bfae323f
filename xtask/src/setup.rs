//! One-command setup: installs what is missing, skips what is there, and says which.
//!
//! - system packages, with apt on Debian/Ubuntu and dnf on Anolis/RHEL-family hosts;
//! - the pinned nightly of `agent-ebpf/rust-toolchain.toml` with `rust-src` (aya-build compiles
//!   `core` for the bpf target);
//! - `bpf-linker` at [`BPF_LINKER_VERSION`], built against the LLVM of that nightly.
//!
//! The stable toolchain of `rust-toolchain.toml` is installed by rustup itself before this
//! program can run (`.ci/run` asks for it explicitly).

use std::process::Command;

use anyhow::{bail, Context as _};

use crate::{say, step, which};

/// The bpf-linker release that links the eBPF programs: pinned, like the nightly, so that the
/// object the verifier passed can be rebuilt bit for bit.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// `agent-ebpf/rust-toolchain.toml`, which names the nightly that builds the eBPF programs.
const EBPF_TOOLCHAIN_FILE: &str = include_str!("../../agent-ebpf/rust-toolchain.toml");

/// The `channel = "…"` of a rust-toolchain.toml.
pub fn toolchain_channel(toml: &str) -> Option<&str> {
    toml.lines().find_map(|l| {
        let (key, value) = l.split_once('=')?;
        (key.trim() == "channel").then(|| value.trim().trim_matches('"'))
    })
}

/// The dated nightly of `agent-ebpf/rust-toolchain.toml`.
pub fn ebpf_toolchain() -> anyhow::Result<&'static str> {
    toolchain_channel(EBPF_TOOLCHAIN_FILE)
        .context("agent-ebpf/rust-toolchain.toml names no channel")
}

/// The LLVM major version of the nightly rustc that builds the eBPF programs.
fn nightly_llvm_major() -> anyhow::Result<u32> {
    let toolchain = ebpf_toolchain()?;
    let out = Command::new("rustc")
        .arg(format!("+{toolchain}"))
        .args(["--version", "--verbose"])
        .output()
        .with_context(|| format!("run rustc +{toolchain}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("no LLVM version in `rustc +{toolchain} -vV`: {text}"))
}

#[derive(Clone, Copy, PartialEq)]
enum Pm {
    Apt,
    Dnf,
}

fn package_manager() -> Option<Pm> {
    if which("apt-get").is_some() {
        Some(Pm::Apt)
    } else if which("dnf").is_some() {
        Some(Pm::Dnf)
    } else {
        None
    }
}

fn installed(pm: Pm, pkg: &str) -> bool {
    let out = match pm {
        Pm::Apt => Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output(),
        Pm::Dnf => Command::new("rpm").args(["-q", pkg]).output(),
    };
    match out {
        Ok(o) if pm == Pm::Apt => {
            String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        }
        Ok(o) => o.status.success(),
        Err(_) => false,
    }
}

/// Installs the packages that are missing, with one `apt-get update` first if any are.
fn ensure_packages(what: &str, apt: &[String], dnf: &[String]) -> anyhow::Result<()> {
    let Some(pm) = package_manager() else {
        say(&format!(
            "{what}: no apt-get or dnf here; install {apt:?} by hand"
        ));
        return Ok(());
    };
    let wanted = if pm == Pm::Apt { apt } else { dnf };
    let missing: Vec<&String> = wanted.iter().filter(|p| !installed(pm, p)).collect();
    if missing.is_empty() {
        say(&format!("{what}: already installed ({})", wanted.join(" ")));
        return Ok(());
    }
    if !crate::is_root() && which("sudo").is_none() {
        bail!("{what}: {missing:?} are missing and installing them needs root");
    }
    let sudo = |c: &str| {
        if crate::is_root() {
            Command::new(c)
        } else {
            let mut s = Command::new("sudo");
            s.arg(c);
            s
        }
    };
    match pm {
        Pm::Apt => {
            step("apt-get update", sudo("apt-get").args(["update", "-q"]))?;
            step(
                &format!("{what}: installing {}", join(&missing)),
                sudo("apt-get")
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .args(["install", "-y", "-q", "--no-install-recommends"])
                    .args(&missing),
            )
        }
        Pm::Dnf => step(
            &format!("{what}: installing {}", join(&missing)),
            sudo("dnf").args(["install", "-y"]).args(&missing),
        ),
    }
}

fn join(v: &[&String]) -> String {
    v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn ensure_nightly_rust_src() -> anyhow::Result<()> {
    let toolchain = ebpf_toolchain()?;
    let comps = Command::new("rustup")
        .args(["component", "list", "--toolchain", toolchain, "--installed"])
        .output()
        .context("rustup is needed to build the eBPF programs (a pinned nightly + rust-src)")?;
    if comps.status.success()
        && String::from_utf8_lossy(&comps.stdout)
            .lines()
            .any(|l| l.trim().starts_with("rust-src"))
    {
        say(&format!("{toolchain} with rust-src: already installed"));
        return Ok(());
    }
    step(
        &format!("installing {toolchain} with rust-src (builds the eBPF programs)"),
        Command::new("rustup").args([
            "toolchain",
            "install",
            toolchain,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]),
    )
}

/// The version `bpf-linker --version` prints, if one is on PATH.
fn installed_bpf_linker() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_start_matches("bpf-linker")
            .trim()
            .to_owned()
    })
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let installed = installed_bpf_linker();
    if installed.as_deref() == Some(BPF_LINKER_VERSION) {
        say(&format!(
            "bpf-linker {BPF_LINKER_VERSION}: already installed"
        ));
        return Ok(());
    }
    if let Some(other) = installed {
        say(&format!(
            "bpf-linker {other} is installed, the build pins {BPF_LINKER_VERSION}: replacing it"
        ));
    }
    let major = nightly_llvm_major()?;
    ensure_packages(
        &format!("LLVM {major} for bpf-linker"),
        &[
            format!("llvm-{major}-dev"),
            format!("libpolly-{major}-dev"),
            "libzstd-dev".to_owned(),
            "zlib1g-dev".to_owned(),
        ],
        &strings(&["llvm-devel", "libzstd-devel", "zlib-devel"]),
    )?;
    let prefix = format!("/usr/lib/llvm-{major}");
    let mut cmd = crate::cargo();
    cmd.args(["install", "--locked", "--force", "bpf-linker", "--version"])
        .arg(format!("={BPF_LINKER_VERSION}"))
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major}"));
    if std::path::Path::new(&prefix).is_dir() {
        cmd.env("LLVM_PREFIX", &prefix);
    }
    step(
        &format!(
            "building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (takes about 4 minutes)"
        ),
        &mut cmd,
    )
}

/// The rust-std of `triple` for the workspace's stable toolchain (cross builds).
pub fn ensure_rust_target(triple: &str) -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup is needed to add a cross target")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == triple)
    {
        say(&format!("rust target {triple}: already installed"));
        return Ok(());
    }
    step(
        &format!("adding the rust target {triple}"),
        Command::new("rustup").args(["target", "add", triple]),
    )
}

/// What building the agent needs.
pub fn ensure_build_tools() -> anyhow::Result<()> {
    ensure_packages(
        "build tools",
        &strings(&["protobuf-compiler", "pkg-config", "gcc"]),
        &strings(&["protobuf-compiler", "pkgconf-pkg-config", "gcc"]),
    )?;
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()
}

/// What the tests need on top: tools they drive and compare against.
pub fn ensure_test_tools(root: &std::path::Path) -> anyhow::Result<()> {
    ensure_packages(
        "test tools",
        &strings(&[
            "iproute2",
            "bpftool",
            "iptables",
            "procps",
            "tshark",
            "libnetfilter-queue-dev",
            // packaging tests: promtool and a real server, RPM inspection, unit verification
            "prometheus",
            // /metrics over TLS: a stock HTTPS client with client certificates
            "curl",
            "rpm",
            "rpmlint",
            "systemd",
            // kernels test: boot Debian's 5.10 and 6.1 kernels with the agent in an initramfs
            "qemu-system-x86",
            "busybox-static",
            "cpio",
            // cri_identity test: a real containerd with its CRI plugin, and runc under it
            "containerd",
            "runc",
            // image test: the image built offline and run as the DaemonSet runs it
            "buildah",
            "podman",
            // rpm_srpm test: the aarch64 cross build and running it under qemu-user
            "gcc-aarch64-linux-gnu",
            "libc6-dev-arm64-cross",
            "qemu-user",
            // docs_commands test: the README's and docs' commands run as written (`| jq ...`)
            "jq",
        ]),
        // Anolis/RHEL have no `prometheus` package in their base repositories: those tests skip.
        &strings(&[
            "iproute",
            "bpftool",
            "iptables",
            "procps-ng",
            "wireshark-cli",
            "curl",
            "rpm",
            "rpmlint",
            "systemd",
            "buildah",
            "podman",
            "jq",
        ]),
    )?;
    let requirements = root.join("tests/requirements.txt");
    if requirements.exists() {
        step(
            "Python test clients (tests/requirements.txt)",
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "-r",
                ])
                .arg(&requirements),
        )?;
    }
    Ok(())
}

/// The cargo-deny release the supply-chain check runs (`deny.toml`).
pub const CARGO_DENY_VERSION: &str = "0.20.2";

/// cargo-deny for the supply-chain check of `cargo xtask test`.
pub fn ensure_cargo_deny() -> anyhow::Result<()> {
    if let Ok(out) = Command::new("cargo").args(["deny", "--version"]).output() {
        if out.status.success() {
            say(&format!(
                "cargo-deny: already installed ({})",
                String::from_utf8_lossy(&out.stdout).trim()
            ));
            return Ok(());
        }
    }
    step(
        &format!("building cargo-deny {CARGO_DENY_VERSION} (takes about 5 minutes)"),
        crate::cargo().args([
            "install",
            "--locked",
            "cargo-deny",
            "--version",
            CARGO_DENY_VERSION,
        ]),
    )
}

/// The Buf CLI release that `cargo xtask test` lints the proto with (`proto/buf.yaml`).
pub const BUF_VERSION: &str = "1.75.0";

/// The Buf CLI for `buf lint` and `buf breaking`. Its PyPI package (`buf-bin`) ships the
/// released binary, so pip installs it without a Go toolchain.
pub fn ensure_buf() -> anyhow::Result<()> {
    if let Ok(out) = Command::new("buf").arg("--version").output() {
        if out.status.success() {
            say(&format!(
                "buf: already installed ({})",
                String::from_utf8_lossy(&out.stdout).trim()
            ));
            return Ok(());
        }
    }
    step(
        &format!("installing the Buf CLI {BUF_VERSION} (pip package buf-bin)"),
        Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("buf-bin=={BUF_VERSION}"),
        ]),
    )
}

/// What `cargo xtask image` builds with (the tests get them from [`ensure_test_tools`]).
pub fn ensure_image_tools() -> anyhow::Result<()> {
    ensure_packages(
        "image tools",
        &strings(&["buildah", "binutils", "python3"]),
        &strings(&["buildah", "binutils", "python3"]),
    )
}

/// What the benchmark drives.
pub fn ensure_bench_tools() -> anyhow::Result<()> {
    ensure_packages(
        "bench tools",
        &strings(&["iperf3", "bpftool", "gcc", "bpftrace"]),
        &strings(&["iperf3", "bpftool", "gcc", "bpftrace"]),
    )
}

pub fn ensure_all(root: &std::path::Path) -> anyhow::Result<()> {
    ensure_build_tools()?;
    ensure_test_tools(root)?;
    // The rpm_srpm test cross-builds the agent for aarch64.
    if std::env::consts::ARCH == "x86_64" {
        ensure_rust_target("aarch64-unknown-linux-gnu")?;
    }
    ensure_buf()
}
