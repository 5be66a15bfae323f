//! The sock_diag fallback run with exactly the DaemonSet's capabilities: it must either see a
//! pod's sockets (in another network namespace) or report itself unavailable at WARN, naming
//! the capability it lacks, so that the drain waits for its deadline instead of reading "no
//! streams". Polling only its own namespace and calling that "0 sockets" is the failure.
//!
//! And the start-up seed with the same capabilities (on the default eBPF path): a pod's
//! connection older than the agent, in the pod's own network namespace, which sock_diag cannot
//! enter without CAP_SYS_ADMIN, still holds the drain (read from `/proc/<pid>/net/tcp`), with
//! as many streams as `ss -tn` lists in that namespace, until it closes.

use std::{
    io::BufRead as _,
    process::{Command, Stdio},
    time::Duration,
};

use nodeward_tests::{
    agent_binary,
    api::{conn, eventually, TempDir},
    cgroup_v2_root,
    drain::{have_python, key_of},
    grantable_caps, is_root, skip, Cgroup, Netns,
};

const DAEMONSET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../packaging/kubernetes/30-daemonset.yaml"
);

/// The capabilities the DaemonSet adds (`securityContext.capabilities.add`), `BPF` form.
fn daemonset_caps() -> Vec<String> {
    let text = std::fs::read_to_string(DAEMONSET).expect("read the DaemonSet");
    let mut caps = Vec::new();
    for l in text.lines().skip_while(|l| l.trim() != "add:").skip(1) {
        let Some(item) = l.trim().strip_prefix("- ") else {
            break;
        };
        caps.push(item.split_whitespace().next().unwrap_or("").to_owned());
    }
    caps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sock_diag_with_the_daemonsets_capabilities_sees_sockets_or_says_what_it_lacks() {
    const TEST: &str =
        "sock_diag_with_the_daemonsets_capabilities_sees_sockets_or_says_what_it_lacks";
    if !is_root() {
        return skip(TEST, "needs root (network namespaces, cgroups)");
    }
    let Some(v2) = cgroup_v2_root() else {
        return skip(TEST, "no cgroup v2 hierarchy");
    };
    if !have_python() {
        return skip(TEST, "python3 is missing (the echo server)");
    }
    let Some(setpriv) = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        return skip(TEST, "setpriv is not installed (util-linux)");
    };
    let caps = daemonset_caps();
    assert!(
        caps.iter().any(|c| c == "BPF") && !caps.iter().any(|c| c == "SYS_ADMIN"),
        "read the DaemonSet's capabilities: {caps:?}"
    );
    let names: Vec<&str> = caps.iter().map(String::as_str).collect();
    let (list, missing) = grantable_caps(&names);
    if !missing.is_empty() {
        eprintln!("{TEST}: this machine cannot grant {missing:?}; testing without them");
    }

    // A pod: its own network namespace, a server in its cgroup, a client that keeps talking.
    let netns = Netns::new("diag-caps");
    let cgroup = Cgroup::new("diag-caps");
    let key = key_of(&cgroup, &v2);
    let server_py = "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen(1)\n\
                     print(s.getsockname()[1], flush=True)\nc, _ = s.accept()\nwhile True:\n    \
                     d = c.recv(4096)\n    if not d:\n        break\n    c.sendall(d)\n";
    let mut server = cgroup.spawn(
        netns
            .command("python3")
            .args(["-c", server_py])
            .stdout(Stdio::piped()),
    );
    let mut port = String::new();
    std::io::BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut port)
        .expect("the server prints its port");
    let client_py = format!(
        "import socket, time\nc = socket.create_connection(('127.0.0.1', {}))\nwhile True:\n    \
         c.sendall(b'ping')\n    c.recv(4)\n    time.sleep(0.05)\n",
        port.trim()
    );
    let mut client = netns
        .command("python3")
        .args(["-c", &client_py])
        .spawn()
        .expect("client");

    let dir = TempDir::new("drain-diag-caps");
    let socket = dir.0.join("agent.sock");
    let log = dir.0.join("agent.log");
    let file = std::fs::File::create(&log).expect("log");
    let mut agent = Command::new(setpriv)
        .arg(format!("--inh-caps=-all,{list}"))
        .arg(format!("--bounding-set=-all,{list}"))
        .arg(agent_binary())
        .args(["run", "--config", "/dev/null"])
        .args([
            "--set",
            "tcp.attribution=sock_diag",
            "--set",
            "gpu.enabled=false",
        ])
        .args(["--set", "metrics.enabled=false", "--set", "api.tcp_listen="])
        .args(["--set", "agent.tick=500ms", "--set", "log.format=json"])
        .arg("--set")
        .arg(format!("api.unix_socket={}", socket.display()))
        .env("NODEWARD_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(file.try_clone().expect("fd"))
        .stderr(file)
        .spawn()
        .expect("start the agent under setpriv");
    let addr = format!("unix:{}", socket.display());
    let c = eventually(Duration::from_secs(60), || {
        let (addr, socket) = (addr.clone(), socket.clone());
        async move { nodeward::client::connect(&conn(&addr), &socket).await.ok() }
    })
    .await
    .expect("the agent answers");
    let mut c2 = c.clone();
    c2.begin_drain(nodeward::api::pb::BeginDrainRequest {
        requested_by: "diag-test".into(),
        reason: String::new(),
        deadline_seconds: 3_600,
    })
    .await
    .expect("BeginDrain");

    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let outcome = eventually(Duration::from_secs(60), || {
        let (mut c, key) = (c.clone(), key.clone());
        let text = read_log();
        async move {
            let s = c
                .get_drain_status(nodeward::api::pb::GetDrainStatusRequest {})
                .await
                .ok()?
                .into_inner();
            let sees = s.streams_known
                && s.containers
                    .iter()
                    .any(|c| c.container_id == key && c.live_streams > 0);
            let says = text
                .lines()
                .any(|l| l.contains("\"WARN\"") && l.contains("CAP_SYS_ADMIN"))
                && s.ready_reason.contains("CAP_SYS_ADMIN")
                && !s.streams_known
                && !s.ready_to_drain;
            (sees || says).then_some((sees, s))
        }
    })
    .await;
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = client.kill();
    let _ = client.wait();
    let _ = server.kill();
    let _ = server.wait();
    let (sees, status) = outcome.unwrap_or_else(|| {
        panic!(
            "sock_diag neither saw the pod's connection nor said it lacks CAP_SYS_ADMIN\n{}",
            read_log()
        )
    });
    eprintln!(
        "{TEST}: {} ({})",
        if sees {
            "sees the pod's sockets"
        } else {
            "reports itself unavailable"
        },
        status.ready_reason
    );
}

/// Established server-side and client-side sockets in `netns`, as `ss -tn` inside it lists
/// them: the kernel's count, not the agent's.
fn ss_established_in(netns: &Netns) -> usize {
    let out = netns
        .command("ss")
        .args(["-tnH", "state", "established"])
        .output()
        .expect("run ss in the namespace");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_connection_older_than_the_agent_holds_the_drain_with_the_daemonsets_capabilities() {
    const TEST: &str =
        "a_pods_connection_older_than_the_agent_holds_the_drain_with_the_daemonsets_capabilities";
    if !is_root() {
        return skip(TEST, "needs root (eBPF, network namespaces, cgroups)");
    }
    let Some(v2) = cgroup_v2_root() else {
        return skip(TEST, "no cgroup v2 hierarchy");
    };
    if !have_python() {
        return skip(TEST, "python3 is missing (the echo server)");
    }
    let Some(setpriv) = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        return skip(TEST, "setpriv is not installed (util-linux)");
    };
    let caps = daemonset_caps();
    let names: Vec<&str> = caps.iter().map(String::as_str).collect();
    let (list, missing) = grantable_caps(&names);
    if !missing.is_empty() {
        eprintln!("{TEST}: this machine cannot grant {missing:?}; testing without them");
    }

    // A pod (its own network namespace and cgroup) with a viewer connected BEFORE the agent
    // starts: the start-up seed must find it without entering the namespace.
    let netns = Netns::new("seed-caps");
    let cgroup = Cgroup::new("seed-caps");
    let key = key_of(&cgroup, &v2);
    let server_py = "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen(1)\n\
                     print(s.getsockname()[1], flush=True)\nc, _ = s.accept()\nwhile True:\n    \
                     d = c.recv(4096)\n    if not d:\n        break\n    c.sendall(d)\n";
    let mut server = cgroup.spawn(
        netns
            .command("python3")
            .args(["-c", server_py])
            .stdout(Stdio::piped()),
    );
    let mut port = String::new();
    std::io::BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut port)
        .expect("the server prints its port");
    let client_py = format!(
        "import socket, time\nc = socket.create_connection(('127.0.0.1', {}))\nwhile True:\n    \
         c.sendall(b'ping')\n    c.recv(4)\n    time.sleep(0.05)\n",
        port.trim()
    );
    let mut client = cgroup.spawn(netns.command("python3").args(["-c", &client_py]));
    let established = nodeward_tests::wait_for(Duration::from_secs(10), || {
        let n = ss_established_in(&netns);
        (n == 2).then_some(n)
    })
    .expect("both ends of the connection established");

    let dir = TempDir::new("drain-seed-caps");
    let socket = dir.0.join("agent.sock");
    let log = dir.0.join("agent.log");
    let file = std::fs::File::create(&log).expect("log");
    let mut agent = Command::new(setpriv)
        .arg(format!("--inh-caps=-all,{list}"))
        .arg(format!("--bounding-set=-all,{list}"))
        .arg(agent_binary())
        .args(["run", "--config", "/dev/null"])
        .args(["--set", "gpu.enabled=false"])
        .args(["--set", "metrics.enabled=false", "--set", "api.tcp_listen="])
        .args(["--set", "agent.tick=500ms", "--set", "log.format=json"])
        .arg("--set")
        .arg(format!("api.unix_socket={}", socket.display()))
        .env("NODEWARD_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(file.try_clone().expect("fd"))
        .stderr(file)
        .spawn()
        .expect("start the agent under setpriv");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let addr = format!("unix:{}", socket.display());
    let c = eventually(Duration::from_secs(60), || {
        let (addr, socket) = (addr.clone(), socket.clone());
        async move { nodeward::client::connect(&conn(&addr), &socket).await.ok() }
    })
    .await
    .unwrap_or_else(|| panic!("the agent answers\n{}", read_log()));
    let mut c2 = c.clone();
    c2.begin_drain(nodeward::api::pb::BeginDrainRequest {
        requested_by: "seed-caps-test".into(),
        reason: String::new(),
        deadline_seconds: 3_600,
    })
    .await
    .expect("BeginDrain");

    let status = |c: &nodeward::api::pb::node_health_client::NodeHealthClient<_>| {
        let mut c = c.clone();
        async move {
            c.get_drain_status(nodeward::api::pb::GetDrainStatusRequest {})
                .await
                .ok()
                .map(tonic::Response::into_inner)
        }
    };
    let held = eventually(Duration::from_secs(60), || {
        let (c, key) = (c.clone(), key.clone());
        async move {
            let s = status(&c).await?;
            let n = s
                .containers
                .iter()
                .find(|c| c.container_id == key)
                .map(|c| c.live_streams)?;
            (n > 0).then_some((n, s))
        }
    })
    .await;
    let Some((n, s)) = held else {
        let last = status(&c).await;
        let _ = agent.kill();
        panic!(
            "the pod's connection from before the agent never held the drain: {last:?}\n{}",
            read_log()
        );
    };
    assert_eq!(
        n as usize, established,
        "every established socket in the pod's namespace, as ss counts them: {s:?}"
    );
    assert!(!s.ready_to_drain, "{}", s.ready_reason);

    // The viewer leaves: both ends close, and the pod holds nothing.
    let _ = client.kill();
    let _ = client.wait();
    let _ = server.kill();
    let _ = server.wait();
    let released = eventually(Duration::from_secs(60), || {
        let (c, key) = (c.clone(), key.clone());
        async move {
            let s = status(&c).await?;
            s.containers
                .iter()
                .find(|c| c.container_id == key)
                .is_none_or(|c| c.live_streams == 0)
                .then_some(())
        }
    })
    .await;
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        released.is_some(),
        "the closed connection still held the drain\n{}",
        read_log()
    );
}
