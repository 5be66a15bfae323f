//! RTCP receiver reports (RFC 3550 6.4) that viewers send back to a container serving an RTP
//! stream: the types shared by the `udp_flows` programs and user space, and the parser.
//!
//! The parser walks a (compound) RTCP packet through two loads it is handed, so the very same
//! code runs in the kernel (on `bpf_skb_load_bytes`) and in user-space tests on a byte slice.
//! Its loops have constant bounds ([`MAX_RTCP_PACKETS`], [`MAX_REPORT_BLOCKS`]) so the verifier
//! of a 5.10 kernel accepts them.

/// RTCP packet types that carry report blocks: sender report and receiver report.
pub const RTCP_SR: u8 = 200;
pub const RTCP_RR: u8 = 201;
/// Bytes of the common RTCP header (version, count, type, length, sender SSRC).
pub const RTCP_HEADER_LEN: u32 = 8;
/// Bytes of an SR's sender info, between its header and its report blocks.
pub const SR_SENDER_INFO_LEN: u32 = 20;
/// Bytes of one report block.
pub const REPORT_BLOCK_LEN: u32 = 24;
/// Sub-packets of a compound packet looked at (an SR/RR comes first, RFC 3550 6.1; RFC 5506
/// reduced-size packets may put one later).
pub const MAX_RTCP_PACKETS: u32 = 3;
/// Report blocks read per UDP datagram, over all its sub-packets: a viewer reports on the few
/// streams it receives from this server; further blocks are not read.
pub const MAX_REPORT_BLOCKS: u32 = 4;

/// Whom a report is about and who sent it, in one container.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RtcpReportKey {
    /// The cgroup of the socket that received the report (the serving container).
    pub cgroup_id: u64,
    /// The SSRC the report is about: the container's outbound RTP stream.
    pub media_ssrc: u32,
    /// The SSRC of the viewer that sent the report.
    pub reporter_ssrc: u32,
}

/// The latest report block from one viewer about one stream.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RtcpReport {
    /// When it arrived (monotonic ns, `bpf_ktime_get_ns`).
    pub arrival_ns: u64,
    /// The viewer's address (network byte order; IPv4 in the first word).
    pub remote_addr: [u32; 4],
    /// Fraction lost since the viewer's previous report, in 1/256.
    pub fraction_lost: u32,
    /// Cumulative packets lost, the raw 24-bit two's complement field.
    pub cumulative_lost: u32,
    /// Extended highest sequence number received.
    pub ext_highest_seq: u32,
    /// Interarrival jitter, in RTP timestamp units of the stream.
    pub jitter: u32,
    pub remote_port: u16,
    /// The container's port it arrived on: the RTP port (rtcp-mux, RFC 5761) or RTP port + 1.
    pub local_port: u16,
    /// 4 or 6.
    pub ip_version: u16,
    pub _pad: u16,
}

/// One report block (RFC 3550 6.4.1), decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportBlock {
    pub media_ssrc: u32,
    pub fraction_lost: u8,
    /// 24-bit two's complement, as on the wire.
    pub cumulative_lost: u32,
    pub ext_highest_seq: u32,
    pub jitter: u32,
}

impl ReportBlock {
    #[inline(always)]
    pub fn parse(b: &[u8; 24]) -> Self {
        Self {
            media_ssrc: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            fraction_lost: b[4],
            cumulative_lost: u32::from_be_bytes([0, b[5], b[6], b[7]]),
            ext_highest_seq: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            jitter: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
        }
    }
}

/// The 24-bit cumulative-lost field as a signed number (duplicates can make it negative).
pub fn cumulative_lost_signed(raw: u32) -> i32 {
    // Shift the 24-bit field to the top and back to sign-extend it.
    ((raw << 8) as i32) >> 8
}

/// Walks an RTCP datagram of `payload_len` bytes. `header(off)` loads the 8 bytes at payload
/// offset `off`, `block(off)` the 24 at `off` (`None` past the end); `report(reporter_ssrc,
/// block)` is called for each report block of an SR or RR, at most [`MAX_REPORT_BLOCKS`].
/// Anything that does not look like RTCP (version, length) ends the walk: what was reported
/// before stays, nothing after it is read. Returns the number of blocks reported.
#[inline(always)]
pub fn walk<H, B, R>(payload_len: u32, mut header: H, mut block: B, mut report: R) -> u32
where
    H: FnMut(u32) -> Option<[u8; 8]>,
    B: FnMut(u32) -> Option<[u8; 24]>,
    R: FnMut(u32, &ReportBlock),
{
    let mut off: u32 = 0;
    let mut done: u32 = 0;
    for _ in 0..MAX_RTCP_PACKETS {
        if off + RTCP_HEADER_LEN > payload_len {
            break;
        }
        let Some(h) = header(off) else { break };
        if h[0] >> 6 != 2 {
            break;
        }
        let len = (u32::from(u16::from_be_bytes([h[2], h[3]])) + 1) * 4;
        let end = off + len;
        if end > payload_len {
            break;
        }
        let first = match h[1] {
            RTCP_SR => off + RTCP_HEADER_LEN + SR_SENDER_INFO_LEN,
            RTCP_RR => off + RTCP_HEADER_LEN,
            _ => end,
        };
        let count = u32::from(h[0] & 0x1f);
        let reporter = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        for i in 0..MAX_REPORT_BLOCKS {
            if i >= count || done >= MAX_REPORT_BLOCKS {
                break;
            }
            let at = first + i * REPORT_BLOCK_LEN;
            if at + REPORT_BLOCK_LEN > end {
                break;
            }
            let Some(b) = block(at) else { break };
            report(reporter, &ReportBlock::parse(&b));
            done += 1;
        }
        off = end;
    }
    done
}

const _: () = assert!(core::mem::size_of::<RtcpReportKey>() == 8 + 4 + 4);
const _: () = assert!(core::mem::size_of::<RtcpReport>() == 8 + 4 * 4 + 4 * 4 + 4 * 2);
