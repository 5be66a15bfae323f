//! A flow map far too small for the node's sockets (`tcp.max_flows` at its minimum, 64) with
//! the real agent and its eBPF TCP source: 150 connections accepted by a pod cgroup, every one
//! kept busy, so that the LRU map evicts flows all the time and RTT samples rebuild them. The
//! drain's count of the pod's live streams stays exact on every reading — checked against
//! `ss -tn state established cgroup <pod>`, the kernel's own list — and the drain is not
//! ready while they are open: an evicted served connection never passes for an outbound one
//! (a rebuilt entry does not know which side opened it) and never drops out of the count.
//! Once they close, the pod's count falls to 0.

use std::{
    io::BufRead as _,
    process::{Command, Stdio},
    time::Duration,
};

use nodeward_tests::{
    api::{network_reported, TempDir},
    cgroup_v2_root,
    drain::{have_python, key_of, DrainAgent, STEP},
    is_root, skip, wait_for, Cgroup,
};

const TEST: &str = "drain_evict";
const CONNECTIONS: usize = 150;
/// Readings of the drain status after the count first matched, half a second apart.
const READINGS: usize = 30;

/// Accepts argv[1] connections and echoes on each until stdin closes.
const SERVER: &str = "import selectors, socket, sys
n = int(sys.argv[1])
s = socket.socket()
s.bind(('127.0.0.1', 0))
s.listen(256)
print(s.getsockname()[1], flush=True)
sel = selectors.DefaultSelector()
for _ in range(n):
    c, _ = s.accept()
    sel.register(c, selectors.EVENT_READ)
sel.register(sys.stdin, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is sys.stdin:
            sys.exit(0)
        d = key.fileobj.recv(4096)
        if d:
            key.fileobj.sendall(d)
";

/// Opens argv[2] connections to port argv[1], prints `ready`, then makes round trips on each
/// in turn until stdin closes (every socket keeps taking RTT samples).
const CLIENTS: &str = "import selectors, socket, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
held = [socket.create_connection(('127.0.0.1', port)) for _ in range(n)]
print('ready', flush=True)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
while not stop.is_set():
    for c in held:
        c.sendall(b'x')
        c.recv(16)
";

fn ss_established_in_cgroup(path: &str) -> usize {
    let out = Command::new("ss")
        .args(["-tnH", "state", "established", "cgroup", path])
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_served_connections_still_hold_the_drain_and_the_count_stays_exact() {
    if !is_root() {
        return skip(TEST, "needs root (eBPF, cgroups)");
    }
    let Some(v2_root) = cgroup_v2_root() else {
        return skip(TEST, "no cgroup v2 hierarchy");
    };
    if !have_python() {
        return skip(TEST, "python3 is missing");
    }
    let cg = Cgroup::new("evict-pod");
    let key = key_of(&cg, &v2_root);
    let dir = TempDir::new("drain-evict");
    let agent = DrainAgent::start(&dir.0, "agent", &["tcp.max_flows=64"], &[]).await;
    network_reported(&agent.client, STEP)
        .await
        .expect("the network source reports");

    let mut server = cg.spawn(
        Command::new("python3")
            .args(["-c", SERVER, &CONNECTIONS.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().expect("stdout piped"))
        .read_line(&mut line)
        .expect("the server prints its port");
    let mut clients = Command::new("python3")
        .args(["-c", CLIENTS, line.trim(), &CONNECTIONS.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the clients");
    let mut ready = String::new();
    std::io::BufReader::new(clients.stdout.take().expect("stdout piped"))
        .read_line(&mut ready)
        .expect("the clients report");
    assert_eq!(ready.trim(), "ready", "the clients could not connect");
    let truth = wait_for(Duration::from_secs(30), || {
        let c = ss_established_in_cgroup(&key);
        (c == CONNECTIONS).then_some(c)
    })
    .expect("ss lists every accepted connection in the pod cgroup");

    let counted = |s: &nodeward::api::pb::GetDrainStatusResponse| {
        s.containers
            .iter()
            .find(|c| c.container_id == key)
            .map(|c| (c.established_connections as usize, c.live_streams as usize))
    };
    agent
        .wait_status("the pod's connections counted", |s| {
            counted(s) == Some((truth, truth))
        })
        .await;
    agent.begin("drain-evict-test", 3600).await;
    // The map evicts all the while: every reading must still count each connection, as a
    // stream the drain waits for.
    for i in 0..READINGS {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = agent.status().await;
        assert_eq!(
            counted(&s),
            Some((truth, truth)),
            "reading {i}: (established, live streams) of the pod, with {truth} connections \
             open (ss); status {s:?}"
        );
        assert!(
            !s.ready_to_drain,
            "reading {i}: ready with {truth} connections open"
        );
    }

    let _ = clients.kill();
    let _ = clients.wait();
    let _ = server.kill();
    let _ = server.wait();
    // Readiness is node-wide (other tests' connections, and their evicted outbound ones,
    // which are held as of unknown direction): the pod's own count is what must fall to 0.
    agent
        .wait_status(
            "the pod's count falls to 0 once its connections close",
            |s| matches!(counted(s), None | Some((0, 0))),
        )
        .await;
}
