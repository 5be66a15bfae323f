//! Served ports and what each stream says it is, with the real agent and its eBPF TCP source:
//! one test cgroup serves two ports — RTMP's 1935 (on 127.0.0.77, so as not to need the
//! loopback's 1935 free) with a busy viewer, and a "metrics" port listed in
//! `drain.exclude_ports` with an idle scraper connection. Only the RTMP viewer holds the drain;
//! both connections are listed, each with its local port and kind, checked against `ss -tn`
//! (what the kernel says, not what the agent computed); the busy one shows bytes over the last
//! tick and the idle one none. Once the RTMP viewer leaves, the drain reads ready while the
//! excluded connection is still open.
//!
//! The drain's readiness is node-wide: a test of another run holding connections in a test
//! cgroup at the same time delays the last step (the wait is generous, then the test fails
//! with the status that held it).

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use nodeward::api::pb;
use nodeward_tests::{
    api::{network_reported, TempDir},
    cgroup_v2_root,
    drain::{have_python, key_of, DrainAgent, STEP},
    is_root, skip, Cgroup,
};

const TEST: &str = "drain_ports";
const RTMP_ADDR: &str = "127.0.0.77";
const RTMP_PORT: u16 = 1935;

/// Serves RTMP's port on 127.0.0.77 and a free "metrics" port on 127.0.0.1 (printed on the
/// first line), echoing on every connection.
const SERVER: &str = "import socket, threading
def serve(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
def echo(c):
    while True:
        d = c.recv(4096)
        if not d:
            c.close()
            return
        c.sendall(d)
rtmp = socket.socket()
rtmp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
rtmp.bind(('127.0.0.77', 1935))
rtmp.listen(4)
metrics = socket.socket()
metrics.bind(('127.0.0.1', 0))
metrics.listen(4)
print(metrics.getsockname()[1], flush=True)
threading.Thread(target=serve, args=(rtmp,), daemon=True).start()
serve(metrics)
";

/// Server-side established sockets as `ss -tn` lists them: (local port, peer address).
fn ss_served(ports: &[u16]) -> Vec<(u16, String)> {
    let out = Command::new("ss")
        .args(["-tnH", "state", "established"])
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss failed: {out:?}");
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // Recv-Q Send-Q Local:Port Peer:Port
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(peer)) = (cols.get(2), cols.get(3)) else {
            continue;
        };
        let Some(port) = local
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
        else {
            continue;
        };
        if ports.contains(&port) {
            found.push((port, (*peer).to_owned()));
        }
    }
    found.sort();
    found
}

fn stream_on(c: &pb::ContainerStreams, port: u16) -> Option<&pb::LiveStream> {
    c.streams.iter().find(|s| s.local_port == u32::from(port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_streams_on_included_ports_hold_a_drain_and_each_says_its_port_and_kind() {
    if !is_root() {
        return skip(TEST, "needs root (eBPF, cgroups)");
    }
    let Some(v2_root) = cgroup_v2_root() else {
        return skip(TEST, "no cgroup v2 hierarchy");
    };
    if !have_python() {
        return skip(TEST, "python3 is missing");
    }
    if std::net::TcpListener::bind((RTMP_ADDR, RTMP_PORT)).is_err() {
        return skip(TEST, "127.0.0.77:1935 is taken on this machine");
    }
    let cg = Cgroup::new("ports-pod");
    let key = key_of(&cg, &v2_root);
    let mut server = cg.spawn(
        Command::new("python3")
            .args(["-c", SERVER])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().expect("stdout piped"))
        .read_line(&mut line)
        .expect("the server prints its port");
    let metrics_port: u16 = line.trim().parse().expect("a port number");

    let dir = TempDir::new("drain-ports");
    let agent = DrainAgent::start(
        &dir.0,
        "agent",
        &[
            &format!("drain.exclude_ports=[{metrics_port}]"),
            "drain.viewer_idle=1s",
        ],
        &[],
    )
    .await;
    network_reported(&agent.client, STEP)
        .await
        .expect("the network source reports");

    // The scraper: one exchange, then idle. The viewer: a round trip every 50 ms.
    let mut scraper = TcpStream::connect(("127.0.0.1", metrics_port)).expect("connect");
    scraper.write_all(b"GET /").expect("write");
    let mut buf = [0u8; 5];
    scraper.read_exact(&mut buf).expect("echo");
    let viewer = TcpStream::connect((RTMP_ADDR, RTMP_PORT)).expect("connect to 1935");
    let viewer_addr = viewer.local_addr().expect("viewer address").to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = {
        let (stop, mut conn) = (stop.clone(), viewer);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut buf = [0u8; 4];
                if conn.write_all(b"ping").is_err() || conn.read_exact(&mut buf).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    assert!(!agent.begin("drain-ports-test", 3600).await.already_draining);
    let s = agent
        .wait_status("both connections listed, bytes known", |s| {
            s.containers.iter().any(|c| {
                c.container_id == key
                    && [RTMP_PORT, metrics_port]
                        .iter()
                        .all(|p| stream_on(c, *p).is_some_and(|s| s.bytes_known))
            })
        })
        .await;
    let c = s
        .containers
        .iter()
        .find(|c| c.container_id == key)
        .expect("listed");
    assert_eq!(
        c.live_streams, 1,
        "only the RTMP viewer holds the drain: {c:?}"
    );
    assert_eq!(c.viewers, 1, "the scraper is no viewer: {c:?}");
    assert!(!s.ready_to_drain, "{}", s.ready_reason);

    // Ground truth: the kernel's own list of the served sockets.
    let mut listed: Vec<(u16, String)> = c
        .streams
        .iter()
        .map(|s| {
            (
                u16::try_from(s.local_port).expect("a port"),
                s.remote_addr.clone(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(listed, ss_served(&[RTMP_PORT, metrics_port]), "{c:?}");
    assert!(listed.iter().any(|(_, peer)| *peer == viewer_addr));

    let rtmp = stream_on(c, RTMP_PORT).expect("the RTMP stream");
    let metrics = stream_on(c, metrics_port).expect("the metrics stream");
    assert_eq!(rtmp.kind(), pb::StreamKind::Rtmp, "{rtmp:?}");
    assert_eq!(metrics.kind(), pb::StreamKind::Tcp, "{metrics:?}");
    assert_eq!(rtmp.direction(), pb::StreamDirection::Served);
    assert_eq!(metrics.direction(), pb::StreamDirection::Served);
    // Both listed; each says whether the drain waits for it.
    assert!(rtmp.holds_drain, "{rtmp:?}");
    assert!(!metrics.holds_drain, "an excluded port: {metrics:?}");
    assert!(
        rtmp.age_seconds > 0.0 && rtmp.bytes_seconds > 0.0,
        "{rtmp:?}"
    );
    // A busy stream and an idle keep-alive look different.
    let busy = agent
        .wait_status("the busy stream moved bytes in a tick", |s| {
            s.containers
                .iter()
                .filter(|c| c.container_id == key)
                .filter_map(|c| stream_on(c, RTMP_PORT))
                .any(|s| s.bytes_known && s.sent_bytes > 0 && s.received_bytes > 0)
        })
        .await;
    let idle = busy
        .containers
        .iter()
        .find(|c| c.container_id == key)
        .and_then(|c| stream_on(c, metrics_port))
        .expect("the metrics stream");
    assert_eq!(
        (idle.bytes_known, idle.sent_bytes, idle.received_bytes),
        (true, 0, 0),
        "{idle:?}"
    );

    // The viewer leaves: ready, with the excluded connection still open (and still listed).
    stop.store(true, Ordering::Relaxed);
    let _ = pinger.join();
    let s = agent
        .wait_status("ready with only the excluded connection open", |s| {
            s.ready_to_drain
        })
        .await;
    let c = s.containers.iter().find(|c| c.container_id == key);
    assert!(
        c.is_some_and(|c| c.live_streams == 0 && stream_on(c, metrics_port).is_some()),
        "{s:?}"
    );
    assert_eq!(
        ss_served(&[metrics_port]).len(),
        1,
        "the scraper is still connected"
    );
    drop(scraper);
    let _ = server.kill();
    let _ = server.wait();
}
