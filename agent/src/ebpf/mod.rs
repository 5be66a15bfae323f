//! Loading nodeward's eBPF programs and reading their maps.
//!
//! The object file is built by `build.rs` and embedded in the binary. Every program is attached
//! through a link owned by the [`aya::Ebpf`] value that loaded it: dropping that value detaches
//! everything, so a clean shutdown (or a SIGKILL, which closes the file descriptors) leaves
//! nothing attached. Nothing is pinned.

use std::{collections::HashMap, path::Path};

use agent_ebpf::{SetStateOffsets, TcpStateKey};
use aya::{
    maps::{MapError, PerCpuHashMap},
    programs::{ProgramError, TracePoint},
    Ebpf, EbpfError, EbpfLoader,
};

use crate::tracefs::{Format, TracefsError};

pub mod tcp;
pub mod udp;

/// The eBPF object built from `agent-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeward-ebpf"));

/// The maps of the object whose size matters. Each source loads its own copy of the object,
/// which creates every map in it; the maps another source owns are shrunk to one entry.
const SIZED_MAPS: &[&str] = &[
    "TCP_STATE_EVENTS",
    "TCP_CGROUP_STATS",
    "TCP_RTT_HIST",
    "TCP_FLOWS",
    "UDP_FLOWS",
    "RTP_STREAMS",
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
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("tracepoint field `{field}` has size {size}, which the program cannot read")]
    FieldSize { field: &'static str, size: u32 },
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
    /// A load refused before the kernel was asked (fault injection, debug builds).
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
            Self::Tracefs(_)
            | Self::FieldSize { .. }
            | Self::Object(_)
            | Self::MissingMap(_)
            | Self::Config(_)
            | Self::Cgroup { .. }
            | Self::Map { .. } => None,
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, which the programs stamp
/// flows and streams with.
pub fn monotonic_ns() -> u64 {
    // SAFETY: an all-zero timespec is a valid out-parameter.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid clock id and out-pointer; CLOCK_MONOTONIC cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Reads the record layout of `sock:inet_sock_set_state` for the program.
pub fn set_state_offsets(tracefs: &Path) -> Result<SetStateOffsets, LoadError> {
    let format = Format::read(tracefs, "sock", "inet_sock_set_state")?;
    let old = format.field("oldstate")?;
    let new = format.field("newstate")?;
    let proto = format.field("protocol")?;
    for (field, f) in [("oldstate", old), ("newstate", new)] {
        if f.size != 4 {
            return Err(LoadError::FieldSize {
                field,
                size: f.size,
            });
        }
    }
    if proto.size != 1 && proto.size != 2 {
        return Err(LoadError::FieldSize {
            field: "protocol",
            size: proto.size,
        });
    }
    Ok(SetStateOffsets {
        oldstate: old.offset,
        newstate: new.offset,
        protocol: proto.offset,
        protocol_size: proto.size,
    })
}

const TCP_STATE_PROGRAM: &str = "nodeward_tcp_state";
const TCP_STATE_MAP: &str = "TCP_STATE_EVENTS";

/// Counts TCP state transitions per cgroup (`sock:inet_sock_set_state`): the proof that the
/// whole chain (build, embed, load, attach, read) works on this node.
pub struct TcpStateCounter {
    ebpf: Ebpf,
}

impl std::fmt::Debug for TcpStateCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStateCounter").finish_non_exhaustive()
    }
}

impl TcpStateCounter {
    /// Loads and attaches the program. Detached when the value is dropped.
    pub fn attach(tracefs: &Path) -> Result<Self, LoadError> {
        let offsets = set_state_offsets(tracefs)?;
        let mut ebpf = loader_owning(&[TCP_STATE_MAP])
            .override_global("SET_STATE_OFFSETS", &offsets, true)
            .load(OBJECT)?;
        let program: &mut TracePoint = ebpf
            .program_mut(TCP_STATE_PROGRAM)
            .ok_or(LoadError::MissingProgram(TCP_STATE_PROGRAM))?
            .try_into()
            .map_err(|source| LoadError::Program {
                name: TCP_STATE_PROGRAM,
                source,
            })?;
        program.load().map_err(|source| LoadError::Program {
            name: TCP_STATE_PROGRAM,
            source,
        })?;
        program
            .attach("sock", "inet_sock_set_state")
            .map_err(|source| LoadError::Program {
                name: TCP_STATE_PROGRAM,
                source,
            })?;
        Ok(Self { ebpf })
    }

    /// The counters summed over CPUs, by (cgroup id, old state, new state).
    pub fn counts(&self) -> Result<HashMap<TcpStateKey, u64>, LoadError> {
        let map = self
            .ebpf
            .map(TCP_STATE_MAP)
            .ok_or(LoadError::MissingMap(TCP_STATE_MAP))?;
        let map: PerCpuHashMap<_, TcpStateKey, u64> =
            PerCpuHashMap::try_from(map).map_err(|source| LoadError::Map {
                name: TCP_STATE_MAP,
                source,
            })?;
        let mut out = HashMap::new();
        for entry in map.iter() {
            let (key, per_cpu) = entry.map_err(|source| LoadError::Map {
                name: TCP_STATE_MAP,
                source,
            })?;
            out.insert(key, per_cpu.iter().sum());
        }
        Ok(out)
    }

    /// Total transitions counted for one cgroup, optionally only one (old → new) transition.
    pub fn count_for(
        &self,
        cgroup_id: u64,
        transition: Option<(u32, u32)>,
    ) -> Result<u64, LoadError> {
        Ok(self
            .counts()?
            .iter()
            .filter(|(k, _)| k.cgroup_id == cgroup_id)
            .filter(|(k, _)| transition.is_none_or(|(o, n)| k.oldstate == o && k.newstate == n))
            .map(|(_, v)| *v)
            .sum())
    }
}
