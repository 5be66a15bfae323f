//! TCP round-trip time, jitter, retransmits and connection life per socket cgroup.
//!
//! This module holds the egress and sock_ops programs and the flow map; the storage map with
//! the `sock_create` program and listener tagging are in `tcp_storage`, the per-cgroup slots,
//! counters and histogram in `tcp_cgroup`.
//!
//! The programs share one socket-local storage map, `SOCK_CGROUP`, an sk_storage map created
//! with `BPF_F_CLONE`: an accepted socket inherits its listener's entry when the kernel clones
//! it, before any callback runs on it. Each socket's cgroup v2 id is recorded there by:
//! - `nodeward_sock_tag_egress` (`cgroup_skb/egress`, attached to the cgroup v2 root) from the
//!   first packet a TCP socket sends, with `bpf_skb_cgroup_id` (the socket's cgroup, not the
//!   sender's task); it never overwrites a recorded cgroup. A client's SYN is such a packet.
//! - `nodeward_tcp_sockops` itself, with `TAG_AT_LISTEN`, at `BPF_SOCK_OPS_TCP_LISTEN_CB`: the
//!   kernel runs it from `listen()` in the listening task, so `bpf_get_current_cgroup_id` is
//!   the listener's cgroup, and the sockets it accepts are attributed from
//!   PASSIVE_ESTABLISHED on, before they send anything. Where sock_ops may not call that
//!   helper (5.10, where neither can this), or where `tcp.attribution = "sock_create"` asks,
//! - `nodeward_sock_create` (`cgroup/sock_create`) records the creating task's cgroup at every
//!   TCP `socket()` instead (it runs on every inet socket, and leaves non-TCP ones alone).
//!
//! `nodeward_tcp_sockops` (`sock_ops`, attached to the same root) enables the RTT, state and
//! retransmit callbacks when a connection is established and, on each callback, reads the
//! socket's cgroup from `SOCK_CGROUP`, never from `current`: RTT callbacks run in softirq on
//! whichever task happens to be on the CPU. With egress tagging alone (5.10) the listener is
//! tagged by its first SYN-ACK (the kernel runs egress programs on it with the listener as its
//! socket), but a SYN-cookie SYN-ACK belongs to no socket: an accepted socket whose listener
//! has no entry yet has sent nothing at PASSIVE_ESTABLISHED, so its flow starts with cgroup 0
//! ("pending") and is resolved, and its open counted, at its first callback after its first
//! packet — always before its first RTT sample, since a sample needs data it sent.
//!
//! With `tcp.rtt_method = "segment"` (`RTT_METHOD`; before 6.10 `RTT_CB` passes no measured
//! RTT) the egress program also stamps, in the same storage, the first data segment of each
//! flight, and sock_ops ends it at the `RTT_CB` whose `snd_una` covers it: see
//! `agent_ebpf::tcp::segment`.
//!
//! On cgroup-v1 hosts user space sets `KEY_BY_NETNS` and everything is keyed by the socket's
//! network-namespace cookie instead; no storage is used.
//!
//! Everything read comes from the UAPI contexts (`struct bpf_sock_ops`, `__sk_buff`,
//! `bpf_sock`), the packet's own bytes and helpers, so the object is the same on every kernel
//! (no CO-RE needed).

use agent_ebpf::{
    tcp::{direction, drop_reason, path, rtt_method, segment, FOREIGN_CHECK_EVERY},
    CgroupTcpStats, FlowState, SockState,
};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_RETRANS_CB_FLAG, BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
        generated::{bpf_sk_fullsock, bpf_skb_cgroup_id},
    },
    macros::{cgroup_skb, map, sock_ops},
    maps::LruHashMap,
    programs::{SkBuffContext, SockOpsContext},
};

use crate::{
    tcp_cgroup::{count_drop, flow_stats, hist_add, stats_of},
    tcp_storage::{sock_ops_storage, tag_listener, SOCK_CGROUP},
};

// sock_ops operations (include/uapi/linux/bpf.h); stable UAPI numbers.
const OP_ACTIVE_ESTABLISHED: u32 = 4;
const OP_PASSIVE_ESTABLISHED: u32 = 5;
const OP_RETRANS: u32 = 9;
const OP_STATE: u32 = 10;
const OP_TCP_LISTEN: u32 = 11;
const OP_RTT: u32 = 12;
const TCP_CLOSE: u32 = 7;
const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
// `__sk_buff.protocol` (network order) of IPv4 and IPv6 packets.
const ETH_P_IP_BE: u32 = 0x0800_u16.to_be() as u32;
const ETH_P_IPV6_BE: u32 = 0x86DD_u16.to_be() as u32;

/// 1 when sock_ops programs may call `bpf_get_current_cgroup_id`; set by user space before
/// load.
#[unsafe(no_mangle)]
static COUNT_FOREIGN_CONTEXT: u32 = 0;

/// 1 to key everything by the socket's network-namespace cookie instead of its cgroup (hosts
/// with cgroup v1 only); set by user space before load.
#[unsafe(no_mangle)]
static KEY_BY_NETNS: u32 = 0;

/// Which RTT a sample takes (`agent_ebpf::tcp::rtt_method`); set by user space before load.
/// Read by sock_ops and, for `SEGMENT`, by the egress program.
#[unsafe(no_mangle)]
static RTT_METHOD: u32 = 0;

/// Per-connection state, by socket cookie. LRU: the oldest idle flows make room.
#[map]
static TCP_FLOWS: LruHashMap<u64, FlowState> = LruHashMap::with_max_entries(65536, 0);

#[cgroup_skb(egress)]
pub fn nodeward_sock_tag_egress(ctx: SkBuffContext) -> i32 {
    try_tag_egress(&ctx);
    // 1 = let the packet pass: this program only observes.
    1
}

#[inline(always)]
fn try_tag_egress(ctx: &SkBuffContext) {
    let skb = ctx.skb.skb;
    // SAFETY: reading the `sk` member of the UAPI `__sk_buff` context (nullable).
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: `sk` is a non-null socket pointer from the context; the helper returns the full
    // socket or null (request and time-wait sockets carry no storage).
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return;
    }
    // Only TCP sockets are read by sock_ops: a UDP packet leaves before the storage lookup.
    // SAFETY: `protocol` of the UAPI `bpf_sock` of a full socket.
    if unsafe { (*full).protocol } != IPPROTO_TCP {
        return;
    }
    let slot = SOCK_CGROUP.get(full.cast(), true);
    if slot.is_null() {
        return;
    }
    // SAFETY: non-null storage pointer; `bpf_skb_cgroup_id` reads the cgroup recorded on the
    // skb's socket, whatever task is sending.
    unsafe {
        if (*slot).cgroup_id == 0 {
            (*slot).cgroup_id = bpf_skb_cgroup_id(skb);
        }
    }
    // SAFETY: a volatile read of a read-only global set before load: for every other method
    // the verifier prunes the timing below.
    if unsafe { core::ptr::read_volatile(&RTT_METHOD) } != rtt_method::SEGMENT {
        return;
    }
    // SAFETY: valid storage pointer.
    if unsafe { (*slot).probe_ns } != 0 {
        return;
    }
    if let Some(end) = timed_segment_end(ctx) {
        // SAFETY: valid storage pointer; the stamp is taken after the parse, as late as the
        // program can.
        unsafe {
            (*slot).probe_end_seq = end;
            (*slot).probe_ns = bpf_ktime_get_ns();
        }
    }
}

/// The end sequence number of the bytes to time in this packet, if it carries TCP payload
/// (one fixed-size load per packet, sized by the IP version).
#[inline(always)]
fn timed_segment_end(ctx: &SkBuffContext) -> Option<u32> {
    let skb = ctx.skb.skb;
    // SAFETY: UAPI `__sk_buff` fields.
    let (proto, len, gso_size) = unsafe { ((*skb).protocol, (*skb).len, (*skb).gso_size) };
    let range = if proto == ETH_P_IP_BE {
        let head: [u8; segment::V4_LOAD] = ctx.load(0).ok()?;
        segment::timed_range_v4(&head, len, gso_size)
    } else if proto == ETH_P_IPV6_BE {
        let head: [u8; segment::V6_LOAD] = ctx.load(0).ok()?;
        segment::timed_range_v6(&head, len, gso_size)
    } else {
        None
    };
    range.map(|(_, end)| end)
}

#[sock_ops]
pub fn nodeward_tcp_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops(&ctx);
    1
}

/// The socket's storage, if a program created it.
#[inline(always)]
fn sock_state(ctx: &SockOpsContext) -> Option<*mut SockState> {
    sock_ops_storage(ctx, false)
}

/// `tcp.rtt_method = "segment"`: the RTT (µs) of the segment being timed if this ACK covers
/// it (which ends the measurement), else `None`.
#[inline(always)]
fn segment_rtt(ctx: &SockOpsContext) -> Option<u32> {
    let state = sock_state(ctx)?;
    // SAFETY: valid storage pointer; UAPI context fields.
    unsafe {
        let sent = (*state).probe_ns;
        if sent == 0 {
            return None;
        }
        // Either way the segment is done with: `RTT_CB` runs once per flight (when `snd_una`
        // passes what was in flight at the last one, on every kernel: 6.10 added arguments,
        // not calls), so a segment this ACK does not cover would be ended a flight late. The
        // next data segment sent (the first of the next flight) is timed instead.
        (*state).probe_ns = 0;
        if !segment::acked((*ctx.ops).snd_una, (*state).probe_end_seq) {
            return None;
        }
        let us = (bpf_ktime_get_ns().wrapping_sub(sent)) / 1000;
        Some(if us > u64::from(u32::MAX) {
            u32::MAX
        } else {
            us as u32
        })
    }
}

/// The socket's recorded cgroup, if `sock_create` saw the socket; on cgroup-v1 hosts, where
/// every socket sits in the one cgroup2 root, its network namespace's cookie instead.
#[inline(always)]
fn socket_cgroup(ctx: &SockOpsContext) -> Option<u64> {
    // SAFETY: a volatile read of a read-only global set before load.
    if unsafe { core::ptr::read_volatile(&KEY_BY_NETNS) } != 0 {
        // SAFETY: the helper takes the sock_ops context; the namespace is the socket's own,
        // whatever task runs. Pruned by the verifier when the global is 0.
        return Some(unsafe { bpf_get_netns_cookie(ctx.ops.cast()) });
    }
    let slot = sock_state(ctx)?;
    // SAFETY: non-null storage pointer.
    Some(unsafe { (*slot).cgroup_id })
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), i64> {
    let op = ctx.op();
    match op {
        OP_ACTIVE_ESTABLISHED | OP_PASSIVE_ESTABLISHED => {
            let flags = BPF_SOCK_OPS_RTT_CB_FLAG
                | BPF_SOCK_OPS_STATE_CB_FLAG
                | BPF_SOCK_OPS_RETRANS_CB_FLAG;
            // OR in what other sock_ops programs on this socket (a CNI's) already asked for:
            // the helper replaces the whole set.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | flags) as i32);
            // 0 = not known yet (egress tagging, accepted socket): resolved on a later callback.
            let cgroup_id = socket_cgroup(ctx).unwrap_or(0);
            let dir = if op == OP_PASSIVE_ESTABLISHED {
                direction::PASSIVE
            } else {
                direction::ACTIVE
            };
            // A segment stamped before now (data on a Fast Open SYN) was acked by the
            // handshake, whose RTT is taken from the kernel below: timed on, it would end at
            // the first callback with the whole wait since the SYN.
            // SAFETY: a volatile read of a read-only global set before load.
            if unsafe { core::ptr::read_volatile(&RTT_METHOD) } == rtt_method::SEGMENT {
                if let Some(state) = sock_state(ctx) {
                    // SAFETY: valid storage pointer.
                    unsafe { (*state).probe_ns = 0 };
                }
            }
            let flow = new_flow(ctx, cgroup_id, dir, true)?;
            if cgroup_id != 0 {
                count_open(flow, cgroup_id);
            }
        }
        OP_TCP_LISTEN => tag_listener(ctx),
        OP_RTT => rtt_sample(ctx)?,
        OP_RETRANS => {
            // The kernel adds this retransmit to `total_retrans` after the callback; the delta
            // is picked up on the next callback of this socket (an RTT sample or the close).
            // Karn: the ACK of a retransmitted segment cannot tell which copy it answers, so
            // a segment being timed is dropped (the kernel calls this after the retransmitted
            // segment went through egress, so a probe that egress just set on it goes too).
            // SAFETY: a volatile read of a read-only global set before load.
            if unsafe { core::ptr::read_volatile(&RTT_METHOD) } == rtt_method::SEGMENT {
                if let Some(state) = sock_state(ctx) {
                    // SAFETY: valid storage pointer.
                    unsafe { (*state).probe_ns = 0 };
                }
            }
        }
        OP_STATE => {
            if ctx.arg(1) == TCP_CLOSE {
                close_flow(ctx);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Counts the flow's open once, against its (now known) cgroup, and its handshake RTT as the
/// connection's first path sample.
#[inline(always)]
fn count_open(flow: *mut FlowState, cgroup_id: u64) {
    let Some((slot, stats)) = flow_stats(flow, cgroup_id) else {
        return;
    };
    // SAFETY: `flow` and `stats` are valid map values for the program's run.
    let handshake = unsafe {
        if (*flow).passive == direction::PASSIVE {
            (*stats).opened_passive += 1;
        } else {
            (*stats).opened_active += 1;
        }
        (*flow).handshake_rtt_us
    };
    if handshake != 0 {
        path_sample(flow, stats, slot, handshake);
    }
}

/// Adds a path sample to the flow, its cgroup's counters and histogram; updates the
/// connection's RFC 3550 jitter.
#[inline(always)]
fn path_sample(flow: *mut FlowState, stats: *mut CgroupTcpStats, slot: u32, rtt_us: u32) {
    let rtt = u64::from(rtt_us);
    // SAFETY: `flow` and `stats` are valid map values; `stats` is per-CPU.
    unsafe {
        let last = (*flow).last_rtt_us;
        if (*flow).path_samples > 0 {
            let d = if rtt_us > last {
                rtt_us - last
            } else {
                last - rtt_us
            };
            // RFC 3550: J += (|D| - J) / 16, kept as 16·J so that the division is exact.
            let j16 = (*flow).jitter16_us;
            let j16 = j16 - (j16 >> 4) + d;
            (*flow).jitter16_us = j16;
            (*flow).diffs += 1;
            (*flow).sum_jitter16_us += u64::from(j16);
            (*stats).diffs += 1;
            (*stats).sum_jitter16_us += u64::from(j16);
        }
        (*flow).last_rtt_us = rtt_us;
        (*flow).path_samples += 1;
        (*flow).sum_rtt_us += rtt;
        (*stats).path_samples += 1;
        (*stats).sum_rtt_us += rtt;
    }
    hist_add(slot, rtt);
}

/// The flow's cgroup, resolving a pending (0) one from the socket storage when it is there.
#[inline(always)]
fn flow_cgroup(ctx: &SockOpsContext, flow: *mut FlowState) -> u64 {
    // SAFETY: valid map value.
    let known = unsafe { (*flow).cgroup_id };
    if known != 0 {
        return known;
    }
    let cgroup_id = socket_cgroup(ctx).unwrap_or(0);
    if cgroup_id != 0 {
        // SAFETY: valid map value.
        unsafe { (*flow).cgroup_id = cgroup_id };
        count_open(flow, cgroup_id);
    }
    cgroup_id
}

/// The remote port as the wire has it (network order), from the UAPI context.
#[inline(always)]
fn remote_port_be(ctx: &SockOpsContext) -> u16 {
    let raw = ctx.remote_port();
    if cfg!(target_endian = "little") {
        (raw >> 16) as u16
    } else {
        raw as u16
    }
}

#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: valid in sock_ops programs; takes the context.
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
}

/// A new flow entry; `dir`: a [`direction`] value; `established`: at the ESTABLISHED callback,
/// where the kernel's srtt is the handshake's RTT (its first and only sample so far).
fn new_flow(
    ctx: &SockOpsContext,
    cgroup_id: u64,
    dir: u32,
    established: bool,
) -> Result<*mut FlowState, i64> {
    let family = ctx.family();
    let mut flow = FlowState {
        cgroup_id,
        // SAFETY: no preconditions.
        start_ns: unsafe { bpf_ktime_get_ns() },
        family,
        // UAPI quirk (since 4.13): the network-order port sits in the upper 16 bits on
        // little-endian hosts (the kernel loads the be16 and shifts it left by 16).
        remote_port: u32::from(u16::from_be(remote_port_be(ctx))),
        // Unlike `remote_port`, the UAPI gives `local_port` in host order.
        local_port: ctx.local_port(),
        passive: dir,
        // SAFETY: UAPI context fields, valid for full sockets (every TCP callback used here).
        seen_total_retrans: unsafe { (*ctx.ops).total_retrans },
        // SAFETY: as above.
        seen_segs_out: unsafe { (*ctx.ops).segs_out },
        // SAFETY: as above.
        seen_data_segs_in: unsafe { (*ctx.ops).data_segs_in },
        handshake_rtt_us: if established {
            // SAFETY: as above; srtt is kept << 3.
            unsafe { (*ctx.ops).srtt_us >> 3 }
        } else {
            0
        },
        ..FlowState::default()
    };
    if family == AF_INET {
        flow.remote[0] = ctx.remote_ip4();
    } else {
        // Four 32-bit loads at fixed context offsets: the verifier rejects the 64-bit copy
        // through a moved context pointer that `remote_ip6()` compiles to.
        // SAFETY: UAPI context fields, read in place.
        unsafe {
            let ops = ctx.ops;
            flow.remote[0] = core::ptr::read_volatile(&raw const (*ops).remote_ip6[0]);
            flow.remote[1] = core::ptr::read_volatile(&raw const (*ops).remote_ip6[1]);
            flow.remote[2] = core::ptr::read_volatile(&raw const (*ops).remote_ip6[2]);
            flow.remote[3] = core::ptr::read_volatile(&raw const (*ops).remote_ip6[3]);
        }
    }
    let key = cookie(ctx);
    if TCP_FLOWS.insert(&key, &flow, 0).is_err() {
        count_drop(drop_reason::FLOW_INSERT);
        return Err(-1);
    }
    TCP_FLOWS.get_ptr_mut(&key).ok_or(-1)
}

/// Adds the segments sent and retransmitted since the last callback to the flow and cgroup.
#[inline(always)]
fn account_segments(ctx: &SockOpsContext, flow: *mut FlowState, stats: *mut CgroupTcpStats) {
    // SAFETY: UAPI context fields; `flow` and `stats` are valid map values.
    unsafe {
        let total_retrans = (*ctx.ops).total_retrans;
        let segs_out = (*ctx.ops).segs_out;
        let d_retrans = u64::from(total_retrans.wrapping_sub((*flow).seen_total_retrans));
        let d_segs = u64::from(segs_out.wrapping_sub((*flow).seen_segs_out));
        (*flow).seen_total_retrans = total_retrans;
        (*flow).seen_segs_out = segs_out;
        (*flow).bytes_acked = (*ctx.ops).bytes_acked;
        (*flow).bytes_received = (*ctx.ops).bytes_received;
        (*flow).retrans += d_retrans;
        (*flow).segs_out += d_segs;
        (*stats).retrans += d_retrans;
        (*stats).segs_out += d_segs;
    }
}

fn rtt_sample(ctx: &SockOpsContext) -> Result<(), i64> {
    // Kernels since 6.10 pass the measured RTT (µs) and the updated srtt as arguments; older
    // ones pass nothing (zeros), and the smoothed srtt (µs << 3) is all there is. `srtt`
    // forces the latter; `segment` takes the segment the programs timed, and no sample when
    // this ACK does not end one (a read-only global: the verifier prunes the branches not
    // taken).
    // SAFETY: a volatile read of a read-only global set before load.
    let method = unsafe { core::ptr::read_volatile(&RTT_METHOD) };
    // (RTT in µs, 1 if it is a measurement rather than the smoothed srtt.)
    let sample: Option<(u32, u64)> = if method == rtt_method::SEGMENT {
        segment_rtt(ctx).map(|us| (us, 1))
    } else if method != rtt_method::SRTT && ctx.arg(1) != 0 {
        Some((ctx.arg(0), 1))
    } else {
        // SAFETY: UAPI context field.
        Some((unsafe { (*ctx.ops).srtt_us } >> 3, 0))
    };
    let key = cookie(ctx);
    let flow = match TCP_FLOWS.get_ptr_mut(&key) {
        Some(f) => f,
        None => {
            // Evicted from the LRU map (or established before the agent started, in which
            // case the RTT callback would not be enabled): rebuild from the socket storage.
            let Some(cgroup_id) = socket_cgroup(ctx) else {
                count_drop(drop_reason::NO_CGROUP);
                return Ok(());
            };
            count_drop(drop_reason::FLOW_EVICTED);
            // Which side opened it went with the evicted entry: unknown, so that an accepted
            // (served) connection still holds a drain rather than pass for an outbound one.
            new_flow(ctx, cgroup_id, direction::UNKNOWN, false)?
        }
    };
    let cgroup_id = flow_cgroup(ctx, flow);
    if cgroup_id == 0 {
        count_drop(drop_reason::NO_CGROUP);
        return Ok(());
    }
    let Some((slot, stats)) = flow_stats(flow, cgroup_id) else {
        return Ok(());
    };
    // SAFETY: UAPI context fields; `flow` and `stats` are valid map values.
    let is_path = unsafe {
        let ops = ctx.ops;
        let data_in = (*ops).data_segs_in;
        let peer_data = data_in != (*flow).seen_data_segs_in;
        (*flow).seen_data_segs_in = data_in;
        path::is_path_sample(
            (*ops).snd_una != (*ops).snd_nxt,
            (*flow).passive == direction::ACTIVE,
            peer_data,
        )
    };
    // Segments, retransmits and bytes move at every callback; a sample only where there is
    // one (with `segment`, at the ACK that ends a timed segment).
    account_segments(ctx, flow, stats);
    let Some((rtt_us, raw)) = sample else {
        return Ok(());
    };
    // SAFETY: `flow` and `stats` are valid map values; `stats` is per-CPU.
    unsafe {
        (*flow).samples += 1;
        (*stats).samples += 1;
        (*stats).raw_samples += raw;
        (*stats).sum_measured_rtt_us += u64::from(rtt_us);
        // A read-only global: on kernels whose sock_ops may not call this helper (5.10) user
        // space leaves it 0 and the verifier never sees the call (dead-code pruning). One
        // sample in FOREIGN_CHECK_EVERY (this CPU's 1st, 17th, ...) is checked.
        if core::ptr::read_volatile(&COUNT_FOREIGN_CONTEXT) != 0
            && (*stats).samples % FOREIGN_CHECK_EVERY == 1
            && bpf_get_current_cgroup_id() != cgroup_id
        {
            (*stats).foreign_context += FOREIGN_CHECK_EVERY;
        }
    }
    if is_path {
        path_sample(flow, stats, slot, rtt_us);
    }
    Ok(())
}

fn close_flow(ctx: &SockOpsContext) {
    let key = cookie(ctx);
    let Some(flow) = TCP_FLOWS.get_ptr_mut(&key) else {
        // Evicted from the LRU map while open: still count the close, so that opened - closed
        // stays the number of established connections (user space reports the ones it cannot
        // see as untracked).
        if let Some(cgroup_id) = socket_cgroup(ctx).filter(|id| *id != 0) {
            if let Some((_, stats)) = stats_of(cgroup_id) {
                // SAFETY: per-CPU value.
                unsafe { (*stats).closed += 1 };
            }
        }
        return;
    };
    let cgroup_id = flow_cgroup(ctx, flow);
    if cgroup_id == 0 {
        // Never attributed (it sent nothing): user space drops it with the closed flows.
        // SAFETY: valid map value.
        unsafe { (*flow).closed_ns = bpf_ktime_get_ns() };
        return;
    }
    let Some((_, stats)) = flow_stats(flow, cgroup_id) else {
        return;
    };
    account_segments(ctx, flow, stats);
    // SAFETY: valid map values; user space deletes the flow after reading its final numbers.
    unsafe {
        if (*flow).closed_ns == 0 {
            (*flow).closed_ns = bpf_ktime_get_ns();
            (*stats).closed += 1;
        }
    }
}
