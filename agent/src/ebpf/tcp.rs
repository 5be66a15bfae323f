//! The TCP latency programs: load and attach them, read (and trim) their maps. The TCP
//! source (`sources/tcp`) decides which programs and map sizes from its plan and config.
//!
//! The programs attach to the root of the cgroup v2 hierarchy, so they see every socket on
//! the node. aya attaches through a BPF link on kernels ≥ 5.7, and a cgroup link always runs
//! beside other programs there; the kernel rejects the `BPF_F_ALLOW_MULTI` flag on link
//! creation, so the mode passed is `Single` (flags 0).
//! Links belong to the [`aya::Ebpf`] value: dropping the [`Reader`] detaches everything.

use std::{fs::File, os::fd::AsFd as _, path::Path};

use agent_ebpf::{tcp::drop_reason, CgroupTcpStats, FlowState, HistKey};
use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, ProgramError, SockOps,
    },
    Ebpf,
};

use super::{
    batch::{self, BatchError},
    loader_owning, monotonic_ns, LoadError, OBJECT,
};

pub const SOCK_CREATE: &str = "nodeward_sock_create";
pub const TAG_EGRESS: &str = "nodeward_sock_tag_egress";
pub const SOCK_OPS: &str = "nodeward_tcp_sockops";
/// What `NODEWARD_FAULT_INJECT=reject:…` names to refuse the sock_ops program in its listen
/// tagging variant only (`TAG_AT_LISTEN` set), standing in for a verifier that rejects the
/// helper call the other variants leave out.
pub const SOCK_OPS_TAG_AT_LISTEN: &str = "nodeward_tcp_sockops/tag_at_listen";
const STATS: &str = "TCP_CGROUP_STATS";
const HIST: &str = "TCP_RTT_HIST";
const FLOWS: &str = "TCP_FLOWS";
const DROPS: &str = "TCP_DROPS";

/// What one tick read from the kernel maps.
#[derive(Debug, Default)]
pub struct RawRead {
    pub stats: Vec<(u64, CgroupTcpStats)>,
    pub hist: Vec<(HistKey, u64)>,
    pub flows: Vec<(u64, FlowState)>,
    pub drops: [u64; drop_reason::COUNT as usize],
    /// CLOCK_MONOTONIC now, in ns (the clock of `bpf_ktime_get_ns`).
    pub now_ns: u64,
}

/// What to delete from the kernel maps after a tick.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Closed flows whose final numbers were taken.
    pub flows: Vec<u64>,
    /// Cgroups idle for longer than the longest window, with no open connection.
    pub cgroups: Vec<u64>,
    pub hist: Vec<HistKey>,
}

/// Which programs to attach and how large the maps are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attach {
    /// Record the creating task's cgroup at `socket()` (`cgroup/sock_create`).
    pub sock_create: bool,
    /// Record a listener's cgroup at `listen()`, in the sock_ops program itself
    /// (`BPF_SOCK_OPS_TCP_LISTEN_CB`; needs `bpf_get_current_cgroup_id` in sock_ops).
    pub tag_at_listen: bool,
    /// Record the cgroup of the socket that sends the first packet (`cgroup_skb/egress`).
    pub egress: bool,
    /// Key by the socket's network-namespace cookie instead of its cgroup.
    pub key_by_netns: bool,
    /// Count samples taken while another cgroup's task ran.
    pub count_foreign_context: bool,
    /// Which RTT a sample takes: one of `agent_ebpf::tcp::rtt_method` (`tcp.rtt_method`
    /// resolved); `SEGMENT` needs `egress`.
    pub rtt_method: u32,
    pub max_cgroups: u32,
    pub max_hist_entries: u32,
    pub max_flows: u32,
}

/// Asks the fault-injection hook whether `name` may be loaded (always yes without the
/// `fault-injection` feature, which release builds leave off).
fn may_load(name: &'static str) -> Result<(), LoadError> {
    #[cfg(feature = "fault-injection")]
    crate::fault::reject(name).map_err(|reason| LoadError::Refused { name, reason })?;
    #[cfg(not(feature = "fault-injection"))]
    let _ = name;
    Ok(())
}

/// [`may_load`] for one variant of program `name` (its globals set a certain way): the fault
/// names the variant, the error the program.
fn may_load_variant(variant: &'static str, name: &'static str) -> Result<(), LoadError> {
    #[cfg(feature = "fault-injection")]
    crate::fault::reject(variant).map_err(|reason| LoadError::Refused { name, reason })?;
    #[cfg(not(feature = "fault-injection"))]
    let _ = (variant, name);
    Ok(())
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> LoadError {
    move |source| LoadError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl Fn(ProgramError) -> LoadError {
    move |source| LoadError::Program { name, source }
}

/// Entries in each kernel map now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapUsage {
    pub flows: usize,
    pub cgroups: usize,
    pub hist: usize,
}

/// How many ticks read the flow map in batches, and how many walked it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowReads {
    pub batched: u64,
    pub walked: u64,
    /// The kernel refused the batch lookup once: every later read walks.
    pub batch_unsupported: bool,
}

pub struct Reader {
    ebpf: Ebpf,
    flow_reads: FlowReads,
    /// Flows the last read found: the next read's buffer is sized from it rather than grown
    /// by doubling (a 42 MiB buffer and its 21 MiB predecessor at once, at 200,000 flows).
    last_flows: usize,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

impl Reader {
    /// Loads the programs `how` names with its map sizes and attaches them to `cgroup_root`.
    pub fn attach(cgroup_root: &Path, how: &Attach) -> Result<Self, LoadError> {
        super::require_cgroup_links()?;
        let root = File::open(cgroup_root).map_err(|source| LoadError::Cgroup {
            path: cgroup_root.to_path_buf(),
            source,
        })?;
        let count_foreign = u32::from(how.count_foreign_context);
        let key_by_netns = u32::from(how.key_by_netns);
        let tag_at_listen = u32::from(how.tag_at_listen);
        let rtt_method = how.rtt_method;
        let mut ebpf = loader_owning(&[STATS, HIST, FLOWS])
            .map_max_entries(STATS, how.max_cgroups)
            .map_max_entries(HIST, how.max_hist_entries)
            .map_max_entries(FLOWS, how.max_flows)
            .override_global("COUNT_FOREIGN_CONTEXT", &count_foreign, true)
            .override_global("KEY_BY_NETNS", &key_by_netns, true)
            .override_global("TAG_AT_LISTEN", &tag_at_listen, true)
            .override_global("RTT_METHOD", &rtt_method, true)
            .load(OBJECT)?;
        // The tagging program first: a socket created between the two attachments is then
        // still recorded.
        let (create, egress) = (how.sock_create, how.egress);
        if egress {
            let tag: &mut CgroupSkb = ebpf
                .program_mut(TAG_EGRESS)
                .ok_or(LoadError::MissingProgram(TAG_EGRESS))?
                .try_into()
                .map_err(prog_err(TAG_EGRESS))?;
            may_load(TAG_EGRESS)?;
            tag.load().map_err(prog_err(TAG_EGRESS))?;
            tag.attach(&root, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
                .map_err(prog_err(TAG_EGRESS))?;
        }
        if create {
            let prog: &mut CgroupSock = ebpf
                .program_mut(SOCK_CREATE)
                .ok_or(LoadError::MissingProgram(SOCK_CREATE))?
                .try_into()
                .map_err(prog_err(SOCK_CREATE))?;
            may_load(SOCK_CREATE)?;
            prog.load().map_err(prog_err(SOCK_CREATE))?;
            prog.attach(&root, CgroupAttachMode::Single)
                .map_err(prog_err(SOCK_CREATE))?;
        }
        let ops: &mut SockOps = ebpf
            .program_mut(SOCK_OPS)
            .ok_or(LoadError::MissingProgram(SOCK_OPS))?
            .try_into()
            .map_err(prog_err(SOCK_OPS))?;
        may_load(SOCK_OPS)?;
        if how.tag_at_listen {
            may_load_variant(SOCK_OPS_TAG_AT_LISTEN, SOCK_OPS)?;
        }
        ops.load().map_err(prog_err(SOCK_OPS))?;
        ops.attach(&root, CgroupAttachMode::Single)
            .map_err(prog_err(SOCK_OPS))?;
        Ok(Self {
            ebpf,
            flow_reads: FlowReads::default(),
            last_flows: 0,
        })
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, LoadError> {
        self.ebpf.map(name).ok_or(LoadError::MissingMap(name))
    }

    /// How the flow map was read so far.
    pub fn flow_reads(&self) -> FlowReads {
        self.flow_reads
    }

    /// Appends the flow map's entries: in batches, or by walking it where the kernel has no
    /// batch lookup (counted, and logged once).
    fn read_flows(&mut self, out: &mut Vec<(u64, FlowState)>) -> Result<(), LoadError> {
        let map = self.ebpf.map(FLOWS).ok_or(LoadError::MissingMap(FLOWS))?;
        // Checks the key and value sizes against the types, which the batch read relies on.
        let flows: BpfHashMap<&MapData, u64, FlowState> =
            BpfHashMap::try_from(map).map_err(map_err(FLOWS))?;
        if !self.flow_reads.batch_unsupported {
            let (Map::LruHashMap(data) | Map::HashMap(data)) = map else {
                return Err(LoadError::MissingMap(FLOWS));
            };
            match batch::lookup_all(data.fd().as_fd(), batch::CHUNK, out) {
                Ok(()) => {
                    self.flow_reads.batched += 1;
                    return Ok(());
                }
                Err(BatchError::Unsupported(e)) => {
                    tracing::warn!(error = %e, "the kernel has no batch lookup for the TCP flow map: it is walked entry by entry from now on (two syscalls per flow)");
                    self.flow_reads.batch_unsupported = true;
                }
                Err(source) => {
                    return Err(LoadError::Batch {
                        name: FLOWS,
                        source,
                    })
                }
            }
        }
        // An entry evicted between listing and lookup reads as an error: skip it.
        out.extend(flows.iter().flatten());
        self.flow_reads.walked += 1;
        Ok(())
    }

    /// Reads every map once. `now_ns` is CLOCK_MONOTONIC, the clock the programs stamp with.
    pub fn read(&mut self) -> Result<RawRead, LoadError> {
        let mut raw = RawRead {
            now_ns: monotonic_ns(),
            ..RawRead::default()
        };
        let stats: PerCpuHashMap<&MapData, u64, CgroupTcpStats> =
            PerCpuHashMap::try_from(self.map(STATS)?).map_err(map_err(STATS))?;
        for entry in stats.iter() {
            let (id, per_cpu) = entry.map_err(map_err(STATS))?;
            let mut sum = CgroupTcpStats::default();
            for s in per_cpu.iter() {
                sum += *s;
            }
            raw.stats.push((id, sum));
        }
        let hist: PerCpuHashMap<&MapData, HistKey, u64> =
            PerCpuHashMap::try_from(self.map(HIST)?).map_err(map_err(HIST))?;
        for entry in hist.iter() {
            let (key, per_cpu) = entry.map_err(map_err(HIST))?;
            raw.hist.push((key, per_cpu.iter().sum()));
        }
        raw.flows
            .reserve_exact(self.last_flows + self.last_flows / 16);
        self.read_flows(&mut raw.flows)?;
        self.last_flows = raw.flows.len();
        let drops: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.map(DROPS)?).map_err(map_err(DROPS))?;
        for i in 0..drop_reason::COUNT {
            let per_cpu = drops.get(&i, 0).map_err(map_err(DROPS))?;
            if let Some(slot) = raw.drops.get_mut(i as usize) {
                *slot = per_cpu.iter().sum();
            }
        }
        Ok(raw)
    }

    /// Counts the entries of each map: the flow map in batches where the kernel allows (a walk
    /// of keys restarts from the first when its cursor is deleted meanwhile, and counts some
    /// entries twice under churn), the small ones by walking their keys.
    pub fn usage(&self) -> Result<MapUsage, LoadError> {
        let flows: BpfHashMap<&MapData, u64, FlowState> =
            BpfHashMap::try_from(self.map(FLOWS)?).map_err(map_err(FLOWS))?;
        let stats: PerCpuHashMap<&MapData, u64, CgroupTcpStats> =
            PerCpuHashMap::try_from(self.map(STATS)?).map_err(map_err(STATS))?;
        let hist: PerCpuHashMap<&MapData, HistKey, u64> =
            PerCpuHashMap::try_from(self.map(HIST)?).map_err(map_err(HIST))?;
        let batched = match self.ebpf.map(FLOWS) {
            Some(Map::LruHashMap(data) | Map::HashMap(data))
                if !self.flow_reads.batch_unsupported =>
            {
                batch::count::<u64, FlowState>(data.fd().as_fd(), batch::CHUNK).ok()
            }
            _ => None,
        };
        Ok(MapUsage {
            flows: batched.unwrap_or_else(|| flows.keys().flatten().count()),
            cgroups: stats.keys().flatten().count(),
            hist: hist.keys().flatten().count(),
        })
    }

    /// Deletes closed flows and idle cgroups. A missing key is not an error (LRU eviction).
    pub fn clean(&mut self, cleanup: &Cleanup) -> Result<(), LoadError> {
        let map = self
            .ebpf
            .map_mut(FLOWS)
            .ok_or(LoadError::MissingMap(FLOWS))?;
        let mut flows: BpfHashMap<&mut MapData, u64, FlowState> =
            BpfHashMap::try_from(map).map_err(map_err(FLOWS))?;
        for cookie in &cleanup.flows {
            let _ = flows.remove(cookie);
        }
        let map = self
            .ebpf
            .map_mut(STATS)
            .ok_or(LoadError::MissingMap(STATS))?;
        let mut stats: PerCpuHashMap<&mut MapData, u64, CgroupTcpStats> =
            PerCpuHashMap::try_from(map).map_err(map_err(STATS))?;
        for id in &cleanup.cgroups {
            let _ = stats.remove(id);
        }
        let map = self.ebpf.map_mut(HIST).ok_or(LoadError::MissingMap(HIST))?;
        let mut hist: PerCpuHashMap<&mut MapData, HistKey, u64> =
            PerCpuHashMap::try_from(map).map_err(map_err(HIST))?;
        for key in &cleanup.hist {
            let _ = hist.remove(key);
        }
        Ok(())
    }
}
