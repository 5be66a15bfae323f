//! What viewers report in RTCP about a stream a container sends: an RTP sender in a container
//! cgroup, the tests' delay line (known drops, known pseudo-random delays) between it and a
//! viewer of the tests' own that computes RFC 3550 loss and jitter from what arrives and sends
//! receiver reports back. The agent's numbers are compared with what the delay line applied.

use std::{
    io::{BufRead, BufReader, Write},
    net::UdpSocket,
    process::{Child, ChildStdin, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use nodeward::{
    sources::udp::{
        model::{ContainerUdp, StreamQuality, UdpSnapshot},
        Source, UdpConfig,
    },
    store::{ViewerReports, DEFAULT_NETWORK_WINDOWS},
};
use nodeward_tests::{cgroup_v2_root, require_root, rtp::Rng, skip, Cgroup};

/// Tests here attach to the same root cgroup; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const RATE: f64 = 8_000.0;
const INTERVAL: Duration = Duration::from_millis(20);

/// An RTP sender (python3) in a container cgroup: one socket on port P for RTP and
/// rtcp-mux, one on P + 1 for classic RTCP. It sends `n` PCMU packets to `dest` at a steady
/// pace once told to on stdin, then keeps both sockets open until stdin closes.
struct Sender {
    child: Child,
    stdin: Option<ChildStdin>,
    port: u16,
}

const SENDER: &str = r#"
import socket, struct, sys, time
dest = ('127.0.0.1', int(sys.argv[1])); ssrc = int(sys.argv[2]); n = int(sys.argv[3])
interval = float(sys.argv[4]); first = int(sys.argv[5])
while True:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.bind(('127.0.0.1', 0))
    p = a.getsockname()[1]
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        b.bind(('127.0.0.1', p + 1)); break
    except OSError:
        a.close(); b.close()
print(p, flush=True)
sys.stdin.readline()
start = time.monotonic()
for i in range(n):
    wait = start + i * interval - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    hdr = struct.pack('!BBHII', 0x80, 0, (first + i) & 0xffff, (0x1000 + i * 160) & 0xffffffff, ssrc)
    a.sendto(hdr + b'\xd5' * 160, dest)
sys.stdin.readline()
"#;

impl Sender {
    fn start(cgroup: &Cgroup, dest_port: u16, ssrc: u32, packets: u32, first_seq: u16) -> Self {
        let mut child = cgroup.spawn(
            Command::new("python3")
                .args(["-c", SENDER])
                .arg(dest_port.to_string())
                .arg(ssrc.to_string())
                .arg(packets.to_string())
                .arg(INTERVAL.as_secs_f64().to_string())
                .arg(first_seq.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        );
        let mut line = String::new();
        let stdout = child.stdout.take().expect("sender stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("sender prints its port");
        let port = line.trim().parse().expect("port number");
        let stdin = child.stdin.take();
        Self { child, stdin, port }
    }

    fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("sender stdin");
        stdin.write_all(b"go\n").expect("start the sender");
        stdin.flush().expect("flush");
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One report block, as a viewer writes it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Block {
    media_ssrc: u32,
    fraction: u8,
    cumulative_lost: i32,
    ext_highest_seq: u32,
    jitter: u32,
}

/// An RTCP receiver report from `reporter` with `blocks`, and an SDES after it (a compound
/// packet, as RFC 3550 6.1 asks).
fn receiver_report(reporter: u32, blocks: &[Block]) -> Vec<u8> {
    let mut p = vec![0x80 | blocks.len() as u8, 201];
    p.extend_from_slice(&(1 + 6 * blocks.len() as u16).to_be_bytes());
    p.extend_from_slice(&reporter.to_be_bytes());
    for b in blocks {
        p.extend_from_slice(&b.media_ssrc.to_be_bytes());
        p.push(b.fraction);
        p.extend_from_slice(&b.cumulative_lost.to_be_bytes()[1..]);
        p.extend_from_slice(&b.ext_highest_seq.to_be_bytes());
        p.extend_from_slice(&b.jitter.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
    }
    p.extend_from_slice(&[0x81, 202, 0, 2]);
    p.extend_from_slice(&reporter.to_be_bytes());
    p.extend_from_slice(&[1, 1, b'v', 0]);
    p
}

/// The viewer's RFC 3550 receiver state (A.1, A.3, A.8), from arrival times it measures.
#[derive(Debug, Default)]
struct Viewer {
    base: Option<u32>,
    max_seq: u32,
    cycles: u32,
    received: u64,
    expected_prior: u64,
    received_prior: u64,
    jitter: f64,
    last: Option<(Instant, u32)>,
}

impl Viewer {
    fn packet(&mut self, seq: u16, ts: u32, arrival: Instant) {
        let seq = u32::from(seq);
        match self.base {
            None => {
                self.base = Some(seq);
                self.max_seq = seq;
            }
            Some(_) => {
                if seq.wrapping_sub(self.max_seq) & 0xffff < 3000 {
                    if seq < self.max_seq {
                        self.cycles += 1;
                    }
                    self.max_seq = seq;
                }
            }
        }
        self.received += 1;
        if let Some((r0, s0)) = self.last {
            let d = (arrival - r0).as_secs_f64() * RATE - f64::from(ts.wrapping_sub(s0));
            self.jitter += (d.abs() - self.jitter) / 16.0;
        }
        self.last = Some((arrival, ts));
    }

    fn block(&mut self, media_ssrc: u32) -> Block {
        let ext = (self.cycles << 16) | self.max_seq;
        let expected = u64::from(ext - self.base.unwrap_or(ext)) + 1;
        let lost = expected as i64 - self.received as i64;
        let expected_interval = expected - self.expected_prior;
        let received_interval = self.received - self.received_prior;
        let lost_interval = expected_interval as i64 - received_interval as i64;
        self.expected_prior = expected;
        self.received_prior = self.received;
        let fraction = if expected_interval == 0 || lost_interval <= 0 {
            0
        } else {
            ((lost_interval << 8) / expected_interval as i64) as u8
        };
        Block {
            media_ssrc,
            fraction,
            cumulative_lost: lost as i32,
            ext_highest_seq: ext,
            jitter: self.jitter.round() as u32,
        }
    }
}

/// The container's outbound stream with `ssrc` in `snap`.
fn outbound(snap: &UdpSnapshot, cgroup_id: u64, ssrc: u32) -> Option<&StreamQuality> {
    snap.container(cgroup_id)?
        .streams
        .iter()
        .find(|s| s.ssrc == ssrc && s.endpoint.direction == "egress")
}

fn attach(test: &str) -> Option<Source> {
    attach_with(test, &UdpConfig::default())
}

fn attach_with(test: &str, config: &UdpConfig) -> Option<Source> {
    let root = cgroup_v2_root()?;
    let have_python = Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    if !have_python {
        skip(test, "needs python3 (cargo xtask test installs it)");
        return None;
    }
    Some(
        Source::attach(
            &root,
            config,
            Duration::from_millis(200),
            &DEFAULT_NETWORK_WINDOWS,
        )
        .expect("attach the UDP source"),
    )
}

/// What the delay line does: per packet index, dropped or held for a delay.
struct Applied {
    dropped: Vec<u32>,
    delays: Vec<Option<Duration>>,
}

/// The delay line: receives the sender's packets on `inbound`, drops the planned ones, and
/// releases packet i at t0 + i * INTERVAL + delay(i), t0 being 15 ms after the first arrival,
/// so the viewer's arrival times carry exactly the delays applied here (not the sender's own
/// pacing noise). A second thread releases them, sleeping until each is due (a socket
/// timeout would round to the kernel's tick). Ends when nothing arrived for 1 s; returns the
/// packets it got.
fn delay_line(
    inbound: UdpSocket,
    viewer: String,
    first_seq: u16,
    delays: Vec<Option<Duration>>,
) -> u32 {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let out = inbound.try_clone().expect("clone the delay line's socket");
    let release = std::thread::spawn(move || {
        for (due, p) in rx {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            out.send_to(&p, &viewer).expect("forward");
        }
    });
    inbound
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut buf = [0u8; 2048];
    let mut t0 = None;
    let mut got = 0;
    while let Ok(n) = inbound.recv(&mut buf) {
        if n < 12 {
            continue;
        }
        got += 1;
        let seq = u16::from_be_bytes([buf[2], buf[3]]);
        let i = seq.wrapping_sub(first_seq) as usize;
        let t0 = *t0.get_or_insert_with(|| Instant::now() + Duration::from_millis(15));
        if let Some(Some(delay)) = delays.get(i) {
            let due = t0 + INTERVAL * i as u32 + *delay;
            tx.send((due, buf[..n].to_vec()))
                .expect("to the release thread");
        }
    }
    drop(tx);
    release.join().expect("release thread");
    got
}

/// 400 PCMU packets through the delay line with 5% of them dropped and each delayed by
/// U(0, 12 ms); the viewer reports every 500 ms and once at the end. The agent's viewer
/// reports for the container's stream: cumulative lost equals the drops, loss over the window
/// equals the drops in the sequence range the window covers (within 10%), and the jitter, in
/// time, is within 10% of RFC 3550 jitter computed from the delays the delay line applied.
#[test]
fn viewer_reported_loss_and_jitter_match_the_delay_line() {
    const TEST: &str = "viewer_reported_loss_and_jitter_match_the_delay_line";
    require_root!(TEST);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut source) = attach(TEST) else {
        return skip(TEST, "no cgroup v2 hierarchy for cgroup_skb programs");
    };
    const SSRC: u32 = 0x5EED_0001;
    const VIEWER_SSRC: u32 = 0x0B5E_EEEE;
    const PACKETS: u32 = 400;
    const FIRST_SEQ: u16 = 1_000;
    let mut rng = Rng::new(11);
    let mut applied = Applied {
        dropped: Vec::new(),
        delays: Vec::new(),
    };
    for i in 0..PACKETS {
        // Never the first or the last, so the viewer's base and final sequence are the plan's.
        if i > 0 && i + 1 < PACKETS && rng.below(100) < 5 {
            applied.dropped.push(i);
            applied.delays.push(None);
        } else {
            applied
                .delays
                .push(Some(Duration::from_nanos(rng.below(12_000_000))));
        }
    }

    let container = Cgroup::new("rtcp-tx");
    let line = UdpSocket::bind("127.0.0.1:0").expect("delay line socket");
    let viewer_socket = UdpSocket::bind("127.0.0.1:0").expect("viewer socket");
    let viewer_addr = viewer_socket.local_addr().expect("viewer addr").to_string();
    let line_port = line.local_addr().expect("line addr").port();
    let mut sender = Sender::start(&container, line_port, SSRC, PACKETS, FIRST_SEQ);
    let sender_rtp = format!("127.0.0.1:{}", sender.port);

    let viewer = std::thread::spawn(move || {
        let mut v = Viewer::default();
        let mut reports = Vec::new();
        let mut buf = [0u8; 2048];
        let mut last_rr = Instant::now();
        viewer_socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let mut idle_since = Instant::now();
        loop {
            if let Ok(n) = viewer_socket.recv(&mut buf) {
                if n >= 12 {
                    let seq = u16::from_be_bytes([buf[2], buf[3]]);
                    let ts = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
                    v.packet(seq, ts, Instant::now());
                    idle_since = Instant::now();
                }
            }
            let done = v.received > 0 && idle_since.elapsed() > Duration::from_millis(1_500);
            if v.received > 0 && (last_rr.elapsed() >= Duration::from_millis(500) || done) {
                let b = v.block(SSRC);
                viewer_socket
                    .send_to(&receiver_report(VIEWER_SSRC, &[b]), &sender_rtp)
                    .expect("send RR");
                reports.push(b);
                last_rr = Instant::now();
            }
            if done {
                return reports;
            }
        }
    });
    sender.go();
    let line_thread = {
        let viewer_addr = viewer_addr.clone();
        let delays = applied.delays.clone();
        let line = line.try_clone().expect("clone");
        std::thread::spawn(move || delay_line(line, viewer_addr, FIRST_SEQ, delays))
    };
    // Polled as the agent does, so it keeps the history its window loss needs.
    while !viewer.is_finished() {
        std::thread::sleep(Duration::from_millis(200));
        source.poll().expect("poll");
    }
    let reports = viewer.join().expect("viewer");
    let sent = line_thread.join().expect("delay line");
    std::thread::sleep(Duration::from_millis(200));
    let snap = source.poll().expect("poll");

    assert_eq!(
        sent, PACKETS,
        "the delay line got every packet the sender sent"
    );
    let last = *reports.last().expect("the viewer reported");
    let stream = outbound(&snap, container.id(), SSRC).unwrap_or_else(|| {
        panic!(
            "the container's stream: {:#?}",
            snap.container(container.id())
        )
    });
    assert_eq!(stream.endpoint.direction, "egress");
    let v: &ViewerReports = stream
        .viewer_reports
        .as_ref()
        .expect("the viewer's reports are attached to the stream");
    assert_eq!(v.reports.len(), 1, "{v:#?}");
    let r = &v.reports[0];
    assert_eq!(r.reporter_ssrc, VIEWER_SSRC);
    assert_eq!(r.local_port, sender.port, "rtcp-mux: on the RTP port");
    // The report the agent holds is the viewer's last, read field by field.
    assert_eq!(r.ext_highest_seq, last.ext_highest_seq);
    assert_eq!(r.jitter_units, last.jitter);
    assert_eq!(r.fraction_lost, f64::from(last.fraction) / 256.0);

    // Loss against the delay line.
    let drops = applied.dropped.len() as i64;
    eprintln!(
        "delay line: {sent} packets, {drops} dropped; agent: cumulative lost {}, window {:?}",
        r.cumulative_lost, r.window
    );
    assert!(drops >= 10, "the plan drops packets: {drops}");
    assert_eq!(
        r.cumulative_lost, drops,
        "cumulative lost = the delay line's drops"
    );
    let w = r.window.expect("several reports in the window");
    let first_ext = u64::from(r.ext_highest_seq) - w.expected;
    let truth = applied
        .dropped
        .iter()
        .map(|&i| u64::from(FIRST_SEQ) + u64::from(i))
        .filter(|&s| s > first_ext && s <= u64::from(r.ext_highest_seq))
        .count() as f64
        / w.expected as f64;
    let got = w.fraction().expect("packets expected in the window");
    assert!(
        w.expected > u64::from(PACKETS) / 2,
        "the window covers most of the run: {w:?}"
    );
    assert!(
        (got - truth).abs() <= 0.10 * truth,
        "window loss {got} vs the delay line's {truth}"
    );

    // Jitter against the delays applied: RFC 3550 A.8 over the packets that were delivered,
    // D = difference of their delays.
    let mut j = 0.0f64;
    let mut prev: Option<Duration> = None;
    for d in applied.delays.iter().flatten() {
        if let Some(p) = prev {
            let dd = (d.as_secs_f64() - p.as_secs_f64()).abs() * RATE;
            j += (dd - j) / 16.0;
        }
        prev = Some(*d);
    }
    let truth_s = j / RATE;
    let got_s = r.jitter.expect("PCMU has a clock rate").as_secs_f64();
    eprintln!("jitter: agent {got_s:.6} s, from the applied delays {truth_s:.6} s");
    assert!(truth_s > 0.001, "the delay line made jitter: {truth_s}");
    assert!(
        (got_s - truth_s).abs() <= 0.10 * truth_s,
        "viewer-reported jitter {got_s} vs applied {truth_s}"
    );
    assert_eq!(v.clock_rate, Some(8_000));
}

/// Reports to the RTP port (rtcp-mux) and to RTP port + 1 are both read; a report about an
/// SSRC the container does not send is attached to no stream, nor is one sent to another
/// container; truncated and malformed RTCP adds no report.
#[test]
fn both_rtcp_ports_are_read_and_nothing_else_is_attached() {
    const TEST: &str = "both_rtcp_ports_are_read_and_nothing_else_is_attached";
    require_root!(TEST);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut source) = attach(TEST) else {
        return skip(TEST, "no cgroup v2 hierarchy for cgroup_skb programs");
    };
    const SSRC: u32 = 0x5EED_0002;
    let container = Cgroup::new("rtcp-ports");
    let other = Cgroup::new("rtcp-other");
    let sink = UdpSocket::bind("127.0.0.1:0").expect("sink");
    let sink_port = sink.local_addr().expect("addr").port();
    let mut sender = Sender::start(&container, sink_port, SSRC, 150, 7);
    // The other container sends nothing of SSRC; its sockets still receive reports.
    let mut bystander = Sender::start(&other, sink_port, 0x0DD0_0000, 0, 7);
    sender.go();
    bystander.go();
    let block = |jitter| Block {
        media_ssrc: SSRC,
        fraction: 25,
        cumulative_lost: 3,
        ext_highest_seq: 100,
        jitter,
    };
    let viewer = UdpSocket::bind("127.0.0.1:0").expect("viewer");
    let to = |port: u16| format!("127.0.0.1:{port}");
    let good_mux = receiver_report(1, &[block(80)]);
    let good_plus1 = receiver_report(2, &[block(160)]);
    let foreign = receiver_report(
        3,
        &[Block {
            media_ssrc: 0xFFFF_0003,
            ..block(8)
        }],
    );
    let elsewhere = receiver_report(5, &[block(16)]);
    let malformed_source = receiver_report(4, &[block(400)]);
    let mut malformed: Vec<Vec<u8>> = (8..malformed_source.len() - 12)
        .map(|cut| malformed_source[..cut].to_vec())
        .collect();
    let mut lying_length = malformed_source.clone();
    lying_length[3] = 200;
    malformed.push(lying_length);
    let mut v1 = malformed_source.clone();
    v1[0] = 0x41;
    malformed.push(v1);
    malformed.push(vec![0x81, 201, 0, 0]);
    std::thread::sleep(Duration::from_millis(1_000));
    for p in &malformed {
        viewer.send_to(p, to(sender.port)).expect("send malformed");
        viewer
            .send_to(p, to(sender.port + 1))
            .expect("send malformed");
    }
    viewer.send_to(&good_mux, to(sender.port)).expect("send");
    viewer
        .send_to(&good_plus1, to(sender.port + 1))
        .expect("send");
    viewer.send_to(&foreign, to(sender.port)).expect("send");
    viewer
        .send_to(&elsewhere, to(bystander.port))
        .expect("send");
    std::thread::sleep(Duration::from_millis(500));
    let snap = source.poll().expect("poll");

    let stream = outbound(&snap, container.id(), SSRC).expect("the container's stream");
    let v = stream.viewer_reports.as_ref().expect("reports attached");
    let mut got: Vec<(u32, u16, u32)> = v
        .reports
        .iter()
        .map(|r| (r.reporter_ssrc, r.local_port, r.jitter_units))
        .collect();
    got.sort_unstable();
    assert_eq!(
        got,
        [(1, sender.port, 80), (2, sender.port + 1, 160)],
        "the mux and port+1 reports, nothing of the malformed ones: {v:#?}"
    );
    for r in &v.reports {
        assert_eq!(r.cumulative_lost, 3);
        assert_eq!(r.fraction_lost, 25.0 / 256.0);
        assert_eq!(
            r.jitter,
            Some(Duration::from_nanos(u64::from(r.jitter_units) * 125_000)),
            "timestamp units at 8 kHz"
        );
    }
    let attached_anywhere = |reporter: u32| {
        snap.containers
            .iter()
            .flat_map(|c: &ContainerUdp| &c.streams)
            .filter_map(|s| s.viewer_reports.as_ref())
            .flat_map(|v| &v.reports)
            .any(|r| r.reporter_ssrc == reporter)
    };
    assert!(!attached_anywhere(3), "an SSRC the container does not send");
    assert!(
        !attached_anywhere(5),
        "a report that arrived at another container"
    );
    assert!(!attached_anywhere(4), "malformed reports");
    assert!(
        snap.counters.rtcp_with_reports >= 4,
        "the kernel read the good reports: {:?}",
        snap.counters
    );
}

/// RTCP on RTP port + 1 (no rtcp-mux) belongs to its RTP session: a stream whose viewer sends
/// receiver reports to port + 1 for longer than `udp.stream_min_duration` is one stream, not
/// an RTP stream plus a long-lived UDP flow that would hold a drain of its own.
#[test]
fn rtcp_on_port_plus_one_is_part_of_its_rtp_stream_not_a_stream_of_its_own() {
    const TEST: &str = "rtcp_on_port_plus_one_is_part_of_its_rtp_stream_not_a_stream_of_its_own";
    require_root!(TEST);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let config = UdpConfig {
        stream_min_duration: Duration::from_secs(1),
        ..UdpConfig::default()
    };
    let Some(mut source) = attach_with(TEST, &config) else {
        return skip(TEST, "no cgroup v2 hierarchy for cgroup_skb programs");
    };
    const SSRC: u32 = 0x5EED_0003;
    let container = Cgroup::new("rtcp-plus1");
    let sink = UdpSocket::bind("127.0.0.1:0").expect("sink");
    let sink_port = sink.local_addr().expect("addr").port();
    // 3 s of RTP.
    let mut sender = Sender::start(&container, sink_port, SSRC, 150, 7);
    sender.go();
    let viewer = UdpSocket::bind("127.0.0.1:0").expect("viewer");
    let report = receiver_report(
        9,
        &[Block {
            media_ssrc: SSRC,
            fraction: 0,
            cumulative_lost: 0,
            ext_highest_seq: 100,
            jitter: 8,
        }],
    );
    // Reports to port + 1 for 2.4 s: a flow that lives past `stream_min_duration`.
    for _ in 0..13 {
        viewer
            .send_to(&report, format!("127.0.0.1:{}", sender.port + 1))
            .expect("send a receiver report");
        std::thread::sleep(Duration::from_millis(200));
    }
    let snap = source.poll().expect("poll");

    let c = snap
        .container(container.id())
        .expect("the container reports");
    let rtcp = c
        .flows
        .iter()
        .find(|f| f.endpoint.local_port == sender.port + 1)
        .unwrap_or_else(|| panic!("the RTCP flow is tracked: {:#?}", c.flows));
    assert!(
        rtcp.live && rtcp.age_seconds >= 1.0,
        "long-lived enough to count were it a stream: {rtcp:#?}"
    );
    assert!(
        outbound(&snap, container.id(), SSRC).is_some_and(|s| s.live),
        "the RTP stream is live"
    );
    assert_eq!(
        c.live_streams, 1,
        "one RTP session with RTCP on port + 1 is one stream: {:#?}",
        c.flows
    );
    assert!(rtcp.rtcp, "marked as the RTCP of the RTP flow: {rtcp:#?}");
    drop(sink);
}
