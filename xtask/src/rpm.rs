//! `cargo xtask rpm`: the binary RPM for Anolis OS 23 (and other RPM distributions with
//! systemd), built by `rpmbuild -bb` from the same spec as the source RPM (`xtask srpm`), in
//! the checkout (`--build-in-place`) and with the binary cargo built here: `nodeward_prebuilt`
//! tells the spec to skip its own cargo build. So both RPMs have one file list, one set of
//! scriptlets, one changelog and one licence expression.
//!
//! The binary is built (release by default), copied to `target/rpm/<target>/nodeward` and
//! stripped there, so the cargo build output is never modified and the package holds no debug
//! info (rpmlint rejects unstripped binaries). `--reuse-debug` packages the debug build instead:
//! the tests use it to check the package in seconds rather than wait for a release build.
//! `--target aarch64` cross-builds with Debian's `gcc-aarch64-linux-gnu` as linker.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::{cargo, say, step, which};

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
    /// Package this binary as it is (no cargo build): what `cargo xtask image` and the image
    /// tests use with the release binary they already have.
    #[arg(long, conflicts_with = "reuse_debug")]
    prebuilt: Option<PathBuf>,
}

impl RpmArgs {
    /// The RPM of the native architecture around `binary`, written into `out`.
    pub fn prebuilt(binary: PathBuf, out: Option<PathBuf>) -> Self {
        Self {
            reuse_debug: false,
            target: None,
            out,
            prebuilt: Some(binary),
        }
    }
}

pub fn run(root: &Path, args: &RpmArgs) -> anyhow::Result<()> {
    let rpm = build(root, args)?;
    say(&format!("built {}", rpm.display()));
    println!("{}", rpm.display());
    Ok(())
}

/// Builds the RPM and returns its path.
pub fn build(root: &Path, args: &RpmArgs) -> anyhow::Result<PathBuf> {
    if which("rpmbuild").is_none() {
        bail!("rpmbuild not found: install rpm (Debian) or rpm-build (Anolis)");
    }
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

    if let Some(binary) = &args.prebuilt {
        if !binary.is_file() {
            bail!("--prebuilt {}: no such file", binary.display());
        }
        built = binary.clone();
        say(&format!("packaging {}", built.display()));
    } else if !reuse_debug || !built.exists() {
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

    let triple = args
        .target
        .clone()
        .unwrap_or_else(|| format!("{}-unknown-linux-gnu", std::env::consts::ARCH));
    let arch = triple
        .split('-')
        .next()
        .context("a target triple starts with its architecture")?
        .to_owned();
    let stage_dir = root.join("target/rpm").join(&triple);
    std::fs::create_dir_all(&stage_dir)
        .with_context(|| format!("create {}", stage_dir.display()))?;
    let staged = stage_dir.join("nodeward");
    std::fs::copy(&built, &staged)
        .with_context(|| format!("copy {} to {}", built.display(), staged.display()))?;
    let strip = strip_tool(args.target.as_deref())?;
    step(
        "stripping the packaged copy",
        Command::new(&strip).arg("--strip-all").arg(&staged),
    )?;

    let topdir = stage_dir.join("rpmbuild");
    let _ = std::fs::remove_dir_all(&topdir);
    let specs = topdir.join("SPECS");
    std::fs::create_dir_all(&specs).with_context(|| format!("create {}", specs.display()))?;
    let spec = specs.join("nodeward.spec");
    std::fs::write(&spec, crate::srpm::spec(root)?)
        .with_context(|| format!("write {}", spec.display()))?;
    let mut rpmbuild = Command::new("rpmbuild");
    rpmbuild
        // The build requirements are those of the source build (rustup toolchains are not
        // packages); this build needs none of them.
        .args(["-bb", "--build-in-place", "--nodeps"])
        .arg("--define")
        .arg(format!("_topdir {}", topdir.display()))
        .arg("--define")
        .arg(format!("nodeward_prebuilt {}", staged.display()))
        // Stripped already; a debuginfo package would be empty.
        .args(["--define", "debug_package %{nil}"])
        .args(["--target", &format!("{arch}-linux")])
        // rpmbuild's own strip pass must understand the target's ELF files.
        .arg("--define")
        .arg(format!("__strip {}", strip.display()))
        .arg(&spec)
        .current_dir(root);
    step("rpmbuild -bb", &mut rpmbuild)?;

    let rpm = newest_rpm(&topdir.join("RPMS").join(&arch))?;
    let out = args.out.clone().unwrap_or_else(|| root.join("target/rpm"));
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let dest = out.join(rpm.file_name().context("file name")?);
    std::fs::copy(&rpm, &dest).with_context(|| format!("copy to {}", dest.display()))?;
    Ok(dest)
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
pub fn cross_build_env(triple: &str, build: &mut Command) -> anyhow::Result<()> {
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
            bail!(
                "`{gcc}` not found: install the cross compiler (Debian: gcc-{}, libc6-dev-*-cross)",
                triple.replace("-unknown-", "-")
            );
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
        .with_context(|| format!("rpmbuild wrote no .rpm into {}", dir.display()))
}
