//! The user-space twin of the eBPF UDP/RTP code (`agent_ebpf::rtp`): the classifier and the
//! RFC 3550 A.1/A.8 receiver state machine. The eBPF build runs the same source, so a panic
//! here is an overflow or out-of-range index there.

use agent_ebpf::rtp::{
    classify, payload_type_is_sane, static_clock_rate, Payload, RtpHeader, RtpState, MAX_MISORDER,
    RTP_HEADER_LEN,
};
use proptest::prelude::*;

use crate::cases;

fn header_bytes(h: &RtpHeader, marker: bool, csrc: u8) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0] = 0x80 | (csrc & 0x0f);
    b[1] = h.payload_type | if marker { 0x80 } else { 0 };
    b[2..4].copy_from_slice(&h.seq.to_be_bytes());
    b[4..8].copy_from_slice(&h.timestamp.to_be_bytes());
    b[8..12].copy_from_slice(&h.ssrc.to_be_bytes());
    b
}

fn sane_pt() -> impl Strategy<Value = u8> {
    let sane: Vec<u8> = (0u8..128).filter(|&pt| payload_type_is_sane(pt)).collect();
    prop::sample::select(sane)
}

/// An in-order stream: `n` packets from `first_seq`, 20 ms apart, timestamps 160 units apart.
fn stream(first_seq: u16, n: usize, pt: u8) -> Vec<(RtpHeader, u64)> {
    (0..n)
        .map(|i| {
            let h = RtpHeader {
                payload_type: pt,
                seq: first_seq.wrapping_add(i as u16),
                timestamp: (i as u32).wrapping_mul(160),
                ssrc: 0x1234_5678,
            };
            (h, 1_000_000_000 + i as u64 * 20_000_000)
        })
        .collect()
}

/// Feeds packets as a receiver does: the first creates the state, the rest update it.
fn receive(packets: &[(RtpHeader, u64)]) -> Option<RtpState> {
    let ((first, t0), rest) = packets.split_first()?;
    let rate = static_clock_rate(first.payload_type).unwrap_or(0);
    let mut s = RtpState::new(first, rate, *t0, 172);
    for (h, t) in rest {
        s.update(h, static_clock_rate(h.payload_type).unwrap_or(0), *t, 172);
    }
    Some(s)
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn classify_never_panics_and_rtp_means_a_valid_header(head in any::<[u8; 12]>(), len in any::<u32>()) {
        match classify(&head, len) {
            Payload::Rtp(h) => {
                prop_assert_eq!(head[0] >> 6, 2);
                prop_assert!(len >= RTP_HEADER_LEN + 4 * u32::from(head[0] & 0x0f));
                prop_assert!(payload_type_is_sane(h.payload_type));
                prop_assert!(!(192..=223).contains(&head[1]));
            }
            Payload::Rtcp => prop_assert!(head[0] >> 6 == 2 && (192..=223).contains(&head[1])),
            Payload::Stun => prop_assert!(head[0] >> 6 == 0 && len >= 20),
            Payload::Other => {}
        }
    }

    #[test]
    fn a_valid_rtp_header_is_read_back_exactly(
        pt in sane_pt(), seq in any::<u16>(), timestamp in any::<u32>(), ssrc in any::<u32>(),
        marker in any::<bool>(), csrc in 0u8..16, extra in 0u32..1500,
    ) {
        let h = RtpHeader { payload_type: pt, seq, timestamp, ssrc };
        let len = RTP_HEADER_LEN + 4 * u32::from(csrc) + extra;
        prop_assert_eq!(classify(&header_bytes(&h, marker, csrc), len), Payload::Rtp(h));
        // Shorter than its own CSRC list: not RTP.
        if csrc > 0 {
            let short = RTP_HEADER_LEN + 4 * u32::from(csrc) - 1;
            prop_assert_eq!(classify(&header_bytes(&h, marker, csrc), short), Payload::Other);
        }
    }

    #[test]
    fn an_in_order_stream_loses_nothing_even_across_the_wrap(
        first_seq in any::<u16>(), n in 2usize..3000, pt in sane_pt(),
    ) {
        let s = receive(&stream(first_seq, n, pt)).expect("n >= 2");
        prop_assert_eq!(s.expected(), n as u64);
        prop_assert_eq!(s.received, n as u64);
        prop_assert_eq!(s.lost(), 0);
        prop_assert_eq!(s.reordered, 0);
    }

    #[test]
    fn a_permutation_of_an_in_order_stream_loses_nothing(
        first_seq in any::<u16>(),
        n in 3usize..1500,
        pt in sane_pt(),
        lateness in prop::collection::vec(0usize..(MAX_MISORDER as usize / 2), 1500),
    ) {
        // Keep the two probation packets first and in order; every later packet may arrive up
        // to MAX_MISORDER/2 places late (sorting by index + lateness bounds the displacement),
        // so each late packet is a reorder, never a restart.
        let in_order = stream(first_seq, n, pt);
        let mut order: Vec<usize> = (2..n).collect();
        order.sort_by_key(|&i| (i + lateness[i], i));
        let mut packets: Vec<_> = [0, 1].into_iter().chain(order).map(|i| in_order[i]).collect();
        // Arrival times stay in arrival order.
        for (p, (_, t)) in packets.iter_mut().zip(&in_order) {
            p.1 = *t;
        }
        let s = receive(&packets).expect("n >= 3");
        prop_assert_eq!(s.received, n as u64, "{:?}", s);
        prop_assert_eq!(s.expected(), n as u64, "{:?}", s);
        prop_assert_eq!(s.lost(), 0);
    }

    #[test]
    fn any_packet_sequence_keeps_lost_within_expected_without_overflow(
        first in (sane_pt(), any::<u16>(), any::<u32>()),
        packets in prop::collection::vec(
            (prop_oneof![sane_pt(), any::<u8>().prop_map(|p| p & 0x7f)], any::<u16>(), any::<u32>(), 0u64..3_600_000_000_000, 0u64..65_536),
            0..400,
        ),
        t0 in 0u64..(1 << 62),
    ) {
        let (pt, seq, ts) = first;
        let h = RtpHeader { payload_type: pt, seq, timestamp: ts, ssrc: 1 };
        let mut s = RtpState::new(&h, static_clock_rate(pt).unwrap_or(0), t0, 100);
        let mut now = t0;
        for (pt, seq, timestamp, gap, bytes) in packets {
            now += gap;
            let h = RtpHeader { payload_type: pt, seq, timestamp, ssrc: 1 };
            s.update(&h, static_clock_rate(pt).unwrap_or(0), now, bytes);
            prop_assert!(s.lost() <= s.expected());
            prop_assert!(s.received <= s.packets);
            prop_assert!(s.jitter_ns() <= s.jitter_max_ns.max(s.jitter_ns()));
        }
    }
}

/// The committed corpus: real header shapes (RTP with and without CSRCs and marker, RTCP SR/RR,
/// STUN, DTLS, QUIC) and near misses, each with what the classifier must answer.
#[test]
fn rtp_corpus_packets_are_classified_as_their_protocol() {
    for (name, text) in crate::corpus("rtp_classify") {
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let words: Vec<&str> = line.split_whitespace().collect();
            let (want, len) = (words[words.len() - 1], words[words.len() - 2]);
            let hex: String = words[..words.len() - 2].concat();
            let mut head = [0u8; 12];
            for (i, b) in head.iter_mut().enumerate() {
                *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex byte");
            }
            let len: u32 = len.parse().expect("length");
            let got = match classify(&head, len) {
                Payload::Rtp(_) => "rtp",
                Payload::Rtcp => "rtcp",
                Payload::Stun => "stun",
                Payload::Other => "other",
            };
            assert_eq!(got, want, "{name}: {line}");
        }
    }
}
