//! Tracker tests: deltas, windows and bounds, on hand-made kernel reads.

use agent_ebpf::{tcp::bucket_of, CgroupTcpStats, FlowState, HistKey};

use super::*;

/// Windows of 2 and 4 ticks (one-second ticks).
const W2: Window = Window::from_secs(2);
const W4: Window = Window::from_secs(4);

fn limits() -> Limits {
    Limits {
        windows: vec![(W2, 2), (W4, 4)],
        max_peers: 2,
        recorder: super::super::Recorder::SockCreate,
        max_totals: 16,
    }
}

fn stats(samples: u64, rtt: u64) -> CgroupTcpStats {
    CgroupTcpStats {
        samples,
        raw_samples: samples,
        path_samples: samples,
        sum_rtt_us: samples * rtt,
        sum_measured_rtt_us: samples * rtt,
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
        path_samples: samples,
        sum_rtt_us: samples * 1000,
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
    assert_eq!(c.window(W2).map(|w| w.samples), Some(70));
    assert_eq!(c.window(W4).map(|w| w.samples), Some(100));
    let w = c.window(W2).expect("window");
    assert!((w.mean_rtt_us - 1000.0).abs() < 1e-6);
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
    open.path_samples = 8;
    open.sum_rtt_us = 8000;
    let (snap, _) = t.update(read(13, vec![(1, open)]), &mut |_| None);
    let peer = snap
        .container(7)
        .expect("cgroup 7")
        .peers
        .iter()
        .find(|p| p.peer == Peer::Addr(([10, 0, 0, 2], 80).into()))
        .cloned();
    let w = peer
        .expect("peer")
        .windows
        .into_iter()
        .find(|w| w.window == W2)
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
        .map(|p| p.peer.to_string())
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
        .find(|w| w.window == W2)
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
        Peer::Addr(([192, 0, 2, 7], 443).into())
    );
}

/// A read of cgroup `id` whose kernel counters stand at `samples` RTT samples of `rtt` µs (all
/// in one bucket), `samples / 10` retransmits of `samples` segments, and `opened`/`closed`
/// connections.
fn counters(id: u64, samples: u64, rtt: u64, opened: u64, closed: u64) -> RawRead {
    RawRead {
        stats: vec![(
            id,
            CgroupTcpStats {
                retrans: samples / 10,
                segs_out: samples,
                opened_active: opened,
                closed,
                ..stats(samples, rtt)
            },
        )],
        hist: vec![(
            HistKey {
                cgroup_id: id,
                bucket: bucket_of(rtt),
                _pad: 0,
            },
            samples,
        )],
        now_ns: 11_000_000_000,
        ..RawRead::default()
    }
}

fn upper(rtt: u64) -> u64 {
    agent_ebpf::tcp::bucket_bounds(bucket_of(rtt)).1
}

#[test]
fn totals_count_every_sample_since_start_beyond_the_windows_and_a_map_cleanup() {
    let mut t = Tracker::new(limits());
    // The cgroup's directory exists throughout.
    let mut exists = |_| Some("/c".to_owned());
    for c in [10, 30, 60, 100] {
        t.update(counters(7, c, 1000, 3, 1), &mut exists);
    }
    // Idle until the cgroup's kernel entries are deleted, then it counts again from 0.
    let mut cleaned = false;
    for _ in 0..10 {
        cleaned |= !t
            .update(counters(7, 100, 1000, 3, 1), &mut exists)
            .1
            .cgroups
            .is_empty();
        if cleaned {
            break;
        }
    }
    assert!(cleaned, "the idle cgroup was never cleaned up");
    let (snap, _) = t.update(counters(7, 20, 1000, 2, 2), &mut exists);
    let c = snap.container(7).expect("cgroup 7");
    assert_eq!(
        c.window(W4).map(|w| w.samples),
        Some(20),
        "windows only hold their ticks"
    );
    let totals = &c.totals;
    assert_eq!(totals.rtt.buckets, vec![(upper(1000), 120)]);
    assert_eq!((totals.rtt.count, totals.rtt.sum_us), (120, 120_000));
    assert_eq!((totals.tcp_retransmits, totals.tcp_segments_out), (12, 120));
    assert_eq!(
        (totals.tcp_connections_opened, totals.tcp_connections_closed),
        (5, 3)
    );
    assert_eq!((totals.rtp_packets, totals.rtp_lost), (0, 0));
}

#[test]
fn a_restarted_tracker_with_fresh_maps_carries_the_old_totals_forward() {
    let mut first = Tracker::new(limits());
    first.update(counters(7, 40, 1000, 4, 0), &mut |_| None);
    let (before, _) = first.update(counters(7, 100, 1000, 4, 0), &mut |_| None);

    let mut second = Tracker::new(limits());
    second.carry(&before);
    // The new run's maps start empty: 5 samples in a lower bucket, 3 in the old one.
    let mut fresh = counters(7, 8, 1000, 1, 1);
    fresh.hist = vec![
        (
            HistKey {
                cgroup_id: 7,
                bucket: bucket_of(200),
                _pad: 0,
            },
            5,
        ),
        (
            HistKey {
                cgroup_id: 7,
                bucket: bucket_of(1000),
                _pad: 0,
            },
            3,
        ),
    ];
    let (after, _) = second.update(fresh, &mut |_| None);
    let totals = &after.container(7).expect("cgroup 7").totals;
    assert_eq!(
        totals.rtt.buckets,
        vec![(upper(200), 5), (upper(1000), 103)]
    );
    assert_eq!(totals.rtt.count, 108);
    assert_eq!(totals.rtt.sum_us, 100_000 + 8_000);
    assert_eq!(totals.tcp_segments_out, 108);
    assert_eq!(
        (totals.tcp_connections_opened, totals.tcp_connections_closed),
        (5, 1)
    );
    let old = &before.container(7).expect("cgroup 7").totals;
    assert!(
        totals.rtt.count >= old.rtt.count && totals.tcp_retransmits >= old.tcp_retransmits,
        "nothing went backwards: {old:?} -> {totals:?}"
    );
}

#[test]
fn totals_are_kept_for_at_most_max_totals_containers_the_idlest_forgotten() {
    let mut t = Tracker::new(Limits {
        max_totals: 2,
        ..limits()
    });
    let mut last = None;
    for (id, n) in [(1, 10), (2, 10), (3, 10)] {
        last = Some(t.update(counters(id, n, 500, 0, 0), &mut |_| None).0);
    }
    let snap = last.expect("snapshot");
    let with_totals: Vec<u64> = snap
        .containers
        .values()
        .filter(|c| c.totals.rtt.count > 0)
        .map(|c| c.cgroup_id)
        .collect();
    assert_eq!(with_totals, vec![2, 3]);
}

#[test]
fn the_totals_of_a_cleaned_up_cgroup_go_with_its_directory_and_stay_while_it_exists() {
    for exists in [true, false] {
        let mut t = Tracker::new(limits());
        let mut resolve = |id: u64| exists.then(|| format!("/c{id}"));
        t.update(counters(7, 10, 1000, 1, 1), &mut resolve);
        let mut last = None;
        for _ in 0..10 {
            let (snap, cleanup) = t.update(counters(7, 10, 1000, 1, 1), &mut resolve);
            if !cleanup.cgroups.is_empty() {
                last = Some(snap);
                break;
            }
        }
        let snap = last.expect("the idle cgroup was cleaned up");
        assert_eq!(
            snap.container(7).map(|c| c.totals.rtt.count),
            Some(10),
            "the last snapshot before the cleanup still carries the totals"
        );
        // Its kernel entries are gone now: the reads no longer list it. While its (empty)
        // windows are reported its totals are too; then a deleted cgroup leaves for good.
        let mut seen = Vec::new();
        for _ in 0..6 {
            let (snap, _) = t.update(RawRead::default(), &mut resolve);
            seen.push(snap.container(7).map(|c| c.totals.rtt.count));
        }
        assert!(
            seen.iter().all(|c| c.is_none_or(|n| n == 10)),
            "never reported at 0: {seen:?}"
        );
        if exists {
            assert_eq!(
                seen.last(),
                Some(&Some(10)),
                "an idle existing cgroup keeps its totals"
            );
        } else {
            assert_eq!(
                seen.last(),
                Some(&None),
                "a deleted cgroup is forgotten: {seen:?}"
            );
        }
    }
}

#[test]
fn each_connection_keeps_the_direction_the_kernel_recorded_per_container_and_peer() {
    use agent_ebpf::tcp::direction;
    let mut t = Tracker::new(limits());
    let with = |mut f: FlowState, passive| {
        f.passive = passive;
        f
    };
    let flows = vec![
        // Two viewers accepted from one peer, one connection to a database, one from a dump.
        (1, with(flow(7, [10, 0, 0, 2], 80, 1), direction::PASSIVE)),
        (2, with(flow(7, [10, 0, 0, 2], 80, 1), direction::PASSIVE)),
        (3, with(flow(7, [10, 0, 0, 9], 5432, 1), direction::ACTIVE)),
        (4, with(flow(7, [10, 0, 0, 3], 80, 1), direction::UNKNOWN)),
    ];
    let (snap, _) = t.update(read(10, flows), &mut |_| None);
    let c = snap.container(7).expect("cgroup 7");
    assert_eq!(c.established, 4);
    assert_eq!(
        (
            c.established_by.served,
            c.established_by.outbound,
            c.established_by.unknown
        ),
        (2, 1, 1)
    );
    let by_peer = |port: u16| {
        c.peers
            .iter()
            .find(|p| matches!(p.peer, Peer::Addr(a) if a.port() == port))
            .map(|p| p.established_by)
            .expect("peer listed")
    };
    assert_eq!((by_peer(80).served, by_peer(80).outbound), (2, 0));
    assert_eq!((by_peer(5432).served, by_peer(5432).outbound), (0, 1));
    // The third peer is past `max_peers`: folded into its prefix, direction kept.
    let folded = c
        .peers
        .iter()
        .find(|p| matches!(p.peer, Peer::Prefix(..)))
        .expect("folded peer");
    assert_eq!(folded.established_by.unknown, 1);
}

#[test]
fn served_hosts_stay_viewers_between_connections_and_outbound_ones_never_are() {
    use agent_ebpf::tcp::direction;
    let mut t = Tracker::new(limits());
    let with = |mut f: FlowState, passive, closed_ns| {
        f.passive = passive;
        f.closed_ns = closed_ns;
        f
    };
    // A segment fetch from 10.0.0.2 that closed at 9 s (now is 11 s), one open from 10.0.0.3,
    // and the container's own connection to a database.
    let flows = vec![
        (
            1,
            with(
                flow(7, [10, 0, 0, 2], 40001, 1),
                direction::PASSIVE,
                9_000_000_000,
            ),
        ),
        (
            2,
            with(flow(7, [10, 0, 0, 3], 40002, 1), direction::PASSIVE, 0),
        ),
        (
            3,
            with(flow(7, [10, 0, 0, 9], 5432, 1), direction::ACTIVE, 0),
        ),
    ];
    let (snap, _) = t.update(read(10, flows), &mut |_| None);
    let viewers = &snap.container(7).expect("cgroup 7").viewers;
    let seen: Vec<(IpAddr, u64)> = viewers.iter().map(|v| (v.addr, v.idle.as_secs())).collect();
    assert_eq!(
        seen,
        [
            (IpAddr::from([10, 0, 0, 3]), 0),
            (IpAddr::from([10, 0, 0, 2]), 2)
        ]
    );
    // Next tick: the closed fetch is gone from the map, its host is still a viewer, now
    // idle for longer; a new fetch from it on another port is the same viewer.
    let mut next = read(
        10,
        vec![(
            4,
            with(flow(7, [10, 0, 0, 2], 40003, 1), direction::PASSIVE, 0),
        )],
    );
    next.now_ns = 12_000_000_000;
    let (snap, _) = t.update(next, &mut |_| None);
    let viewers = &snap.container(7).expect("cgroup 7").viewers;
    let seen: Vec<(IpAddr, u64)> = viewers.iter().map(|v| (v.addr, v.idle.as_secs())).collect();
    assert_eq!(
        seen,
        [
            (IpAddr::from([10, 0, 0, 2]), 0),
            (IpAddr::from([10, 0, 0, 3]), 1)
        ]
    );
}

#[test]
fn each_connection_carries_its_local_port_age_and_the_bytes_it_moved_since_the_last_read() {
    let mut t = Tracker::new(limits());
    let mut none = |_| None;
    let served = |acked: u64, received: u64| FlowState {
        local_port: 1935,
        passive: agent_ebpf::tcp::direction::PASSIVE,
        bytes_acked: acked,
        bytes_received: received,
        ..flow(7, [10, 0, 0, 2], 50_000, 1)
    };
    let at = |now_ns: u64, flow: FlowState| RawRead {
        now_ns,
        ..read(1, vec![(1, flow)])
    };
    let (first, _) = t.update(at(11_000_000_000, served(1_000, 10)), &mut none);
    let c = &first.container(7).expect("cgroup 7").connections;
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].local_port, 1935);
    assert_eq!(c[0].remote, SocketAddr::from(([10, 0, 0, 2], 50_000)));
    assert_eq!(c[0].direction, StreamDirection::Served);
    assert_eq!(c[0].age, std::time::Duration::from_secs(10));
    assert_eq!(c[0].bytes, None, "a first read has nothing to compare with");
    let (next, _) = t.update(at(13_000_000_000, served(501_000, 30)), &mut none);
    let c = &next.container(7).expect("cgroup 7").connections;
    let bytes = c[0].bytes.expect("second read");
    assert_eq!(
        (bytes.acked, bytes.received, bytes.over),
        (500_000, 20, std::time::Duration::from_secs(2))
    );
    let viewers = &next.container(7).expect("cgroup 7").viewers;
    assert_eq!(viewers.len(), 1);
    assert_eq!(
        viewers[0].port, 1935,
        "a viewer keeps the port it was served on"
    );
}

#[test]
fn seeded_flows_taken_beside_the_read_count_and_follow_their_bytes_like_the_maps_own() {
    let mut t = Tracker::new(limits());
    let mut none = |_| None;
    let old = SocketAddr::from(([10, 0, 0, 3], 50_001));
    let seeded = |acked: u64| {
        let f = FlowState {
            bytes_acked: acked,
            ..flow(7, [10, 0, 0, 3], 50_001, 0)
        };
        std::iter::once((2, f))
    };
    let at = |now_ns: u64| RawRead {
        now_ns,
        ..read(1, vec![(1, flow(7, [10, 0, 0, 2], 50_000, 1))])
    };
    let (first, _) = t.update_with(at(11_000_000_000), seeded(1_000), &mut none);
    assert_eq!(first.container(7).expect("cgroup 7").established, 2);
    let (next, _) = t.update_with(at(13_000_000_000), seeded(3_000), &mut none);
    let c = next.container(7).expect("cgroup 7");
    assert_eq!(c.established, 2);
    let conn = c
        .connections
        .iter()
        .find(|c| c.remote == old)
        .expect("seeded");
    assert_eq!(
        conn.bytes.map(|b| b.acked),
        Some(2_000),
        "remembered from the read before, like a flow of the map"
    );
    // The seed saw it close: gone, like a flow the map no longer holds.
    let (last, _) = t.update_with(at(14_000_000_000), std::iter::empty(), &mut none);
    let c = last.container(7).expect("cgroup 7");
    assert_eq!(c.established, 1);
    assert!(c.connections.iter().all(|c| c.remote != old));
}
