//! End to end through the real daemon: `nodeward run` with its real sources, a receiver in a
//! cgroup of its own getting an RTP stream, and the gRPC API over the Unix socket. Proves that
//! the sources reach the store: the verdict leaves UNKNOWN, the container shows its RTP numbers,
//! and the drain handshake counts the stream while it flows and reports ready once it stops.
//!
//! The TCP source is switched off here so that readiness depends only on streams this test
//! controls (any established TCP connection on the host would otherwise count); the TCP
//! mapping into streams is covered by the bridge's unit tests.

use std::{
    net::UdpSocket,
    process::Stdio,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use nodeward::api::pb;
use nodeward_tests::{
    agent_binary,
    api::{conn, eventually, network_reported, TempDir},
    cgroup_v2_root, is_root,
    rtp::{rtp_packet, Receiver},
    skip, Cgroup,
};

const TEST: &str = "e2e_health";
/// How long the daemon gets for each step: many ticks, so a slow shared machine is no failure.
const STEP: Duration = Duration::from_secs(30);
const IDLE_TIMEOUT: &str = "2s";

fn have_python() -> bool {
    std::process::Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Sends 8 kHz PCMU-like RTP (payload type 0, 20 ms) to `port` until `stop` is set.
fn send_until(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the sender");
        let dest = format!("127.0.0.1:{port}");
        let mut seq: u16 = 100;
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            let ts = u32::from(seq).wrapping_mul(160);
            let pkt = rtp_packet(0, seq, ts, 0x00e2_e0e2, 160);
            socket.send_to(&pkt, &dest).expect("send RTP");
            seq = seq.wrapping_add(1);
            sent += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        sent
    })
}

/// `nodeward run` with its API on a socket of its own, the eBPF sources on, no GPU, no metrics.
struct Agent {
    child: tokio::process::Child,
    client: Client,
    _dir: TempDir,
}

type Client = pb::node_health_client::NodeHealthClient<tonic::transport::Channel>;

impl Agent {
    async fn start(stem: &str, extra: &[&str]) -> Self {
        let dir = TempDir::new(stem);
        let socket = dir.0.join("agent.sock");
        let mut cmd = tokio::process::Command::new(agent_binary());
        cmd.args(["run", "--config", "/dev/null"])
            .args(["--set", "api.tcp_listen=", "--set", "metrics.enabled=false"])
            .args(["--set", "gpu.enabled=false", "--set", "agent.tick=500ms"])
            .args(["--set", &format!("udp.idle_timeout={IDLE_TIMEOUT}")])
            .arg("--set")
            .arg(format!("api.unix_socket={}", socket.display()));
        for kv in extra {
            cmd.args(["--set", kv]);
        }
        let child = cmd
            .env("NODEWARD_LOG", "warn")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start nodeward run");
        let addr = format!("unix:{}", socket.display());
        let client = eventually(STEP, || {
            let (addr, socket) = (addr.clone(), socket.clone());
            async move { nodeward::client::connect(&conn(&addr), &socket).await.ok() }
        })
        .await
        .expect("the daemon answers on its socket");
        Self {
            child,
            client,
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        let pid = i32::try_from(self.child.id().expect("pid")).expect("pid fits");
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let exit = tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("exits in time")
            .expect("wait");
        assert!(exit.success(), "clean exit: {exit:?}");
    }
}

/// The store key of a test cgroup: its path below the v2 root, `/`-prefixed.
fn key_of(cgroup: &Cgroup, v2_root: &std::path::Path) -> String {
    format!(
        "/{}",
        cgroup
            .path
            .strip_prefix(v2_root)
            .expect("test cgroup under the v2 root")
            .display()
    )
}

async fn drain_status(client: &mut Client) -> pb::GetDrainStatusResponse {
    client
        .get_drain_status(pb::GetDrainStatusRequest {})
        .await
        .expect("GetDrainStatus")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtp_stream_reaches_health_containers_and_the_drain_handshake() {
    if !is_root() {
        return skip(TEST, "needs root (eBPF, cgroups)");
    }
    let Some(v2_root) = cgroup_v2_root() else {
        return skip(TEST, "no cgroup v2 hierarchy");
    };
    if !have_python() {
        return skip(TEST, "python3 is missing (the RTP receiver)");
    }

    let agent = Agent::start("e2e-health", &["tcp.enabled=false"]).await;
    let mut client = agent.client.clone();

    // 1. The verdict leaves UNKNOWN once the sources have reported (or said they cannot run).
    let report = eventually(STEP, || {
        let mut c = client.clone();
        async move {
            let r = c
                .get_node_health(pb::GetNodeHealthRequest {})
                .await
                .ok()?
                .into_inner()
                .health?;
            (r.verdict != pb::Verdict::Unknown as i32).then_some(r)
        }
    })
    .await;
    let last = client
        .get_node_health(pb::GetNodeHealthRequest {})
        .await
        .expect("GetNodeHealth")
        .into_inner();
    let report = report.unwrap_or_else(|| panic!("verdict stayed UNKNOWN: {last:?}"));
    let names: Vec<&str> = report.sources.iter().map(|s| s.name.as_str()).collect();
    for kind in ["network", "cgroup", "node"] {
        assert!(names.contains(&kind), "{kind} missing from {names:?}");
    }
    let network = report
        .sources
        .iter()
        .find(|s| s.name == "network")
        .expect("network source");
    assert!(
        network.hook.contains("udp: cgroup_skb"),
        "provenance names the UDP hook: {network:?}"
    );

    // 2. A receiver in its own cgroup gets an RTP stream.
    let cgroup = Cgroup::new("e2e-rx");
    let key = key_of(&cgroup, &v2_root);
    let receiver = Receiver::start(&cgroup);
    let stop = Arc::new(AtomicBool::new(false));
    let sender = send_until(receiver.port, stop.clone());

    let network = eventually(STEP, || {
        let (mut c, key) = (client.clone(), key.clone());
        async move {
            let n = c
                .get_container_network(pb::GetContainerNetworkRequest { container_id: key })
                .await
                .ok()?
                .into_inner()
                .network?;
            let w = n.windows.iter().find(|w| w.window_seconds == 10)?;
            (w.rtp_packets >= 50 && n.live_streams >= 1).then_some(n)
        }
    })
    .await
    .unwrap_or_else(|| panic!("{key} never showed its RTP stream"));
    assert!(network
        .streams
        .iter()
        .all(|s| s.protocol == pb::StreamProtocol::Udp as i32));
    let w10 = network
        .windows
        .iter()
        .find(|w| w.window_seconds == 10)
        .expect("10 s window");
    assert_eq!(w10.rtp_lost, 0, "nothing was dropped: {w10:?}");
    let listed = client
        .list_containers(pb::ListContainersRequest::default())
        .await
        .expect("ListContainers")
        .into_inner();
    let c = listed
        .containers
        .iter()
        .find(|c| c.id == key)
        .unwrap_or_else(|| panic!("{key} not in ListContainers"));
    assert_eq!(c.cgroup_id, cgroup.id(), "identity carries the cgroup id");

    // 3. A drain counts the live stream and is not ready while it flows.
    client
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "e2e-test".to_owned(),
            reason: "prove the handshake".to_owned(),
            deadline_seconds: 3600,
        })
        .await
        .expect("BeginDrain");
    let status = drain_status(&mut client).await;
    assert!(status.streams_known, "{status:?}");
    let mine = status
        .containers
        .iter()
        .find(|c| c.container_id == key)
        .unwrap_or_else(|| panic!("{key} not among the draining containers: {status:?}"));
    assert!(
        mine.live_streams >= 1 && !mine.streams.is_empty(),
        "{mine:?}"
    );
    assert!(!status.ready_to_drain, "{status:?}");

    // 4. Stop the stream: within the idle timeout and a tick it is gone and the node is ready.
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("sender thread");
    assert!(sent > 0);
    let ready = eventually(STEP, || {
        let mut c = client.clone();
        async move {
            let s = drain_status(&mut c).await;
            s.ready_to_drain.then_some(s)
        }
    })
    .await;
    let last = drain_status(&mut client).await;
    assert!(
        !last.containers.iter().any(|c| c.container_id == key),
        "{key} still has live streams after the sender stopped: {last:?}"
    );
    let ready =
        ready.unwrap_or_else(|| panic!("never ready (other live streams on this host?): {last:?}"));
    assert_eq!(
        ready.live_streams, 0,
        "ready because the streams ended: {ready:?}"
    );
    assert!(ready.ready_reason.contains("no live streams"), "{ready:?}");
    drop(receiver);

    agent.stop().await;
}

/// An echo server (python3) in `cgroup` on 127.0.0.1; it serves one connection and exits.
fn echo_server(cgroup: &Cgroup) -> (std::process::Child, u16) {
    let script = [
        "import socket",
        "s = socket.socket()",
        "s.bind(('127.0.0.1', 0))",
        "s.listen(1)",
        "print(s.getsockname()[1], flush=True)",
        "c, _ = s.accept()",
        "while True:",
        "    d = c.recv(4096)",
        "    if not d:",
        "        break",
        "    c.sendall(d)",
        "c.close()",
    ]
    .join("\n");
    let mut child = cgroup.spawn(
        std::process::Command::new("python3")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let mut line = String::new();
    let stdout = child.stdout.take().expect("server stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
        .expect("server prints its port");
    (child, line.trim().parse().expect("port number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_established_tcp_connection_is_a_drain_stream_until_it_closes() {
    const TEST: &str = "e2e_health_tcp";
    if !is_root() {
        return skip(TEST, "needs root (eBPF, cgroups)");
    }
    let Some(v2_root) = cgroup_v2_root() else {
        return skip(TEST, "no cgroup v2 hierarchy");
    };
    if !have_python() {
        return skip(TEST, "python3 is missing (the echo server)");
    }
    // A window set other than the default, to prove that it travels from the config through
    // the TCP source and the store to the reply (and that the rules' window may be any of it).
    let agent = Agent::start(
        "e2e-health-tcp",
        &[
            "network.windows=[\"7s\", \"40s\"]",
            "health.network_window=40s",
        ],
    )
    .await;
    let mut client = agent.client.clone();
    // The TCP source only attributes sockets created after it attached: wait for it to run.
    network_reported(&client, STEP)
        .await
        .expect("the network source reports");

    let cgroup = Cgroup::new("e2e-tcp");
    let key = key_of(&cgroup, &v2_root);
    let (mut server, port) = echo_server(&cgroup);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let local = conn.local_addr().expect("client address").to_string();
    // Round trips give the server's socket RTT samples.
    let echo = |conn: &mut std::net::TcpStream| {
        use std::io::{Read as _, Write as _};
        for _ in 0..20 {
            conn.write_all(b"ping").expect("write");
            let mut buf = [0u8; 4];
            conn.read_exact(&mut buf).expect("echo");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    echo(&mut conn);

    let streams = eventually(STEP, || {
        let (mut c, key) = (client.clone(), key.clone());
        async move {
            let s = drain_status(&mut c).await;
            s.containers.into_iter().find(|c| c.container_id == key)
        }
    })
    .await
    .unwrap_or_else(|| panic!("{key}'s connection never counted as a stream"));
    assert_eq!(streams.established_connections, 1, "{streams:?}");
    assert!(
        streams
            .streams
            .iter()
            .all(|s| s.protocol == pb::StreamProtocol::Tcp as i32),
        "{streams:?}"
    );
    assert!(
        streams.streams.iter().any(|s| s.remote_addr == local),
        "the peer is the client at {local}: {streams:?}"
    );
    echo(&mut conn);
    let network = eventually(STEP, || {
        let (mut c, key) = (client.clone(), key.clone());
        async move {
            let n = c
                .get_container_network(pb::GetContainerNetworkRequest { container_id: key })
                .await
                .ok()?
                .into_inner()
                .network?;
            n.windows
                .iter()
                .any(|w| w.window_seconds == 7 && w.samples > 0)
                .then_some(n)
        }
    })
    .await
    .unwrap_or_else(|| panic!("{key} never showed TCP RTT samples"));
    assert!(network.established_connections >= 1, "{network:?}");
    let lengths: Vec<u32> = network.windows.iter().map(|w| w.window_seconds).collect();
    assert_eq!(
        lengths,
        [7, 40],
        "exactly the configured windows: {network:?}"
    );
    // The per-peer breakdown (over health.network_window, 40 s) names the client, typed
    // `address:port` all the way and written out only in the reply.
    assert!(
        network
            .peers
            .iter()
            .any(|p| p.remote_addr == local && p.samples > 0 && p.rtt_mean_us > 0),
        "the client {local} is the server's peer with RTT samples: {network:?}"
    );

    drop(conn);
    let _ = server.wait();
    // The stream ends with the connection; its client stays a viewer of the container for
    // `drain.viewer_idle` (30 s) after it, as a player between two segment fetches would.
    let gone = eventually(STEP, || {
        let (mut c, key) = (client.clone(), key.clone());
        async move {
            let s = drain_status(&mut c).await;
            s.containers
                .iter()
                .filter(|c| c.container_id == key)
                .all(|c| c.live_streams == 0 && c.streams.is_empty() && c.viewers <= 1)
                .then_some(())
        }
    })
    .await;
    assert!(
        gone.is_some(),
        "{key} still serves a stream after the connection closed: {:?}",
        drain_status(&mut client).await
    );
    agent.stop().await;
}
