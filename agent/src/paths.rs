//! The host paths every layer may need (cgroup, proc, BTF, tracefs): the `[paths]` section,
//! at the bottom of the layers so that the probe and the sources take it without the root
//! config above them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    /// Root of the cgroup filesystem (the host's, when running in a DaemonSet).
    pub cgroup_root: PathBuf,
    /// The proc filesystem (the host's, when running in a DaemonSet).
    pub proc_root: PathBuf,
    /// Kernel BTF, used by the capability probe.
    pub btf: PathBuf,
    /// tracefs mount the capability probe looks in (it reports kprobes and tracepoints; nothing
    /// is mounted or attached there); empty means `/sys/kernel/tracing`, then
    /// `/sys/kernel/debug/tracing`.
    pub tracefs: PathBuf,
}

impl Default for PathsConfig {
    fn default() -> Self {
        Self {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            proc_root: PathBuf::from("/proc"),
            btf: PathBuf::from("/sys/kernel/btf/vmlinux"),
            tracefs: PathBuf::new(),
        }
    }
}
