//! UDP flow and RTP stream types shared by the `udp_flows` programs and user space, and the
//! RTP logic itself: header classification and the RFC 3550 (appendix A.1, A.8) sequence and
//! jitter bookkeeping.
//!
//! The logic lives here, in plain `no_std` Rust without loops, so that the very same code runs
//! in the kernel (called on a map value) and in user-space tests and fuzzers.

/// Bytes of the fixed RTP header.
pub const RTP_HEADER_LEN: u32 = 12;
/// STUN (RFC 5389) magic cookie, big-endian at offset 4.
pub const STUN_MAGIC: u32 = 0x2112_A442;

/// A packet belongs to this direction of the container's socket.
pub const DIR_INGRESS: u16 = 0;
pub const DIR_EGRESS: u16 = 1;

/// One UDP flow as seen by one container's socket, in one direction. Addresses are in network
/// byte order; IPv4 addresses use the first word, the others are zero. Ports are host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct UdpFlowKey {
    pub cgroup_id: u64,
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    /// 4 or 6.
    pub ip_version: u16,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub direction: u16,
}

/// Counters and inter-arrival statistics of one flow (RFC 3393-style packet delay variation:
/// the difference between consecutive inter-arrival times).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UdpFlowStats {
    pub packets: u64,
    /// UDP payload bytes.
    pub bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// The last inter-arrival time.
    pub last_iat_ns: u64,
    /// Sum, count and maximum of |iat(n) - iat(n-1)|.
    pub ipdv_sum_ns: u64,
    pub ipdv_count: u64,
    pub ipdv_max_ns: u64,
    /// The longest inter-arrival time seen (a gap in the stream).
    pub max_gap_ns: u64,
}

impl UdpFlowStats {
    /// Accounts one packet of `bytes` payload arriving at `now_ns`.
    #[inline(always)]
    pub fn update(&mut self, now_ns: u64, bytes: u64) {
        if self.packets == 0 {
            self.first_ns = now_ns;
        } else {
            let iat = now_ns.saturating_sub(self.last_ns);
            if self.packets >= 2 {
                let ipdv = iat.abs_diff(self.last_iat_ns);
                self.ipdv_sum_ns += ipdv;
                self.ipdv_count += 1;
                if ipdv > self.ipdv_max_ns {
                    self.ipdv_max_ns = ipdv;
                }
            }
            if iat > self.max_gap_ns {
                self.max_gap_ns = iat;
            }
            self.last_iat_ns = iat;
        }
        self.last_ns = now_ns;
        self.packets += 1;
        self.bytes += bytes;
    }

    /// Accounts one packet of a flow on probation. Returns whether the flow has now proved
    /// itself ([`FLOW_ADMIT_PACKETS`] within [`PROBATION_WINDOW_NS`] of each other) and belongs
    /// in the flow map.
    #[inline(always)]
    pub fn probation_update(&mut self, now_ns: u64, bytes: u64) -> bool {
        if self.packets > 0 && now_ns.saturating_sub(self.last_ns) > PROBATION_WINDOW_NS {
            // Too long since its last packet: probation starts again from this one.
            *self = Self::default();
        }
        self.update(now_ns, bytes);
        self.packets >= FLOW_ADMIT_PACKETS
    }
}

/// Packets a new flow must show before it enters the flow map. Until then it waits in a
/// separate, smaller probation map, so a flood of one-packet flows (random source ports) churns
/// only that map and never evicts an established flow. The probation packets are carried over
/// into the admitted flow, so its counts start at its first packet.
pub const FLOW_ADMIT_PACKETS: u64 = 2;

/// A flow or stream on probation whose packets are further apart than this starts its
/// probation again: a low-rate sender is not a stream, and a stale first packet would make an
/// admitted flow look older than it is.
pub const PROBATION_WINDOW_NS: u64 = 10_000_000_000;

/// One RTP stream: a flow and a synchronisation source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RtpKey {
    pub flow: UdpFlowKey,
    pub ssrc: u32,
    pub _pad: u32,
}

/// RFC 3550 A.1 constants.
pub const MIN_SEQUENTIAL: u32 = 2;
pub const MAX_DROPOUT: u32 = 3000;
pub const MAX_MISORDER: u32 = 100;
pub const RTP_SEQ_MOD: u32 = 1 << 16;

/// Receiver state of one RTP stream (RFC 3550 A.1 `source`, plus jitter in nanoseconds).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RtpState {
    /// Packets seen, including those during probation and invalid ones.
    pub packets: u64,
    pub bytes: u64,
    /// Packets counted by the sequence logic (RFC 3550 `received`).
    pub received: u64,
    /// Packets that arrived with a sequence number behind the highest (late or duplicate).
    pub reordered: u64,
    pub first_arrival_ns: u64,
    pub last_arrival_ns: u64,
    /// RFC 3550 interarrival jitter, in nanoseconds, scaled by 16 (A.8's integer form).
    pub jitter_ns_x16: u64,
    /// Sum and count of the jitter estimate after each update (for the mean), and its maximum.
    pub jitter_sum_ns: u64,
    pub jitter_samples: u64,
    pub jitter_max_ns: u64,
    /// 0 until probation passed, then 1.
    pub confirmed: u32,
    pub probation: u32,
    pub max_seq: u32,
    pub bad_seq: u32,
    pub base_seq: u32,
    /// Sequence number wrap-arounds.
    pub cycles: u32,
    pub payload_type: u32,
    /// Clock rate used for the jitter (Hz); 0 when the payload type's rate is unknown.
    pub clock_rate: u32,
    pub last_rtp_ts: u32,
    /// RTP timestamp increment between the last two packets, in timestamp units (reported for
    /// payload types whose clock rate is unknown, instead of a guessed jitter).
    pub last_ts_delta: u32,
    pub payload_type_changes: u32,
    pub resyncs: u32,
}

/// The fields of an RTP header the receiver needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtpHeader {
    pub payload_type: u8,
    pub seq: u16,
    pub timestamp: u32,
    pub ssrc: u32,
}

/// What a UDP payload looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    Rtp(RtpHeader),
    Rtcp,
    Stun,
    Other,
}

/// Whether an RTP payload type is one a real stream uses: RFC 3551's assigned static types and
/// the dynamic range. Unassigned, reserved and RTCP-conflicting values are not RTP.
#[inline(always)]
pub fn payload_type_is_sane(pt: u8) -> bool {
    matches!(pt, 0 | 3..=18 | 25 | 26 | 28 | 31..=34 | 96..=127)
}

/// RFC 3551 clock rates of the static payload types (Hz).
#[inline(always)]
pub fn static_clock_rate(pt: u8) -> Option<u32> {
    match pt {
        0 | 3 | 4 | 5 | 7 | 8 | 9 | 12 | 13 | 15 | 18 => Some(8_000),
        6 => Some(16_000),
        10 | 11 => Some(44_100),
        16 => Some(11_025),
        17 => Some(22_050),
        14 | 25 | 26 | 28 | 31 | 32 | 33 | 34 => Some(90_000),
        _ => None,
    }
}

/// Classifies a UDP payload from its first 12 bytes (`head`, zero-filled past the end) and its
/// length. RTCP (packet types 192–223, RFC 5761) and STUN (magic cookie) are told apart from
/// RTP; an RTP header must have version 2, a sane payload type, and room for its CSRC list.
#[inline(always)]
pub fn classify(head: &[u8; 12], payload_len: u32) -> Payload {
    if payload_len < RTP_HEADER_LEN {
        return Payload::Other;
    }
    let version = head[0] >> 6;
    if version == 0 {
        let cookie = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        return if payload_len >= 20 && cookie == STUN_MAGIC {
            Payload::Stun
        } else {
            Payload::Other
        };
    }
    if version != 2 {
        return Payload::Other;
    }
    if (192..=223).contains(&head[1]) {
        return Payload::Rtcp;
    }
    let csrc_count = u32::from(head[0] & 0x0f);
    if RTP_HEADER_LEN + 4 * csrc_count > payload_len {
        return Payload::Other;
    }
    let payload_type = head[1] & 0x7f;
    if !payload_type_is_sane(payload_type) {
        return Payload::Other;
    }
    Payload::Rtp(RtpHeader {
        payload_type,
        seq: u16::from_be_bytes([head[2], head[3]]),
        timestamp: u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
        ssrc: u32::from_be_bytes([head[8], head[9], head[10], head[11]]),
    })
}

impl RtpState {
    /// A new stream, first packet seen: on probation (RFC 3550 A.1).
    #[inline(always)]
    pub fn new(h: &RtpHeader, clock_rate: u32, now_ns: u64, bytes: u64) -> Self {
        Self {
            packets: 1,
            bytes,
            // This first packet is the first of the MIN_SEQUENTIAL in-order packets probation needs.
            probation: MIN_SEQUENTIAL - 1,
            max_seq: u32::from(h.seq),
            bad_seq: RTP_SEQ_MOD + 1,
            base_seq: u32::from(h.seq),
            payload_type: u32::from(h.payload_type),
            clock_rate,
            last_rtp_ts: h.timestamp,
            first_arrival_ns: now_ns,
            last_arrival_ns: now_ns,
            ..Self::default()
        }
    }

    /// Accounts one packet of a stream on probation. Returns whether RFC 3550 probation has
    /// now confirmed it (sequential packets within [`PROBATION_WINDOW_NS`] of each other) and it
    /// belongs in the stream map.
    #[inline(always)]
    pub fn probation_update(
        &mut self,
        h: &RtpHeader,
        clock_rate: u32,
        now_ns: u64,
        bytes: u64,
    ) -> bool {
        if now_ns.saturating_sub(self.last_arrival_ns) > PROBATION_WINDOW_NS {
            *self = Self::new(h, clock_rate, now_ns, bytes);
            return false;
        }
        self.update(h, clock_rate, now_ns, bytes);
        self.confirmed == 1
    }

    /// Total packets expected from the sequence numbers (RFC 3550 A.3).
    pub fn expected(&self) -> u64 {
        let extended_max =
            u64::from(self.cycles) * u64::from(RTP_SEQ_MOD) + u64::from(self.max_seq);
        (extended_max + 1).saturating_sub(u64::from(self.base_seq))
    }

    /// Packets lost: expected minus received, never negative (duplicates can exceed it).
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }

    /// The current jitter estimate in nanoseconds.
    pub fn jitter_ns(&self) -> u64 {
        self.jitter_ns_x16 >> 4
    }

    /// Accounts one packet. Returns whether the sequence logic counted it.
    #[inline(always)]
    pub fn update(&mut self, h: &RtpHeader, clock_rate: u32, now_ns: u64, bytes: u64) -> bool {
        self.packets += 1;
        self.bytes += bytes;
        let pt = u32::from(h.payload_type);
        let same_clock = pt == self.payload_type && clock_rate == self.clock_rate;
        if pt != self.payload_type {
            self.payload_type_changes += 1;
            self.payload_type = pt;
            self.clock_rate = clock_rate;
        }
        let valid = self.update_seq(u32::from(h.seq));
        if valid && same_clock && self.confirmed == 1 && clock_rate != 0 {
            self.update_jitter(h.timestamp, clock_rate, now_ns);
        }
        if self.clock_rate == 0 {
            self.last_ts_delta = h.timestamp.wrapping_sub(self.last_rtp_ts);
        }
        self.last_rtp_ts = h.timestamp;
        self.last_arrival_ns = now_ns;
        valid
    }

    /// RFC 3550 A.1 `update_seq`, with probation packets counted once the stream is confirmed.
    #[inline(always)]
    fn update_seq(&mut self, seq: u32) -> bool {
        let udelta = seq.wrapping_sub(self.max_seq) & (RTP_SEQ_MOD - 1);
        if self.probation > 0 {
            if seq == (self.max_seq + 1) & (RTP_SEQ_MOD - 1) {
                self.probation -= 1;
                self.max_seq = seq;
                if self.probation == 0 {
                    // Confirmed: count the probation packets, as if the stream began there.
                    self.init_seq(seq);
                    self.received = u64::from(MIN_SEQUENTIAL);
                    if seq >= MIN_SEQUENTIAL - 1 {
                        self.base_seq = seq - (MIN_SEQUENTIAL - 1);
                    } else {
                        // Probation straddled a wrap: the base lies in the previous cycle.
                        self.cycles = 1;
                        self.base_seq = seq + RTP_SEQ_MOD - (MIN_SEQUENTIAL - 1);
                    }
                    self.confirmed = 1;
                    return true;
                }
            } else {
                self.probation = MIN_SEQUENTIAL - 1;
                self.max_seq = seq;
            }
            return false;
        }
        if udelta < MAX_DROPOUT {
            if seq < self.max_seq {
                self.cycles += 1;
            }
            self.max_seq = seq;
        } else if udelta <= RTP_SEQ_MOD - MAX_MISORDER {
            // A very large jump: resynchronise if two sequential packets agree, else wait.
            if seq == self.bad_seq {
                self.init_seq(seq);
                self.resyncs += 1;
            } else {
                self.bad_seq = (seq + 1) & (RTP_SEQ_MOD - 1);
                return false;
            }
        } else {
            self.reordered += 1;
        }
        self.received += 1;
        true
    }

    #[inline(always)]
    fn init_seq(&mut self, seq: u32) {
        self.base_seq = seq;
        self.max_seq = seq;
        self.bad_seq = RTP_SEQ_MOD + 1;
        self.cycles = 0;
        self.received = 0;
    }

    /// RFC 3550 A.8 with time in nanoseconds: D = (R_j - R_i) - (S_j - S_i), the RTP timestamp
    /// difference converted with the clock rate; J += (|D| - J) / 16. Unsigned arithmetic only
    /// (signed division needs a newer BPF instruction set).
    #[inline(always)]
    fn update_jitter(&mut self, ts: u32, clock_rate: u32, now_ns: u64) {
        let arrival_delta = now_ns.saturating_sub(self.last_arrival_ns);
        let ts_delta = ts.wrapping_sub(self.last_rtp_ts);
        // A negative timestamp step (reordering) is the two's complement of a small number.
        let (ts_back, ts_abs) = if ts_delta > u32::MAX / 2 {
            (true, u64::from(ts_delta.wrapping_neg()))
        } else {
            (false, u64::from(ts_delta))
        };
        let ts_ns = ts_abs * 1_000_000_000 / u64::from(clock_rate);
        let d = if ts_back {
            arrival_delta + ts_ns
        } else {
            arrival_delta.abs_diff(ts_ns)
        };
        // jitter += |D| - (jitter + 8) / 16, in the x16 scale; never below zero.
        self.jitter_ns_x16 = (self.jitter_ns_x16 + d).saturating_sub((self.jitter_ns_x16 + 8) >> 4);
        let j = self.jitter_ns_x16 >> 4;
        self.jitter_sum_ns += j;
        self.jitter_samples += 1;
        if j > self.jitter_max_ns {
            self.jitter_max_ns = j;
        }
    }
}

/// Indexes of the `UDP_COUNTERS` per-CPU array.
pub mod counter {
    pub const UDP_PACKETS: u32 = 0;
    pub const TRUNCATED: u32 = 1;
    pub const FRAGMENTS: u32 = 2;
    pub const RTP_PACKETS: u32 = 3;
    pub const RTCP_PACKETS: u32 = 4;
    pub const STUN_PACKETS: u32 = 5;
    pub const FLOWS_CREATED: u32 = 6;
    pub const STREAMS_CREATED: u32 = 7;
    pub const FLOW_INSERT_FAILED: u32 = 8;
    pub const STREAM_INSERT_FAILED: u32 = 9;
    /// New flows put on probation (see [`FLOW_ADMIT_PACKETS`](super::FLOW_ADMIT_PACKETS)).
    pub const FLOWS_ON_PROBATION: u32 = 10;
    /// New RTP streams put on probation (RFC 3550 A.1: two packets in sequence admit one).
    pub const STREAMS_ON_PROBATION: u32 = 11;
    /// Inbound RTCP datagrams with at least one report block read (see `rtcp`).
    pub const RTCP_WITH_REPORTS: u32 = 12;
    pub const COUNT: u32 = 13;
}

// Map keys and values shared with user space: each size is the sum of its fields, so no
// implicit padding hides in them (padding bytes in a hash key are whatever the stack held, and
// a lookup with the same fields then misses).
const _: () = assert!(core::mem::size_of::<UdpFlowKey>() == 8 + 4 * 4 + 4 * 4 + 4 * 2);
const _: () = assert!(core::mem::size_of::<UdpFlowStats>() == 9 * 8);
const _: () = assert!(core::mem::size_of::<RtpKey>() == core::mem::size_of::<UdpFlowKey>() + 4 + 4);
const _: () = assert!(core::mem::size_of::<RtpState>() == 10 * 8 + 12 * 4);
