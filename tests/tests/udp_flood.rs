//! A flood of one-packet UDP flows from many source ports (the cheapest attack on LRU flow
//! tables) must not evict a live RTP stream: its packets, loss and jitter stay what the
//! generator made and tshark measures, and the flood is counted.
//!
//! The kernel's LRU already favours entries used more than once, so a flood alone does not push
//! out a stream that sends every 20 ms. What it does push out is a stream that pauses (talk
//! spurts with silence suppression, as VoIP with DTX sends) on a node whose maps are mostly
//! full of other live streams: then the LRU rotates its active entries, and the paused one goes.
//! That is the node this test builds: 50 background streams (100 map entries, one for each
//! direction) in maps of 128 and 256 entries, the measured stream paused twice for 1.5 s, and a
//! burst of one-packet flows in each pause. Without admission control the measured stream is
//! evicted in a pause and counted again from scratch when it resumes.

use std::{
    collections::BTreeMap,
    net::UdpSocket,
    time::{Duration, Instant},
};

use agent_ebpf::rtp::{counter, RtpState, DIR_INGRESS};
use nodeward::ebpf::udp::{probation_entries, UdpPrograms};
use nodeward_tests::{
    cgroup_v2_root, require_root,
    rtp::{rtp_packet, tshark_rtp_streams, Capture, Receiver, Rng},
    skip, Cgroup,
};

/// Small maps, mostly full of live streams; the flood outnumbers each map, probation included.
const MAX_FLOWS: u32 = 256;
const MAX_STREAMS: u32 = 128;
/// Other live streams on the node: 50 packets/s each, for the whole test.
const BACKGROUND: u32 = 50;
/// Source ports the flood sends from, one datagram each and each port once (a second packet
/// from the same port is a flow that proved itself, not a one-packet flow).
const FLOOD_PORTS: std::ops::Range<u16> = 20_000..36_000;
/// The stream: PCMU, 20 ms packets, three talk spurts of 100 packets with 1.5 s pauses.
const SSRC: u32 = 0xF100_D5AF;
const PACKETS: u32 = 300;
const SPURT: u32 = 100;
const SILENCE: Duration = Duration::from_millis(1500);
const DROPS: [u32; 5] = [40, 41, 120, 200, 260];

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

/// The other streams on the node, from their own sockets, until `stop` is set.
fn background(dest: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let sockets: Vec<UdpSocket> = (0..BACKGROUND)
        .map(|_| UdpSocket::bind("127.0.0.1:0").expect("background socket"))
        .collect();
    let mut seq = 0u16;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for (i, s) in sockets.iter().enumerate() {
            let p = rtp_packet(0, seq, u32::from(seq) * 160, 0xB000_0000 + i as u32, 160);
            let _ = s.send_to(&p, &dest);
        }
        seq = seq.wrapping_add(1);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// When packet `i` leaves (before its random delay): the talk spurts' schedule.
fn due(i: u32) -> Duration {
    Duration::from_millis(20) * i + SILENCE * (i / SPURT)
}

/// Sends the talk spurts: consecutive sequence numbers, timestamps that run on through the
/// pauses (8 kHz), each packet delayed by U(0, 8 ms); returns the packets dropped on purpose.
fn talk(socket: &UdpSocket, dest: &str, rng: &mut Rng) -> u32 {
    let start = Instant::now();
    let silence_samples = (SILENCE.as_millis() as u32) * 8;
    let mut dropped = 0;
    for i in 0..PACKETS {
        let at = due(i) + Duration::from_micros(rng.below(8_000));
        if DROPS.contains(&i) {
            dropped += 1;
            continue;
        }
        if let Some(wait) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let ts = 0x1000 + i * 160 + (i / SPURT) * silence_samples;
        let pkt = rtp_packet(0, 1000 + i as u16, ts, SSRC, 160);
        socket.send_to(&pkt, dest).expect("send RTP");
    }
    dropped
}

fn ingress_stream(
    streams: &[(agent_ebpf::rtp::RtpKey, RtpState)],
    cgroup_id: u64,
    ssrc: u32,
) -> Option<RtpState> {
    streams
        .iter()
        .find(|(k, _)| {
            k.flow.cgroup_id == cgroup_id && k.ssrc == ssrc && k.flow.direction == DIR_INGRESS
        })
        .map(|(_, s)| *s)
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

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let others = {
        let dest = format!("127.0.0.1:{}", target.port);
        let stop = stop.clone();
        std::thread::spawn(move || background(dest, stop))
    };
    std::thread::sleep(Duration::from_millis(500));
    let dest = format!("127.0.0.1:{}", receiver.port);
    let started = Instant::now();
    let sender = std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("sender socket");
        talk(&socket, &dest, &mut Rng::new(11))
    });
    // One burst in each pause, 300 ms into it.
    let flood_dest = format!("127.0.0.1:{}", target.port);
    let mut rng = Rng::new(5);
    let half = FLOOD_PORTS.start + (FLOOD_PORTS.end - FLOOD_PORTS.start) / 2;
    let mut flooded = 0;
    for (spurt, ports) in [(1, FLOOD_PORTS.start..half), (2, half..FLOOD_PORTS.end)] {
        let at = due(spurt * SPURT) - SILENCE + Duration::from_millis(300);
        if let Some(wait) = at.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        let burst = Instant::now();
        flooded += flood(ports, &flood_dest, &mut rng);
        eprintln!("flood burst {spurt} took {:?}", burst.elapsed());
    }
    let dropped = sender.join().expect("sender thread");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    others.join().expect("background streams");
    std::thread::sleep(Duration::from_millis(300));
    let file = capture.stop();

    let maps = programs.read().expect("read UDP maps");
    let after = maps.counters;
    eprintln!(
        "maps after the flood: {} flows, {} streams",
        maps.flows.len(),
        maps.streams.len()
    );
    let agent = ingress_stream(&maps.streams, container.id(), SSRC)
        .expect("the stream is still tracked after the flood");
    let flow_packets: u64 = maps
        .flows
        .iter()
        .filter(|(k, _)| {
            k.cgroup_id == container.id()
                && k.direction == DIR_INGRESS
                && k.local_port == receiver.port
        })
        .map(|(_, f)| f.packets)
        .sum();
    let tshark = tshark_rtp_streams(&file, receiver.port);
    let _ = std::fs::remove_dir_all(&dir);
    let t = tshark
        .iter()
        .find(|r| r.ssrc == SSRC)
        .unwrap_or_else(|| panic!("tshark found no stream {SSRC:#x}: {tshark:?}"));
    let delta = |i: u32| after[i as usize] - before[i as usize];
    eprintln!(
        "flood: {flooded} one-packet flows; flows on probation +{}, admitted +{}; streams on \
         probation +{}, admitted +{}",
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
    let sent = u64::from(PACKETS - dropped);
    assert_eq!(dropped, 5);
    assert_eq!(
        agent.expected(),
        u64::from(PACKETS),
        "tracked since the first packet: {agent:?}"
    );
    assert_eq!(agent.lost(), u64::from(dropped), "{agent:?}");
    assert_eq!(agent.received, sent, "{agent:?}");
    assert_eq!(agent.received, t.packets, "tshark counts the same packets");
    assert_eq!(
        flow_packets, sent,
        "the stream's UDP flow kept its count too"
    );
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
