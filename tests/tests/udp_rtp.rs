//! UDP/RTP stream quality per container, checked against tshark's RTP stream analysis of a
//! capture of the same traffic.

use std::{collections::BTreeMap, net::UdpSocket, path::PathBuf, sync::Mutex, time::Duration};

use agent_ebpf::rtp::{RtpState, DIR_INGRESS};
use nodeward::ebpf::udp::UdpPrograms;
use nodeward_tests::{
    cgroup_v2_root, is_root,
    rtp::{rtp_packet, send_rtp, tshark_rtp_streams, Capture, Receiver, Rng, RtpPlan},
    skip, Cgroup,
};

/// Tests here attach to the same root cgroup and read every stream; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn have(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// The cgroup v2 root to attach the UDP programs to, when the test can run here: root, a
/// cgroup v2 hierarchy and `tools`; `None` after a skip that says what is missing.
fn prerequisites(test: &str, tools: &[&str]) -> Option<PathBuf> {
    if !is_root() {
        skip(test, "needs root (eBPF, cgroups, network namespaces)");
        return None;
    }
    let Some(root) = cgroup_v2_root() else {
        skip(test, "no cgroup v2 hierarchy for cgroup_skb programs");
        return None;
    };
    if !tools.iter().all(|t| have(t)) {
        skip(
            test,
            &format!(
                "needs {} (cargo xtask test installs them)",
                tools.join(" and ")
            ),
        );
        return None;
    }
    Some(root)
}

/// The stream the receiver's cgroup saw from `ssrc`, inbound.
fn ingress_stream(programs: &UdpPrograms, cgroup_id: u64, ssrc: u32) -> Option<RtpState> {
    let maps = programs.read().expect("read UDP maps");
    maps.streams
        .into_iter()
        .find(|(k, _)| {
            k.flow.cgroup_id == cgroup_id && k.ssrc == ssrc && k.flow.direction == DIR_INGRESS
        })
        .map(|(_, s)| s)
}

/// 50 packets/s of PCMU (8 kHz, 160 samples per packet) held in the tests' delay line for
/// U(0, 12 ms) each, with 7 packets dropped. The jitter the agent computes for that SSRC is
/// within 10% of tshark's (mean and max over the stream), and its loss equals the drops.
#[test]
fn rtp_jitter_and_loss_match_tshark() {
    const TEST: &str = "rtp_jitter_and_loss_match_tshark";
    let Some(root) = prerequisites(TEST, &["tshark", "python3"]) else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());

    let programs = UdpPrograms::attach(&root, &BTreeMap::new(), 16384, 8192)
        .expect("attach cgroup_skb programs");
    let container = Cgroup::new("rtp-rx");
    let receiver = Receiver::start(&container);
    let dir = std::env::temp_dir().join(format!("nodeward-rtp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let capture = Capture::start(&dir, receiver.port);

    let plan = RtpPlan {
        ssrc: 0x4E57_4152,
        payload_type: 0,
        first_seq: 65_400, // wraps during the run
        interval: Duration::from_millis(20),
        ts_step: 160,
        packets: 300,
        max_delay: Duration::from_millis(12),
        drops: vec![17, 18, 60, 111, 150, 151, 152],
        payload_len: 160,
    };
    let socket = UdpSocket::bind("127.0.0.1:0").expect("sender socket");
    let dest = format!("127.0.0.1:{}", receiver.port);
    let dropped = send_rtp(&socket, &dest, &plan, &mut Rng::new(7));
    std::thread::sleep(Duration::from_millis(300));
    let file = capture.stop();

    let agent = ingress_stream(&programs, container.id(), plan.ssrc)
        .expect("the agent saw the stream in the receiver's cgroup");
    let tshark = tshark_rtp_streams(&file, receiver.port);
    let _ = std::fs::remove_dir_all(&dir);
    let t = tshark
        .iter()
        .find(|r| r.ssrc == plan.ssrc)
        .unwrap_or_else(|| panic!("tshark found no stream {:#x}: {tshark:?}", plan.ssrc));

    assert_eq!(dropped, 7);
    assert_eq!(agent.lost(), u64::from(dropped), "agent: {agent:?}");
    assert_eq!(
        t.lost,
        i64::from(dropped),
        "tshark agrees on the drops: {t:?}"
    );
    assert_eq!(agent.cycles, 1, "the sequence number wrapped once");
    assert_eq!(agent.received, t.packets, "same packets counted");

    let mean_ms = agent.jitter_sum_ns as f64 / agent.jitter_samples as f64 / 1e6;
    let max_ms = agent.jitter_max_ns as f64 / 1e6;
    eprintln!(
        "jitter mean {mean_ms:.3} ms (tshark {:.3}), max {max_ms:.3} ms (tshark {:.3}); injected U(0,12ms) => about 4 ms",
        t.mean_jitter_ms, t.max_jitter_ms
    );
    assert!(
        t.mean_jitter_ms > 1.0,
        "the delay line produced jitter: {t:?}"
    );
    let within = |a: f64, b: f64| (a - b).abs() <= 0.10 * b;
    assert!(
        within(mean_ms, t.mean_jitter_ms),
        "mean jitter {mean_ms} vs tshark {}",
        t.mean_jitter_ms
    );
    assert!(
        within(max_ms, t.max_jitter_ms),
        "max jitter {max_ms} vs tshark {}",
        t.max_jitter_ms
    );
}

/// Noise on the same port range, truncated and malformed packets, RTCP and STUN: none of it
/// becomes an RTP stream, nothing crashes; a payload-type change mid-stream is counted and the
/// stream keeps its loss count at zero.
#[test]
fn non_rtp_and_malformed_udp_is_not_counted_as_rtp() {
    const TEST: &str = "non_rtp_and_malformed_udp_is_not_counted_as_rtp";
    let Some(root) = prerequisites(TEST, &["python3"]) else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let programs = UdpPrograms::attach(&root, &BTreeMap::new(), 16384, 8192).expect("attach");
    let container = Cgroup::new("udp-noise");
    let receiver = Receiver::start(&container);
    let dest = format!("127.0.0.1:{}", receiver.port);
    let socket = UdpSocket::bind("127.0.0.1:0").expect("socket");

    let mut rng = Rng::new(99);
    for i in 0..200u32 {
        // Random bytes, but with the RTP version bits set half the time.
        let mut noise: Vec<u8> = (0..(20 + i % 50)).map(|_| rng.next_u64() as u8).collect();
        if i % 2 == 0 {
            noise[0] = 0x80 | (noise[0] & 0x3f);
        }
        socket.send_to(&noise, &dest).expect("send noise");
        // Truncated (shorter than an RTP header) and empty datagrams.
        socket
            .send_to(&noise[..(i as usize % 12)], &dest)
            .expect("send truncated");
    }
    // RTCP sender report and STUN binding request.
    let mut rtcp = rtp_packet(0, 0, 0, 1, 16);
    rtcp[1] = 200;
    socket.send_to(&rtcp, &dest).expect("rtcp");
    let mut stun = vec![0u8; 20];
    stun[1] = 1;
    stun[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    socket.send_to(&stun, &dest).expect("stun");
    // CSRC count pointing past the end of the packet.
    let mut bad = rtp_packet(96, 1, 1, 0xBAD, 0);
    bad[0] = 0x8f;
    socket.send_to(&bad, &dest).expect("malformed");

    // A real stream from another socket that changes payload type halfway.
    let rtp_socket = UdpSocket::bind("127.0.0.1:0").expect("socket");
    for seq in 0..100u16 {
        let pt = if seq < 50 { 0 } else { 8 };
        let pkt = rtp_packet(pt, seq, u32::from(seq) * 160, 0x5EED, 160);
        rtp_socket.send_to(&pkt, &dest).expect("rtp");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(200));

    let maps = programs.read().expect("read");
    let streams: Vec<_> = maps
        .streams
        .iter()
        .filter(|(k, _)| k.flow.cgroup_id == container.id() && k.flow.direction == DIR_INGRESS)
        .collect();
    let noise_port = socket.local_addr().expect("addr").port();
    let from_noise: Vec<_> = streams
        .iter()
        .filter(|(k, s)| k.flow.remote_port == noise_port && s.confirmed == 1)
        .collect();
    assert!(
        from_noise.is_empty(),
        "noise was confirmed as RTP: {from_noise:?}"
    );
    let real = streams
        .iter()
        .find(|(k, _)| k.ssrc == 0x5EED)
        .map(|(_, s)| *s)
        .expect("the real stream is tracked");
    assert_eq!(real.confirmed, 1);
    assert_eq!(real.payload_type_changes, 1);
    assert_eq!(real.payload_type, 8);
    assert_eq!(real.lost(), 0);
    assert_eq!(real.received, 100);
    let flows = maps
        .flows
        .iter()
        .filter(|(k, _)| k.cgroup_id == container.id() && k.remote_port == noise_port)
        .map(|(_, f)| f.packets)
        .sum::<u64>();
    assert_eq!(
        flows, 403,
        "every datagram of the noise socket is counted in its flow"
    );
}

/// The source's report for a container: an RTP stream and a long-lived plain UDP flow count as
/// live streams while they flow (what a drain waits for), a one-off datagram is not even a
/// flow, and the count drops to zero once both stop. The windows carry the drops the sender
/// made.
#[test]
fn live_streams_follow_the_traffic_and_windows_count_loss() {
    const TEST: &str = "live_streams_follow_the_traffic_and_windows_count_loss";
    let Some(root) = prerequisites(TEST, &["python3"]) else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let config = nodeward::sources::udp::UdpConfig {
        idle_timeout: Duration::from_millis(500),
        stream_min_duration: Duration::from_secs(1),
        ..Default::default()
    };
    let mut source = nodeward::sources::udp::Source::attach(
        &root,
        &config,
        Duration::from_millis(200),
        &nodeward::store::DEFAULT_NETWORK_WINDOWS,
    )
    .expect("attach the UDP source");
    let container = Cgroup::new("udp-live");
    let receiver = Receiver::start(&container);
    let dest = format!("127.0.0.1:{}", receiver.port);

    // A one-off datagram first: never a stream.
    let oneoff = UdpSocket::bind("127.0.0.1:0").expect("socket");
    oneoff.send_to(b"hello", &dest).expect("send");

    let plan = RtpPlan {
        ssrc: 0x1175,
        payload_type: 96,
        first_seq: 100,
        interval: Duration::from_millis(10),
        ts_step: 900,
        packets: 200,
        max_delay: Duration::from_millis(2),
        drops: vec![50, 51, 52],
        payload_len: 100,
    };
    let rtp_dest = dest.clone();
    let sender = std::thread::spawn(move || {
        let s = UdpSocket::bind("127.0.0.1:0").expect("socket");
        send_rtp(&s, &rtp_dest, &plan, &mut Rng::new(3))
    });
    let plain = UdpSocket::bind("127.0.0.1:0").expect("socket");
    let mut during = None;
    for i in 0..200u32 {
        plain.send_to(&i.to_be_bytes(), &dest).expect("plain UDP");
        std::thread::sleep(Duration::from_millis(10));
        if i == 150 {
            let snap = source.poll().expect("poll");
            during = snap.container(container.id()).cloned();
        }
    }
    let dropped = sender.join().expect("sender thread");
    std::thread::sleep(Duration::from_millis(50));
    let end = source.poll().expect("poll");
    let during = during.expect("the container appears while traffic flows");
    assert_eq!(
        during.live_streams, 2,
        "RTP stream + long-lived UDP flow: {:#?}",
        during.streams
    );

    let c = end
        .container(container.id())
        .expect("container in the report");
    let dir = container
        .path
        .file_name()
        .expect("cgroup dir")
        .to_string_lossy()
        .into_owned();
    assert!(
        c.cgroup_path.as_deref().is_some_and(|p| p.ends_with(&dir)),
        "the cgroup id resolves to its path: {:?}",
        c.cgroup_path
    );
    let w10 = &c.windows[0];
    assert_eq!(w10.window, nodeward::store::Window::from_secs(10));
    assert_eq!(w10.rtp_lost, u64::from(dropped), "{w10:?}");
    assert_eq!(w10.rtp_expected, 200, "{w10:?}");
    // The totals since start: every packet the sender did not drop, and the drops.
    assert_eq!(
        (c.totals.rtp_packets, c.totals.rtp_lost),
        (200 - u64::from(dropped), u64::from(dropped)),
        "{:?}",
        c.totals
    );
    let stream = c
        .streams
        .iter()
        .find(|s| s.ssrc == 0x1175)
        .expect("stream listed");
    assert_eq!(
        stream.clock_rate,
        Some(90_000),
        "dynamic type 96 takes the configured rate"
    );
    assert!(stream.jitter_seconds.is_some());
    let oneoff_port = oneoff.local_addr().expect("addr").port();
    // A single datagram proves nothing: it waits on probation and never enters the flow map
    // (tests/tests/udp_flood.rs floods with such datagrams).
    assert!(
        !c.flows
            .iter()
            .any(|f| f.endpoint.remote_port == oneoff_port),
        "the one-off datagram is not a flow: {:#?}",
        c.flows
    );
    assert!(end.counters.flows_on_probation >= 1, "{:?}", end.counters);

    std::thread::sleep(Duration::from_millis(800));
    let after = source.poll().expect("poll");
    let c = after.container(container.id()).expect("still reported");
    assert_eq!(c.live_streams, 0, "nothing flows any more");
    assert!(after.hook.contains("cgroup_skb"));
}

/// The same bookkeeping over IPv6: the stream is found with its IPv6 endpoints and its loss
/// equals the drops.
#[test]
fn rtp_over_ipv6_is_tracked_with_its_loss() {
    const TEST: &str = "rtp_over_ipv6_is_tracked_with_its_loss";
    let Some(root) = prerequisites(TEST, &["python3"]) else {
        return;
    };
    let Ok(socket) = UdpSocket::bind("[::1]:0") else {
        return skip(TEST, "no IPv6 loopback on this host");
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let programs = UdpPrograms::attach(&root, &BTreeMap::new(), 16384, 8192).expect("attach");
    let container = Cgroup::new("rtp6");
    let receiver = Receiver::start_on(&container, "::1");
    let plan = RtpPlan {
        ssrc: 0x0006_0006,
        payload_type: 8,
        first_seq: 1,
        interval: Duration::from_millis(5),
        ts_step: 40,
        packets: 100,
        max_delay: Duration::from_millis(1),
        drops: vec![10, 20, 30],
        payload_len: 40,
    };
    let dropped = send_rtp(
        &socket,
        &format!("[::1]:{}", receiver.port),
        &plan,
        &mut Rng::new(6),
    );
    std::thread::sleep(Duration::from_millis(100));
    let maps = programs.read().expect("read");
    let (key, state) = maps
        .streams
        .iter()
        .find(|(k, _)| {
            k.flow.cgroup_id == container.id()
                && k.ssrc == plan.ssrc
                && k.flow.direction == DIR_INGRESS
        })
        .expect("the IPv6 stream is tracked in the receiver's cgroup");
    assert_eq!(key.flow.ip_version, 6);
    assert_eq!(key.flow.local_port, receiver.port);
    assert_eq!(
        key.flow.local_addr,
        [0, 0, 0, u32::from_be(1)],
        "::1 in network order"
    );
    assert_eq!(state.lost(), u64::from(dropped));
    assert_eq!(state.received, 97);
}

/// IPv4 with header options puts the UDP header at a variable offset, which the programs read
/// through `bpf_skb_load_bytes` rather than directly from the packet: the flow and the stream
/// are counted as exactly as without options (every packet and payload byte sent, the drops as
/// loss).
#[test]
fn rtp_with_ipv4_options_is_tracked_with_its_loss() {
    const TEST: &str = "rtp_with_ipv4_options_is_tracked_with_its_loss";
    let Some(root) = prerequisites(TEST, &["python3"]) else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let programs = UdpPrograms::attach(&root, &BTreeMap::new(), 16384, 8192).expect("attach");
    let container = Cgroup::new("rtp-ipopt");
    let receiver = Receiver::start(&container);
    let socket = UdpSocket::bind("127.0.0.1:0").expect("sender socket");
    // Three no-operation options and an end-of-list: a 24-byte IPv4 header (IHL 6).
    let options = [1u8, 1, 1, 0];
    // SAFETY: a valid socket descriptor and a buffer of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::IPPROTO_IP,
            libc::IP_OPTIONS,
            options.as_ptr().cast(),
            options.len() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "IP_OPTIONS: {}", std::io::Error::last_os_error());
    let plan = RtpPlan {
        ssrc: 0x0004_0024,
        payload_type: 0,
        first_seq: 500,
        interval: Duration::from_millis(5),
        ts_step: 40,
        packets: 100,
        max_delay: Duration::from_millis(1),
        drops: vec![5, 50, 51],
        payload_len: 40,
    };
    let dest = format!("127.0.0.1:{}", receiver.port);
    let dropped = send_rtp(&socket, &dest, &plan, &mut Rng::new(24));
    std::thread::sleep(Duration::from_millis(100));
    let maps = programs.read().expect("read");
    let sender_port = socket.local_addr().expect("addr").port();
    let state = ingress_stream(&programs, container.id(), plan.ssrc)
        .expect("the stream sent with IP options is tracked in the receiver's cgroup");
    assert_eq!(dropped, 3);
    assert_eq!(state.lost(), u64::from(dropped));
    assert_eq!(state.received, 97);
    let (_, flow) = maps
        .flows
        .iter()
        .find(|(k, _)| {
            k.cgroup_id == container.id()
                && k.direction == DIR_INGRESS
                && k.remote_port == sender_port
        })
        .expect("the flow is tracked");
    assert_eq!(flow.packets, 97);
    assert_eq!(
        flow.bytes,
        97 * (12 + 40),
        "RTP header and payload of each datagram"
    );
}
