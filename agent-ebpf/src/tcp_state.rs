//! `sock:inet_sock_set_state`: counts TCP state transitions per cgroup.
//!
//! The counter is keyed by the cgroup of the task in whose context the transition ran
//! (`bpf_get_current_cgroup_id`), which is exact for transitions a process causes itself
//! (`connect()` → SYN_SENT, `close()` → FIN_WAIT1) and approximate for those the kernel makes in
//! softirq context. Socket-cgroup attribution for RTT lives in the TCP latency programs.

use agent_ebpf::{SetStateOffsets, TcpStateKey, IPPROTO_TCP};
use aya_ebpf::{
    helpers::bpf_get_current_cgroup_id,
    macros::{map, tracepoint},
    maps::PerCpuHashMap,
    programs::TracePointContext,
};

/// Field offsets in the tracepoint record, written by user space before load.
#[unsafe(no_mangle)]
static SET_STATE_OFFSETS: SetStateOffsets = SetStateOffsets {
    oldstate: 0,
    newstate: 0,
    protocol: 0,
    protocol_size: 0,
};

/// Transition counters; bounded, and an insert into a full map is dropped (the user-space
/// reader compares totals to notice that).
#[map]
static TCP_STATE_EVENTS: PerCpuHashMap<TcpStateKey, u64> = PerCpuHashMap::with_max_entries(16384, 0);

#[tracepoint]
pub fn nodeward_tcp_state(ctx: TracePointContext) -> u32 {
    match try_tcp_state(&ctx) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

fn try_tcp_state(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: a volatile read of a global that user space patched before load; it is plain data.
    let off: SetStateOffsets = unsafe { core::ptr::read_volatile(&SET_STATE_OFFSETS) };
    if off.protocol_size == 0 {
        // Offsets were never set: user space did not configure the program, count nothing.
        return Err(-1);
    }
    // SAFETY: the offsets come from the tracepoint's own format file; read_at uses
    // bpf_probe_read on the record, so a wrong offset yields a wrong value, never a fault.
    let protocol: u32 = unsafe {
        if off.protocol_size == 1 {
            u32::from(ctx.read_at::<u8>(off.protocol as usize)?)
        } else {
            u32::from(ctx.read_at::<u16>(off.protocol as usize)?)
        }
    };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    // SAFETY: as above.
    let (oldstate, newstate) = unsafe {
        (
            ctx.read_at::<i32>(off.oldstate as usize)? as u32,
            ctx.read_at::<i32>(off.newstate as usize)? as u32,
        )
    };
    // SAFETY: the helper takes no arguments and is valid in tracepoint programs.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let key = TcpStateKey {
        cgroup_id,
        oldstate,
        newstate,
    };
    match TCP_STATE_EVENTS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value: no other CPU writes this slot, and the pointer is valid for
        // the duration of the program.
        Some(count) => unsafe { *count += 1 },
        None => {
            TCP_STATE_EVENTS.insert(&key, &1, 0)?;
        }
    }
    Ok(())
}
