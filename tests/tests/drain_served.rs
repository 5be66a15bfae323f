//! Which TCP connections a drain waits for, with the real agent and its eBPF TCP source: a
//! pod-like cgroup serving one viewer and holding a connection to a "database" (a host service
//! under `/system.slice`) is not ready while the viewer is connected; its database connection is
//! listed as an outbound dependency and holds nothing; neither do the database's side, a root-
//! cgroup (host) service's connection, or the agent's own API connection — with the agent in a
//! private cgroup namespace, where `/proc/self/cgroup` reads `/`. Closing the viewer's
//! connection makes the drain ready.
//!
//! The drain's readiness is node-wide: a test of another run that holds connections in a test
//! cgroup at the same time delays it (the wait is generous, then the test fails with the
//! status that held it).

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
    api::{eventually, network_reported, TempDir},
    cgroup_v2_root, is_root, skip, Cgroup, CgroupTree,
};

const TEST: &str = "drain_served";
/// How long each step may take: many ticks, so a slow shared machine is no failure.
const STEP: Duration = Duration::from_secs(40);

type Client = pb::node_health_client::NodeHealthClient<tonic::transport::Channel>;

/// The tests of this file run one at a time: each one's agent would count the other agent's
/// API connection (a connection another cgroup serves) as a stream, and rightly so.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A listener on 127.0.0.1 that accepts one connection and reads it until EOF.
const SINK: &str = "import socket
s = socket.socket()
s.bind(('127.0.0.1', 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
while c.recv(4096):
    pass
";

/// The "pod": connects to its database (argv[1]) first, then serves one viewer (echo, each
/// message also written to the database); once the viewer leaves, it keeps the database
/// connection open until its stdin closes.
const POD: &str = "import socket, sys
db = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
db.sendall(b'hello')
s = socket.socket()
s.bind(('127.0.0.1', 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
while True:
    d = c.recv(4096)
    if not d:
        break
    c.sendall(d)
    db.sendall(d)
c.close()
print('viewer gone', flush=True)
sys.stdin.read()
";

/// Reads the port a script prints on its first line.
fn port_of(child: &mut Child) -> (u16, std::io::BufReader<std::process::ChildStdout>) {
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout piped"));
    let mut line = String::new();
    out.read_line(&mut line)
        .expect("the script prints its port");
    (line.trim().parse().expect("a port number"), out)
}

fn python(script: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// A free loopback port for the agent's TCP API (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
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

/// Kills the process on drop (the agent, when an assertion fails first).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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

fn directions(c: &pb::ContainerStreams) -> Vec<pb::StreamDirection> {
    let mut d: Vec<pb::StreamDirection> = c
        .streams
        .iter()
        .map(|s| pb::StreamDirection::try_from(s.direction).expect("a known direction"))
        .collect();
    d.sort_unstable();
    d
}

/// `nodeward run` in a cgroup of its own and a private cgroup namespace (its
/// `/proc/self/cgroup` reads `/`, as in a pod), its API on a loopback TCP port; returns once the
/// network source has reported, with a client connected over TCP (a connection the agent's
/// cgroup serves).
async fn start_agent(stem: &str) -> (Cgroup, Killed, Client, TempDir) {
    let dir = TempDir::new(stem);
    let api_port = free_port();
    let agent_cg = Cgroup::new("ds-agent");
    let mut cmd = Command::new("unshare");
    cmd.args(["--cgroup", "--"])
        .arg(agent_binary())
        .args(["run", "--config", "/dev/null"])
        .args(["--set", &format!("api.tcp_listen=127.0.0.1:{api_port}")])
        .args([
            "--set",
            "metrics.enabled=false",
            "--set",
            "gpu.enabled=false",
        ])
        .args(["--set", "agent.tick=500ms"])
        // The client calls over TCP, without a certificate: drain calls need it listed.
        .args(["--set", r#"api.drain_allowed_identities=["anonymous"]"#])
        .arg("--set")
        .arg(format!(
            "api.unix_socket={}",
            dir.0.join("agent.sock").display()
        ))
        .env("NODEWARD_LOG", "warn")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let agent = Killed(agent_cg.spawn(&mut cmd));
    let endpoint = format!("http://127.0.0.1:{api_port}");
    let client = eventually(STEP, || {
        let endpoint = endpoint.clone();
        async move { Client::connect(endpoint).await.ok() }
    })
    .await
    .expect("the agent answers on its TCP port");
    // Sockets older than the TCP source carry no cgroup: wait until it runs.
    network_reported(&client, STEP)
        .await
        .expect("the network source reports");
    (agent_cg, agent, client, dir)
}

async fn begin_drain(client: &mut Client) {
    let begun = client
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "drain-served-test".into(),
            reason: "test".into(),
            deadline_seconds: 3600,
        })
        .await
        .expect("BeginDrain")
        .into_inner();
    assert!(!begun.already_draining);
}

async fn stop(mut agent: Killed) {
    let pid = i32::try_from(agent.0.id()).expect("pid fits");
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let exit = tokio::task::block_in_place(|| agent.0.wait()).expect("wait for the agent");
    assert!(exit.success(), "clean exit: {exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_for_served_connections_not_dependencies_the_host_or_the_agent() {
    if !is_root() {
        return skip(TEST, "needs root (eBPF, cgroups)");
    }
    let Some(v2_root) = cgroup_v2_root() else {
        return skip(TEST, "no cgroup v2 hierarchy");
    };
    if !have("python3") || !have("unshare") {
        return skip(TEST, "python3 or unshare (util-linux) is missing");
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let (agent_cg, agent, mut client, _dir) = start_agent("drain-served").await;
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/cgroup")).ok();
    assert_ne!(
        ns(&agent.0.id().to_string()),
        ns("self"),
        "the agent runs in a cgroup namespace of its own"
    );

    // A host service in the root cgroup, with a client (also in the root cgroup).
    let root_procs = v2_root.join("cgroup.procs");
    let mut host_cmd = Command::new("sh");
    host_cmd
        .args([
            "-c",
            "echo $$ > \"$1\" && exec python3 -c \"$2\"",
            "sh",
            &root_procs.display().to_string(),
            SINK,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut host = Killed(host_cmd.spawn().expect("start the host service"));
    let (host_port, _host_out) = port_of(&mut host.0);
    let mut host_conn = TcpStream::connect(("127.0.0.1", host_port)).expect("connect to host");
    host_conn.write_all(b"ping").expect("write to host");

    // The "database": a host service under /system.slice.
    let db_cg = CgroupTree::new(
        &format!("system.slice/nodeward-test-ds-db-{}", std::process::id()),
        std::slice::from_ref(&v2_root),
    );
    let db_key = key_of(db_cg.dir_in(&v2_root).expect("v2 dir"), &v2_root);
    let mut db = Killed(db_cg.spawn(&mut python(SINK, &[])));
    let (db_port, _db_out) = port_of(&mut db.0);

    // The pod: a dependency on the database, and one viewer.
    let pod_cg = Cgroup::new("ds-pod");
    let pod_key = key_of(&pod_cg.path, &v2_root);
    let mut pod = Killed(pod_cg.spawn(&mut python(POD, &[&db_port.to_string()])));
    let (pod_port, mut pod_out) = port_of(&mut pod.0);
    let mut viewer = TcpStream::connect(("127.0.0.1", pod_port)).expect("connect to the pod");
    for _ in 0..10 {
        viewer.write_all(b"frame").expect("write");
        let mut buf = [0u8; 5];
        viewer.read_exact(&mut buf).expect("echo");
        std::thread::sleep(Duration::from_millis(20));
    }

    begin_drain(&mut client).await;

    // The pod's viewer holds the drain; its database connection is listed, holding nothing.
    let s = eventually(STEP, || {
        let (mut c, key) = (client.clone(), pod_key.clone());
        async move {
            let s = status(&mut c).await;
            let p = container(&s, &key)?;
            (directions(p) == [pb::StreamDirection::Served, pb::StreamDirection::Outbound])
                .then_some(s)
        }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{pod_key} never showed one served and one outbound connection: {:?}",
            status_now(&mut client)
        )
    });
    let p = container(&s, &pod_key).expect("pod listed");
    assert_eq!(p.live_streams, 1, "only the viewer holds the drain: {p:?}");
    assert!(!s.ready_to_drain, "{}", s.ready_reason);
    let agent_key = key_of(&agent_cg.path, &v2_root);
    for (what, key) in [
        ("the agent's own API connection", agent_key.as_str()),
        ("the database's (system.slice) side", db_key.as_str()),
        ("the root cgroup's host service", "/"),
    ] {
        let held = container(&s, key).map_or(0, |c| c.live_streams);
        assert_eq!(held, 0, "{what} ({key}) holds the drain: {s:?}");
    }

    // The viewer leaves: the drain is ready, the dependency still listed.
    drop(viewer);
    let mut line = String::new();
    pod_out
        .read_line(&mut line)
        .expect("the pod saw the viewer leave");
    assert_eq!(line.trim(), "viewer gone");
    let s = eventually(STEP, || {
        let mut c = client.clone();
        async move {
            let s = status(&mut c).await;
            s.ready_to_drain.then_some(s)
        }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the drain never read ready after the viewer left: {:?}",
            status_now(&mut client)
        )
    });
    assert!(
        s.ready_reason.contains("no live streams"),
        "{}",
        s.ready_reason
    );
    let p = container(&s, &pod_key).expect("the pod's dependency is still listed");
    assert_eq!(
        (p.live_streams, directions(p)),
        (0, vec![pb::StreamDirection::Outbound]),
        "{p:?}"
    );

    drop(host_conn);
    drop((host, db, pod));
    stop(agent).await;
}

/// Serves one viewer (echo); once it leaves, waits for its stdin to close.
const SERVE: &str = "import socket, sys
s = socket.socket()
s.bind(('127.0.0.1', 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
while True:
    d = c.recv(4096)
    if not d:
        break
    c.sendall(d)
c.close()
print('viewer gone', flush=True)
sys.stdin.read()
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_older_than_the_agent_holds_the_drain_until_it_closes() {
    const TEST: &str = "drain_served_seed";
    if !is_root() {
        return skip(
            TEST,
            "needs root (eBPF, cgroups, sock_diag in every namespace)",
        );
    }
    let Some(v2_root) = cgroup_v2_root() else {
        return skip(TEST, "no cgroup v2 hierarchy");
    };
    if !have("python3") || !have("unshare") {
        return skip(TEST, "python3 or unshare (util-linux) is missing");
    }
    let _one = ONE_AT_A_TIME.lock().await;
    // The viewer connects and watches before the agent starts.
    let pod_cg = Cgroup::new("ds-old-pod");
    let pod_key = key_of(&pod_cg.path, &v2_root);
    let mut pod = Killed(pod_cg.spawn(&mut python(SERVE, &[])));
    let (pod_port, mut pod_out) = port_of(&mut pod.0);
    let mut viewer = TcpStream::connect(("127.0.0.1", pod_port)).expect("connect to the pod");
    viewer.write_all(b"frame").expect("write");
    let mut buf = [0u8; 5];
    viewer.read_exact(&mut buf).expect("echo");

    let (_agent_cg, agent, mut client, _dir) = start_agent("drain-served-seed").await;
    begin_drain(&mut client).await;
    let s = eventually(STEP, || {
        let (mut c, key) = (client.clone(), pod_key.clone());
        async move {
            let s = status(&mut c).await;
            (container(&s, &key)?.live_streams == 1).then_some(s)
        }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{pod_key}'s connection from before the agent never counted: {:?}",
            status_now(&mut client)
        )
    });
    assert!(!s.ready_to_drain, "{}", s.ready_reason);
    let p = container(&s, &pod_key).expect("pod listed");
    assert_eq!(
        directions(p),
        [pb::StreamDirection::Unspecified],
        "a dump cannot tell who opened it: {p:?}"
    );

    drop(viewer);
    let mut line = String::new();
    pod_out
        .read_line(&mut line)
        .expect("the pod saw the viewer leave");
    assert_eq!(line.trim(), "viewer gone");
    let gone = eventually(STEP, || {
        let (mut c, key) = (client.clone(), pod_key.clone());
        async move {
            let s = status(&mut c).await;
            (s.ready_to_drain && container(&s, &key).is_none()).then_some(())
        }
    })
    .await;
    assert!(
        gone.is_some(),
        "the drain never read ready after the old connection closed: {:?}",
        status_now(&mut client)
    );
    drop(pod);
    stop(agent).await;
}

/// The drain status right now, for a failure message.
fn status_now(client: &mut Client) -> pb::GetDrainStatusResponse {
    let mut c = client.clone();
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async move { status(&mut c).await })
    })
}
