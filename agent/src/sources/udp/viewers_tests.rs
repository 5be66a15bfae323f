//! Joining reports to streams, windows and staleness, on reports built here.

use std::time::{Duration, SystemTime};

use agent_ebpf::{
    rtcp::{RtcpReport, RtcpReportKey},
    rtp::{UdpFlowKey, DIR_EGRESS},
};

use super::Reports;
use crate::store::Window;

const S: u64 = 1_000_000_000;
const WINDOW: Window = Window::from_secs(60);
const STALE: Duration = Duration::from_secs(15);

fn flow(cgroup: u64, remote: u32) -> UdpFlowKey {
    UdpFlowKey {
        cgroup_id: cgroup,
        local_addr: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
        remote_addr: [remote, 0, 0, 0],
        local_port: 5004,
        remote_port: 6000,
        ip_version: 4,
        direction: DIR_EGRESS,
    }
}

fn report(remote: u32, at_s: u64, ext: u32, lost: i32, jitter: u32) -> RtcpReport {
    RtcpReport {
        arrival_ns: at_s * S,
        remote_addr: [remote, 0, 0, 0],
        fraction_lost: 26,
        cumulative_lost: (lost as u32) & 0x00ff_ffff,
        ext_highest_seq: ext,
        jitter,
        remote_port: 6001,
        local_port: 5005,
        ip_version: 4,
        _pad: 0,
    }
}

fn key(cgroup: u64, media: u32, reporter: u32) -> RtcpReportKey {
    RtcpReportKey {
        cgroup_id: cgroup,
        media_ssrc: media,
        reporter_ssrc: reporter,
    }
}

#[test]
fn reports_join_their_ssrc_in_their_container_with_jitter_in_time_and_window_loss() {
    let viewer = u32::from_ne_bytes([10, 0, 0, 2]);
    let mut r = Reports::default();
    let k = key(7, 0xAA, 1);
    let now = SystemTime::now();
    for (t, ext, lost) in [(5, 250, 3), (10, 500, 13), (15, 750, 13)] {
        let (fresh, gone) = r.tick(
            &[(k, report(viewer, t, ext, lost, 160))],
            t * S,
            STALE,
            WINDOW,
        );
        assert!(gone.is_empty());
        let v = r
            .for_stream(
                &fresh,
                &flow(7, viewer),
                0xAA,
                true,
                Some(8000),
                t * S,
                now,
                WINDOW,
            )
            .expect("the report joins its stream");
        assert_eq!(v.reports.len(), 1);
        assert_eq!(
            v.reports[0].jitter,
            Some(Duration::from_millis(20)),
            "160 units at 8 kHz"
        );
        assert!((v.reports[0].fraction_lost - 26.0 / 256.0).abs() < 1e-9);
        if t == 15 {
            let w = v.reports[0].window.expect("three reports kept");
            assert_eq!((w.lost, w.expected), (10, 500));
            assert_eq!(w.fraction(), Some(0.02));
        }
        // Another SSRC, or the same SSRC in another container: nothing.
        assert!(r
            .for_stream(
                &fresh,
                &flow(7, viewer),
                0xBB,
                true,
                Some(8000),
                t * S,
                now,
                WINDOW
            )
            .is_none());
        assert!(r
            .for_stream(
                &fresh,
                &flow(8, viewer),
                0xAA,
                true,
                Some(8000),
                t * S,
                now,
                WINDOW
            )
            .is_none());
    }
}

#[test]
fn stale_reports_are_dropped_and_shared_ssrcs_join_by_address() {
    let (a, b) = (
        u32::from_ne_bytes([10, 0, 0, 2]),
        u32::from_ne_bytes([10, 0, 0, 3]),
    );
    let mut r = Reports::default();
    let now = SystemTime::now();
    let reports = [
        (key(7, 0xAA, 1), report(a, 100, 10, 0, 0)),
        (key(7, 0xAA, 2), report(b, 90, 10, 0, 0)),
    ];
    let (fresh, gone) = r.tick(&reports, 110 * S, STALE, WINDOW);
    assert_eq!(gone, vec![key(7, 0xAA, 2)], "20 s old: stale");
    // The SSRC goes to two viewers: each stream gets only its viewer's report.
    let to_a = r
        .for_stream(&fresh, &flow(7, a), 0xAA, false, None, 110 * S, now, WINDOW)
        .expect("a's report");
    assert_eq!(to_a.reports.len(), 1);
    assert_eq!(to_a.reports[0].reporter_ssrc, 1);
    assert_eq!(to_a.reports[0].jitter, None, "no clock rate, no time");
    assert!(r
        .for_stream(&fresh, &flow(7, b), 0xAA, false, None, 110 * S, now, WINDOW)
        .is_none());
}
