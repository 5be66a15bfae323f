//! Loading nodeward's eBPF programs and reading their maps.
//!
//! The object file is built by `build.rs` and embedded in the binary. Every program is attached
//! through a link owned by the [`aya::Ebpf`] value that loaded it: dropping that value detaches
//! everything, so a clean shutdown (or a SIGKILL, which closes the file descriptors) leaves
//! nothing attached. Nothing is pinned. Where the kernel has no links for cgroups (before 5.7)
//! nothing is attached at all: [`require_cgroup_links`] refuses first.

use aya::{maps::MapError, programs::ProgramError, EbpfError, EbpfLoader};

pub mod batch;
pub mod cgroup_link;
pub mod tcp;
pub mod udp;

/// The eBPF object built from `agent-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeward-ebpf"));

/// The maps of the object whose size matters. Each source loads its own copy of the object,
/// which creates every map in it; the maps another source owns are shrunk to one entry.
const SIZED_MAPS: &[&str] = &[
    "TCP_CGROUP_STATS",
    "TCP_RTT_HIST",
    "TCP_FLOWS",
    "UDP_FLOWS",
    "RTP_STREAMS",
    "UDP_FLOW_PROBATION",
    "RTP_STREAM_PROBATION",
    "RTCP_REPORTS",
];

/// A loader for a source that owns the maps `owned`: every other sized map gets one entry,
/// so unused copies cost no kernel memory. Set the owned maps' sizes on the returned loader.
pub fn loader_owning(owned: &[&str]) -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    for name in SIZED_MAPS.iter().filter(|m| !owned.contains(m)) {
        loader.map_max_entries(name, 1);
    }
    loader
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object failed: {0}")]
    Object(#[from] EbpfError),
    #[error("program `{0}` is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map `{0}` is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program `{name}`: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("map `{name}`: {source}")]
    Batch {
        name: &'static str,
        source: batch::BatchError,
    },
    /// The kernel cannot attach cgroup programs through a link (see [`cgroup_link`]).
    #[error("{0}")]
    NoCgroupLink(String),
    /// A load refused before the kernel was asked (fault injection, a test-only feature).
    #[error("program `{name}`: {reason}")]
    Refused { name: &'static str, reason: String },
}

impl LoadError {
    /// The program whose load or attachment failed, if one did.
    pub fn program(&self) -> Option<&'static str> {
        match self {
            Self::MissingProgram(name)
            | Self::Program { name, .. }
            | Self::Refused { name, .. } => Some(name),
            Self::Object(_)
            | Self::MissingMap(_)
            | Self::Config(_)
            | Self::Cgroup { .. }
            | Self::Map { .. }
            | Self::Batch { .. }
            | Self::NoCgroupLink(_) => None,
        }
    }
}

/// Refuses to go on where cgroup programs would be attached without a link (kernels before
/// 5.7): such an attachment outlives the agent.
pub fn require_cgroup_links() -> Result<(), LoadError> {
    match cgroup_link::check() {
        cgroup_link::CgroupAttach::Link => Ok(()),
        cgroup_link::CgroupAttach::Refused(why) => Err(LoadError::NoCgroupLink(why)),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, which the programs stamp
/// flows and streams with.
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
