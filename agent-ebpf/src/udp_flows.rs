//! `cgroup_skb` ingress/egress: UDP flows and RTP streams per container.
//!
//! Attached to the root of the cgroup v2 hierarchy, the programs see every packet a socket of
//! any cgroup sends or receives, and attribute it with `bpf_skb_cgroup_id`, the cgroup of the
//! packet's socket (never the task that happens to run). They parse only the IP and UDP headers
//! and the first 12 payload bytes, keep bounded LRU state, and always let the packet through.

use agent_ebpf::rtcp::{self, RtcpReport, RtcpReportKey};
use agent_ebpf::rtp::{
    classify, counter, static_clock_rate, Payload, RtpHeader, RtpKey, RtpState, UdpFlowKey,
    UdpFlowStats, DIR_EGRESS, DIR_INGRESS,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, bpf_skb_cgroup_id},
    macros::{cgroup_skb, map},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::SkBuffContext,
};

#[map]
static UDP_FLOWS: LruHashMap<UdpFlowKey, UdpFlowStats> = LruHashMap::with_max_entries(16384, 0);

#[map]
static RTP_STREAMS: LruHashMap<RtpKey, RtpState> = LruHashMap::with_max_entries(8192, 0);

/// Flows and streams not yet admitted (see `FLOW_ADMIT_PACKETS` and RFC 3550 A.1 probation):
/// what a flood of one-packet flows churns instead of the maps above.
#[map]
static UDP_FLOW_PROBATION: LruHashMap<UdpFlowKey, UdpFlowStats> =
    LruHashMap::with_max_entries(4096, 0);

#[map]
static RTP_STREAM_PROBATION: LruHashMap<RtpKey, RtpState> = LruHashMap::with_max_entries(2048, 0);

/// Clock rate (Hz) per RTP payload type, 0 = unknown; user space fills it from RFC 3551 and
/// the config's dynamic payload types.
#[map]
static RTP_CLOCK_RATES: Array<u32> = Array::with_max_entries(128, 0);

/// The latest report block per (container, media SSRC, viewer) from RTCP SR/RR arriving at a
/// container; user space joins it to the container's outbound RTP stream with that SSRC.
#[map]
static RTCP_REPORTS: LruHashMap<RtcpReportKey, RtcpReport> = LruHashMap::with_max_entries(4096, 0);

#[map]
static UDP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

const IPPROTO_UDP: u8 = 17;

#[cgroup_skb]
pub fn nodeward_udp_ingress(ctx: SkBuffContext) -> i32 {
    let _ = try_udp(&ctx, DIR_INGRESS);
    1
}

#[cgroup_skb]
pub fn nodeward_udp_egress(ctx: SkBuffContext) -> i32 {
    let _ = try_udp(&ctx, DIR_EGRESS);
    1
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(c) = UDP_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, valid for the program's run.
        unsafe { *c += 1 };
    }
}

/// The headers of one UDP datagram, read from its packet.
struct Datagram {
    ip_version: u16,
    /// Addresses in network byte order, IPv4 in the first word.
    src: [u32; 4],
    dst: [u32; 4],
    /// Offset of the UDP header from the start of the IP header.
    l4: usize,
    sport: u16,
    dport: u16,
    payload_len: u32,
    /// The first 12 payload bytes, zero-filled past the end of a shorter payload.
    head: [u8; 12],
}

impl Datagram {
    /// From the UDP header and the 12 bytes after it (`b`, as it lies in the packet).
    #[inline(always)]
    fn new(ip_version: u16, src: [u32; 4], dst: [u32; 4], l4: usize, b: &[u8; 20]) -> Self {
        Self {
            ip_version,
            src,
            dst,
            l4,
            sport: u16::from_be_bytes([b[0], b[1]]),
            dport: u16::from_be_bytes([b[2], b[3]]),
            payload_len: u32::from(u16::from_be_bytes([b[4], b[5]])).saturating_sub(8),
            head: [
                b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15], b[16], b[17], b[18], b[19],
            ],
        }
    }
}

/// What the first look at a packet found.
enum Parsed {
    NotUdp,
    Fragment,
    /// A UDP packet whose UDP header is not all there.
    Truncated,
    Udp(Datagram),
}

/// The linear part of the packet, `[data, data_end)`, for direct packet access. `cgroup_skb`
/// programs may read it since 5.0 when loaded with `CAP_SYS_ADMIN` (or `CAP_BPF` on 5.8+),
/// which the agent needs anyway. `data` is the start of the IP header on both hooks.
#[derive(Clone, Copy)]
struct Linear {
    data: usize,
    end: usize,
}

/// A packet span that [`Linear::span`] checked.
#[derive(Clone, Copy)]
struct Span(usize);

impl Span {
    /// The `T` at `off` in the span (which the caller keeps within the span's length).
    ///
    /// An aligned load on purpose: an unaligned one is split into byte loads by the BPF
    /// backend. Packet loads need no alignment on the architectures the agent runs on
    /// (x86-64, arm64: the verifier checks alignment only where the kernel lacks efficient
    /// unaligned access).
    #[inline(always)]
    fn at<T: Copy>(self, off: usize) -> T {
        // SAFETY: within the range the verifier checked in `Linear::span`.
        unsafe { *((self.0 + off) as *const T) }
    }
}

impl Linear {
    #[inline(always)]
    fn of(ctx: &SkBuffContext) -> Self {
        let skb = ctx.skb.skb;
        // SAFETY: reading two UAPI `__sk_buff` fields of the program's own context; the
        // verifier turns them into packet pointers.
        unsafe {
            Self {
                data: (*skb).data as usize,
                end: (*skb).data_end as usize,
            }
        }
    }

    /// The `len` bytes at `off`, if the linear part holds them. `off` and `len` are constants
    /// at every call site, which keeps the bounds check one the 5.10 verifier follows.
    #[inline(always)]
    fn span(self, off: usize, len: usize) -> Option<Span> {
        if self.data + off + len > self.end {
            return None;
        }
        Some(Span(self.data + off))
    }
}

#[inline(always)]
fn word(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// The UDP header and the 12 bytes after it, from a checked span of 20 bytes: ports and length
/// in host order, the payload head as it lies in the packet.
#[inline(always)]
fn udp_from_span(ip_version: u16, src: [u32; 4], dst: [u32; 4], l4: usize, u: Span) -> Datagram {
    let h0: u32 = u.at(8);
    let h1: u32 = u.at(12);
    let h2: u32 = u.at(16);
    let (a, b, c) = (h0.to_ne_bytes(), h1.to_ne_bytes(), h2.to_ne_bytes());
    Datagram {
        ip_version,
        src,
        dst,
        l4,
        sport: u16::from_be(u.at(0)),
        dport: u16::from_be(u.at(2)),
        payload_len: u32::from(u16::from_be(u.at(4))).saturating_sub(8),
        head: [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3],
        ],
    }
}

/// Reads the IP and UDP headers and the first 12 payload bytes. Every packet a socket sends or
/// receives comes here, TCP included, so the common cases cost no helper call: an IPv4 header
/// without options or an IPv6 header, with UDP after it and everything in the linear part, is
/// read directly from the packet, and a packet that is not UDP leaves after reading its first
/// bytes. Anything else (IP options, headers in paged data, a payload shorter than 12 bytes)
/// gets `None` here and goes to [`parse_loaded`], the `bpf_skb_load_bytes` path that reads any
/// layout.
#[inline(always)]
fn parse_linear(ctx: &SkBuffContext) -> Option<Parsed> {
    let lin = Linear::of(ctx);
    // The IPv4 fixed header, or the first 20 bytes of IPv6's. Every TCP packet has at least 40.
    let ip = lin.span(0, 20)?;
    let first: u8 = ip.at(0);
    if first == 0x45 {
        if ip.at::<u8>(9) != IPPROTO_UDP {
            return Some(Parsed::NotUdp);
        }
        if u16::from_be(ip.at(6)) & 0x1fff != 0 {
            return Some(Parsed::Fragment);
        }
        let u = lin.span(20, 20)?;
        return Some(Parsed::Udp(udp_from_span(
            4,
            [ip.at(12), 0, 0, 0],
            [ip.at(16), 0, 0, 0],
            20,
            u,
        )));
    }
    match first >> 4 {
        6 => {
            // Only UDP directly after the fixed header; extension headers are not followed.
            if ip.at::<u8>(6) != IPPROTO_UDP {
                return Some(Parsed::NotUdp);
            }
            let a = lin.span(8, 32)?;
            let u = lin.span(40, 20)?;
            Some(Parsed::Udp(udp_from_span(
                6,
                [a.at(0), a.at(4), a.at(8), a.at(12)],
                [a.at(16), a.at(20), a.at(24), a.at(28)],
                40,
                u,
            )))
        }
        // IPv4 with options: its UDP header sits at a variable offset, which the load path
        // handles.
        4 => None,
        _ => Some(Parsed::NotUdp),
    }
}

/// [`parse_linear`] through `bpf_skb_load_bytes`, for packets whose headers are not all in the
/// linear part or sit at a variable offset.
#[inline(always)]
fn parse_loaded(ctx: &SkBuffContext) -> Parsed {
    let Ok(ip) = ctx.load::<[u8; 20]>(0) else {
        return Parsed::NotUdp;
    };
    let (ip_version, src, dst, l4): (u16, [u32; 4], [u32; 4], usize) = match ip[0] >> 4 {
        4 => {
            if ip[9] != IPPROTO_UDP {
                return Parsed::NotUdp;
            }
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
                return Parsed::Fragment;
            }
            (
                4,
                [word(&ip, 12), 0, 0, 0],
                [word(&ip, 16), 0, 0, 0],
                usize::from(ip[0] & 0x0f) * 4,
            )
        }
        6 => {
            if ip[6] != IPPROTO_UDP {
                return Parsed::NotUdp;
            }
            let Ok(a) = ctx.load::<[u32; 8]>(8) else {
                return Parsed::NotUdp;
            };
            (6, [a[0], a[1], a[2], a[3]], [a[4], a[5], a[6], a[7]], 40)
        }
        _ => return Parsed::NotUdp,
    };
    // The UDP header and the first 12 payload bytes in one load; a payload shorter than an RTP
    // header falls back to the UDP header alone.
    match ctx.load::<[u8; 20]>(l4) {
        Ok(b) => Parsed::Udp(Datagram::new(ip_version, src, dst, l4, &b)),
        Err(_) => match ctx.load::<[u8; 8]>(l4) {
            Ok(u) => {
                let mut b = [0u8; 20];
                b[..8].copy_from_slice(&u);
                Parsed::Udp(Datagram::new(ip_version, src, dst, l4, &b))
            }
            Err(_) => Parsed::Truncated,
        },
    }
}

#[inline(always)]
fn try_udp(ctx: &SkBuffContext, direction: u16) -> Result<(), i64> {
    let parsed = match parse_linear(ctx) {
        Some(p) => p,
        None => parse_loaded(ctx),
    };
    let d = match parsed {
        Parsed::NotUdp => return Ok(()),
        Parsed::Fragment => {
            bump(counter::FRAGMENTS);
            return Ok(());
        }
        Parsed::Truncated => {
            bump(counter::UDP_PACKETS);
            bump(counter::TRUNCATED);
            return Ok(());
        }
        Parsed::Udp(d) => d,
    };
    bump(counter::UDP_PACKETS);
    let (head, payload_len, l4) = (d.head, d.payload_len, d.l4);
    // Every field written here, none left to a default: a default is zero-filled first, and
    // the BPF backend turns that fill into a byte-by-byte `memset` subprogram call.
    // SAFETY: the context pointer is the program's own __sk_buff.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let key = if direction == DIR_INGRESS {
        UdpFlowKey {
            cgroup_id,
            local_addr: d.dst,
            remote_addr: d.src,
            local_port: d.dport,
            remote_port: d.sport,
            ip_version: d.ip_version,
            direction,
        }
    } else {
        UdpFlowKey {
            cgroup_id,
            local_addr: d.src,
            remote_addr: d.dst,
            local_port: d.sport,
            remote_port: d.dport,
            ip_version: d.ip_version,
            direction,
        }
    };
    // SAFETY: the helper takes no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let bytes = u64::from(payload_len);

    match UDP_FLOWS.get_ptr_mut(&key) {
        // SAFETY: a map value pointer, valid for the program's run. Another CPU may update the
        // same flow at once; UDP receive for one socket is normally serialised, and a lost
        // update costs one sample, not correctness of the map.
        Some(f) => unsafe { (*f).update(now, bytes) },
        None => flow_probation(&key, now, bytes),
    }

    match classify(&head, payload_len) {
        Payload::Rtp(h) => {
            bump(counter::RTP_PACKETS);
            let pt = u32::from(h.payload_type);
            let rate = match static_clock_rate(h.payload_type) {
                Some(r) => r,
                None => RTP_CLOCK_RATES.get(pt).copied().unwrap_or(0),
            };
            let rkey = RtpKey {
                flow: key,
                ssrc: h.ssrc,
                _pad: 0,
            };
            match RTP_STREAMS.get_ptr_mut(&rkey) {
                // SAFETY: as for the flow above.
                Some(s) => unsafe {
                    (*s).update(&h, rate, now, bytes);
                },
                None => stream_probation(&rkey, &h, rate, now, bytes),
            }
        }
        Payload::Rtcp => {
            bump(counter::RTCP_PACKETS);
            // Viewers report on what the container sends them: only inbound RTCP matters.
            if direction == DIR_INGRESS {
                rtcp_reports(ctx, &key, l4 + 8, payload_len, now);
            }
        }
        Payload::Stun => bump(counter::STUN_PACKETS),
        Payload::Other => {}
    }
    Ok(())
}

/// A packet of a flow not in `UDP_FLOWS`: count it on probation, and admit the flow, with the
/// packets counted so far, once it proved itself (`UdpFlowStats::probation_update`).
#[inline(always)]
fn flow_probation(key: &UdpFlowKey, now: u64, bytes: u64) {
    match UDP_FLOW_PROBATION.get_ptr_mut(key) {
        Some(f) => {
            // SAFETY: a map value pointer, valid for the program's run.
            let admit = unsafe { (*f).probation_update(now, bytes) };
            if admit {
                // SAFETY: as above; the kernel copies the value out of the probation map.
                let stats = unsafe { &*f };
                if UDP_FLOWS.insert(key, stats, u64::from(BPF_NOEXIST)).is_ok() {
                    bump(counter::FLOWS_CREATED);
                } else {
                    bump(counter::FLOW_INSERT_FAILED);
                }
                let _ = UDP_FLOW_PROBATION.remove(key);
            }
        }
        None => {
            let mut f = UdpFlowStats::default();
            f.update(now, bytes);
            if UDP_FLOW_PROBATION
                .insert(key, &f, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                bump(counter::FLOWS_ON_PROBATION);
            }
        }
    }
}

/// A packet of an RTP stream not in `RTP_STREAMS`: run the RFC 3550 probation in the probation
/// map, and admit the stream once its sequence numbers confirmed it.
#[inline(always)]
fn stream_probation(rkey: &RtpKey, h: &RtpHeader, rate: u32, now: u64, bytes: u64) {
    match RTP_STREAM_PROBATION.get_ptr_mut(rkey) {
        Some(s) => {
            // SAFETY: a map value pointer, valid for the program's run.
            let admit = unsafe { (*s).probation_update(h, rate, now, bytes) };
            if admit {
                // SAFETY: as above; the kernel copies the value out of the probation map.
                let state = unsafe { &*s };
                if RTP_STREAMS
                    .insert(rkey, state, u64::from(BPF_NOEXIST))
                    .is_ok()
                {
                    bump(counter::STREAMS_CREATED);
                } else {
                    bump(counter::STREAM_INSERT_FAILED);
                }
                let _ = RTP_STREAM_PROBATION.remove(rkey);
            }
        }
        None => {
            let s = RtpState::new(h, rate, now, bytes);
            if RTP_STREAM_PROBATION
                .insert(rkey, &s, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                bump(counter::STREAMS_ON_PROBATION);
            }
        }
    }
}

/// Reads the report blocks of an inbound RTCP datagram whose payload starts at `payload` in
/// the packet, and keeps each as the latest from its viewer about its SSRC.
#[inline(always)]
fn rtcp_reports(ctx: &SkBuffContext, key: &UdpFlowKey, payload: usize, len: u32, now: u64) {
    let n = rtcp::walk(
        len,
        |off| ctx.load::<[u8; 8]>(payload + off as usize).ok(),
        |off| ctx.load::<[u8; 24]>(payload + off as usize).ok(),
        |reporter, b| {
            let rkey = RtcpReportKey {
                cgroup_id: key.cgroup_id,
                media_ssrc: b.media_ssrc,
                reporter_ssrc: reporter,
            };
            let report = RtcpReport {
                arrival_ns: now,
                remote_addr: key.remote_addr,
                fraction_lost: u32::from(b.fraction_lost),
                cumulative_lost: b.cumulative_lost,
                ext_highest_seq: b.ext_highest_seq,
                jitter: b.jitter,
                remote_port: key.remote_port,
                local_port: key.local_port,
                ip_version: key.ip_version,
                _pad: 0,
            };
            let _ = RTCP_REPORTS.insert(&rkey, &report, 0);
        },
    );
    if n > 0 {
        bump(counter::RTCP_WITH_REPORTS);
    }
}
