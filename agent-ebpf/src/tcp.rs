//! Types and arithmetic shared by the TCP latency programs (`tcp_latency.rs`) and user space
//! (`agent/src/sources/tcp/`).
//!
//! The histogram bucket function lives here so that the kernel and user space agree on bucket
//! edges by construction, and so that it is unit-tested on the host. It is written without
//! loops: the 5.10 verifier rejects loops it cannot bound, and a straight-line binary search
//! costs a handful of instructions.

/// Sub-buckets per power of two (2^4 = 16): a bucket spans at most 1/16 of its lower edge, so
/// a value estimated at the bucket's middle is off by at most ~3%.
pub const HIST_SUB_BITS: u32 = 4;
const SUB: u64 = 1 << HIST_SUB_BITS;
/// The largest value the histogram tells apart, in microseconds (2^27 - 1 ≈ 134 s); larger
/// samples land in the last bucket.
pub const HIST_MAX_US: u64 = (1 << 27) - 1;
/// Number of buckets: 16 exact ones for 0..16 µs, then 16 per power of two up to 2^27.
pub const HIST_BUCKETS: u32 = (27 - HIST_SUB_BITS + 1) * (1 << HIST_SUB_BITS);

/// floor(log2(v)) for v > 0, branch-only (no loop, no ctlz instruction on BPF).
#[inline(always)]
pub fn ilog2(mut v: u64) -> u32 {
    let mut r = 0;
    if v >= 1 << 32 {
        v >>= 32;
        r += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        r += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        r += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        r += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        r += 2;
    }
    if v >= 1 << 1 {
        r += 1;
    }
    r
}

/// The log-linear bucket of a sample in microseconds.
#[inline(always)]
pub fn bucket_of(us: u64) -> u32 {
    let v = if us > HIST_MAX_US { HIST_MAX_US } else { us };
    if v < SUB {
        return v as u32;
    }
    let e = ilog2(v);
    let sub = ((v >> (e - HIST_SUB_BITS)) & (SUB - 1)) as u32;
    (e - HIST_SUB_BITS + 1) * (SUB as u32) + sub
}

/// The half-open range `[lo, hi)` of microsecond values that fall into `bucket`.
pub fn bucket_bounds(bucket: u32) -> (u64, u64) {
    let sub_count = SUB as u32;
    if bucket < sub_count {
        return (u64::from(bucket), u64::from(bucket) + 1);
    }
    let e = bucket / sub_count + HIST_SUB_BITS - 1;
    let sub = u64::from(bucket % sub_count);
    let shift = e - HIST_SUB_BITS;
    ((SUB + sub) << shift, (SUB + sub + 1) << shift)
}

/// A row of a cgroup's RTT histogram in the `TCP_RTT_HIST` array (see [`slot`]); the programs
/// add to a bucket atomically. A slot has [`hist_stripes`] rows (its histogram is their sum).
pub type HistRow = [u64; HIST_BUCKETS as usize];

/// The histogram rows per cgroup slot for `cpus` possible CPUs, as log2: one per CPU up to 4,
/// a power of two. A CPU adds to the row of its number's low bits, so that the CPUs serving
/// one busy cgroup do not take the same cache line in turn on every sample (measured on the
/// 2-core VM: `nodeward_tcp_sockops` 126 ns per run with one shared row, 114 ns with one per
/// CPU, 132 ns with the per-CPU hashes before slots, in the same A/B run).
pub fn hist_stripe_shift(cpus: usize) -> u32 {
    match cpus {
        0 | 1 => 0,
        2 => 1,
        _ => 2,
    }
}

/// A histogram bucket of a cgroup, as user space reads it (a non-zero bucket of the cgroup's
/// [`HistRow`]) and as the sock_diag fallback keeps it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HistKey {
    pub cgroup_id: u64,
    pub bucket: u32,
    pub _pad: u32,
}

/// Per-cgroup counters in the `TCP_CGROUP_STATS` per-CPU array, indexed by the cgroup's slot
/// (see [`slot`]). All cumulative since the slot was given to the cgroup; user space takes
/// differences on each tick (wrapping, so the sums may wrap).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupTcpStats {
    /// RTT measurements taken, path samples or not: one per `BPF_SOCK_OPS_RTT_CB` (once per
    /// flight), or with `tcp.rtt_method = "segment"` one per timed segment whose ACK ended it
    /// (a flight whose segment was retransmitted, or not covered by that ACK, gives none).
    pub samples: u64,
    /// Of those, samples that carried a measured RTT (the kernel's argument, or a timed
    /// segment); the others used the smoothed `srtt`.
    pub raw_samples: u64,
    /// Samples counted as the path's RTT (see [`path`]): each connection's handshake RTT and
    /// the measurements that did not wait on the peer. The histogram, `sum_rtt_us` and the
    /// jitter are over these.
    pub path_samples: u64,
    pub sum_rtt_us: u64,
    /// Sum of every measurement (`samples`), path or not: the RTT as the kernel measured it.
    pub sum_measured_rtt_us: u64,
    /// Path samples that followed an earlier path sample of the same connection (those that
    /// update its RFC 3550 jitter).
    pub diffs: u64,
    /// Sum, over those samples, of the connection's RFC 3550 jitter after that sample, times
    /// 16 (µs): divided by `16 · diffs` it is the mean jitter the API serves.
    pub sum_jitter16_us: u64,
    /// Segments retransmitted and segments sent (from `total_retrans`/`segs_out` deltas).
    pub retrans: u64,
    pub segs_out: u64,
    /// Connections that reached ESTABLISHED actively (connect) or passively (accept).
    pub opened_active: u64,
    pub opened_passive: u64,
    /// Established connections that closed.
    pub closed: u64,
    /// Samples taken while a task of another cgroup was on the CPU (softirq): the ones that
    /// attribution by `current` would have given to the wrong container. Estimated: one
    /// sample in [`FOREIGN_CHECK_EVERY`] (per CPU) is checked, and a foreign one counts for
    /// them all.
    pub foreign_context: u64,
}

/// One RTT sample in this many is checked for a foreign context (the check costs a helper
/// call, and it is a diagnostic, not a figure a verdict rests on).
pub const FOREIGN_CHECK_EVERY: u64 = 16;

/// Counter arithmetic in user space: summing per-CPU values and ticks, and differences of
/// cumulative reads. Wrapping, as the kernel's counters may wrap. The field list is written
/// once, and each generated impl destructures the type with it, so a field added to the type
/// and not to the list is a compile error, not a counter that silently reads 0.
#[cfg(feature = "user")]
mod arith {
    use super::CgroupTcpStats;

    macro_rules! fieldwise_wrapping {
        ($ty:ident { $($field:ident),+ $(,)? }) => {
            impl core::ops::AddAssign for $ty {
                fn add_assign(&mut self, o: Self) {
                    let Self { $($field),+ } = o;
                    $(self.$field = self.$field.wrapping_add($field);)+
                }
            }

            impl core::ops::Sub for $ty {
                type Output = Self;

                fn sub(self, o: Self) -> Self {
                    let Self { $($field),+ } = o;
                    Self { $($field: self.$field.wrapping_sub($field)),+ }
                }
            }
        };
    }

    fieldwise_wrapping!(CgroupTcpStats {
        samples,
        raw_samples,
        path_samples,
        sum_rtt_us,
        sum_measured_rtt_us,
        diffs,
        sum_jitter16_us,
        retrans,
        segs_out,
        opened_active,
        opened_passive,
        closed,
        foreign_context,
    });
}

/// Per-connection state in the `TCP_FLOWS` LRU hash, keyed by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the connection was established, and when it
    /// closed (0 while open).
    pub start_ns: u64,
    pub closed_ns: u64,
    /// RTT measurements, and of those (plus the handshake) the path samples that
    /// `sum_rtt_us`, the jitter and `last_rtt_us` are over (as in [`CgroupTcpStats`]).
    pub samples: u64,
    pub path_samples: u64,
    pub sum_rtt_us: u64,
    /// As in [`CgroupTcpStats`]: path samples that updated the jitter, and the sum of
    /// 16·jitter after each.
    pub diffs: u64,
    pub sum_jitter16_us: u64,
    pub retrans: u64,
    pub segs_out: u64,
    /// The kernel's `bytes_acked` and `bytes_received` of the connection (cumulative), as
    /// last seen at a callback that reads them (an RTT sample or the close): a connection
    /// that only receives takes no RTT samples, so its `bytes_received` moves at its close.
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// Remote address: IPv4 in `remote[0]` (network order) when `family` is AF_INET.
    pub remote: [u32; 4],
    /// Remote port, host order.
    pub remote_port: u32,
    pub family: u32,
    pub last_rtt_us: u32,
    /// RFC 3550 jitter of this connection, times 16 (µs).
    pub jitter16_us: u32,
    /// `total_retrans` and `segs_out` as last seen, to take deltas.
    pub seen_total_retrans: u32,
    pub seen_segs_out: u32,
    /// Which side opened the connection: one of [`direction`] (`ACTIVE` if it connected,
    /// `PASSIVE` if it was accepted on a listening socket, `UNKNOWN` where the recorder cannot
    /// tell).
    pub passive: u32,
    /// Local port, host order: for an accepted connection the port the container serves on.
    /// Written once, when the connection is established.
    pub local_port: u32,
    /// The handshake's RTT (µs; the kernel's first sample, SYN to SYN-ACK or SYN-ACK to ACK),
    /// 0 when the kernel took none (a retransmitted SYN) or the flow was rebuilt after
    /// eviction. Counted as a path sample once the flow's cgroup is known.
    pub handshake_rtt_us: u32,
    /// The socket's `data_segs_in` at the last RTT callback: whether the peer sent data since.
    pub seen_data_segs_in: u32,
    /// The flow's cgroup's slot plus one, as last looked up (0: none yet); checked against the
    /// slot's owner on every use, so a slot given to another cgroup since is never written.
    pub slot: u32,
    pub _pad: u32,
}

/// Per-cgroup slots: the counters (`TCP_CGROUP_STATS`, per-CPU) and histogram
/// (`TCP_RTT_HIST`) of a cgroup are rows of arrays, at the cgroup's slot, so that a sample costs
/// array lookups the JIT inlines instead of two hash lookups.
///
/// - `TCP_SLOTS` (hash, cgroup id → slot) tells a cgroup's slot; `TCP_SLOT_OWNER` (array,
///   slot → cgroup id) tells whose a slot is; `TCP_FREE_SLOTS` (queue) holds the free ones,
///   all of them at start (user space pushes them before attaching).
/// - A program takes a slot for a cgroup at its first connection event: pops a free one,
///   writes the owner, inserts the mapping (if another CPU was faster, it gives its slot back
///   and takes the winner's). With no free slot the event is counted in
///   `drop_reason::STATS_FULL` and nothing is written: never another cgroup's row.
/// - Each flow remembers its slot ([`super::FlowState::slot`]) and checks the owner before
///   every write; on a mismatch it looks the cgroup up again.
/// - User space frees the slot of a cgroup idle past its longest window with no open
///   connection: deletes the mapping, clears the owner, zeroes the row, pushes the slot back.
pub mod slot {
    /// [`super::FlowState::slot`] of a flow whose slot is not looked up yet; any other value
    /// is the slot plus one.
    pub const NONE: u32 = 0;
}

/// Which RTT measurements count as the path's RTT. A measurement ends at the ACK that covers
/// the segment; when that ACK waited on the peer — its delayed-ACK timer, or its next request
/// after a pause — the measurement holds the peer's think time, not the path's delay.
///
/// - An ACK that leaves data in flight (`snd_una != snd_nxt`) was sent because segments
///   arrived (a receiver acks every second full segment at once): path.
/// - An ACK that completes the flight, on a connection this side opened, that came with or
///   after new data from the peer: the peer answered this side's request, so the sample is
///   the path plus the peer's processing time (what the client's own `ss -ti` shows): path.
/// - Any other ACK that completes the flight may have waited on the peer (the server side of
///   a request/response exchange, a lone segment acked by the delayed-ACK timer): left out,
///   whatever its value — keeping the ones that look small would bias the distribution low.
///
/// Each connection's handshake RTT is a path sample too: the peer acks a SYN or SYN-ACK at
/// once, so a server whose every later sample waits on its clients still has one clean sample
/// per connection.
pub mod path {
    /// The classification above. `in_flight`: data is still outstanding after this ACK;
    /// `active`: this side opened the connection; `peer_data`: the peer sent data since the
    /// last RTT callback.
    #[inline(always)]
    pub fn is_path_sample(in_flight: bool, active: bool, peer_data: bool) -> bool {
        in_flight || (active && peer_data)
    }
}

/// Values of the read-only global `RTT_METHOD` in the TCP programs: which RTT a sample takes.
pub mod rtt_method {
    /// The measured RTT where the kernel passes it (≥ 6.10), else the smoothed srtt.
    pub const AUTO: u32 = 0;
    /// The measured RTT the kernel passes to `RTT_CB` (≥ 6.10; user space refuses it before).
    pub const KERNEL: u32 = 1;
    /// The kernel's smoothed srtt before this measurement (what kernels before 6.10 give).
    pub const SRTT: u32 = 2;
    /// The programs time one data segment per flight themselves (see [`super::segment`]):
    /// egress stamps it, sock_ops ends it at the `RTT_CB` whose `snd_una` covers it.
    pub const SEGMENT: u32 = 3;
}

/// The value of the `SOCK_CGROUP` socket-local storage: the socket's cgroup (or 0 while not
/// known) and, with `tcp.rtt_method = "segment"`, the data segment being timed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns` when the timed segment went through egress; 0 = none outstanding.
    pub probe_ns: u64,
    /// Sequence number just past the timed segment's payload: the segment is acknowledged once
    /// `snd_una` reaches it.
    pub probe_end_seq: u32,
    pub _pad: u32,
}

/// `tcp.rtt_method = "segment"`: the RTT of one data segment per flight, timed by the programs.
///
/// The egress program (`cgroup_skb`, which sees every packet a socket sends, from the network
/// header on) stamps the first data segment it sees while the socket has no segment timed;
/// sock_ops ends the measurement at the next `RTT_CB`: a sample if its `snd_una` reaches the
/// segment's end, nothing otherwise; a retransmission drops it (Karn: the ACK of a
/// retransmitted segment is ambiguous). The kernel calls `RTT_CB` once per flight (when
/// `snd_una` passes `rtt_seq`, the `snd_nxt` of the previous call; 6.10 added arguments, not
/// calls), and the segment stamped is the first one sent after that call, which starts at
/// `rtt_seq`: the next call's ACK covers it. Of a GSO super-packet only the first segment
/// (`gso_size` bytes) is timed: the first ACK past `rtt_seq` covers a first segment but need
/// not cover a whole 64 KiB burst, and the oldest newly acked segment is what the kernel times
/// too.
pub mod segment {
    /// Bytes of the fixed-size load the egress program makes: the IPv4 header without options
    /// and the first 16 bytes of the TCP header (through the data offset).
    pub const V4_LOAD: usize = 20 + 16;
    /// As [`V4_LOAD`] for IPv6: the fixed header and the first 16 bytes of the TCP header.
    pub const V6_LOAD: usize = 40 + 16;
    const IPPROTO_TCP: u8 = 6;

    /// The timed range of an IPv4 TCP segment: (its first sequence number, the sequence
    /// number just past the bytes timed), from the packet's first [`V4_LOAD`] bytes, the length
    /// of the whole packet from the network header on (`skb_len`) and its `gso_size` (0 when
    /// it is not a GSO packet). `None` for what is not timed: no payload (a pure ACK, a SYN, a
    /// FIN alone), not TCP, a header with options.
    #[inline(always)]
    pub fn timed_range_v4(head: &[u8; V4_LOAD], skb_len: u32, gso_size: u32) -> Option<(u32, u32)> {
        // Header length 20 (IHL 5): the TCP header sits where the load put it.
        if head[0] != 0x45 || head[9] != IPPROTO_TCP {
            return None;
        }
        let seq = u32::from_be_bytes([head[24], head[25], head[26], head[27]]);
        range(seq, 20, head[32], skb_len, gso_size)
    }

    /// As [`timed_range_v4`] for IPv6 ([`V6_LOAD`] bytes); extension headers are not
    /// followed (only TCP directly after the fixed header is timed).
    #[inline(always)]
    pub fn timed_range_v6(head: &[u8; V6_LOAD], skb_len: u32, gso_size: u32) -> Option<(u32, u32)> {
        if head[0] >> 4 != 6 || head[6] != IPPROTO_TCP {
            return None;
        }
        let seq = u32::from_be_bytes([head[44], head[45], head[46], head[47]]);
        range(seq, 40, head[52], skb_len, gso_size)
    }

    /// `doff_byte`: the TCP header's byte 12 (data offset in its upper 4 bits).
    #[inline(always)]
    fn range(
        seq: u32,
        ip_len: u32,
        doff_byte: u8,
        skb_len: u32,
        gso_size: u32,
    ) -> Option<(u32, u32)> {
        let tcp_len = u32::from(doff_byte >> 4) * 4;
        // From the skb's length, not the IP header's: a GSO packet's length field may be 0
        // (BIG TCP).
        let payload = skb_len.checked_sub(ip_len + tcp_len)?;
        if payload == 0 {
            return None;
        }
        let timed = if gso_size != 0 && gso_size < payload {
            gso_size
        } else {
            payload
        };
        Some((seq, seq.wrapping_add(timed)))
    }

    /// Whether `snd_una` has reached `end` (sequence numbers wrap: serial arithmetic).
    #[inline(always)]
    pub fn acked(snd_una: u32, end: u32) -> bool {
        snd_una.wrapping_sub(end) as i32 >= 0
    }
}

/// Values of [`FlowState::passive`]. sock_ops tells them apart by its callback
/// (`ACTIVE_ESTABLISHED` or `PASSIVE_ESTABLISHED`); the sock_diag fallback sees established
/// sockets without their history and writes `UNKNOWN`.
pub mod direction {
    pub const ACTIVE: u32 = 0;
    pub const PASSIVE: u32 = 1;
    pub const UNKNOWN: u32 = 2;
}

/// Indices of the `TCP_DROPS` per-CPU array: events not recorded because a map was full or a
/// socket carried no cgroup.
pub mod drop_reason {
    /// A histogram bucket could not be inserted (the sock_diag fallback's histogram full; the
    /// programs' histogram rows cannot fill).
    pub const HIST_FULL: u32 = 0;
    /// A cgroup got no slot (`tcp.max_cgroups` cgroups hold one): its event was not recorded.
    pub const STATS_FULL: u32 = 1;
    /// A flow could not be inserted in the LRU flow map.
    pub const FLOW_INSERT: u32 = 2;
    /// An RTT sample from a socket without a recorded cgroup (created before the agent started).
    pub const NO_CGROUP: u32 = 3;
    /// A flow was missing when its RTT sample came (evicted from the LRU map) and was recreated.
    pub const FLOW_EVICTED: u32 = 4;
    pub const COUNT: u32 = 8;
}

const _: () = assert!(core::mem::size_of::<HistKey>() == 16);
const _: () = assert!(core::mem::size_of::<SockState>() == 24);
const _: () = assert!(core::mem::size_of::<CgroupTcpStats>() == 13 * 8);
const _: () = assert!(core::mem::size_of::<FlowState>() == 12 * 8 + 16 + 12 * 4);
const _: () = assert!(core::mem::size_of::<HistRow>() == 3072);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flight_completing_ack_counts_only_when_it_answered_this_sides_request() {
        // Mid-flight, either side: the receiver acked on arrival.
        assert!(path::is_path_sample(true, false, false));
        assert!(path::is_path_sample(true, true, false));
        // A client's request answered by the server's reply.
        assert!(path::is_path_sample(false, true, true));
        // A server's reply acked by the client's next request (or at once: not told apart).
        assert!(!path::is_path_sample(false, false, true));
        // A lone segment acked by a pure ACK that may be the delayed-ACK timer, either side.
        assert!(!path::is_path_sample(false, true, false));
        assert!(!path::is_path_sample(false, false, false));
    }

    /// An IPv4 packet: header without options, TCP header of `doff` words, `payload` bytes.
    fn v4(seq: u32, doff: u8, payload: u32) -> ([u8; segment::V4_LOAD], u32) {
        let mut h = [0u8; segment::V4_LOAD];
        h[0] = 0x45;
        h[9] = 6;
        h[24..28].copy_from_slice(&seq.to_be_bytes());
        h[32] = doff << 4;
        (h, 20 + u32::from(doff) * 4 + payload)
    }

    #[test]
    fn a_data_segment_is_timed_to_the_end_of_its_payload() {
        let (h, len) = v4(1000, 8, 100);
        assert_eq!(segment::timed_range_v4(&h, len, 0), Some((1000, 1100)));
        // Near the wrap of the sequence space.
        let (h, len) = v4(u32::MAX - 9, 5, 100);
        assert_eq!(
            segment::timed_range_v4(&h, len, 0),
            Some((u32::MAX - 9, 90))
        );
    }

    #[test]
    fn of_a_gso_packet_only_the_first_segment_is_timed() {
        let (h, len) = v4(5000, 8, 3 * 1448);
        assert_eq!(segment::timed_range_v4(&h, len, 1448), Some((5000, 6448)));
        // A GSO size at least the payload (one segment) times the payload.
        let (h, len) = v4(5000, 8, 1000);
        assert_eq!(segment::timed_range_v4(&h, len, 1448), Some((5000, 6000)));
    }

    #[test]
    fn pure_acks_and_what_is_not_plain_tcp_are_not_timed() {
        let (h, len) = v4(1, 8, 0);
        assert_eq!(segment::timed_range_v4(&h, len, 0), None, "pure ACK");
        let (mut h, len) = v4(1, 5, 10);
        h[9] = 17;
        assert_eq!(segment::timed_range_v4(&h, len, 0), None, "UDP");
        let (mut h, len) = v4(1, 5, 10);
        h[0] = 0x46;
        assert_eq!(segment::timed_range_v4(&h, len, 0), None, "IPv4 options");
        // A length shorter than the headers (a truncated read) is not a segment.
        let (h, _) = v4(1, 8, 0);
        assert_eq!(segment::timed_range_v4(&h, 30, 0), None);
    }

    #[test]
    fn an_ipv6_segment_is_timed_and_extension_headers_are_not_followed() {
        let mut h = [0u8; segment::V6_LOAD];
        h[0] = 0x60;
        h[6] = 6;
        h[44..48].copy_from_slice(&7u32.to_be_bytes());
        h[52] = 5 << 4;
        assert_eq!(segment::timed_range_v6(&h, 40 + 20 + 50, 0), Some((7, 57)));
        h[6] = 0; // hop-by-hop options first
        assert_eq!(segment::timed_range_v6(&h, 40 + 20 + 50, 0), None);
    }

    #[test]
    fn acked_compares_sequence_numbers_across_the_wrap() {
        assert!(segment::acked(100, 100));
        assert!(segment::acked(101, 100));
        assert!(!segment::acked(99, 100));
        assert!(segment::acked(5, u32::MAX - 5));
        assert!(!segment::acked(u32::MAX - 5, 5));
    }

    #[test]
    fn ilog2_matches_the_standard_library() {
        for v in [1u64, 2, 3, 15, 16, 17, 1023, 1024, 1 << 40, u64::MAX] {
            assert_eq!(ilog2(v), v.ilog2(), "v = {v}");
        }
    }

    #[test]
    fn every_value_lies_within_its_bucket() {
        let mut v = 0u64;
        while v < HIST_MAX_US {
            let b = bucket_of(v);
            let (lo, hi) = bucket_bounds(b);
            assert!(lo <= v && v < hi, "v = {v} bucket {b} [{lo}, {hi})");
            assert!(b < HIST_BUCKETS);
            v = v * 21 / 20 + 1;
        }
        assert_eq!(bucket_of(u64::MAX), HIST_BUCKETS - 1);
    }

    #[test]
    fn buckets_are_contiguous_and_at_most_one_sixteenth_wide() {
        for b in 0..HIST_BUCKETS - 1 {
            let (lo, hi) = bucket_bounds(b);
            assert_eq!(hi, bucket_bounds(b + 1).0, "gap after bucket {b}");
            if lo >= 16 {
                assert!((hi - lo) * 16 <= lo, "bucket {b} [{lo}, {hi}) too wide");
            }
        }
    }
}
