//! The TCP latency programs: load and attach them, read (and trim) their maps. The TCP
//! source (`sources/tcp`) decides which programs and map sizes from its plan and config.
//!
//! The programs attach to the root of the cgroup v2 hierarchy, so they see every socket on
//! the node. aya attaches through a BPF link on kernels ≥ 5.7, and a cgroup link always runs
//! beside other programs there; the kernel rejects the `BPF_F_ALLOW_MULTI` flag on link
//! creation, so the mode passed is `Single` (flags 0).
//! Links belong to the [`aya::Ebpf`] value: dropping the [`Reader`] detaches everything.

use std::{fs::File, os::fd::AsFd as _, path::Path};

use agent_ebpf::{tcp::drop_reason, CgroupTcpStats, FlowState, HistKey, HistRow};
use aya::{
    maps::{
        Array, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues, Queue,
    },
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
const SLOTS: &str = "TCP_SLOTS";
const OWNER: &str = "TCP_SLOT_OWNER";
const FREE: &str = "TCP_FREE_SLOTS";
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
    /// Cgroups idle for longer than the longest window, with no open connection: the programs'
    /// reader frees their slots (counters and histogram together).
    pub cgroups: Vec<u64>,
    /// Their histogram buckets (the sock_diag fallback keeps buckets one by one).
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
    /// Cgroup slots: counters and a histogram row each (`agent_ebpf::tcp::slot`).
    pub max_cgroups: u32,
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
    /// log2 of the histogram rows per cgroup slot.
    stripe_shift: u32,
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
        let cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| LoadError::Config(format!("reading {what}: {e}")))?;
        let stripe_shift = agent_ebpf::tcp::hist_stripe_shift(cpus);
        let mut ebpf = loader_owning(&[STATS, HIST, SLOTS, OWNER, FREE, FLOWS])
            .map_max_entries(STATS, how.max_cgroups)
            .map_max_entries(HIST, how.max_cgroups << stripe_shift)
            .map_max_entries(SLOTS, how.max_cgroups)
            .map_max_entries(OWNER, how.max_cgroups)
            .map_max_entries(FREE, how.max_cgroups)
            .map_max_entries(FLOWS, how.max_flows)
            .override_global("COUNT_FOREIGN_CONTEXT", &count_foreign, true)
            .override_global("KEY_BY_NETNS", &key_by_netns, true)
            .override_global("TAG_AT_LISTEN", &tag_at_listen, true)
            .override_global("RTT_METHOD", &rtt_method, true)
            .override_global("HIST_STRIPE_SHIFT", &stripe_shift, true)
            .load(OBJECT)?;
        // Every slot is free before a program can take one.
        let mut free: Queue<&mut MapData, u32> =
            Queue::try_from(ebpf.map_mut(FREE).ok_or(LoadError::MissingMap(FREE))?)
                .map_err(map_err(FREE))?;
        for s in 0..how.max_cgroups {
            free.push(s, 0).map_err(map_err(FREE))?;
        }
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
            stripe_shift,
        })
    }

    /// The histogram of `slot`: the sum of its rows.
    fn hist_of(&self, hist: &Array<&MapData, HistRow>, slot: u32) -> Result<HistRow, LoadError> {
        let mut sum = [0u64; agent_ebpf::tcp::HIST_BUCKETS as usize];
        for stripe in 0..1u32 << self.stripe_shift {
            let row = hist
                .get(&((slot << self.stripe_shift) | stripe), 0)
                .map_err(map_err(HIST))?;
            for (s, c) in sum.iter_mut().zip(row) {
                *s = s.wrapping_add(c);
            }
        }
        Ok(sum)
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
        let stats: PerCpuArray<&MapData, CgroupTcpStats> =
            PerCpuArray::try_from(self.map(STATS)?).map_err(map_err(STATS))?;
        let hist: Array<&MapData, HistRow> =
            Array::try_from(self.map(HIST)?).map_err(map_err(HIST))?;
        for (cgroup_id, slot) in self.slots()? {
            let per_cpu = stats.get(&slot, 0).map_err(map_err(STATS))?;
            let mut sum = CgroupTcpStats::default();
            for s in per_cpu.iter() {
                sum += *s;
            }
            raw.stats.push((cgroup_id, sum));
            let row = self.hist_of(&hist, slot)?;
            for (bucket, count) in (0u32..).zip(row) {
                if count != 0 {
                    let key = HistKey {
                        cgroup_id,
                        bucket,
                        _pad: 0,
                    };
                    raw.hist.push((key, count));
                }
            }
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

    /// The cgroups that hold a slot, with their slots. A mapping whose slot's owner differs is
    /// in the middle of being made or freed by a program: left for the next read.
    fn slots(&self) -> Result<Vec<(u64, u32)>, LoadError> {
        let slots: BpfHashMap<&MapData, u64, u32> =
            BpfHashMap::try_from(self.map(SLOTS)?).map_err(map_err(SLOTS))?;
        let owner: Array<&MapData, u64> =
            Array::try_from(self.map(OWNER)?).map_err(map_err(OWNER))?;
        let mut out = Vec::new();
        // An entry deleted between listing and lookup reads as an error: skip it.
        for (cgroup_id, slot) in slots.iter().flatten() {
            if owner.get(&slot, 0).map_err(map_err(OWNER))? == cgroup_id {
                out.push((cgroup_id, slot));
            }
        }
        Ok(out)
    }

    /// Counts the entries of each map: the flow map in batches where the kernel allows (a walk
    /// of keys restarts from the first when its cursor is deleted meanwhile, and counts some
    /// entries twice under churn), the small ones by walking their keys.
    pub fn usage(&self) -> Result<MapUsage, LoadError> {
        let flows: BpfHashMap<&MapData, u64, FlowState> =
            BpfHashMap::try_from(self.map(FLOWS)?).map_err(map_err(FLOWS))?;
        let slots = self.slots()?;
        let hist: Array<&MapData, HistRow> =
            Array::try_from(self.map(HIST)?).map_err(map_err(HIST))?;
        let mut buckets = 0;
        for (_, slot) in &slots {
            let row = self.hist_of(&hist, *slot)?;
            buckets += row.iter().filter(|c| **c != 0).count();
        }
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
            cgroups: slots.len(),
            hist: buckets,
        })
    }

    /// Deletes closed flows and frees the slots of idle cgroups. A missing key is not an error
    /// (LRU eviction).
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
        for id in &cleanup.cgroups {
            self.free_slot(*id)?;
        }
        Ok(())
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map, LoadError> {
        self.ebpf.map_mut(name).ok_or(LoadError::MissingMap(name))
    }

    /// Frees the slot of `cgroup_id`, if it holds one: the mapping goes first (a program that
    /// looks the cgroup up now takes a new slot), then the owner (a flow that remembers the
    /// slot stops writing it), then the row is zeroed and the slot queued for reuse.
    fn free_slot(&mut self, cgroup_id: u64) -> Result<(), LoadError> {
        let shift = self.stripe_shift;
        let mut slots: BpfHashMap<&mut MapData, u64, u32> =
            BpfHashMap::try_from(self.map_mut(SLOTS)?).map_err(map_err(SLOTS))?;
        let Ok(slot) = slots.get(&cgroup_id, 0) else {
            return Ok(());
        };
        if slots.remove(&cgroup_id).is_err() {
            // A concurrent free; nothing of ours to give back.
            return Ok(());
        }
        let mut owner: Array<&mut MapData, u64> =
            Array::try_from(self.map_mut(OWNER)?).map_err(map_err(OWNER))?;
        owner.set(slot, 0, 0).map_err(map_err(OWNER))?;
        let cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| LoadError::Config(format!("reading {what}: {e}")))?;
        let mut stats: PerCpuArray<&mut MapData, CgroupTcpStats> =
            PerCpuArray::try_from(self.map_mut(STATS)?).map_err(map_err(STATS))?;
        let zeros = PerCpuValues::try_from(vec![CgroupTcpStats::default(); cpus])
            .map_err(|e| LoadError::Config(format!("per-CPU values: {e}")))?;
        stats.set(slot, zeros, 0).map_err(map_err(STATS))?;
        let mut hist: Array<&mut MapData, HistRow> =
            Array::try_from(self.map_mut(HIST)?).map_err(map_err(HIST))?;
        for stripe in 0..1u32 << shift {
            let zero = [0u64; agent_ebpf::tcp::HIST_BUCKETS as usize];
            hist.set((slot << shift) | stripe, zero, 0)
                .map_err(map_err(HIST))?;
        }
        let mut free: Queue<&mut MapData, u32> =
            Queue::try_from(self.map_mut(FREE)?).map_err(map_err(FREE))?;
        free.push(slot, 0).map_err(map_err(FREE))?;
        Ok(())
    }
}
