//! The fake `libnvidia-ml.so.1` (`tests/fake-nvml/fake_nvml.c`), built per test into a
//! directory of its own so that parallel tests never share a library instance or a script.
//! The library reads `fake_nvml.script` next to itself; see the C file for the keys.

use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use nodeward::{
    config::Config,
    sources::gpu::{model::DeviceStats, Gpu, GpuSnapshot},
};

use crate::skip;

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

    /// The library's call counts, when the script has `record_calls = 1` (zeros before the
    /// first call).
    pub fn calls(&self) -> Calls {
        let text = std::fs::read_to_string(self.dir.join("fake_nvml.calls")).unwrap_or_default();
        let mut calls = Calls::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(name), Some(n)) = (words.next(), words.next().and_then(|n| n.parse().ok()))
            else {
                continue;
            };
            match name {
                "init" => calls.init = n,
                "shutdown" => calls.shutdown = n,
                "count" => calls.count = n,
                _ => {}
            }
        }
        calls
    }

    /// `gpu.library` as a string.
    pub fn library_str(&self) -> String {
        self.library.display().to_string()
    }

    /// The default config with `gpu.library` pointing at this fake.
    pub fn config(&self) -> Config {
        let mut config = Config::default();
        config.gpu.library = self.library_str();
        config
    }

    /// Opens the GPU source on this fake; panics if it cannot.
    pub fn open(&self) -> Gpu {
        let config = self.config();
        Gpu::open(&config.gpu, &config.paths.proc_root).expect("the fake NVML opens")
    }
}

/// How often the fake's library-wide functions were called (`record_calls = 1`), across
/// unloads and loads of the library: the ground truth for re-initialisation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls {
    pub init: u64,
    pub shutdown: u64,
    /// `nvmlDeviceGetCount_v2`: once per poll after start-up, and what `@count N` counts.
    pub count: u64,
}

/// A script in which `devices` GPUs answer every call the source makes (one active NVLink
/// link, two compute processes, one sample each): what a benchmark of one poll should time.
pub fn every_field_script(devices: u32) -> String {
    format!("devices = {devices}\n{}", EVERY_FIELD)
}

/// `tests/fake-nvml/every-field.script`, shared with `cargo xtask bench`.
pub const EVERY_FIELD: &str = include_str!("../fake-nvml/every-field.script");

/// Builds the fake for `test`, or records why it cannot be built here (the test then returns).
pub fn fake(test: &str, defines: &[&str]) -> Option<FakeNvml> {
    match FakeNvml::build(test, defines) {
        Ok(f) => Some(f),
        Err(reason) => {
            skip(test, &reason);
            None
        }
    }
}

/// The device with NVML index `index` in a snapshot; panics if it is missing.
pub fn device(snapshot: &GpuSnapshot, index: u32) -> &DeviceStats {
    snapshot
        .devices
        .iter()
        .find(|d| d.index == index)
        .unwrap_or_else(|| panic!("device {index} missing from {:?}", snapshot.devices))
}

impl Drop for FakeNvml {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
