//! `cargo xtask rpm`: the RPM for Anolis OS 23 (and other RPM distributions with systemd),
//! built without rpmbuild by `cargo-generate-rpm` from `[package.metadata.generate-rpm]` in
//! `agent/Cargo.toml`.
//!
//! The binary is built (release by default), copied to `target/rpm/nodeward` and stripped
//! there, so the cargo build output is never modified and the package holds no debug info
//! (rpmlint rejects unstripped binaries). `--reuse-debug` packages the debug build instead:
//! the tests use it to check the package in seconds rather than wait for a release build.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::{cargo, say, step, which};

/// The cargo-generate-rpm release this project's metadata is written for; it builds with the
/// workspace's rustc 1.95.
pub const GENERATE_RPM_VERSION: &str = "0.21.1";

#[derive(clap::Args)]
pub struct RpmArgs {
    /// Package the debug build (target/debug/nodeward, built if missing) instead of a release
    /// build: for tests. Also set by NODEWARD_RPM_REUSE_DEBUG=1.
    #[arg(long)]
    reuse_debug: bool,
    /// Cross-build for this target: a triple, or an architecture (`aarch64`) for its
    /// `-unknown-linux-gnu` triple. Needs the target's gcc as linker (Debian's
    /// `gcc-aarch64-linux-gnu`); the rustup target is added when missing.
    #[arg(long, value_parser = target_triple)]
    target: Option<String>,
    /// Directory to write the .rpm into [default: target/rpm].
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Installs cargo-generate-rpm when `cargo generate-rpm` is not there.
pub fn ensure_generate_rpm() -> anyhow::Result<()> {
    let present = cargo()
        .args(["generate-rpm", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if present {
        say("cargo-generate-rpm: already installed");
        return Ok(());
    }
    step(
        &format!("installing cargo-generate-rpm {GENERATE_RPM_VERSION} (takes a few minutes)"),
        cargo().args([
            "install",
            "--locked",
            "cargo-generate-rpm",
            "--version",
            GENERATE_RPM_VERSION,
        ]),
    )
}

pub fn run(root: &Path, args: &RpmArgs) -> anyhow::Result<()> {
    ensure_generate_rpm()?;
    let reuse_debug =
        args.reuse_debug || std::env::var("NODEWARD_RPM_REUSE_DEBUG").is_ok_and(|v| v == "1");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let mut built = target_dir.clone();
    if let Some(t) = &args.target {
        built.push(t);
    }
    built.push(if reuse_debug { "debug" } else { "release" });
    built.push("nodeward");

    if !reuse_debug || !built.exists() {
        crate::setup::ensure_build_tools()?;
        let mut build = cargo();
        if let Some(t) = &args.target {
            cross_build_env(t, &mut build)?;
        }
        build.args(["build", "-p", "nodeward"]);
        if !reuse_debug {
            build.arg("--release");
        }
        if let Some(t) = &args.target {
            build.args(["--target", t]);
        }
        step("building nodeward", &mut build)?;
    } else {
        say(&format!("reusing {}", built.display()));
    }

    // The metadata names this path, relative to the workspace root, whatever the target dir.
    let staged = root.join("target/rpm/nodeward");
    let stage_dir = staged.parent().context("staging path has a parent")?;
    std::fs::create_dir_all(stage_dir)
        .with_context(|| format!("create {}", stage_dir.display()))?;
    std::fs::copy(&built, &staged)
        .with_context(|| format!("copy {} to {}", built.display(), staged.display()))?;
    let strip = strip_tool(args.target.as_deref())?;
    step(
        "stripping the packaged copy",
        Command::new(&strip).arg("--strip-all").arg(&staged),
    )?;

    let out = args.out.clone().unwrap_or_else(|| root.join("target/rpm"));
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let mut generate = cargo();
    generate
        .args(["generate-rpm", "-p", "agent", "-o"])
        .arg(&out)
        .current_dir(root);
    match &args.target {
        Some(t) if !t.starts_with(std::env::consts::ARCH) => {
            // ldd cannot read a foreign binary: rpm's ELF reader can.
            generate
                .arg("--auto-req")
                .arg(root.join("packaging/rpm/elf-requires.sh"));
        }
        // Dependencies on shared libraries and their symbol versions (glibc) come from ldd, so
        // they do not depend on which rpm tools this machine happens to have.
        _ => {
            generate.args(["--auto-req", "builtin"]);
        }
    }
    if let Some(t) = &args.target {
        generate.args(["--target", t]);
    }
    step("cargo generate-rpm", &mut generate)?;

    let rpm = newest_rpm(&out)?;
    say(&format!("built {}", rpm.display()));
    println!("{}", rpm.display());
    Ok(())
}

/// `aarch64` → `aarch64-unknown-linux-gnu`; a triple stays as it is.
fn target_triple(arg: &str) -> Result<String, String> {
    match arg {
        "" => Err("empty target".to_owned()),
        a if a.contains('-') => Ok(a.to_owned()),
        arch => Ok(format!("{arch}-unknown-linux-gnu")),
    }
}

/// For a target other than the host's: its rustup target, and its gcc as cargo's linker (and
/// as the C compiler of crates with C code, which the `cc` crate finds by the same name).
fn cross_build_env(triple: &str, build: &mut Command) -> anyhow::Result<()> {
    if triple.starts_with(std::env::consts::ARCH) {
        return Ok(());
    }
    crate::setup::ensure_rust_target(triple)?;
    let var = format!(
        "CARGO_TARGET_{}_LINKER",
        triple.to_uppercase().replace('-', "_")
    );
    if std::env::var_os(&var).is_none() {
        let gcc = format!("{}-gcc", triple.replace("-unknown-", "-"));
        if which(&gcc).is_none() {
            bail!("`{gcc}` not found: install the cross compiler (Debian: gcc-{}, libc6-dev-*-cross)",
                triple.replace("-unknown-", "-"));
        }
        build.env(&var, &gcc);
    }
    Ok(())
}

/// `strip` for the host, `<triple>-strip` (binutils' cross naming) for another target.
fn strip_tool(target: Option<&str>) -> anyhow::Result<PathBuf> {
    let host_arch = std::env::consts::ARCH;
    let name = match target {
        Some(t) if !t.starts_with(host_arch) => {
            let gnu = t.replace("-unknown-", "-");
            format!("{gnu}-strip")
        }
        _ => "strip".to_owned(),
    };
    match which(&name) {
        Some(p) => Ok(p),
        None => bail!("`{name}` not found: install binutils (for that target)"),
    }
}

fn newest_rpm(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut rpms: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "rpm"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    rpms.sort();
    rpms.pop()
        .map(|(_, p)| p)
        .with_context(|| format!("cargo generate-rpm wrote no .rpm into {}", dir.display()))
}
