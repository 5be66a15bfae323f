//! `cargo xtask srpm`: the source RPM a distribution rebuilds with `rpmbuild --rebuild`, offline.
//!
//! It holds three files: the spec, filled in from `packaging/rpm/nodeward.spec.in`; the source
//! tarball (the files git knows of, as they are in the working tree); and a tarball of
//! `cargo vendor` output: every crate of the workspace's lock file (agent-ebpf's aya-ebpf crates
//! with them) and the crates of the standard library workspace in the pinned nightly's
//! `rust-src`, which `-Z build-std=core` resolves for the bpf target even though `core` itself
//! needs none of them. With the vendored crates as cargo's only source the build needs no
//! network and no cargo cache; only the toolchains and bpf-linker come from the build host.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::{bundled, say, setup, step, which};

/// The architectures the spec builds for (`ExclusiveArch`), as cargo target triples: the
/// bundled crates are the union of what the agent links on each.
pub const RPM_TARGETS: [&str; 2] = ["x86_64-unknown-linux-gnu", "aarch64-unknown-linux-gnu"];

const TEMPLATE: &str = "packaging/rpm/nodeward.spec.in";

#[derive(clap::Args)]
pub struct SrpmArgs {
    /// Directory to write the .src.rpm (and a copy of the spec) into [default: target/rpm].
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The spec: the template with the version, the licence expression and `Provides:` of the
/// bundled crates, the toolchain pins and the fallback scriptlets filled in.
pub fn spec(root: &Path) -> anyhow::Result<String> {
    let template =
        std::fs::read_to_string(root.join(TEMPLATE)).with_context(|| format!("read {TEMPLATE}"))?;
    let crates = bundled::rpm_crates(root, &RPM_TARGETS)?;
    let version = crates
        .iter()
        .find(|c| c.local && c.name == "nodeward")
        .map(|c| c.version.clone())
        .context("nodeward is not among the crates it links")?;
    let script = |name: &str| -> anyhow::Result<String> {
        let path = root.join("packaging/rpm").join(name);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        // A scriptlet's text is expanded like the rest of the spec: `%` must be doubled.
        Ok(text.trim_end().replace('%', "%%"))
    };
    let filled = template
        .lines()
        .filter(|l| !l.starts_with("##"))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .replace("@VERSION@", &version)
        .replace("@LICENSE@", &bundled::license_expression(&crates))
        .replace("@BUNDLED_PROVIDES@", &bundled::provides(&crates))
        .replace("@EBPF_TOOLCHAIN@", setup::ebpf_toolchain()?)
        .replace("@BPF_LINKER_VERSION@", setup::BPF_LINKER_VERSION)
        .replace("@POST_INSTALL@", &script("post_install.sh")?)
        .replace("@PRE_UNINSTALL@", &script("pre_uninstall.sh")?)
        .replace("@POST_UNINSTALL@", &script("post_uninstall.sh")?);
    if let Some(left) = placeholder(&filled) {
        bail!("{TEMPLATE} has a placeholder xtask does not fill: @{left}@");
    }
    Ok(filled)
}

/// The first `@NAME@` (capitals and underscores) in `text`.
fn placeholder(text: &str) -> Option<&str> {
    text.split('@')
        .skip(1)
        .step_by(2)
        .find(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
}

/// The files of the source tarball: what git tracks or would track (not ignored), as they are
/// in the working tree; deleted ones are left out.
fn source_files(root: &Path) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(root)
        .output()
        .context("run git ls-files")?;
    if !out.status.success() {
        bail!("git ls-files: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut list = Vec::new();
    let mut names: Vec<&[u8]> = out.stdout.split(|b| *b == 0).collect();
    names.sort_unstable();
    names.dedup();
    for name in names.into_iter().filter(|n| !n.is_empty()) {
        let path = std::str::from_utf8(name).context("a file name that is not UTF-8")?;
        if root.join(path).symlink_metadata().is_ok() {
            list.extend_from_slice(name);
            list.push(0);
        }
    }
    Ok(list)
}

/// `tar` with the options that make the archive independent of who builds it.
fn tar() -> Command {
    let mut cmd = Command::new("tar");
    cmd.args([
        "--sort=name",
        "--owner=0",
        "--group=0",
        "--numeric-owner",
        "--format=gnu",
    ]);
    cmd
}

pub fn run(root: &Path, args: &SrpmArgs) -> anyhow::Result<()> {
    if which("rpmbuild").is_none() {
        bail!("rpmbuild not found: install rpm (Debian) or rpm-build (Anolis)");
    }
    setup::ensure_build_tools()?;
    let spec = spec(root)?;
    let version = spec
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(str::trim)
        .context("the spec has no Version")?
        .to_owned();
    let name_version = format!("nodeward-{version}");

    let topdir = root.join("target/rpm/srpm");
    let sources = topdir.join("SOURCES");
    let specs = topdir.join("SPECS");
    for dir in [&sources, &specs] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let spec_path = specs.join("nodeward.spec");
    std::fs::write(&spec_path, &spec).with_context(|| format!("write {}", spec_path.display()))?;

    // Source0: the tree, under nodeward-VERSION/.
    let list = topdir.join("files.list");
    std::fs::write(&list, source_files(root)?).context("write the file list")?;
    step(
        "source tarball",
        tar()
            .arg(format!("--transform=s,^,{name_version}/,"))
            .arg("-czf")
            .arg(sources.join(format!("{name_version}.tar.gz")))
            .arg("--null")
            .arg("-T")
            .arg(&list)
            .current_dir(root),
    )?;

    // Source1: vendor/, the workspace's crates and those of the nightly's std workspace. The
    // nightly's cargo reads the std workspace manifest (it uses unstable cargo features).
    let nightly = setup::ebpf_toolchain()?;
    let sysroot = Command::new("rustup")
        .args(["run", nightly, "rustc", "--print", "sysroot"])
        .output()
        .with_context(|| format!("rustup run {nightly} rustc --print sysroot"))?;
    let std_manifest = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim())
        .join("lib/rustlib/src/rust/library/Cargo.toml");
    if !std_manifest.is_file() {
        bail!(
            "{} missing: {nightly} needs rust-src",
            std_manifest.display()
        );
    }
    let vendor = topdir.join("vendor");
    step(
        "cargo vendor (workspace and the std workspace of rust-src)",
        Command::new("rustup")
            .args([
                "run",
                nightly,
                "cargo",
                "vendor",
                "--locked",
                "--versioned-dirs",
            ])
            .arg("--sync")
            .arg(&std_manifest)
            .arg(&vendor)
            .current_dir(root)
            .stdout(std::process::Stdio::null()),
    )?;
    step(
        "vendor tarball",
        tar()
            .arg("-czf")
            .arg(sources.join(format!("{name_version}-vendor.tar.gz")))
            .arg("vendor")
            .current_dir(&topdir),
    )?;

    step(
        "rpmbuild -bs",
        Command::new("rpmbuild")
            .args(["-bs", "--nodeps", "--define"])
            .arg(format!("_topdir {}", topdir.display()))
            .arg(&spec_path),
    )?;
    // Named after the dist tag too (`.an23` on Anolis OS 23), so look for it.
    let srpm = std::fs::read_dir(topdir.join("SRPMS"))
        .context("read SRPMS")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&name_version) && n.ends_with(".src.rpm"))
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .context("rpmbuild -bs wrote no source RPM")?;
    let out = args.out.clone().unwrap_or_else(|| root.join("target/rpm"));
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let dest = out.join(srpm.file_name().context("file name")?);
    std::fs::copy(&srpm, &dest).with_context(|| format!("copy to {}", dest.display()))?;
    std::fs::copy(&spec_path, out.join("nodeward.spec")).context("copy the spec")?;
    say(&format!("built {}", dest.display()));
    println!("{}", dest.display());
    Ok(())
}
