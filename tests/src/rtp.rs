//! Test traffic for the UDP/RTP collector: an RTP sender of the tests' own with a delay line
//! (each packet held for a known, pseudo-random time before it leaves) and known drops, a UDP
//! receiver placed in a cgroup, and tshark as the independent judge of the traffic.

use std::{
    net::UdpSocket,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{wait_for, Cgroup};

/// A small deterministic PRNG (xorshift64*), so every run sends the same schedule.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `[0, max)`.
    pub fn below(&mut self, max: u64) -> u64 {
        self.next_u64() % max.max(1)
    }
}

/// What the sender does.
#[derive(Debug, Clone)]
pub struct RtpPlan {
    pub ssrc: u32,
    pub payload_type: u8,
    pub first_seq: u16,
    /// Packet interval and the matching RTP timestamp step.
    pub interval: Duration,
    pub ts_step: u32,
    pub packets: u32,
    /// Each packet leaves at `i * interval + U(0, max_delay)`.
    pub max_delay: Duration,
    /// Indexes (0-based, in send order) of packets that are never sent.
    pub drops: Vec<u32>,
    /// Payload bytes after the RTP header.
    pub payload_len: usize,
}

/// Builds one RTP packet.
pub fn rtp_packet(pt: u8, seq: u16, ts: u32, ssrc: u32, payload_len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + payload_len);
    p.push(0x80);
    p.push(pt & 0x7f);
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.resize(12 + payload_len, 0xd5);
    p
}

/// Sends the plan to `dest` and returns the number of packets dropped on purpose.
pub fn send_rtp(socket: &UdpSocket, dest: &str, plan: &RtpPlan, rng: &mut Rng) -> u32 {
    let start = Instant::now();
    let mut dropped = 0;
    for i in 0..plan.packets {
        let jitter = Duration::from_nanos(rng.below(plan.max_delay.as_nanos() as u64));
        let due = plan.interval * i + jitter;
        if plan.drops.contains(&i) {
            dropped += 1;
            continue;
        }
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let seq = plan.first_seq.wrapping_add(i as u16);
        let ts = i.wrapping_mul(plan.ts_step).wrapping_add(0x1000);
        let pkt = rtp_packet(plan.payload_type, seq, ts, plan.ssrc, plan.payload_len);
        socket.send_to(&pkt, dest).expect("send RTP");
    }
    dropped
}

/// A UDP receiver (python3) inside `cgroup`, bound to 127.0.0.1 on a free port; it reads until
/// nothing arrives for 3 s.
pub struct Receiver {
    pub child: Child,
    pub port: u16,
}

impl Receiver {
    pub fn start(cgroup: &Cgroup) -> Self {
        Self::start_on(cgroup, "127.0.0.1")
    }

    /// A receiver bound to `addr` (`127.0.0.1` or `::1`).
    pub fn start_on(cgroup: &Cgroup, addr: &str) -> Self {
        let family = if addr.contains(':') {
            "AF_INET6"
        } else {
            "AF_INET"
        };
        let script = [
            "import socket",
            &format!("s = socket.socket(socket.{family}, socket.SOCK_DGRAM)"),
            &format!("s.bind(('{addr}', 0))"),
            "print(s.getsockname()[1], flush=True)",
            "s.settimeout(3)",
            "while True:",
            "    try:",
            "        s.recv(4096)",
            "    except socket.timeout:",
            "        break",
        ]
        .join("\n");
        let script = script.as_str();
        let mut child = cgroup.spawn(
            Command::new("python3")
                .args(["-c", script])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        );
        let mut line = String::new();
        let stdout = child.stdout.take().expect("receiver stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .expect("receiver prints its port");
        let port = line.trim().parse().expect("port number");
        Self { child, port }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tshark capture on `lo` of one UDP port, written to a pcap file.
pub struct Capture {
    child: Child,
    pub file: PathBuf,
}

impl Capture {
    pub fn start(dir: &Path, port: u16) -> Self {
        let file = dir.join(format!("rtp-{port}.pcap"));
        let mut child = Command::new("tshark")
            .args(["-q", "-i", "lo", "-f", &format!("udp port {port}"), "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tshark");
        // tshark says "Capturing on 'Loopback: lo'" once the filter is in place.
        let stderr = child.stderr.take().expect("tshark stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("Capturing on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("tshark started capturing");
        // The message can come a moment before the capture filter is live.
        std::thread::sleep(Duration::from_millis(1000));
        Self { child, file }
    }

    /// Stops the capture and waits until the file is complete.
    pub fn stop(mut self) -> PathBuf {
        let _ = crate::send_signal(self.child.id(), rustix::process::Signal::Int);
        wait_for(Duration::from_secs(10), || {
            self.child.try_wait().ok().flatten()
        })
        .expect("tshark stops on SIGINT");
        self.file.clone()
    }
}

/// One row of `tshark -z rtp,streams`.
#[derive(Debug, Clone, PartialEq)]
pub struct TsharkStream {
    pub ssrc: u32,
    pub packets: u64,
    pub lost: i64,
    pub max_delta_ms: f64,
    pub mean_jitter_ms: f64,
    pub max_jitter_ms: f64,
}

/// Runs tshark's RTP stream analysis on a capture, decoding `port` as RTP.
pub fn tshark_rtp_streams(file: &Path, port: u16) -> Vec<TsharkStream> {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(file)
        .args([
            "-d",
            &format!("udp.port=={port},rtp"),
            "-q",
            "-z",
            "rtp,streams",
        ])
        .output()
        .expect("run tshark");
    assert!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_rtp_streams(&String::from_utf8_lossy(&out.stdout))
}

/// Parses the table: the row's SSRC is a `0x…` token; after it come the payload name (one or
/// more tokens), packets, lost, `(x%)`, min/mean/max delta, min/mean/max jitter.
pub fn parse_rtp_streams(text: &str) -> Vec<TsharkStream> {
    let mut rows = Vec::new();
    for line in text.lines() {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = tokens.iter().position(|t| t.starts_with("0x")) else {
            continue;
        };
        let Ok(ssrc) = u32::from_str_radix(tokens[i].trim_start_matches("0x"), 16) else {
            continue;
        };
        // The lost column is followed by "(p%)"; find it to anchor the numeric columns.
        let Some(pct) = tokens
            .iter()
            .skip(i)
            .position(|t| t.starts_with('(') && t.ends_with("%)"))
        else {
            continue;
        };
        let pct = i + pct;
        let num = |k: usize| -> f64 {
            tokens
                .get(k)
                .and_then(|t| t.parse().ok())
                .unwrap_or(f64::NAN)
        };
        rows.push(TsharkStream {
            ssrc,
            packets: num(pct - 2) as u64,
            lost: num(pct - 1) as i64,
            max_delta_ms: num(pct + 3),
            mean_jitter_ms: num(pct + 5),
            max_jitter_ms: num(pct + 6),
        });
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tshark_rtp_streams_table() {
        let text = "========================= RTP Streams ========================
   Start time      End time     Src IP addr  Port    Dest IP addr  Port       SSRC          Payload  Pkts         Lost   Min Delta(ms)  Mean Delta(ms)   Max Delta(ms)  Min Jitter(ms) Mean Jitter(ms)  Max Jitter(ms) Problem?
     0.000000      5.994368       127.0.0.1 41000       127.0.0.1 38000 0x4E574152            g711U   293     7 (2.3%)           6.517          20.460          47.001           0.000           2.923           4.237 X
==============================================================
";
        let rows = parse_rtp_streams(text);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.ssrc, r.packets, r.lost), (0x4E57_4152, 293, 7));
        assert!((r.max_delta_ms - 47.001).abs() < 1e-9);
        assert!((r.mean_jitter_ms - 2.923).abs() < 1e-9);
        assert!((r.max_jitter_ms - 4.237).abs() < 1e-9);
    }
}
