//! Helpers of the RPM tests (`rpm_srpm.rs`, `rpm_aarch64.rs`): running xtask's `rpm` and
//! `srpm`, querying packages with `rpm -qp`, and the ground truth about the bundled crates,
//! from `cargo tree` (cargo's own resolver, not xtask's reading of `cargo metadata`).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{agent_binary, skip};

/// The workspace root.
pub const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// Anolis OS 23 ships glibc 2.38 (x86_64 and aarch64): a package may need no newer symbol.
pub const ANOLIS_23_GLIBC: (u32, u32) = (2, 38);

pub use crate::{text, tool};

/// A fresh directory under the temporary directory.
pub fn temp_dir(stem: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nodeward-{stem}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Skips (and returns false) unless each `(tool, Debian package)` is installed.
pub fn have_tools(test: &str, tools: &[(&str, &str)]) -> bool {
    for (t, pkg) in tools {
        if tool(t).is_none() {
            skip(test, &format!("{t} not installed (Debian package `{pkg}`)"));
            return false;
        }
    }
    true
}

/// Runs the xtask binary with `args` and returns the path it prints last (the package).
/// `None` after a skip when xtask is not built. The binary, not `cargo xtask`: cargo holds the
/// build directory's lock while the tests run, so a nested cargo build would wait for ever.
pub fn xtask(test: &str, args: &[&str]) -> Option<PathBuf> {
    let xtask = agent_binary().with_file_name("xtask");
    if !xtask.exists() {
        skip(
            test,
            "target/debug/xtask not built (cargo xtask test builds it)",
        );
        return None;
    }
    let out = Command::new(&xtask)
        .args(args)
        .current_dir(WORKSPACE)
        .output()
        .expect("run xtask");
    assert!(
        out.status.success(),
        "xtask {args:?} failed:\n{}",
        text(&out)
    );
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(PathBuf::from)
        .expect("xtask prints the package path");
    assert!(path.is_file(), "{} missing", path.display());
    Some(path)
}

/// `rpm -qp ARGS PACKAGE`.
pub fn rpm_query(rpm: &Path, args: &[&str]) -> String {
    let out = Command::new("rpm")
        .arg("-qp")
        .args(args)
        .arg(rpm)
        .output()
        .expect("run rpm -qp");
    assert!(out.status.success(), "rpm -qp {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The newest `GLIBC_x.y` among `rpm -qpR` lines.
pub fn newest_glibc(requires: &str) -> (u32, u32) {
    requires
        .split("GLIBC_")
        .skip(1)
        .filter_map(|rest| {
            let v = rest.split(')').next()?;
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .max()
        .expect("the binary links glibc")
}

/// `rpmlint` with the project's profile (the Fedora profile's filters only): its report, and
/// whether it counted 0 errors.
pub fn rpmlint(package: &Path) -> (String, bool) {
    let lint = Command::new("rpmlint")
        .arg("-c")
        .arg(Path::new(WORKSPACE).join("packaging/rpm/rpmlint.toml"))
        .arg(package)
        .output()
        .expect("run rpmlint");
    let report = text(&lint);
    let clean = report.contains(" 0 errors,");
    (report, clean)
}

/// One entry of a package's file list: path, permissions, owner, group, and whether it is a
/// `%config` file.
pub type FileEntry = (String, String, String, String, bool);

/// The package's file list with modes and owners, without the `/usr/lib/.build-id` links rpm
/// derives from the binary's build id (which differs between two builds).
pub fn file_entries(rpm: &Path) -> BTreeSet<FileEntry> {
    rpm_query(
        rpm,
        &[
            "--qf",
            "[%{FILENAMES}\t%{FILEMODES:perms}\t%{FILEUSERNAME}\t%{FILEGROUPNAME}\t%{FILEFLAGS:fflags}\n]",
        ],
    )
    .lines()
    .filter(|l| !l.starts_with("/usr/lib/.build-id"))
    .map(|l| {
        let f: Vec<&str> = l.split('\t').collect();
        assert_eq!(f.len(), 5, "unexpected line {l:?}");
        (
            f[0].to_owned(),
            f[1].to_owned(),
            f[2].to_owned(),
            f[3].to_owned(),
            f[4].contains('c'),
        )
    })
    .collect()
}

/// A crate compiled into the binary, by cargo's resolver: name, version, licence.
pub type TreeCrate = (String, String, String);

/// `cargo tree -p PACKAGE --target TARGET -e normal,no-proc-macro`: the crates cargo compiles
/// into `package` for `target`, with their `license` fields; workspace members left out.
pub fn cargo_tree(package: &str, target: &str) -> BTreeSet<TreeCrate> {
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["tree", "--locked", "-p", package, "--target", target])
        .args([
            "-e",
            "normal,no-proc-macro",
            "--prefix",
            "none",
            "--no-dedupe",
        ])
        .args(["-f", "{p}\t{l}"])
        .current_dir(WORKSPACE)
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (p, license) = l.split_once('\t')?;
            // Workspace members print their path: "agent-ebpf v0.1.0 (/…/agent-ebpf)".
            if p.contains(" (/") {
                return None;
            }
            let mut words = p.split_whitespace();
            let name = words.next()?.to_owned();
            let version = words.next()?.trim_start_matches('v').to_owned();
            Some((name, version, license.trim().to_owned()))
        })
        .collect()
}

/// What an RPM of the agent bundles: the agent on x86_64 and aarch64, the eBPF programs on
/// the bpf target.
pub fn bundled_ground_truth() -> BTreeSet<TreeCrate> {
    let mut all = cargo_tree("nodeward", "x86_64-unknown-linux-gnu");
    all.extend(cargo_tree("nodeward", "aarch64-unknown-linux-gnu"));
    all.extend(cargo_tree("agent-ebpf", "bpfel-unknown-none"));
    all
}
