//! The RTCP walker on packets built here, so what it must find is known.

use std::{vec, vec::Vec};

use crate::rtcp::*;

fn block(ssrc: u32, fraction: u8, lost: i32, ext: u32, jitter: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&ssrc.to_be_bytes());
    b.push(fraction);
    b.extend_from_slice(&lost.to_be_bytes()[1..]);
    b.extend_from_slice(&ext.to_be_bytes());
    b.extend_from_slice(&jitter.to_be_bytes());
    b.extend_from_slice(&[0; 8]); // LSR, DLSR
    b
}

/// An SR (with sender info) or RR from `reporter` with `blocks`.
fn packet(pt: u8, reporter: u32, blocks: &[Vec<u8>]) -> Vec<u8> {
    let mut body = reporter.to_be_bytes().to_vec();
    if pt == RTCP_SR {
        body.extend_from_slice(&[0x11; 20]);
    }
    for b in blocks {
        body.extend_from_slice(b);
    }
    let words = (body.len() + 4) / 4 - 1;
    let mut p = vec![0x80 | blocks.len() as u8, pt];
    p.extend_from_slice(&(words as u16).to_be_bytes());
    p.extend_from_slice(&body);
    p
}

fn sdes(ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x81, 202, 0, 2];
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[1, 2, b'a', 0]);
    p
}

fn parse(bytes: &[u8]) -> Vec<(u32, ReportBlock)> {
    let load = |off: u32| -> Option<usize> { Some(off as usize) };
    let mut out = Vec::new();
    walk(
        bytes.len() as u32,
        |off| {
            let o = load(off)?;
            bytes.get(o..o + 8)?.try_into().ok()
        },
        |off| {
            let o = load(off)?;
            bytes.get(o..o + 24)?.try_into().ok()
        },
        |reporter, b| out.push((reporter, *b)),
    );
    out
}

#[test]
fn receiver_report_blocks_are_read() {
    let rr = packet(
        RTCP_RR,
        0xAAAA,
        &[
            block(0x1234, 13, 42, 70_000, 320),
            block(0x5678, 0, -2, 5, 0),
        ],
    );
    let got = parse(&rr);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, 0xAAAA);
    let b = got[0].1;
    assert_eq!(
        (b.media_ssrc, b.fraction_lost, b.ext_highest_seq, b.jitter),
        (0x1234, 13, 70_000, 320)
    );
    assert_eq!(cumulative_lost_signed(b.cumulative_lost), 42);
    assert_eq!(cumulative_lost_signed(got[1].1.cumulative_lost), -2);
}

#[test]
fn sender_report_blocks_follow_the_sender_info() {
    let sr = packet(RTCP_SR, 0xBBBB, &[block(0x99, 64, 1, 9, 7)]);
    let got = parse(&sr);
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0, got[0].1.media_ssrc, got[0].1.jitter),
        (0xBBBB, 0x99, 7)
    );
}

#[test]
fn compound_packets_are_walked_and_blocks_are_bounded() {
    // An SDES first (RFC 5506 reduced size), then an RR.
    let mut p = sdes(1);
    p.extend(packet(RTCP_RR, 2, &[block(3, 1, 1, 1, 1)]));
    assert_eq!(parse(&p).len(), 1);
    // RR with six blocks: only MAX_REPORT_BLOCKS are read.
    let many: Vec<_> = (0..6).map(|i| block(i, 0, 0, 0, 0)).collect();
    let got = parse(&packet(RTCP_RR, 2, &many));
    assert_eq!(got.len(), MAX_REPORT_BLOCKS as usize);
    // Four SDES before the RR: past MAX_RTCP_PACKETS, not read.
    let mut p = Vec::new();
    for _ in 0..MAX_RTCP_PACKETS {
        p.extend(sdes(1));
    }
    p.extend(packet(RTCP_RR, 2, &[block(3, 1, 1, 1, 1)]));
    assert!(parse(&p).is_empty());
}

#[test]
fn malformed_and_short_packets_report_nothing() {
    let good = packet(RTCP_RR, 2, &[block(3, 1, 1, 1, 1)]);
    // Truncated anywhere: the length field no longer fits, nothing is read.
    for cut in 0..good.len() {
        assert!(parse(&good[..cut]).is_empty(), "cut at {cut}");
    }
    // A count larger than the blocks present: only whole blocks inside the length.
    let mut lying = good.clone();
    lying[0] = 0x80 | 31;
    assert_eq!(parse(&lying).len(), 1);
    // A length that claims less than the blocks: none read.
    let mut short = good.clone();
    short[3] = 1;
    assert!(parse(&short).is_empty());
    // Version 1, or a zero-length loop: nothing, and the walk ends.
    let mut v1 = good.clone();
    v1[0] = 0x41;
    assert!(parse(&v1).is_empty());
    assert!(parse(&[0x80, 201, 0, 0]).is_empty());
    assert!(parse(&[]).is_empty());
}
