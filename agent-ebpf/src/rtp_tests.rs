//! The RTP logic on packets whose truth is known by construction.

use std::vec::Vec;

use crate::rtp::*;

fn header(pt: u8, seq: u16, ts: u32, ssrc: u32, cc: u8) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = 0x80 | (cc & 0x0f);
    h[1] = pt & 0x7f;
    h[2..4].copy_from_slice(&seq.to_be_bytes());
    h[4..8].copy_from_slice(&ts.to_be_bytes());
    h[8..12].copy_from_slice(&ssrc.to_be_bytes());
    h
}

fn rtp(head: &[u8; 12]) -> RtpHeader {
    match classify(head, 172) {
        Payload::Rtp(h) => h,
        other => panic!("expected RTP, got {other:?}"),
    }
}

#[test]
fn classifies_rtp_rtcp_stun_and_noise() {
    let h = rtp(&header(0, 7, 160, 0xdead_beef, 0));
    assert_eq!(
        (h.payload_type, h.seq, h.timestamp, h.ssrc),
        (0, 7, 160, 0xdead_beef)
    );
    // RTCP sender report: V=2, PT=200.
    let mut sr = [0u8; 12];
    sr[0] = 0x80;
    sr[1] = 200;
    assert_eq!(classify(&sr, 28), Payload::Rtcp);
    // STUN binding request: first two bits 0, magic cookie.
    let mut stun = [0u8; 12];
    stun[1] = 0x01;
    stun[4..8].copy_from_slice(&STUN_MAGIC.to_be_bytes());
    assert_eq!(classify(&stun, 20), Payload::Stun);
    assert_eq!(classify(&stun, 12), Payload::Other, "too short for STUN");
    // Version 1, unassigned payload type 50, truncated, CSRC list past the end.
    let mut v1 = header(0, 1, 1, 1, 0);
    v1[0] = 0x40;
    assert_eq!(classify(&v1, 172), Payload::Other);
    assert_eq!(classify(&header(50, 1, 1, 1, 0), 172), Payload::Other);
    assert_eq!(classify(&header(0, 1, 1, 1, 0), 11), Payload::Other);
    assert_eq!(classify(&header(96, 1, 1, 1, 15), 60), Payload::Other);
    assert!(matches!(
        classify(&header(96, 1, 1, 1, 15), 72),
        Payload::Rtp(_)
    ));
}

#[test]
fn clock_rates_follow_rfc_3551() {
    assert_eq!(static_clock_rate(0), Some(8000));
    assert_eq!(
        static_clock_rate(9),
        Some(8000),
        "G.722 uses 8000 by RFC 3551's erratum"
    );
    assert_eq!(static_clock_rate(26), Some(90_000));
    assert_eq!(static_clock_rate(96), None);
}

/// Feeds packets (seq, ts, arrival) to a fresh stream.
fn feed(packets: &[(u16, u32, u64)], pt: u8, rate: u32) -> RtpState {
    let mut it = packets.iter();
    let &(seq, ts, at) = it.next().expect("at least one packet");
    let mut s = RtpState::new(&rtp(&header(pt, seq, ts, 1, 0)), rate, at, 160);
    for &(seq, ts, at) in it {
        s.update(&rtp(&header(pt, seq, ts, 1, 0)), rate, at, 160);
    }
    s
}

#[test]
fn counts_loss_from_sequence_gaps() {
    // 100 packets, seq 10..110, with 7 missing.
    let dropped = [20u16, 21, 40, 55, 56, 57, 90];
    let pkts: Vec<(u16, u32, u64)> = (10u16..110)
        .filter(|s| !dropped.contains(s))
        .map(|s| (s, u32::from(s) * 160, u64::from(s) * 20_000_000))
        .collect();
    let s = feed(&pkts, 0, 8000);
    assert_eq!(s.confirmed, 1);
    assert_eq!(s.received, 93);
    assert_eq!(s.expected(), 100);
    assert_eq!(s.lost(), 7);
}

#[test]
fn sequence_wraps_without_phantom_loss() {
    let pkts: Vec<(u16, u32, u64)> = (0u32..200)
        .map(|i| ((65_500 + i) as u16, i * 160, u64::from(i) * 20_000_000))
        .collect();
    let s = feed(&pkts, 0, 8000);
    assert_eq!(s.cycles, 1);
    assert_eq!(s.expected(), 200);
    assert_eq!(s.lost(), 0);
}

#[test]
fn probation_straddling_the_wrap_is_counted() {
    let pkts = [
        (65_535u16, 0u32, 0u64),
        (0, 160, 20_000_000),
        (1, 320, 40_000_000),
    ];
    let s = feed(&pkts, 0, 8000);
    assert_eq!((s.expected(), s.received, s.lost()), (3, 3, 0));
}

#[test]
fn reordered_packets_are_counted_not_lost() {
    let order = [1u16, 2, 3, 5, 4, 6, 7, 8];
    let pkts: Vec<(u16, u32, u64)> = order
        .iter()
        .enumerate()
        .map(|(i, &s)| (s, u32::from(s) * 160, i as u64 * 20_000_000))
        .collect();
    let s = feed(&pkts, 0, 8000);
    assert_eq!(s.reordered, 1);
    assert_eq!(s.lost(), 0);
}

#[test]
fn perfectly_paced_stream_has_zero_jitter() {
    let pkts: Vec<(u16, u32, u64)> = (0u16..500)
        .map(|s| (s, u32::from(s) * 160, u64::from(s) * 20_000_000))
        .collect();
    let s = feed(&pkts, 0, 8000);
    assert_eq!(s.jitter_ns(), 0);
}

/// Alternating +2 ms / -2 ms arrival offsets give |D| = 4 ms on every packet, so the RFC 3550
/// estimate converges to 4 ms.
#[test]
fn jitter_converges_to_the_mean_absolute_transit_difference() {
    let pkts: Vec<(u16, u32, u64)> = (0u16..1000)
        .map(|s| {
            let offset: i64 = if s % 2 == 0 { 2_000_000 } else { -2_000_000 };
            (
                s,
                u32::from(s) * 1800,
                (i64::from(s) * 20_000_000 + 10_000_000 + offset) as u64,
            )
        })
        .collect();
    let s = feed(&pkts, 96, 90_000);
    let j = s.jitter_ns() as f64;
    assert!(
        (j - 4_000_000.0).abs() < 40_000.0,
        "jitter {j} ns, expected ~4 ms"
    );
}

#[test]
fn unknown_clock_rate_reports_timestamp_step_not_jitter() {
    let pkts: Vec<(u16, u32, u64)> = (0u16..50)
        .map(|s| {
            (
                s,
                u32::from(s) * 3000,
                u64::from(s) * 33_000_000 + (s as u64 % 3) * 1_000_000,
            )
        })
        .collect();
    let s = feed(&pkts, 120, 0);
    assert_eq!(s.jitter_samples, 0);
    assert_eq!(s.last_ts_delta, 3000);
    assert_eq!(s.lost(), 0);
}

#[test]
fn payload_type_change_is_counted_and_does_not_poison_jitter() {
    let mut pkts: Vec<(u16, u32, u64)> = (0u16..100)
        .map(|s| (s, u32::from(s) * 160, u64::from(s) * 20_000_000))
        .collect();
    let mut s = feed(&pkts, 0, 8000);
    pkts.clear();
    for q in 100u16..200 {
        s.update(
            &rtp(&header(8, q, 999_999 + u32::from(q) * 160, 1, 0)),
            8000,
            u64::from(q) * 20_000_000,
            160,
        );
    }
    assert_eq!(s.payload_type_changes, 1);
    assert_eq!(s.payload_type, 8);
    assert_eq!(
        s.jitter_ns(),
        0,
        "the timestamp jump at the switch is not jitter"
    );
    assert_eq!(s.lost(), 0);
}

#[test]
fn flow_stats_measure_gaps_and_delay_variation() {
    let mut f = UdpFlowStats::default();
    // Arrivals at 0, 10, 20, 35, 45 ms: inter-arrivals 10, 10, 15, 10; IPDV 0, 5, 5.
    for t in [0u64, 10, 20, 35, 45] {
        f.update(t * 1_000_000, 100);
    }
    assert_eq!(f.packets, 5);
    assert_eq!(f.bytes, 500);
    assert_eq!(f.max_gap_ns, 15_000_000);
    assert_eq!(f.ipdv_count, 3);
    assert_eq!(f.ipdv_sum_ns, 10_000_000);
    assert_eq!(f.ipdv_max_ns, 5_000_000);
}

#[test]
fn a_one_packet_flow_stays_on_probation_and_the_second_packet_admits_it_with_both_counted() {
    let mut f = UdpFlowStats::default();
    assert!(!f.probation_update(1_000, 100), "one packet proves nothing");
    assert!(
        f.probation_update(21_000_000, 50),
        "the second packet admits"
    );
    assert_eq!((f.packets, f.bytes, f.first_ns), (2, 150, 1_000));
}

#[test]
fn flow_probation_restarts_after_a_long_silence() {
    let mut f = UdpFlowStats::default();
    assert!(!f.probation_update(1_000, 10));
    let late = 1_000 + PROBATION_WINDOW_NS + 1;
    assert!(!f.probation_update(late, 10), "too late to count as a pair");
    assert_eq!((f.packets, f.first_ns), (1, late));
    assert!(f.probation_update(late + 1_000, 10));
}

#[test]
fn stream_probation_admits_on_sequential_packets_only() {
    let first = rtp(&header(0, 500, 0, 7, 0));
    let mut s = RtpState::new(&first, 8_000, 0, 160);
    // A jump in sequence numbers (noise with the same SSRC) does not confirm.
    let jump = rtp(&header(0, 9_000, 160, 7, 0));
    assert!(!s.probation_update(&jump, 8_000, 20_000_000, 160));
    let next = rtp(&header(0, 9_001, 320, 7, 0));
    assert!(s.probation_update(&next, 8_000, 40_000_000, 160));
    assert_eq!((s.confirmed, s.received, s.lost()), (1, 2, 0));
}

#[test]
fn stream_probation_restarts_after_a_long_silence() {
    let first = rtp(&header(0, 500, 0, 7, 0));
    let mut s = RtpState::new(&first, 8_000, 0, 160);
    let next = rtp(&header(0, 501, 160, 7, 0));
    let late = PROBATION_WINDOW_NS + 1;
    assert!(!s.probation_update(&next, 8_000, late, 160));
    assert_eq!((s.packets, s.first_arrival_ns, s.confirmed), (1, late, 0));
}
