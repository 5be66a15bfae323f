//! The container image as the tests build it: `packaging/image/build.sh` (what `cargo xtask
//! image` runs) from the RPM of the release binary, with podman's and buildah's storage (vfs) and state in
//! a directory of the test's own, removed afterwards. Podman runs containers with runc (crun
//! refuses this VM's hybrid cgroup layout) and the cgroupfs manager (systemd is not PID 1 here).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{agent_binary, is_root, tool};

pub const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

pub fn path(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

/// The release binary `cargo xtask test` builds first (as packaging.rs expects it).
pub fn release_binary() -> PathBuf {
    let bin = agent_binary()
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/nodeward")
        .join("release/nodeward");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --release -p nodeward, or cargo xtask test)",
        bin.display()
    );
    bin
}

/// Why this machine cannot build and run the image, if it cannot.
pub fn missing_tools() -> Option<String> {
    if !is_root() {
        return Some("needs root (buildah mount, podman with host PID and capabilities)".into());
    }
    let missing: Vec<&str> = [
        "buildah", "podman", "runc", "ldd", "strip", "rpmbuild", "rpm2cpio", "cpio",
    ]
    .into_iter()
    .filter(|t| tool(t).is_none())
    .collect();
    (!missing.is_empty()).then(|| {
        format!("{missing:?} not installed (Debian packages buildah, podman, runc, rpm, cpio: cargo xtask test installs them)")
    })
}

/// Podman and buildah with storage and state in a directory of this test's own.
pub struct Containers {
    pub dir: PathBuf,
    pub tag: String,
}

impl Containers {
    pub fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("nodeward-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the storage directory");
        std::fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{0}/graph\"\nrunroot = \"{0}/run\"\n",
                dir.display()
            ),
        )
        .expect("write storage.conf");
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 runtime = \"runc\"\ntmp_dir = \"{}/tmp\"\n",
                dir.display()
            ),
        )
        .expect("write containers.conf");
        Self {
            tag: format!("localhost/nodeward:{test}-{}", std::process::id()),
            dir,
        }
    }

    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("TMPDIR", &self.dir);
        c
    }

    /// `program args`, which must succeed; its stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Builds the image as `cargo xtask image` does: the RPM of the release binary (`xtask rpm
    /// --prebuilt`), then `build.sh` on it. The RPM's path; `None` after a skip (xtask not built).
    pub fn build(&self, test: &str) -> Option<PathBuf> {
        let out_dir = self.dir.join("rpm");
        let binary = release_binary();
        let rpm = crate::rpm::xtask(
            test,
            &[
                "rpm",
                "--prebuilt",
                &binary.to_string_lossy(),
                "--out",
                &out_dir.to_string_lossy(),
            ],
        )?;
        let out = self
            .command("sh")
            .arg(path("packaging/image/build.sh"))
            .arg(&rpm)
            .arg(&self.tag)
            .output()
            .expect("run packaging/image/build.sh");
        assert!(
            out.status.success(),
            "build.sh: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(rpm)
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        let _ = self.command("podman").args(["rm", "-af"]).output();
        let _ = self.command("buildah").args(["rm", "-a"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub use crate::text;
