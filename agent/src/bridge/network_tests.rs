use std::time::{Duration, SystemTime};

use super::*;
use crate::{
    containers::{Container, Identity, Runtime},
    sources::{
        tcp::snapshot::{ByteCounts, Connection, DirectionCounts, Fidelity, PeerWindow, RttSample},
        udp::model::{FlowQuality, StreamQuality},
    },
    store::Peer,
};

const NOW: Duration = Duration::from_secs(1_000_000);

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + NOW
}

fn params(own: Option<&str>) -> NetworkParams<'_> {
    NetworkParams {
        udp_min_flow_age: Duration::from_secs(10),
        peer_window: Window::from_secs(60),
        own_cgroup_path: own,
        host_cgroups: &[],
        now: now(),
    }
}

fn inventory() -> Inventory {
    Inventory::from_containers(vec![Container {
        path: "kubepods.slice/kubepods-podu1.slice/cri-containerd-live.scope".to_owned(),
        identity: Identity::Container {
            pod_uid: Some("u1".to_owned()),
            qos: None,
            container_id: "live".to_owned(),
            runtime: Runtime::Containerd,
        },
        cgroup_id: Some(100),
        netns: None,
    }])
}

fn tcp_window(seconds: u64, samples: u64) -> TcpWindow {
    TcpWindow {
        samples,
        min_rtt_us: 1_000.4,
        p50_rtt_us: 2_000.0,
        p90_rtt_us: 3_000.0,
        p99_rtt_us: 9_000.0,
        max_rtt_us: 12_000.0,
        jitter_rfc3550_us: 111.0,
        retrans: 30,
        ..TcpWindow::new(Window::from_secs(seconds))
    }
}

fn tcp(path: &str) -> TcpSnapshot {
    let mut t = TcpSnapshot {
        tick: 5,
        fidelity: Fidelity {
            path: Some(Recorder::SockCreate),
            rtt_sample: RttSample::Raw,
            rtt_method: Some(crate::sources::tcp::RttMethod::Kernel),
            fell_back_from: Vec::new(),
        },
        ..TcpSnapshot::default()
    };
    t.containers.insert(
        100,
        ContainerTcp {
            cgroup_id: 100,
            cgroup_path: Some("/kubepods.slice/whatever".to_owned()),
            windows: vec![tcp_window(10, 40), tcp_window(60, 200)],
            established: 2,
            established_by: DirectionCounts {
                served: 1,
                outbound: 1,
                unknown: 0,
            },
            established_age_mean_s: 30.0,
            established_untracked: 1,
            connections: vec![
                Connection {
                    remote: ([10, 0, 0, 9], 50_000).into(),
                    local_port: 1935,
                    direction: StreamDirection::Served,
                    age: Duration::from_secs(30),
                    bytes: Some(ByteCounts {
                        acked: 250_000,
                        received: 1_000,
                        over: Duration::from_secs(1),
                    }),
                },
                Connection {
                    remote: ([10, 0, 0, 9], 443).into(),
                    local_port: 40_001,
                    direction: StreamDirection::Outbound,
                    age: Duration::from_secs(20),
                    bytes: None,
                },
            ],
            peers: vec![
                PeerTcp {
                    peer: Peer::Addr(([10, 0, 0, 9], 443).into()),
                    established: 2,
                    established_by: DirectionCounts {
                        served: 1,
                        outbound: 1,
                        unknown: 0,
                    },
                    windows: vec![PeerWindow {
                        samples: 50,
                        mean_rtt_us: 4_000.0,
                        jitter_rfc3550_us: 90.0,
                        retrans: 3,
                        ..PeerWindow::new(Window::from_secs(60))
                    }],
                },
                PeerTcp {
                    peer: Peer::Prefix([10, 1, 0, 0].into(), 16),
                    established: 0,
                    established_by: DirectionCounts::default(),
                    windows: vec![],
                },
            ],
            ..ContainerTcp::default()
        },
    );
    t.containers.insert(
        200,
        ContainerTcp {
            cgroup_id: 200,
            cgroup_path: Some(path.to_owned()),
            established: 4,
            established_by: DirectionCounts {
                served: 4,
                ..DirectionCounts::default()
            },
            connections: (0..4)
                .map(|i| Connection {
                    remote: ([10, 0, 1, 1], 50_000 + i).into(),
                    local_port: 8080,
                    direction: StreamDirection::Served,
                    age: Duration::from_secs(5),
                    bytes: None,
                })
                .collect(),
            ..ContainerTcp::default()
        },
    );
    t
}

fn endpoint(port: u16) -> Endpoint {
    Endpoint {
        local: [10, 0, 0, 1].into(),
        local_port: port,
        remote: [10, 0, 0, 2].into(),
        remote_port: 40_000,
        direction: "ingress",
    }
}

fn stream(live: bool, age: f64) -> StreamQuality {
    StreamQuality {
        endpoint: endpoint(5004),
        ssrc: 1,
        payload_type: 0,
        clock_rate: Some(8_000),
        packets: 100,
        bytes: 16_000,
        expected: 100,
        lost: 0,
        reordered: 0,
        jitter_seconds: Some(0.001),
        mean_jitter_seconds: Some(0.001),
        max_jitter_seconds: Some(0.001),
        timestamp_step: None,
        payload_type_changes: 0,
        sequence_wraps: 0,
        age_seconds: age,
        idle_seconds: 0.0,
        live,
        viewer_reports: None,
    }
}

fn flow(port: u16, live: bool, rtp: bool, age: f64) -> FlowQuality {
    FlowQuality {
        endpoint: endpoint(port),
        packets: 10,
        bytes: 1000,
        mean_ipdv_seconds: None,
        max_ipdv_seconds: None,
        max_gap_seconds: 0.1,
        age_seconds: age,
        idle_seconds: 0.0,
        live,
        rtp,
        rtcp: false,
    }
}

fn udp() -> UdpSnapshot {
    UdpSnapshot {
        hook: "cgroup_skb".to_owned(),
        containers: vec![ContainerUdp {
            cgroup_id: 100,
            cgroup_path: None,
            // One live RTP stream, one SRT-like flow old enough; the idle stream, the RTP
            // flow (counted as its stream) and the young flow do not count.
            live_streams: 2,
            streams: vec![stream(true, 20.0), stream(false, 50.0)],
            flows: vec![
                flow(5004, true, true, 20.0),
                flow(9000, true, false, 15.0),
                flow(53, true, false, 0.2),
            ],
            windows: vec![
                UdpWindow {
                    rtp_received: 490,
                    rtp_lost: 10,
                    mean_jitter_seconds: Some(0.0025),
                    ..UdpWindow::new(Window::from_secs(10))
                },
                UdpWindow {
                    rtp_received: 9_000,
                    ..UdpWindow::new(Window::from_secs(300))
                },
            ],
            totals: crate::store::NetworkTotals::default(),
        }],
        counters: Default::default(),
    }
}

#[test]
fn tcp_and_udp_windows_of_one_container_merge_by_length() {
    let net = network_snapshot(Some(&tcp("/a")), Some(&udp()), &inventory(), &params(None));
    let c = &net.containers["live"];
    let lengths: Vec<u64> = c.windows.iter().map(|w| w.window.as_secs()).collect();
    assert_eq!(
        lengths,
        [10, 60, 300],
        "union of both sources, shortest first"
    );
    let w10 = c.window(Window::from_secs(10)).expect("10 s window");
    assert_eq!(
        (w10.samples, w10.rtt_min_us, w10.rtt_p99_us, w10.rtt_max_us),
        (40, 1_000, 9_000, 12_000)
    );
    assert_eq!(w10.jitter_rfc3550_us, 111, "the RFC 3550 jitter, rounded");
    assert_eq!((w10.retransmits, w10.retransmits_per_second), (30, 3.0));
    assert_eq!(
        (w10.rtp_packets, w10.rtp_lost, w10.rtp_jitter_us),
        (490, 10, 2_500)
    );
    let w300 = c.window(Window::from_secs(300)).expect("UDP-only window");
    assert_eq!((w300.samples, w300.rtp_packets), (0, 9_000));
}

#[test]
fn containers_are_keyed_by_inventory_id_else_cgroup_path() {
    let net = network_snapshot(Some(&tcp("/test/rx")), None, &inventory(), &params(None));
    let keys: Vec<&str> = net.containers.keys().map(String::as_str).collect();
    assert_eq!(keys, ["/test/rx", "live"]);
}

#[test]
fn every_established_connection_is_a_tcp_stream_with_its_peer_port_kind_age_and_bytes() {
    let net = network_snapshot(Some(&tcp("/a")), None, &inventory(), &params(None));
    let c = &net.containers["live"];
    assert_eq!(c.established_connections, 3, "tracked + untracked");
    let remotes: Vec<String> = c.streams.iter().map(|s| s.remote.to_string()).collect();
    assert_eq!(remotes, ["10.0.0.9:50000", "10.0.0.9:443", "0.0.0.0:0"]);
    let ports: Vec<u16> = c.streams.iter().map(|s| s.local.port()).collect();
    assert_eq!(ports, [1935, 40_001, 0]);
    let kinds: Vec<StreamKind> = c.streams.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        [StreamKind::Rtmp, StreamKind::Https, StreamKind::Tcp],
        "served on 1935; outbound to 443; unknown"
    );
    assert_eq!(
        c.streams[0].bytes,
        Some(StreamBytes {
            sent: 250_000,
            received: 1_000,
            over: Duration::from_secs(1)
        })
    );
    assert_eq!(c.streams[1].bytes, None);
    assert_eq!(c.streams[1].started_at, now() - Duration::from_secs(20));
    let directions: Vec<StreamDirection> = c.streams.iter().map(|s| s.direction).collect();
    assert_eq!(
        directions,
        [
            StreamDirection::Served,
            StreamDirection::Outbound,
            StreamDirection::Unknown
        ],
        "accepted, connected, and the untracked one whose direction nobody knows"
    );
    assert!(c.streams.iter().all(|s| s.protocol == StreamProtocol::Tcp));
    assert_eq!(c.streams[0].started_at, now() - Duration::from_secs(30));
    assert_eq!(c.streams[2].started_at, now(), "untracked: no age known");
    assert_eq!(net.containers["/a"].streams.len(), 4);
}

#[test]
fn the_agents_own_connections_are_not_streams() {
    let net = network_snapshot(
        Some(&tcp("/agent")),
        None,
        &inventory(),
        &params(Some("/agent")),
    );
    let own = &net.containers["/agent"];
    assert_eq!(own.established_connections, 4, "still reported");
    assert!(own.streams.is_empty(), "but never hold up a drain");
}

#[test]
fn the_agents_cgroup_found_by_its_socket_is_not_streams_under_a_private_cgroup_namespace() {
    let mut t = tcp("/agent");
    t.own_cgroup_id = Some(200);
    // `/proc/self/cgroup` reads `/` in a private cgroup namespace.
    let net = network_snapshot(Some(&t), Some(&udp()), &inventory(), &params(Some("/")));
    assert!(net.containers["/agent"].streams.is_empty());
    assert_eq!(
        net.containers["live"].streams.len(),
        3 + 2,
        "other containers' TCP and UDP streams still count"
    );
    t.own_cgroup_id = None;
    let net = network_snapshot(Some(&t), None, &inventory(), &params(Some("/")));
    assert_eq!(
        net.containers["/agent"].streams.len(),
        4,
        "a `/` from a private namespace names no cgroup of the host"
    );
}

#[test]
fn host_cgroups_are_not_streams_unless_the_list_leaves_them_out() {
    let host = crate::health::drain::DrainConfig::default().host_cgroups;
    for path in ["/", "/system.slice/sshd.service", "/kubelet.slice"] {
        let with_host = NetworkParams {
            host_cgroups: &host,
            ..params(None)
        };
        let net = network_snapshot(Some(&tcp(path)), None, &inventory(), &with_host);
        let c = &net.containers[path];
        assert_eq!(c.established_connections, 4, "{path}: still reported");
        assert!(c.streams.is_empty(), "{path}: never holds a drain");
        assert_eq!(net.containers["live"].streams.len(), 3, "a pod's count");
        let net = network_snapshot(Some(&tcp(path)), None, &inventory(), &params(None));
        assert_eq!(
            net.containers[path].streams.len(),
            4,
            "{path} configured in"
        );
    }
}

#[test]
fn udp_streams_match_what_the_source_counts_as_live() {
    let u = udp();
    let net = network_snapshot(None, Some(&u), &inventory(), &params(None));
    let c = &net.containers["live"];
    assert_eq!(c.streams.len() as u32, u.containers[0].live_streams);
    assert!(c.streams.iter().all(|s| s.protocol == StreamProtocol::Udp));
    let ports: Vec<u16> = c.streams.iter().map(|s| s.local.port()).collect();
    assert_eq!(ports, [5004, 9000], "oldest first");
    assert_eq!(c.streams[0].remote.to_string(), "10.0.0.2:40000");
}

#[test]
fn per_peer_breakdown_uses_the_minute_window_and_skips_empty_peers() {
    let net = network_snapshot(Some(&tcp("/a")), None, &inventory(), &params(None));
    let peers = &net.containers["live"].peers;
    assert_eq!(peers.len(), 1, "a peer without windows has nothing to show");
    let p = &peers[0];
    assert_eq!(
        (
            p.remote.to_string(),
            p.samples,
            p.rtt_mean_us,
            p.jitter_rfc3550_us,
            p.retransmits
        ),
        ("10.0.0.9:443".to_owned(), 50, 4_000, 90, 3)
    );
}

#[test]
fn netns_keyed_tcp_is_never_looked_up_as_a_cgroup() {
    let mut t = tcp("/a");
    t.fidelity.path = Some(Recorder::Netns);
    let net = network_snapshot(Some(&t), None, &inventory(), &params(None));
    assert!(net.containers.contains_key("netns-cookie:100"));
    assert!(!net.containers.contains_key("live"));
}

#[test]
fn provenance_names_both_hooks_and_the_rtt_fidelity() {
    let p = network_provenance(Some(&tcp("/a")), Some(&udp()));
    assert_eq!(p.hook, "tcp: sock_ops+sock_create; udp: cgroup_skb");
    assert!(p.fidelity.contains("rtt samples raw"), "{}", p.fidelity);
    assert!(!p.fidelity.contains("fell back"), "{}", p.fidelity);
}

#[test]
fn provenance_names_listen_tagging_as_the_tcp_hook_and_the_sockets_own_cgroup() {
    let mut t = tcp("/a");
    t.fidelity.path = Some(Recorder::ListenAndEgress);
    let p = network_provenance(Some(&t), None);
    assert_eq!(p.hook, "tcp: sock_ops+listen_cb+cgroup_skb_egress");
    assert!(
        p.fidelity.contains("socket's own cgroup") && p.fidelity.contains("listen()"),
        "attribution is by socket storage: {}",
        p.fidelity
    );
}

#[test]
fn provenance_names_the_paths_a_fallback_left_behind_and_why() {
    let mut t = tcp("/a");
    t.fidelity.path = Some(Recorder::Egress);
    t.fidelity.fell_back_from = vec![
        "sock_ops+sock_create+cgroup_skb_egress failed (program `nodeward_sock_create`: x)"
            .to_owned(),
    ];
    let p = network_provenance(Some(&t), None);
    assert_eq!(p.hook, "tcp: sock_ops+cgroup_skb_egress");
    assert!(
        p.fidelity.contains(
            "tcp: fell back to sock_ops+cgroup_skb_egress: sock_ops+sock_create+cgroup_skb_egress \
             failed (program `nodeward_sock_create`: x)"
        ),
        "{}",
        p.fidelity
    );
}

#[test]
fn meta_is_added_for_network_only_containers() {
    let mut meta = BTreeMap::new();
    network_meta(
        Some(&tcp("/test/rx")),
        Some(&udp()),
        &inventory(),
        &mut meta,
    );
    let m = &meta["/test/rx"];
    assert_eq!((m.cgroup_id, m.cgroup_path.as_str()), (200, "test/rx"));
    assert_eq!(meta["live"].cgroup_id, 100);
}

#[test]
fn totals_of_tcp_and_udp_and_of_every_id_of_one_container_add_up() {
    use crate::store::{NetworkTotals, RttHistogram};
    let rtt = |buckets: Vec<(u64, u64)>, sum_us| RttHistogram {
        count: buckets.iter().map(|b| b.1).sum(),
        buckets,
        sum_us,
    };
    let mut t = tcp("/system.slice/x.service");
    let c100 = t.containers.get_mut(&100).expect("container 100");
    c100.totals = NetworkTotals {
        rtt: rtt(vec![(1088, 3), (2176, 1)], 5_000),
        tcp_retransmits: 2,
        tcp_segments_out: 40,
        tcp_connections_opened: 3,
        tcp_connections_closed: 1,
        ..NetworkTotals::default()
    };
    // A second cgroup of the same workload (the inventory maps both to "live").
    let mut other = c100.clone();
    other.cgroup_id = 101;
    other.peers.clear();
    other.totals = NetworkTotals {
        rtt: rtt(vec![(544, 2), (1088, 1)], 1_500),
        tcp_segments_out: 10,
        ..NetworkTotals::default()
    };
    t.containers.insert(101, other);
    let mut inv = inventory();
    let mut second = inv.containers[0].clone();
    second.cgroup_id = Some(101);
    second.path.push_str("/sub");
    inv = Inventory::from_containers(vec![inv.containers[0].clone(), second]);
    let mut u = udp();
    u.containers[0].totals = NetworkTotals {
        rtp_packets: 9_000,
        rtp_lost: 12,
        ..NetworkTotals::default()
    };
    let snap = network_snapshot(Some(&t), Some(&u), &inv, &params(None));
    let totals = &snap.containers["live"].totals;
    assert_eq!(totals.rtt.buckets, vec![(544, 2), (1088, 4), (2176, 1)]);
    assert_eq!((totals.rtt.count, totals.rtt.sum_us), (7, 6_500));
    assert_eq!(
        (
            totals.tcp_retransmits,
            totals.tcp_segments_out,
            totals.tcp_connections_opened,
            totals.tcp_connections_closed
        ),
        (2, 50, 3, 1)
    );
    assert_eq!((totals.rtp_packets, totals.rtp_lost), (9_000, 12));
}

#[test]
fn viewers_carry_when_last_seen_and_never_come_from_host_cgroups() {
    use crate::sources::tcp::viewers::ServedPeer;
    let host = crate::health::drain::DrainConfig::default().host_cgroups;
    let with_host = NetworkParams {
        host_cgroups: &host,
        ..params(None)
    };
    let mut t = tcp("/system.slice/nginx.service");
    let served = |last: u8, idle| ServedPeer {
        addr: std::net::IpAddr::from([10, 0, 0, last]),
        port: 8080,
        idle: Duration::from_secs(idle),
    };
    for c in t.containers.values_mut() {
        c.viewers = vec![served(7, 0), served(8, 12)];
    }
    let net = network_snapshot(Some(&t), None, &inventory(), &with_host);
    let seen: Vec<(String, SystemTime)> = net.containers["live"]
        .viewers
        .iter()
        .map(|v| (v.addr.to_string(), v.last_seen))
        .collect();
    assert_eq!(
        seen,
        [
            ("10.0.0.7".to_owned(), now()),
            ("10.0.0.8".to_owned(), now() - Duration::from_secs(12))
        ]
    );
    assert!(
        net.containers["/system.slice/nginx.service"]
            .viewers
            .is_empty(),
        "a host service's clients are not viewers"
    );
}

#[test]
fn viewer_reports_travel_with_their_rtp_stream_only() {
    let mut u = udp();
    let reports = crate::store::ViewerReports {
        ssrc: 1,
        clock_rate: Some(8_000),
        reports: Vec::new(),
    };
    u.containers[0].streams[0].viewer_reports = Some(reports.clone());
    let net = network_snapshot(None, Some(&u), &inventory(), &params(None));
    let c = &net.containers["live"];
    let with: Vec<_> = c
        .streams
        .iter()
        .filter_map(|s| s.viewer_reports.as_ref())
        .collect();
    assert_eq!(
        with,
        [&reports],
        "on the RTP stream, not on the plain UDP flow"
    );
}
