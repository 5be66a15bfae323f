//! Viewers with the real agent and its eBPF TCP source: an HLS-style player that fetches a
//! small "segment" every 2 s, each over a NEW TCP connection, from a server in a test cgroup.
//! Between two fetches there is no connection at all, yet the player is one viewer and the
//! drain is not ready; `drain.viewer_idle` (4 s here) after its last fetch it stops counting
//! and the drain reads ready.
//!
//! The drain's readiness is node-wide: a test of another run holding connections in a test
//! cgroup at the same time delays the last step (the wait is generous, then the test fails
//! with the status that held it).

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use nodeward::api::pb;
use nodeward_tests::{
    agent_binary,
    api::{conn, eventually, network_reported, TempDir},
    cgroup_v2_root, is_root, skip, Cgroup,
};

const TEST: &str = "drain_viewers";
/// How long each step may take: many ticks, so a slow shared machine is no failure.
const STEP: Duration = Duration::from_secs(60);
/// The player's pause between two fetches.
const SEGMENT_EVERY: Duration = Duration::from_secs(2);

type Client = pb::node_health_client::NodeHealthClient<tonic::transport::Channel>;

/// The origin: answers each connection with a 64 KiB "segment", then closes it.
const ORIGIN: &str = "import socket
s = socket.socket()
s.bind(('127.0.0.1', 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
segment = b'x' * 65536
while True:
    c, _ = s.accept()
    c.recv(4096)
    c.sendall(segment)
    c.close()
";

/// Kills the process on drop (the agent, when an assertion fails first).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One segment fetch over a new connection, read to its end (the origin closes it).
fn fetch(port: u16) -> usize {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect to the origin");
    c.write_all(b"GET /seg.ts HTTP/1.0\r\n\r\n")
        .expect("send the request");
    let mut body = Vec::new();
    c.read_to_end(&mut body).expect("read the segment");
    body.len()
}

async fn status(client: &mut Client) -> pb::GetDrainStatusResponse {
    client
        .get_drain_status(pb::GetDrainStatusRequest {})
        .await
        .expect("GetDrainStatus")
        .into_inner()
}

fn container<'a>(s: &'a pb::GetDrainStatusResponse, key: &str) -> Option<&'a pb::ContainerStreams> {
    s.containers.iter().find(|c| c.container_id == key)
}

/// The store key of a cgroup below the v2 root: its path there, `/`-prefixed.
fn key_of(dir: &Path, v2_root: &Path) -> String {
    format!(
        "/{}",
        dir.strip_prefix(v2_root)
            .expect("cgroup under the v2 root")
            .display()
    )
}

/// `nodeward run` with `drain.viewer_idle=4s`, its API over a Unix socket (so that the test's
/// own API connection is no TCP connection anyone serves); returns once the network source has
/// reported.
async fn start_agent(dir: &TempDir) -> (Killed, Client) {
    let socket = dir.0.join("agent.sock");
    let mut cmd = Command::new(agent_binary());
    cmd.args(["run", "--config", "/dev/null"])
        .args(["--set", &format!("api.unix_socket={}", socket.display())])
        .args([
            "--set",
            "metrics.enabled=false",
            "--set",
            "gpu.enabled=false",
        ])
        .args(["--set", "agent.tick=500ms", "--set", "drain.viewer_idle=4s"])
        .env("NODEWARD_LOG", "warn")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let agent = Killed(cmd.spawn().expect("start the agent"));
    let client = eventually(STEP, || {
        let socket = socket.clone();
        async move {
            nodeward::client::connect(&conn(&format!("unix:{}", socket.display())), &socket)
                .await
                .ok()
        }
    })
    .await
    .expect("the agent answers on its Unix socket");
    network_reported(&client, STEP)
        .await
        .expect("the network source reports");
    (agent, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_fetching_player_is_one_viewer_between_fetches_until_viewer_idle() {
    if !is_root() {
        return skip(TEST, "needs root (eBPF, cgroups)");
    }
    let Some(v2_root) = cgroup_v2_root() else {
        return skip(TEST, "no cgroup v2 hierarchy");
    };
    if !have("python3") {
        return skip(TEST, "python3 is missing");
    }
    let dir = TempDir::new("drain-viewers");
    let (agent, mut client) = start_agent(&dir).await;
    let origin_cg = Cgroup::new("dv-origin");
    let key = key_of(&origin_cg.path, &v2_root);
    let mut cmd = Command::new("python3");
    cmd.args(["-c", ORIGIN])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut origin = Killed(origin_cg.spawn(&mut cmd));
    let mut out = std::io::BufReader::new(origin.0.stdout.take().expect("stdout piped"));
    let mut line = String::new();
    out.read_line(&mut line)
        .expect("the origin prints its port");
    let port: u16 = line.trim().parse().expect("a port number");

    let begun = client
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "drain-viewers-test".into(),
            reason: "test".into(),
            deadline_seconds: 3600,
        })
        .await
        .expect("BeginDrain")
        .into_inner();
    assert!(!begun.already_draining);

    // The player watches: a fetch every 2 s, each on a new connection (a new source port).
    // After each, with its connection closed, the drain status is read: the origin must show
    // no live stream (nothing is connected) and yet one viewer, and the drain must wait.
    let deadline = tokio::time::Instant::now() + STEP;
    let mut between_fetches = None;
    let mut fetches = 0;
    while tokio::time::Instant::now() < deadline {
        assert_eq!(
            tokio::task::block_in_place(|| fetch(port)),
            65536,
            "a whole segment"
        );
        fetches += 1;
        let s = status(&mut client).await;
        if let Some(c) = container(&s, &key) {
            assert!(
                c.viewers <= 1,
                "one player on {fetches} connections is one viewer: {c:?}"
            );
            if c.viewers == 1 && c.live_streams == 0 {
                assert!(!s.ready_to_drain, "a viewer holds the drain: {s:?}");
                between_fetches = Some(c.clone());
                if fetches >= 3 {
                    break;
                }
            }
        }
        tokio::time::sleep(SEGMENT_EVERY).await;
    }
    let c = between_fetches.unwrap_or_else(|| {
        panic!("{key} never showed one viewer between fetches (after {fetches} fetches)")
    });
    assert_eq!(c.viewer_list.len(), 1, "{c:?}");
    assert_eq!(c.viewer_list[0].address, "127.0.0.1", "{c:?}");

    // The player stops: viewer_idle later the viewer is gone and the drain is ready.
    let s = eventually(STEP, || {
        let mut c = client.clone();
        async move {
            let s = status(&mut c).await;
            s.ready_to_drain.then_some(s)
        }
    })
    .await;
    let Some(s) = s else {
        panic!(
            "the drain never read ready after the player stopped: {:?}",
            status(&mut client).await
        );
    };
    assert_eq!(s.viewers, 0, "{s:?}");
    assert!(container(&s, &key).is_none_or(|c| c.viewers == 0), "{s:?}");
    drop(origin);
    drop(agent);
}
