//! The per-cgroup side of the TCP programs (`agent_ebpf::tcp::slot`): the slot table, the
//! counters and the RTT histogram at each cgroup's slot, and the drop counters.

use agent_ebpf::{
    tcp::{bucket_of, drop_reason, slot, HIST_BUCKETS},
    CgroupTcpStats, FlowState, HistRow,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_get_smp_processor_id,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, Queue},
};
use core::intrinsics::AtomicOrdering;

/// log2 of the histogram rows per slot (`agent_ebpf::tcp::hist_stripes`); set by user space
/// before load.
#[unsafe(no_mangle)]
static HIST_STRIPE_SHIFT: u32 = 0;

/// Per-cgroup slots (`agent_ebpf::tcp::slot`): cgroup id → slot, slot → cgroup id, the free
/// slots. Sizes (`tcp.max_cgroups`) are set by user space from the config before load; user
/// space fills the queue before attaching.
#[map]
static TCP_SLOTS: HashMap<u64, u32> = HashMap::with_max_entries(1024, 0);
#[map]
static TCP_SLOT_OWNER: Array<u64> = Array::with_max_entries(1024, 0);
#[map]
static TCP_FREE_SLOTS: Queue<u32> = Queue::with_max_entries(1024, 0);

/// Per-cgroup counters, at the cgroup's slot.
#[map]
static TCP_CGROUP_STATS: PerCpuArray<CgroupTcpStats> = PerCpuArray::with_max_entries(1024, 0);

/// Per-cgroup RTT histogram: `1 << HIST_STRIPE_SHIFT` rows per slot, a CPU adding to the row
/// of its number's low bits (atomic adds: a per-CPU row would cost 3 KiB per cgroup and CPU,
/// one shared row made the CPUs of a busy cgroup take the same cache line in turn).
#[map]
static TCP_RTT_HIST: Array<HistRow> = Array::with_max_entries(1024, 0);

/// What did not fit (indices in `agent_ebpf::tcp::drop_reason`).
#[map]
static TCP_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_reason::COUNT, 0);

#[inline(always)]
pub fn count_drop(reason: u32) {
    if let Some(slot) = TCP_DROPS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, valid for the program's run.
        unsafe { *slot += 1 };
    }
}

/// The slot of `cgroup_id`, taking a free one if it has none yet (counted, and `None`, when
/// every slot is taken).
#[inline(always)]
pub fn slot_of(cgroup_id: u64) -> Option<u32> {
    // SAFETY: a value of this hash map, copied at once.
    if let Some(s) = unsafe { TCP_SLOTS.get(&cgroup_id) } {
        return Some(*s);
    }
    let Ok(Some(free)) = TCP_FREE_SLOTS.pop() else {
        count_drop(drop_reason::STATS_FULL);
        return None;
    };
    // User space pushes only slots below the arrays' size.
    let owner = TCP_SLOT_OWNER.get_ptr_mut(free)?;
    // SAFETY: array value, valid for the program's run. The owner is written before the
    // mapping, so that a flow that finds the mapping also finds its owner.
    unsafe { *owner = cgroup_id };
    if TCP_SLOTS
        .insert(&cgroup_id, &free, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return Some(free);
    }
    // Another CPU gave the cgroup a slot meanwhile: ours goes back, theirs is used.
    // SAFETY: as above.
    unsafe { *owner = 0 };
    let _ = TCP_FREE_SLOTS.push(free, 0);
    // SAFETY: as above.
    match unsafe { TCP_SLOTS.get(&cgroup_id) } {
        Some(s) => Some(*s),
        None => {
            count_drop(drop_reason::STATS_FULL);
            None
        }
    }
}

/// The counters of `cgroup_id` and its slot.
#[inline(always)]
pub fn stats_of(cgroup_id: u64) -> Option<(u32, *mut CgroupTcpStats)> {
    let s = slot_of(cgroup_id)?;
    Some((s, TCP_CGROUP_STATS.get_ptr_mut(s)?))
}

/// As [`stats_of`] for a flow's (known) cgroup, through the slot the flow remembers while that
/// slot is still its cgroup's.
#[inline(always)]
pub fn flow_stats(flow: *mut FlowState, cgroup_id: u64) -> Option<(u32, *mut CgroupTcpStats)> {
    // SAFETY: valid map value.
    let cached = unsafe { (*flow).slot };
    if cached != slot::NONE {
        let s = cached - 1;
        if TCP_SLOT_OWNER
            .get(s)
            .is_some_and(|owner| *owner == cgroup_id)
        {
            return Some((s, TCP_CGROUP_STATS.get_ptr_mut(s)?));
        }
    }
    let (s, stats) = stats_of(cgroup_id)?;
    // SAFETY: valid map value.
    unsafe { (*flow).slot = s + 1 };
    Some((s, stats))
}

/// Adds an RTT sample (µs) to the histogram of the cgroup at `slot`.
#[inline(always)]
pub fn hist_add(slot: u32, rtt: u64) {
    let bucket = bucket_of(rtt) as usize;
    // SAFETY: a volatile read of a read-only global set before load; the helper takes no
    // arguments (inlined by the JIT).
    let row = unsafe {
        let shift = core::ptr::read_volatile(&HIST_STRIPE_SHIFT);
        (slot << shift) | (bpf_get_smp_processor_id() & ((1 << shift) - 1))
    };
    if let Some(row) = TCP_RTT_HIST.get_ptr_mut(row) {
        if bucket < HIST_BUCKETS as usize {
            // SAFETY: a u64 inside this array value, valid for the program's run; the row is
            // shared by every CPU, so the add is atomic (its result unused: the plain atomic
            // add every supported kernel accepts).
            unsafe {
                core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                    (*row).as_mut_ptr().add(bucket),
                    1,
                );
            }
        }
    }
}
