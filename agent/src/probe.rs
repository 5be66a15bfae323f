//! The start-up capability probe: which kernel features this node has.
//!
//! Collectors read the result to choose their hooks and to degrade with a stated reason
//! instead of failing. The probe only looks; it changes nothing on the host.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use aya::{
    programs::ProgramType,
    sys::{is_helper_supported, is_program_supported, BpfHelper},
};
use serde::Serialize;

use crate::{ebpf::cgroup_link::CgroupAttach, paths::PathsConfig};

/// Where tracefs is mounted: `configured` if it is non-empty, else the usual two places. The
/// probe only reports it (kprobes, tracepoints); no program the agent attaches goes through
/// tracefs, so nothing mounts it.
fn locate_tracefs(configured: &Path) -> Option<PathBuf> {
    if !configured.as_os_str().is_empty() {
        return configured
            .join("events")
            .is_dir()
            .then(|| configured.to_path_buf());
    }
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

/// How cgroups are mounted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "layout", rename_all = "snake_case")]
pub enum CgroupLayout {
    /// Pure cgroup v2 at the root.
    V2 { unified: PathBuf },
    /// v1 controllers at the root, a v2 hierarchy (without controllers) beside them.
    Hybrid { unified: PathBuf },
    /// v1 only: no cgroup v2 ids, so eBPF attribution falls back to network namespaces.
    V1,
    /// Nothing recognisable at the configured root.
    Unknown { reason: String },
}

impl CgroupLayout {
    /// The cgroup v2 hierarchy, whose directory inode numbers are the ids eBPF reports.
    pub fn unified(&self) -> Option<&Path> {
        match self {
            Self::V2 { unified } | Self::Hybrid { unified } => Some(unified),
            Self::V1 | Self::Unknown { .. } => None,
        }
    }
}

/// The result of one probe: a feature and whether it is there (with the reason when not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Feature {
    pub available: bool,
    pub detail: String,
}

impl Feature {
    fn yes(detail: impl Into<String>) -> Self {
        Self {
            available: true,
            detail: detail.into(),
        }
    }
    fn no(detail: impl Into<String>) -> Self {
        Self {
            available: false,
            detail: detail.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    pub kernel_release: String,
    pub is_root: bool,
    pub btf: Feature,
    pub tracefs: Option<PathBuf>,
    pub kprobes: Feature,
    pub cgroup: CgroupLayout,
    /// Program types the kernel loads, by aya's name for them.
    pub program_types: BTreeMap<String, Feature>,
    /// Helpers, as `program_type/helper`.
    pub helpers: BTreeMap<String, Feature>,
    /// Tracepoints, as `system:event`.
    pub tracepoints: BTreeMap<String, Feature>,
    pub bpf_stats_enabled: Feature,
    /// Whether cgroup programs can be attached through a `bpf_link` that ends with the agent
    /// (Linux 5.7+); without it no cgroup program is attached (`ebpf::cgroup_link`).
    pub cgroup_link: Feature,
}

const PROGRAM_TYPES: &[(&str, ProgramType)] = &[
    ("tracepoint", ProgramType::TracePoint),
    ("raw_tracepoint", ProgramType::RawTracePoint),
    ("kprobe", ProgramType::KProbe),
    ("tracing (fentry/fexit, tp_btf)", ProgramType::Tracing),
    ("sock_ops", ProgramType::SockOps),
    ("cgroup_skb", ProgramType::CgroupSkb),
    ("sched_cls (tc)", ProgramType::SchedClassifier),
    ("cgroup_sock", ProgramType::CgroupSock),
];

const HELPERS: &[(&str, ProgramType, BpfHelper)] = &[
    (
        "tracepoint/get_current_cgroup_id",
        ProgramType::TracePoint,
        BpfHelper::BPF_FUNC_get_current_cgroup_id,
    ),
    (
        "tracepoint/ringbuf_output",
        ProgramType::TracePoint,
        BpfHelper::BPF_FUNC_ringbuf_output,
    ),
    (
        "cgroup_skb/sk_cgroup_id",
        ProgramType::CgroupSkb,
        BpfHelper::BPF_FUNC_sk_cgroup_id,
    ),
    (
        "cgroup_skb/skb_cgroup_id",
        ProgramType::CgroupSkb,
        BpfHelper::BPF_FUNC_skb_cgroup_id,
    ),
    (
        "sched_cls/skb_cgroup_id",
        ProgramType::SchedClassifier,
        BpfHelper::BPF_FUNC_skb_cgroup_id,
    ),
    (
        "sock_ops/sk_storage_get",
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_sk_storage_get,
    ),
    // TCP latency (sources/tcp): how a socket's cgroup can reach the sock_ops program.
    (
        "sock_ops/get_current_cgroup_id",
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_get_current_cgroup_id,
    ),
    (
        "sock_ops/get_socket_cookie",
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_get_socket_cookie,
    ),
    (
        "sock_ops/get_netns_cookie",
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_get_netns_cookie,
    ),
    (
        "cgroup_sock/get_current_cgroup_id",
        ProgramType::CgroupSock,
        BpfHelper::BPF_FUNC_get_current_cgroup_id,
    ),
    (
        "cgroup_sock/sk_storage_get",
        ProgramType::CgroupSock,
        BpfHelper::BPF_FUNC_sk_storage_get,
    ),
    (
        "cgroup_skb/sk_storage_get",
        ProgramType::CgroupSkb,
        BpfHelper::BPF_FUNC_sk_storage_get,
    ),
];

const TRACEPOINTS: &[(&str, &str)] = &[
    ("sock", "inet_sock_set_state"),
    ("tcp", "tcp_probe"),
    ("tcp", "tcp_retransmit_skb"),
    ("tcp", "tcp_destroy_sock"),
];

impl Capabilities {
    /// Probes this host. Takes a second or less: each program-type and helper check loads a
    /// two-instruction program.
    pub fn probe(paths: &PathsConfig) -> Self {
        let is_root = rustix::process::geteuid().is_root();
        let kernel_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("unknown ({e})"));
        let btf = match std::fs::metadata(&paths.btf) {
            Ok(m) => Feature::yes(format!("{} ({} KiB)", paths.btf.display(), m.len() / 1024)),
            Err(e) => Feature::no(format!("{}: {e}", paths.btf.display())),
        };
        let tracefs = locate_tracefs(&paths.tracefs);
        let kprobes = match &tracefs {
            Some(t) if t.join("kprobe_events").exists() => Feature::yes("kprobe_events present"),
            Some(_) => {
                Feature::no("no kprobe_events in tracefs (kernel built without CONFIG_KPROBES)")
            }
            None => Feature::no("tracefs not mounted"),
        };
        let tracepoints = TRACEPOINTS
            .iter()
            .map(|(sys, ev)| {
                let f = match &tracefs {
                    Some(t) if t.join("events").join(sys).join(ev).is_dir() => {
                        Feature::yes("present")
                    }
                    Some(_) => Feature::no("not in this kernel"),
                    None => Feature::no("tracefs not mounted"),
                };
                (format!("{sys}:{ev}"), f)
            })
            .collect();
        let program_types = PROGRAM_TYPES
            .iter()
            .map(|(name, ty)| {
                let f = match is_program_supported(*ty) {
                    Ok(true) => Feature::yes("loads"),
                    Ok(false) => Feature::no("rejected by the kernel"),
                    Err(e) => Feature::no(format!("could not be probed: {e}")),
                };
                ((*name).to_owned(), f)
            })
            .collect();
        let helpers = HELPERS
            .iter()
            .map(|(name, ty, helper)| {
                let f = match is_helper_supported(*ty, *helper) {
                    Ok(true) => Feature::yes("available"),
                    Ok(false) => Feature::no("unknown to the kernel's verifier"),
                    Err(e) => Feature::no(format!("probe failed: {e}")),
                };
                ((*name).to_owned(), f)
            })
            .collect();
        let bpf_stats_enabled = match std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        {
            Ok(s) if s.trim() == "1" => Feature::yes("kernel.bpf_stats_enabled=1"),
            Ok(_) => Feature::no("kernel.bpf_stats_enabled=0"),
            Err(e) => Feature::no(format!("unreadable: {e}")),
        };
        let cgroup_link = match crate::ebpf::cgroup_link::check() {
            CgroupAttach::Link => Feature::yes("BPF_LINK_CREATE for cgroups"),
            CgroupAttach::Refused(why) => Feature::no(why),
        };
        Self {
            kernel_release,
            is_root,
            cgroup_link,
            btf,
            tracefs,
            kprobes,
            cgroup: cgroup_layout(&paths.cgroup_root),
            program_types,
            helpers,
            tracepoints,
            bpf_stats_enabled,
        }
    }

    /// A one-screen summary for the log and `nodeward probe`.
    pub fn summary(&self) -> String {
        let mark = |f: &Feature| if f.available { "yes" } else { "no " };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "kernel {} (running as {})",
            self.kernel_release,
            if self.is_root { "root" } else { "non-root" }
        );
        let _ = writeln!(
            s,
            "  BTF             {} {}",
            mark(&self.btf),
            self.btf.detail
        );
        let _ = writeln!(
            s,
            "  tracefs         {}",
            self.tracefs
                .as_ref()
                .map_or("not mounted".to_owned(), |p| p.display().to_string())
        );
        let _ = writeln!(
            s,
            "  kprobes         {} {}",
            mark(&self.kprobes),
            self.kprobes.detail
        );
        let cg = match &self.cgroup {
            CgroupLayout::V2 { unified } => format!("v2 at {}", unified.display()),
            CgroupLayout::Hybrid { unified } => {
                format!("hybrid: v1 controllers, v2 at {}", unified.display())
            }
            CgroupLayout::V1 => "v1 only (attribution by network namespace)".to_owned(),
            CgroupLayout::Unknown { reason } => format!("unknown: {reason}"),
        };
        let _ = writeln!(s, "  cgroups         {cg}");
        let _ = writeln!(
            s,
            "  cgroup links    {} {}",
            mark(&self.cgroup_link),
            self.cgroup_link.detail
        );
        for (title, map) in [
            ("program types", &self.program_types),
            ("helpers", &self.helpers),
            ("tracepoints", &self.tracepoints),
        ] {
            let _ = writeln!(s, "  {title}:");
            for (name, f) in map {
                let _ = writeln!(s, "    {} {name} ({})", mark(f), f.detail);
            }
        }
        let _ = write!(
            s,
            "  bpf stats       {} {}",
            mark(&self.bpf_stats_enabled),
            self.bpf_stats_enabled.detail
        );
        s
    }

    pub fn has_program_type(&self, name: &str) -> bool {
        self.program_types.get(name).is_some_and(|f| f.available)
    }

    pub fn has_tracepoint(&self, name: &str) -> bool {
        self.tracepoints.get(name).is_some_and(|f| f.available)
    }
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[expect(
    clippy::useless_conversion,
    reason = "f_type is i64 on x86_64 glibc but narrower on other targets"
)]
fn fs_magic(path: &Path) -> Option<i64> {
    rustix::fs::statfs(path).ok().map(|st| i64::from(st.f_type))
}

/// Recognises pure v2, hybrid (v2 at `<root>/unified`) and v1-only layouts.
pub fn cgroup_layout(root: &Path) -> CgroupLayout {
    match fs_magic(root) {
        Some(CGROUP2_SUPER_MAGIC) => CgroupLayout::V2 {
            unified: root.to_path_buf(),
        },
        Some(_) => {
            let unified = root.join("unified");
            if fs_magic(&unified) == Some(CGROUP2_SUPER_MAGIC) {
                CgroupLayout::Hybrid { unified }
            } else if root.join("cpu").exists() || root.join("memory").exists() {
                CgroupLayout::V1
            } else {
                CgroupLayout::Unknown {
                    reason: format!("{} is neither cgroup2 nor a v1 hierarchy", root.display()),
                }
            }
        }
        None => CgroupLayout::Unknown {
            reason: format!("{} cannot be read", root.display()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_cgroup_root_is_unknown_with_reason() {
        match cgroup_layout(Path::new("/nonexistent/cgroup")) {
            CgroupLayout::Unknown { reason } => assert!(reason.contains("/nonexistent/cgroup")),
            other => panic!("expected Unknown, got {other:?}"),
        }
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup_hierarchy() {
        let dir = std::env::temp_dir();
        assert!(matches!(cgroup_layout(&dir), CgroupLayout::Unknown { .. }));
    }
}
