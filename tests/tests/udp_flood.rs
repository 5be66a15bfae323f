//! A flood of one-packet UDP flows from many source ports (the cheapest attack on LRU flow
//! tables) must not evict a live RTP stream: its packets, loss and jitter stay what the
//! generator made and tshark measures, and the flood is counted.

use std::{
    collections::BTreeMap,
    net::UdpSocket,
    time::{Duration, Instant},
};

use agent_ebpf::rtp::{counter, RtpState, DIR_INGRESS};
use nodeward::ebpf::udp::{probation_entries, UdpPrograms};
use nodeward_tests::{
    cgroup_v2_root, require_root,
    rtp::{rtp_packet, send_rtp, tshark_rtp_streams, Capture, Receiver, Rng, RtpPlan},
    skip, Cgroup,
};

/// Small maps, so that the flood is many times larger than every map, probation included.
const MAX_FLOWS: u32 = 256;
const MAX_STREAMS: u32 = 128;
/// Source ports the flood sends from, one datagram each; below the usual ephemeral range so
/// that no port is picked twice (a second packet from the same port is a flow that proved
/// itself, not a one-packet flow).
const FLOOD_PORTS: std::ops::Range<u16> = 20_000..28_000;
const FLOOD_BURSTS: usize = 4;

fn have(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// Sends one RTP-looking datagram (random SSRC and sequence number) from each port of
/// `ports` to `dest`; returns how many went out (a port in use elsewhere is skipped).
fn flood(ports: impl Iterator<Item = u16>, dest: &str, rng: &mut Rng) -> u64 {
    let mut sent = 0;
    for port in ports {
        let Ok(s) = UdpSocket::bind(("127.0.0.1", port)) else {
            continue;
        };
        let p = rtp_packet(0, rng.next_u64() as u16, 0, rng.next_u64() as u32, 160);
        if s.send_to(&p, dest).is_ok() {
            sent += 1;
        }
    }
    sent
}

fn ingress_stream(programs: &UdpPrograms, cgroup_id: u64, ssrc: u32) -> Option<RtpState> {
    programs
        .read()
        .expect("read UDP maps")
        .streams
        .into_iter()
        .find(|(k, _)| {
            k.flow.cgroup_id == cgroup_id && k.ssrc == ssrc && k.flow.direction == DIR_INGRESS
        })
        .map(|(_, s)| s)
}

#[test]
fn a_flood_of_one_packet_flows_does_not_evict_a_live_rtp_stream() {
    const TEST: &str = "a_flood_of_one_packet_flows_does_not_evict_a_live_rtp_stream";
    require_root!(TEST);
    let Some(root) = cgroup_v2_root() else {
        return skip(TEST, "no cgroup v2 hierarchy for cgroup_skb programs");
    };
    if !have("tshark") || !have("python3") {
        return skip(
            TEST,
            "needs tshark and python3 (cargo xtask test installs them)",
        );
    }
    let flood_ports = u64::from(FLOOD_PORTS.end - FLOOD_PORTS.start);
    assert!(
        flood_ports > 4 * u64::from(MAX_FLOWS + probation_entries(MAX_FLOWS)),
        "the flood outnumbers the maps"
    );
    let programs = UdpPrograms::attach(&root, &BTreeMap::new(), MAX_FLOWS, MAX_STREAMS)
        .expect("attach cgroup_skb programs");
    let before = programs.read().expect("read").counters;
    let container = Cgroup::new("rtp-flood");
    let receiver = Receiver::start(&container);
    // Another open port on the same host, in the same container: the flood's target.
    let target = Receiver::start(&container);
    let dir = std::env::temp_dir().join(format!("nodeward-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let capture = Capture::start(&dir, receiver.port);

    let plan = RtpPlan {
        ssrc: 0xF100_D5AF,
        payload_type: 0,
        first_seq: 1000,
        interval: Duration::from_millis(20),
        ts_step: 160,
        packets: 300,
        max_delay: Duration::from_millis(8),
        drops: vec![40, 41, 120, 200, 260],
        payload_len: 160,
    };
    let dest = format!("127.0.0.1:{}", receiver.port);
    let stream_plan = plan.clone();
    let sender = std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("sender socket");
        send_rtp(&socket, &dest, &stream_plan, &mut Rng::new(11))
    });

    // Bursts of one-packet flows while the stream runs (it lasts 6 s).
    let flood_dest = format!("127.0.0.1:{}", target.port);
    let mut rng = Rng::new(5);
    let per_burst = (FLOOD_PORTS.end - FLOOD_PORTS.start) / FLOOD_BURSTS as u16;
    let mut flooded = 0;
    let started = Instant::now();
    for burst in 0..FLOOD_BURSTS as u16 {
        std::thread::sleep(Duration::from_millis(1000));
        let from = FLOOD_PORTS.start + burst * per_burst;
        flooded += flood(from..from + per_burst, &flood_dest, &mut rng);
    }
    let flood_took = started.elapsed();
    let dropped = sender.join().expect("sender thread");
    std::thread::sleep(Duration::from_millis(300));
    let file = capture.stop();

    let agent = ingress_stream(&programs, container.id(), plan.ssrc)
        .expect("the stream is still tracked after the flood");
    let after = programs.read().expect("read").counters;
    let tshark = tshark_rtp_streams(&file, receiver.port);
    let _ = std::fs::remove_dir_all(&dir);
    let t = tshark
        .iter()
        .find(|r| r.ssrc == plan.ssrc)
        .unwrap_or_else(|| panic!("tshark found no stream {:#x}: {tshark:?}", plan.ssrc));
    let delta = |i: u32| after[i as usize] - before[i as usize];
    eprintln!(
        "flood: {flooded} one-packet flows in {FLOOD_BURSTS} bursts ({flood_took:?} with pauses); \
         flows on probation +{}, admitted +{}; streams on probation +{}, admitted +{}",
        delta(counter::FLOWS_ON_PROBATION),
        delta(counter::FLOWS_CREATED),
        delta(counter::STREAMS_ON_PROBATION),
        delta(counter::STREAMS_CREATED),
    );

    assert!(
        flooded > 4 * u64::from(MAX_FLOWS + probation_entries(MAX_FLOWS)),
        "only {flooded} flood datagrams went out"
    );
    // The stream's figures are the generator's, from its first packet to its last.
    assert_eq!(dropped, 5);
    assert_eq!(
        agent.expected(),
        u64::from(plan.packets),
        "tracked since the first packet: {agent:?}"
    );
    assert_eq!(agent.lost(), u64::from(dropped), "{agent:?}");
    assert_eq!(agent.received, u64::from(plan.packets - dropped));
    assert_eq!(agent.received, t.packets, "tshark counts the same packets");
    let mean_ms = agent.jitter_sum_ns as f64 / agent.jitter_samples as f64 / 1e6;
    let max_ms = agent.jitter_max_ns as f64 / 1e6;
    eprintln!(
        "jitter mean {mean_ms:.3} ms (tshark {:.3}), max {max_ms:.3} ms (tshark {:.3})",
        t.mean_jitter_ms, t.max_jitter_ms
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
    // The flood is counted: every one-packet flow went on probation (inbound at the target,
    // and outbound from this process), and as a stream too, since each looked like RTP.
    assert!(
        delta(counter::FLOWS_ON_PROBATION) >= flooded,
        "flows on probation: {}",
        delta(counter::FLOWS_ON_PROBATION)
    );
    assert!(
        delta(counter::STREAMS_ON_PROBATION) >= flooded,
        "streams on probation: {}",
        delta(counter::STREAMS_ON_PROBATION)
    );
}
