//! Tracker tests: deltas, windows and bounds, on hand-made kernel reads.

use agent_ebpf::{tcp::bucket_of, CgroupTcpStats, FlowState, HistKey};

use super::*;

fn limits() -> Limits {
    Limits {
        windows: vec![("2t".to_owned(), 2), ("4t".to_owned(), 4)],
        max_peers: 2,
        path: "test".to_owned(),
        attribution: "test".to_owned(),
    }
}

fn stats(samples: u64, rtt: u64) -> CgroupTcpStats {
    CgroupTcpStats {
        samples,
        raw_samples: samples,
        sum_rtt_us: samples * rtt,
        sum_rtt_sq: samples * rtt * rtt,
        ..CgroupTcpStats::default()
    }
}

fn flow(cgroup_id: u64, ip: [u8; 4], port: u32, samples: u64) -> FlowState {
    FlowState {
        cgroup_id,
        family: 2,
        remote: [u32::from_ne_bytes(ip), 0, 0, 0],
        remote_port: port,
        samples,
        sum_rtt_us: samples * 1000,
        sum_rtt_sq: samples * 1_000_000,
        start_ns: 1_000_000_000,
        ..FlowState::default()
    }
}

fn read(cumulative: u64, flows: Vec<(u64, FlowState)>) -> RawRead {
    RawRead {
        stats: vec![(7, stats(cumulative, 1000))],
        hist: vec![(
            HistKey {
                cgroup_id: 7,
                bucket: bucket_of(1000),
                _pad: 0,
            },
            cumulative,
        )],
        flows,
        now_ns: 11_000_000_000,
        ..RawRead::default()
    }
}

#[test]
fn windows_sum_only_their_newest_ticks() {
    let mut t = Tracker::new(limits());
    let mut none = |_| None;
    // Cumulative 10, 30, 60, 100: per-tick deltas 10, 20, 30, 40.
    let mut last = None;
    for c in [10, 30, 60, 100] {
        last = Some(t.update(read(c, vec![]), &mut none).0);
    }
    let snap = last.expect("snapshot");
    let c = snap.container(7).expect("cgroup 7");
    assert_eq!(c.window("2t").map(|w| w.samples), Some(70));
    assert_eq!(c.window("4t").map(|w| w.samples), Some(100));
    let w = c.window("2t").expect("window");
    assert!((w.mean_rtt_us - 1000.0).abs() < 1e-6 && w.stddev_rtt_us < 1e-3);
    assert!((w.p50_rtt_us - 1000.0).abs() / 1000.0 < 0.035);
}

#[test]
fn established_connections_report_their_age_and_closed_ones_are_cleaned_up() {
    let mut t = Tracker::new(limits());
    let mut open = flow(7, [10, 0, 0, 2], 80, 5);
    let mut closed = flow(7, [10, 0, 0, 3], 80, 5);
    closed.closed_ns = 10_000_000_000;
    let (snap, cleanup) = t.update(read(10, vec![(1, open), (2, closed)]), &mut |_| None);
    let c = snap.container(7).expect("cgroup 7");
    assert_eq!(c.established, 1);
    assert!((c.established_age_max_s - 10.0).abs() < 1e-9);
    assert_eq!(cleanup.flows, vec![2]);
    // The open flow's second read counts only its new samples.
    open.samples = 8;
    open.sum_rtt_us = 8000;
    let (snap, _) = t.update(read(13, vec![(1, open)]), &mut |_| None);
    let peer = snap
        .container(7)
        .expect("cgroup 7")
        .peers
        .iter()
        .find(|p| p.peer == "10.0.0.2:80")
        .cloned();
    let w = peer
        .expect("peer")
        .windows
        .into_iter()
        .find(|w| w.window == "2t")
        .expect("window");
    assert_eq!(w.samples, 8, "5 from the first tick plus 3 new");
}

#[test]
fn peers_beyond_the_bound_fold_into_a_prefix() {
    let mut t = Tracker::new(limits());
    let flows = (1..=4)
        .map(|i| (u64::from(i), flow(7, [10, 1, 2, i], 443, 1)))
        .collect();
    let (snap, _) = t.update(read(4, flows), &mut |_| None);
    let mut peers: Vec<String> = snap
        .container(7)
        .expect("cgroup 7")
        .peers
        .iter()
        .map(|p| p.peer.clone())
        .collect();
    peers.sort();
    assert_eq!(peers.len(), 3, "two exact peers and one prefix: {peers:?}");
    assert!(peers.contains(&"10.1.2.0/24".to_owned()), "{peers:?}");
}

#[test]
fn an_idle_cgroup_is_dropped_from_the_kernel_maps_after_the_longest_window() {
    let mut t = Tracker::new(limits());
    let mut cleanup = Cleanup::default();
    for _ in 0..7 {
        cleanup = t.update(read(10, vec![]), &mut |_| None).1;
        if !cleanup.cgroups.is_empty() {
            break;
        }
    }
    assert_eq!(cleanup.cgroups, vec![7]);
    assert_eq!(cleanup.hist.len(), 1);
}

#[test]
fn a_flow_recreated_under_the_same_cookie_restarts_its_sums() {
    let mut t = Tracker::new(limits());
    t.update(
        read(0, vec![(1, flow(7, [10, 0, 0, 2], 80, 50))]),
        &mut |_| None,
    );
    let mut again = flow(7, [10, 0, 0, 2], 80, 3);
    again.start_ns += 1;
    let (snap, _) = t.update(read(0, vec![(1, again)]), &mut |_| None);
    let peer = &snap.container(7).expect("cgroup 7").peers[0];
    let w = peer
        .windows
        .iter()
        .find(|w| w.window == "2t")
        .expect("window");
    assert_eq!(
        w.samples, 53,
        "50 from the first flow, 3 from the new one, no wrap-around"
    );
}

#[test]
fn ipv4_peers_of_dual_stack_sockets_are_shown_as_ipv4() {
    let mut t = Tracker::new(limits());
    let mut f = flow(7, [0, 0, 0, 0], 443, 1);
    f.family = 10;
    let mapped: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 7];
    for (i, w) in f.remote.iter_mut().enumerate() {
        *w = u32::from_ne_bytes([
            mapped[i * 4],
            mapped[i * 4 + 1],
            mapped[i * 4 + 2],
            mapped[i * 4 + 3],
        ]);
    }
    let (snap, _) = t.update(read(1, vec![(1, f)]), &mut |_| None);
    assert_eq!(
        snap.container(7).expect("cgroup 7").peers[0].peer,
        "192.0.2.7:443"
    );
}
