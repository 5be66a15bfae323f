//! No caller starves the agent (issue 19): against a running `nodeward run`, 1,000 TCP
//! connections opened and left idle, a TLS client that never finishes its handshake, and
//! 10,000 Watch streams requested on one HTTP/2 connection (a bare one that ignores the
//! server's stream limit, as an attacker would). Throughout, a fresh client's GetNodeHealth is
//! answered (over the Unix socket and over TLS), and the agent's resident memory stays under
//! the DaemonSet's memory limit (read from packaging/kubernetes/30-daemonset.yaml).
//!
//! The sizes are the issue's; `NODEWARD_SCALE_FACTOR` (a divisor, default 1) shrinks them.
//! Needs root (the agent loads its eBPF programs).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use nodeward::api::pb;
use nodeward_tests::{
    agent_binary,
    api::{conn, eventually, TempDir},
    is_root,
    pki::Pki,
    skip,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A bound that only catches a hang: a call slower than this means the agent is starved.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// Watch streams the agent admits in this test (below the per-connection stream limit of 200,
/// so that both limits show).
const WATCH_CAP: usize = 100;

fn scale(n: usize) -> usize {
    let factor: usize = std::env::var("NODEWARD_SCALE_FACTOR")
        .ok()
        .and_then(|f| f.parse().ok())
        .filter(|f| *f > 0)
        .unwrap_or(1);
    (n / factor).max(1)
}

/// `resources.limits.memory` of the DaemonSet's container, in bytes.
fn daemonset_memory_limit() -> u64 {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kubernetes/30-daemonset.yaml");
    let yaml = std::fs::read_to_string(&path).expect("read the DaemonSet");
    let mut in_limits = false;
    for line in yaml.lines() {
        let t = line.trim();
        if t == "limits:" {
            in_limits = true;
        } else if in_limits {
            if let Some(v) = t.strip_prefix("memory:") {
                let v = v.trim().trim_matches('"');
                let (num, unit) =
                    v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
                let n: u64 = num.parse().expect("a memory quantity");
                return n * match unit {
                    "" => 1,
                    "Ki" => 1 << 10,
                    "Mi" => 1 << 20,
                    "Gi" => 1 << 30,
                    "K" | "k" => 1_000,
                    "M" => 1_000_000,
                    "G" => 1_000_000_000,
                    u => panic!("unknown memory unit {u:?}"),
                };
            }
            if !t.starts_with("cpu:") {
                in_limits = false;
            }
        }
    }
    panic!("no resources.limits.memory in {}", path.display());
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

struct Agent {
    child: tokio::process::Child,
    socket: PathBuf,
    tcp: SocketAddr,
    pki: Pki,
    _dir: TempDir,
}

impl Agent {
    async fn start() -> Self {
        let dir = TempDir::new("api-scale");
        let pki = Pki::new("api-scale-pki");
        let socket = dir.0.join("agent.sock");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let tcp: SocketAddr = ([127, 0, 0, 1], port).into();
        let set = [
            "metrics.enabled=false".to_owned(),
            "gpu.enabled=false".to_owned(),
            format!("api.unix_socket={}", socket.display()),
            format!("api.tcp_listen={tcp}"),
            format!("api.tls_cert={}", pki.path("server.pem").display()),
            format!("api.tls_key={}", pki.path("server.key").display()),
            format!("api.limits.max_watch_streams={WATCH_CAP}"),
            // Long enough that the idle connections stay for the whole test.
            "api.limits.tls_handshake_timeout=5m".to_owned(),
        ];
        let mut cmd = tokio::process::Command::new(agent_binary());
        cmd.args(["run", "--config", "/dev/null"]);
        for kv in &set {
            cmd.args(["--set", kv]);
        }
        let child = cmd
            .env("NODEWARD_LOG", "error")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start nodeward run");
        let agent = Self {
            child,
            socket,
            tcp,
            pki,
            _dir: dir,
        };
        eventually(Duration::from_secs(60), || async {
            health(&unix_conn(&agent.socket), &agent.socket).await.ok()
        })
        .await
        .expect("the agent answers on its socket");
        agent
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("agent running")
    }

    /// GetNodeHealth from a fresh client on each listener, each within the bound; returns the
    /// slower one's time.
    async fn answers(&self, when: &str) -> Duration {
        let socket = self.socket.clone();
        let mut slowest = Duration::ZERO;
        for (name, c) in [
            ("unix", unix_conn(&socket)),
            ("tls", self.pki.client_conn(self.tcp, None)),
        ] {
            let start = tokio::time::Instant::now();
            let reply = tokio::time::timeout(ANSWER_WITHIN, health(&c, &socket))
                .await
                .unwrap_or_else(|_| {
                    panic!("{when}: GetNodeHealth over {name} took over {ANSWER_WITHIN:?}")
                });
            reply.unwrap_or_else(|e| panic!("{when}: GetNodeHealth over {name}: {e}"));
            slowest = slowest.max(start.elapsed());
        }
        slowest
    }
}

fn unix_conn(socket: &Path) -> nodeward::client::Conn {
    conn(&format!("unix:{}", socket.display()))
}

async fn health(c: &nodeward::client::Conn, socket: &Path) -> Result<(), String> {
    let mut client = nodeward::client::connect(c, socket)
        .await
        .map_err(|e| e.to_string())?;
    client
        .get_node_health(pb::GetNodeHealthRequest {})
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

// ---- a bare HTTP/2 client ----

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("small frame")
        .to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The request headers of a Watch call, HPACK-encoded as literals without indexing (RFC 7541
/// §6.2.2), no Huffman: every string here is shorter than 127 bytes.
fn watch_headers() -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/nodeward.v1.NodeHealth/WatchNodeHealth"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0x00);
        for s in [name, value] {
            block.push(u8::try_from(s.len()).expect("short string"));
            block.extend_from_slice(s.as_bytes());
        }
    }
    block
}

#[derive(Debug, Default)]
struct Flood {
    /// Streams that received Watch messages (DATA).
    open: usize,
    /// Streams answered with a trailers-only response (the Watch cap's RESOURCE_EXHAUSTED).
    refused_by_watch_cap: usize,
    /// Streams reset by the server, by error code (REFUSED_STREAM = 7: the stream limit).
    reset: HashMap<u32, usize>,
    /// The server's GOAWAY: (last stream id, error code).
    goaway: Option<(u32, u32)>,
}

async fn read_frame(
    r: &mut tokio::net::unix::OwnedReadHalf,
) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok((head[3], head[4], stream, payload))
}

/// Requests `streams` Watch calls on one connection as fast as the socket takes them, and
/// reads until every stream has its answer (or the server sent a GOAWAY and answered every
/// stream it accepted).
async fn watch_flood(socket: &Path, streams: u32) -> (Flood, tokio::net::unix::OwnedWriteHalf) {
    let s = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let (mut r, mut w) = s.into_split();
    let (acks, mut to_send) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS_INITIAL_WINDOW_SIZE 2^30 and a connection window as large: this client
        // reads everything, so flow control never holds the server back.
        start.extend(frame(SETTINGS, 0, 0, &[0, 4, 0x40, 0, 0, 0]));
        start.extend(frame(WINDOW_UPDATE, 0, 0, &0x4000_0000u32.to_be_bytes()));
        w.write_all(&start).await.expect("preface");
        let block = watch_headers();
        // An empty WatchNodeHealthRequest: an uncompressed gRPC message of 0 bytes.
        let message = [0u8; 5];
        let mut id = 1u32;
        while id < streams * 2 {
            let mut batch = Vec::new();
            for _ in 0..100 {
                if id >= streams * 2 {
                    break;
                }
                batch.extend(frame(HEADERS, END_HEADERS, id, &block));
                batch.extend(frame(DATA, END_STREAM, id, &message));
                id += 2;
            }
            while let Ok(ack) = to_send.try_recv() {
                w.write_all(&ack).await.expect("ack");
            }
            if w.write_all(&batch).await.is_err() {
                // The server closed the connection (after a GOAWAY).
                return w;
            }
        }
        // Keep answering SETTINGS and PINGs until the reader is done.
        while let Some(ack) = to_send.recv().await {
            if w.write_all(&ack).await.is_err() {
                break;
            }
        }
        w
    });

    let mut flood = Flood::default();
    let mut answered: HashSet<u32> = HashSet::new();
    let mut data_seen: HashSet<u32> = HashSet::new();
    let done = |answered: &HashSet<u32>, goaway: Option<(u32, u32)>| {
        // Client streams have odd ids: 1, 3, … up to `last`.
        let expected = match goaway {
            Some((last, _)) => last.div_ceil(2),
            None => streams,
        };
        answered
            .iter()
            .filter(|id| goaway.is_none_or(|(last, _)| **id <= last))
            .count()
            >= expected as usize
    };
    loop {
        let Ok((kind, flags, stream, payload)) = read_frame(&mut r).await else {
            assert!(
                flood.goaway.is_some(),
                "the server closed the connection without a GOAWAY: {flood:?}"
            );
            break;
        };
        match kind {
            DATA if stream != 0 && !data_seen.contains(&stream) => {
                data_seen.insert(stream);
                flood.open += 1;
                answered.insert(stream);
            }
            HEADERS if flags & END_STREAM != 0 && !data_seen.contains(&stream) => {
                flood.refused_by_watch_cap += 1;
                answered.insert(stream);
            }
            // The first reset of a stream is its answer; a second one (STREAM_CLOSED, for the
            // DATA frame this client sent after the HEADERS that were refused) is not counted.
            RST_STREAM if !answered.contains(&stream) => {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                *flood.reset.entry(code).or_default() += 1;
                answered.insert(stream);
            }
            SETTINGS if flags & ACK == 0 => {
                let _ = acks.send(frame(SETTINGS, ACK, 0, &[]));
            }
            PING if flags & ACK == 0 => {
                let _ = acks.send(frame(PING, ACK, 0, &payload));
            }
            GOAWAY => {
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                    & 0x7fff_ffff;
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                flood.goaway = Some((last, code));
            }
            _ => {}
        }
        if done(&answered, flood.goaway) {
            break;
        }
    }
    drop(acks);
    let w = writer.await.expect("writer joins");
    (flood, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_stalled_handshakes_and_a_watch_flood_do_not_starve_the_agent() {
    const TEST: &str =
        "idle_connections_stalled_handshakes_and_a_watch_flood_do_not_starve_the_agent";
    if !is_root() {
        skip(TEST, "needs root (nodeward run loads eBPF programs)");
        return;
    }
    let limit = daemonset_memory_limit();
    let agent = Agent::start().await;
    let pid = agent.pid();
    let mut peak = rss_bytes(pid);
    let mut slowest = agent.answers("at start").await;

    // 1,000 TCP connections that send nothing (on the TLS listener, each is a handshake that
    // never starts), and one client that sends the first bytes of a ClientHello and stops.
    let idle = scale(1_000);
    let mut held = Vec::with_capacity(idle + 1);
    for i in 0..idle {
        let s = tokio::net::TcpStream::connect(agent.tcp)
            .await
            .unwrap_or_else(|e| panic!("idle connection {i}: {e}"));
        held.push(s);
    }
    let mut stalled = tokio::net::TcpStream::connect(agent.tcp)
        .await
        .expect("connect");
    // A TLS record header announcing a 512-byte handshake message, then 4 bytes of it.
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
        .await
        .expect("partial ClientHello");
    held.push(stalled);
    slowest = slowest.max(
        agent
            .answers("with idle connections and a stalled handshake")
            .await,
    );
    peak = peak.max(rss_bytes(pid));

    // 10,000 Watch calls on one connection, with fresh clients asking meanwhile.
    let streams = u32::try_from(scale(10_000)).expect("fits");
    let flood = watch_flood(&agent.socket, streams);
    tokio::pin!(flood);
    let mut probes_during = 0;
    let (flood, _conn) = loop {
        tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(120), &mut flood) => {
                break r.expect("the server answers every stream it accepted");
            }
            took = agent.answers("during the Watch flood") => {
                slowest = slowest.max(took);
                probes_during += 1;
                peak = peak.max(rss_bytes(pid));
            }
        }
    };
    assert!(flood.open >= 1, "some Watch streams are served: {flood:?}");
    assert!(
        flood.open <= WATCH_CAP,
        "no more Watch streams than api.limits.max_watch_streams: {flood:?}"
    );
    let refused: usize = flood.refused_by_watch_cap + flood.reset.values().sum::<usize>();
    match flood.goaway {
        // Every request was answered: served, or refused by one of the two limits.
        None => assert_eq!(flood.open + refused, streams as usize, "{flood:?}"),
        Some(_) => assert!(refused >= 1, "the excess is refused: {flood:?}"),
    }
    // The held streams stay open, the idle connections stay connected: still answering.
    slowest = slowest.max(agent.answers("after the Watch flood").await);
    peak = peak.max(rss_bytes(pid));
    eprintln!(
        "{idle} idle connections, a stalled handshake, {streams} Watch requests on one \
         connection: {flood:?}; slowest fresh GetNodeHealth {slowest:?} ({probes_during} probes \
         during the flood); peak RSS {} MiB (limit {} MiB)",
        peak >> 20,
        limit >> 20
    );
    assert!(
        peak < limit,
        "peak RSS {peak} bytes is over the DaemonSet's memory limit {limit} bytes"
    );
    drop(held);
}
