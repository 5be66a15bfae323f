//! The drain that takes a node out of rotation, against the tests' stand-in API server
//! (`nodeward_tests::kubeapi`, standing in for a kube-apiserver, which cannot be installed here).
//!
//! With the real agent and its eBPF TCP source: `BeginDrain` taints the Node at once; a "pod"
//! (a cgroup of its own) serving one viewer over a real TCP connection holds the evictions for
//! as long as the viewer stays; once it leaves, the node's pods are evicted through the
//! Eviction API — a pod whose disruption budget refuses twice is retried until it goes, never
//! forced; the DaemonSet's pod and a static pod's mirror stay. `CancelDrain` removes the taint
//! the agent added. Across that run the agent's requests are compared with the shipped
//! ClusterRole: it must grant exactly what was called. A node tainted by someone else keeps its
//! taint through a drain and its cancellation.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, Read as _, Write as _},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime},
};

use nodeward::api::pb;
use nodeward_tests::{
    api::network_reported,
    cgroup_v2_root, is_root,
    kubeapi::{until, Agent, KubeApi, Recorded, STEP},
    skip, Cgroup,
};
use serde_json::{json, Value};

/// The drain tests of the agent are node-wide: one at a time within this file.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The "pod": serves one viewer (echo) and exits when it leaves.
const POD: &str = "import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', int(sys.argv[1])))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
while True:
    d = c.recv(4096)
    if not d:
        break
    c.sendall(d)
";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn taint(key: &str) -> Value {
    json!({"key": key, "effect": "NoSchedule"})
}

fn taints(api: &KubeApi, node: &str) -> Vec<Value> {
    api.node(node)
        .and_then(|n| n["spec"]["taints"].as_array().cloned())
        .unwrap_or_default()
}

fn evictions(requests: &[Recorded]) -> Vec<Recorded> {
    requests
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/eviction"))
        .cloned()
        .collect()
}

/// The (verb, resource, subresource) triples the shipped ClusterRole grants; `None` without
/// python3 and PyYAML.
fn granted() -> Option<BTreeSet<(String, String, String)>> {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/kubernetes/10-rbac.yaml");
    let docs = nodeward_tests::kube::yaml(&file)?;
    let role = nodeward_tests::kube::find(&docs, "ClusterRole");
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        assert_eq!(
            nodeward_tests::kube::strings(&rule["apiGroups"]),
            vec![""],
            "only the core group is used: {rule}"
        );
        for resource in nodeward_tests::kube::strings(&rule["resources"]) {
            let (r, sub) = resource.split_once('/').unwrap_or((resource, ""));
            for verb in nodeward_tests::kube::strings(&rule["verbs"]) {
                out.insert((verb.to_owned(), r.to_owned(), sub.to_owned()));
            }
        }
    }
    Some(out)
}

async fn begin(agent: &Agent, who: &str) {
    let mut c = agent.client.clone();
    c.begin_drain(pb::BeginDrainRequest {
        requested_by: who.to_owned(),
        reason: "rollout".to_owned(),
        deadline_seconds: 3600,
    })
    .await
    .expect("BeginDrain");
}

async fn cancel(agent: &Agent, who: &str) {
    let mut c = agent.client.clone();
    c.cancel_drain(pb::CancelDrainRequest {
        requested_by: who.to_owned(),
        ..Default::default()
    })
    .await
    .expect("CancelDrain");
}

async fn drain_status(agent: &Agent) -> pb::GetDrainStatusResponse {
    let mut c = agent.client.clone();
    c.get_drain_status(pb::GetDrainStatusRequest {})
        .await
        .expect("GetDrainStatus")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taint_then_wait_for_the_viewer_then_evict_honouring_budgets_and_rbac_is_exact() {
    const TEST: &str = "kube_drain::order";
    if !is_root() {
        return skip(TEST, "needs root (eBPF, cgroups)");
    }
    if cgroup_v2_root().is_none() {
        return skip(TEST, "no cgroup v2 hierarchy");
    }
    let Some(granted) = granted() else {
        return skip(
            TEST,
            "python3 with PyYAML is not installed (tests/requirements.txt)",
        );
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let node = "kube-drain-node";
    let api = KubeApi::start();
    api.add_node(node, json!(null));
    api.add_pod("live", "class-1", node, "ReplicaSet", false);
    api.add_pod("kube-system", "nodeward-abcde", node, "DaemonSet", false);
    api.add_pod("kube-system", "etcd-static", node, "", true);
    api.add_pod("live", "elsewhere", "another-node", "ReplicaSet", false);
    api.block_eviction("live", "class-1", 2);

    // Only the pod's port holds this agent's drain: streams of other tests running on the
    // machine at the same time must not (the drain is node-wide).
    let pod_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let include = format!("drain.include_ports=[{pod_port}]");
    let agent = Agent::start(
        "kube-drain",
        node,
        &api,
        "",
        &[
            &include,
            "ebpf.enabled=true",
            "agent.tick=500ms",
            "kubernetes.heartbeat=1h",
        ],
    )
    .await;
    if network_reported(&agent.client, STEP).await.is_none() {
        let log = agent.log_text();
        agent.stop().await;
        return skip(
            TEST,
            &format!("the TCP source never reported (eBPF?):\n{log}"),
        );
    }

    // The pod and its viewer: a real connection the drain waits for.
    let pod_cg = Cgroup::new("kube-drain-pod");
    let mut cmd = Command::new("python3");
    cmd.args(["-c", POD, &pod_port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut pod = Killed(pod_cg.spawn(&mut cmd));
    let mut out = std::io::BufReader::new(pod.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("the pod prints its port");
    let port: u16 = line.trim().parse().expect("a port");
    // The viewer watches until told to leave: a frame each way every 50 ms, as a live stream.
    let mut viewer = TcpStream::connect(("127.0.0.1", port)).expect("connect to the pod");
    let leave = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watching = {
        let leave = leave.clone();
        std::thread::spawn(move || {
            while !leave.load(std::sync::atomic::Ordering::Relaxed) {
                viewer.write_all(b"frame").expect("write");
                let mut buf = [0u8; 5];
                viewer.read_exact(&mut buf).expect("echo");
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // The agent sees the viewer before the drain begins (what it has not measured, it cannot
    // wait for).
    let seen = nodeward_tests::api::eventually(STEP, || async {
        (drain_status(&agent).await.live_streams >= 1).then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "the viewer was never counted: {}",
        agent.log_text()
    );
    begin(&agent, "kube-drain-test").await;
    assert!(
        until(STEP, || taints(&api, node)
            .contains(&taint("nodeward.io/draining")))
        .await,
        "the node was never tainted: {:?}\n{}",
        api.node(node),
        agent.log_text()
    );
    // The viewer holds the drain: GetDrainStatus counts it, and no eviction goes out.
    let held = nodeward_tests::api::eventually(STEP, || async {
        let s = drain_status(&agent).await;
        (s.live_streams >= 1 && !s.ready_to_drain).then_some(s)
    })
    .await;
    assert!(
        held.is_some(),
        "the viewer was never counted: {}",
        agent.log_text()
    );
    // Several of the drain task's rounds (one a second) with the viewer still there.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        evictions(&api.requests()).is_empty(),
        "evicted while a viewer remained: {:?}",
        evictions(&api.requests())
    );

    leave.store(true, std::sync::atomic::Ordering::Relaxed);
    watching.join().expect("the viewer's thread");
    let viewer_left = SystemTime::now();
    let left: Vec<String> = [
        "kube-system/etcd-static",
        "kube-system/nodeward-abcde",
        "live/elsewhere",
    ]
    .map(str::to_owned)
    .to_vec();
    assert!(
        until(STEP, || api.pods() == left).await,
        "pods left: {:?}; drain status {:?}\n{}",
        api.pods(),
        {
            let s = drain_status(&agent).await;
            (s.ready_to_drain, s.ready_reason, s.live_streams)
        },
        agent
            .log_text()
            .lines()
            .filter(|l| l.contains("kube") || l.contains("ERROR") || l.contains("WARN"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let requests = api.requests();
    let ev = evictions(&requests);
    assert!(
        ev.iter()
            .all(|r| r.path == "/api/v1/namespaces/live/pods/class-1/eviction"),
        "only the ReplicaSet's pod on this node is evicted: {ev:?}"
    );
    assert_eq!(
        ev.iter().map(|r| r.status).collect::<Vec<_>>(),
        [429, 429, 201],
        "refused twice by its budget, retried, then evicted"
    );
    assert!(ev.iter().all(|r| r.at >= viewer_left), "{ev:?}");
    let tainted_at = requests
        .iter()
        .find(|r| r.method == "PATCH" && r.path == format!("/api/v1/nodes/{node}"))
        .map(|r| r.at)
        .expect("the taint patch");
    assert!(tainted_at < ev[0].at);
    assert!(
        requests.iter().any(|r| r.method == "GET"
            && r.path == "/api/v1/pods"
            && r.query.contains("spec.nodeName%3Dkube-drain-node")),
        "pods listed by field selector"
    );

    cancel(&agent, "kube-drain-test").await;
    assert!(
        until(STEP, || taints(&api, node).is_empty()).await,
        "the taint stayed after CancelDrain: {:?}",
        api.node(node)
    );
    agent.stop().await;

    let requests = api.requests();
    // 429: the budget's refusals above; 409: a taint patch that raced the agent's own status
    // patch (which bumps the Node's resourceVersion, as on a real server) and was read again.
    let refused: Vec<&Recorded> = requests
        .iter()
        .filter(|r| r.status >= 400 && r.status != 429 && r.status != 409)
        .collect();
    assert!(
        refused.is_empty(),
        "a call the stand-in refused: {refused:?}"
    );
    let called: BTreeSet<(String, String, String)> =
        requests.iter().filter_map(Recorded::rbac).collect();
    assert_eq!(
        called, granted,
        "the ClusterRole in packaging/kubernetes/10-rbac.yaml must grant exactly what the agent \
         calls in a drain and its conditions (left: called, right: granted)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taint_someone_else_set_stays_through_a_drain_and_its_cancellation() {
    const TEST: &str = "kube_drain::foreign_taint";
    if !is_root() {
        return skip(TEST, "needs root (the agent reads cgroupfs)");
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let node = "kube-foreign-node";
    let api = KubeApi::start();
    let theirs = taint("nodeward.io/draining");
    let other = json!({"key": "dedicated", "value": "gpu", "effect": "NoSchedule"});
    api.add_node(node, json!([other.clone(), theirs.clone()]));
    let agent = Agent::start("kube-foreign", node, &api, "", &[]).await;
    begin(&agent, "kube-foreign-test").await;
    // The drain reached the Node (its condition), and the agent found the taint there.
    assert!(
        until(STEP, || nodeward_tests::kubeapi::has(
            &api,
            node,
            "NodewardDraining",
            "True",
            "DrainRequested"
        ))
        .await
    );
    assert!(
        until(STEP, || agent.log_text().contains("already tainted")).await,
        "{}",
        agent.log_text()
    );
    cancel(&agent, "kube-foreign-test").await;
    assert!(
        until(STEP, || nodeward_tests::kubeapi::has(
            &api,
            node,
            "NodewardDraining",
            "False",
            "NotDraining"
        ))
        .await
    );
    agent.stop().await;
    assert_eq!(
        taints(&api, node),
        vec![other, theirs],
        "the node's taints changed"
    );
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.method == "PATCH" && r.path == format!("/api/v1/nodes/{node}")),
        "the Node itself was patched"
    );
}
