//! The fake `libnvidia-ml.so.1` (`tests/fake-nvml/fake_nvml.c`), built per test into a
//! directory of its own so that parallel tests never share a library instance or a script.
//! The library reads `fake_nvml.script` next to itself; see the C file for the keys.

use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// The C source of the fake library.
pub const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fake-nvml/fake_nvml.c");

/// A compiled fake NVML library and its script; the directory is removed on drop.
#[derive(Debug)]
pub struct FakeNvml {
    pub dir: PathBuf,
    /// Pass this as `gpu.library`.
    pub library: PathBuf,
}

impl FakeNvml {
    /// Compiles the library with `cc` and extra flags (e.g. `-DFAKE_OMIT_INIT`). `Err` says
    /// why it cannot be built here (no C compiler): the caller skips with that reason.
    pub fn build(stem: &str, defines: &[&str]) -> Result<Self, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nodeward-fake-nvml-{stem}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let library = dir.join("libnvidia-ml.so.1");
        let output = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
            .arg(&library)
            .arg(SOURCE)
            .args(defines)
            .output()
            .map_err(|e| format!("no C compiler (`cc`): {e}"))?;
        if !output.status.success() {
            // The source is ours: a compile error is a bug, not a missing tool.
            panic!(
                "cc failed on {SOURCE}:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(Self { dir, library })
    }

    /// Replaces the script; the library sees it at its next nvmlDeviceGetCount or event wait.
    /// Written to a new file and renamed, so the library never reads half a script.
    pub fn script(&self, text: &str) {
        let tmp = self.dir.join("fake_nvml.script.new");
        std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        std::fs::rename(&tmp, self.dir.join("fake_nvml.script"))
            .unwrap_or_else(|e| panic!("rename script: {e}"));
    }

    /// `gpu.library` as a string.
    pub fn library_str(&self) -> String {
        self.library.display().to_string()
    }
}

impl Drop for FakeNvml {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
