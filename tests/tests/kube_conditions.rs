//! The agent's verdict on its Node, against the tests' stand-in API server
//! (`nodeward_tests::kubeapi`, standing in for a kube-apiserver, which cannot be installed here).
//!
//! A real agent (eBPF, GPU and node sources off; the cgroup source on) is made to change its
//! verdict by something real: fault injection makes its cgroup source panic, and the supervisor's
//! long back-off holds a `SourceRestarted` warning. The Node must get nodeward's conditions
//! through the status subresource, with the kubelet's own condition left as it was; the
//! warning must turn `NodewardNodeProblem` `True` and back, each with an Event; with nothing
//! changing, no patch may follow before the heartbeat. With the API server refusing
//! connections for a minute, the agent keeps answering gRPC, and a drain begun meanwhile
//! reaches the Node once the server is back.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::Stdio,
    time::{Duration, SystemTime},
};

use nodeward::api::pb;
use nodeward_tests::{
    agent_binary,
    api::{conn, eventually, TempDir},
    is_root,
    kubeapi::{until, KubeApi, Recorded},
    skip,
};
use serde_json::{json, Value};

/// Each step's bound: many ticks and back-offs, so a slow shared machine is no failure.
const STEP: Duration = Duration::from_secs(90);

type Client = pb::node_health_client::NodeHealthClient<tonic::transport::Channel>;

struct Agent {
    child: tokio::process::Child,
    client: Client,
    log: PathBuf,
    _dir: TempDir,
}

impl Agent {
    async fn start(stem: &str, node: &str, api: &KubeApi, fault: &str, extra: &[&str]) -> Self {
        let dir = TempDir::new(stem);
        let socket = dir.0.join("agent.sock");
        let log = dir.0.join("agent.log");
        let mut cmd = tokio::process::Command::new(agent_binary());
        cmd.args(["run", "--config", "/dev/null"]);
        let sets = [
            "api.tcp_listen=".to_owned(),
            "metrics.enabled=false".to_owned(),
            "ebpf.enabled=false".to_owned(),
            "gpu.enabled=false".to_owned(),
            "node.enabled=false".to_owned(),
            "containers.runtime_endpoint=none".to_owned(),
            "agent.tick=200ms".to_owned(),
            "health.interval=100ms".to_owned(),
            format!("api.unix_socket={}", socket.display()),
            format!("drain.state_file={}", dir.0.join("drain.json").display()),
            format!("api.node_name={node}"),
            format!("kubernetes.server={}", api.url()),
            "kubernetes.min_interval=0s".to_owned(),
            "kubernetes.max_backoff=2s".to_owned(),
        ];
        for kv in sets.iter().map(String::as_str).chain(extra.iter().copied()) {
            cmd.args(["--set", kv]);
        }
        if !fault.is_empty() {
            cmd.env("NODEWARD_FAULT_INJECT", fault);
        }
        let child = cmd
            .env("NODEWARD_LOG", "info,nodeward::kube=debug")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("NODE_NAME")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("start nodeward run");
        let addr = format!("unix:{}", socket.display());
        let client = eventually(STEP, || {
            let (addr, socket) = (addr.clone(), socket.clone());
            async move { nodeward::client::connect(&conn(&addr), &socket).await.ok() }
        })
        .await
        .unwrap_or_else(|| panic!("the daemon never answered on its socket"));
        Self {
            child,
            client,
            log,
            _dir: dir,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn stop(mut self) {
        let pid = i32::try_from(self.child.id().expect("the agent runs")).expect("pid fits");
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let exit = tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("exits in time")
            .expect("wait");
        assert!(exit.success(), "clean exit: {exit:?}\n{}", self.log_text());
    }
}

/// The Node condition of type `t` as stored: (status, reason).
fn condition(api: &KubeApi, node: &str, t: &str) -> Option<(String, String)> {
    let n = api.node(node)?;
    n["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == t)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

fn has(api: &KubeApi, node: &str, t: &str, status: &str, reason: &str) -> bool {
    condition(api, node, t) == Some((status.to_owned(), reason.to_owned()))
}

fn status_patches(requests: &[Recorded], node: &str) -> Vec<Recorded> {
    let path = format!("/api/v1/nodes/{node}/status");
    requests
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == path)
        .cloned()
        .collect()
}

/// The kubelet's own condition, which nodeward's patches must leave as it is.
fn kubelet_ready() -> Value {
    json!({"type": "Ready", "status": "True", "reason": "KubeletReady",
           "message": "kubelet is posting ready status",
           "lastHeartbeatTime": "2026-01-01T00:00:00Z",
           "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verdict_change_reaches_the_node_as_a_condition_and_an_event_and_nothing_else_is_patched()
{
    const TEST: &str = "kube_conditions::verdict_change";
    if !is_root() {
        skip(TEST, "needs root (the agent reads cgroupfs)");
        return;
    }
    let node = "kube-cond-node";
    let api = KubeApi::start();
    api.add_node(node, json!(null));
    api.edit_node(node, |n| {
        n["status"]["conditions"] = json!([kubelet_ready()])
    });
    // The cgroup source panics after 30 reports and waits 25 s before its restart: a warning
    // that lasts long enough to be seen, then clears after `health.recovery`.
    let agent = Agent::start(
        "kube-cond",
        node,
        &api,
        "panic:cgroup:30:25s",
        &[
            "health.hold=0s",
            "health.recovery=2s",
            "kubernetes.heartbeat=1h",
        ],
    )
    .await;

    assert!(
        until(STEP, || has(
            &api,
            node,
            "NodewardUnhealthy",
            "False",
            "Healthy"
        ))
        .await,
        "the healthy verdict never reached the Node: {:?}\n{}",
        api.node(node),
        agent.log_text()
    );
    for t in ["LiveNetworkDegraded", "GpuUnhealthy", "NodewardNodeProblem"] {
        assert_eq!(
            condition(&api, node, t),
            Some(("False".to_owned(), "NoProblem".to_owned())),
            "{t}"
        );
    }
    assert!(has(&api, node, "NodewardDraining", "False", "NotDraining"));

    // The panic: SourceRestarted counts, the node is Degraded.
    assert!(
        until(STEP, || has(
            &api,
            node,
            "NodewardNodeProblem",
            "True",
            "SourceRestarted"
        ))
        .await,
        "the restart never reached the Node: {:?}\n{}",
        api.node(node),
        agent.log_text()
    );
    assert!(has(&api, node, "NodewardUnhealthy", "False", "Degraded"));
    let problem_event = |reason: &str, kind: &str| {
        api.events().iter().any(|e| {
            e["reason"] == reason
                && e["type"] == kind
                && e["involvedObject"]["kind"] == "Node"
                && e["involvedObject"]["name"] == node
        })
    };
    assert!(
        until(STEP, || problem_event("SourceRestarted", "Warning")).await,
        "no Warning Event for the transition: {:?}",
        api.events()
    );

    // The restart happens, health.recovery passes: the problem clears, with a Normal Event.
    assert!(
        until(STEP, || has(
            &api,
            node,
            "NodewardNodeProblem",
            "False",
            "NoProblem"
        ))
        .await,
        "the problem never cleared on the Node: {:?}\n{}",
        api.node(node),
        agent.log_text()
    );
    assert!(
        until(STEP, || problem_event(
            "NodewardNodeProblemCleared",
            "Normal"
        ))
        .await,
        "no Normal Event for the recovery: {:?}",
        api.events()
    );

    // The kubelet's condition is untouched, and every write went through /status as a strategic
    // merge patch (the stand-in ignores status changes on the main resource, as the real one).
    let stored = api.node(node).expect("the node");
    let ready = stored["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready").cloned());
    assert_eq!(ready, Some(kubelet_ready()));
    let requests = api.requests();
    let patches = status_patches(&requests, node);
    assert!(
        patches
            .iter()
            .all(|r| r.content_type == "application/strategic-merge-patch+json" && r.status == 200),
        "{patches:?}"
    );
    let each_time: Vec<_> = stored["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .filter(|c| c["type"] != "Ready")
        .map(|c| c["lastHeartbeatTime"].clone())
        .collect();
    assert_eq!(each_time.len(), 5, "{stored}");

    // Nothing changes now (the heartbeat is an hour): over many health evaluations, no patch.
    let before = patches.len();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = status_patches(&api.requests(), node);
    assert_eq!(
        after.len(),
        before,
        "patched again with nothing changed: {:?}",
        &after[before..].iter().map(|r| &r.body).collect::<Vec<_>>()
    );
    // Each change was one patch: healthy, degraded, healthy again (an Unknown first at most).
    assert!(before <= 4, "{before} patches for three states");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_down_for_a_minute_blocks_nothing_and_the_conditions_catch_up() {
    const TEST: &str = "kube_conditions::api_down";
    if !is_root() {
        skip(TEST, "needs root (the agent reads cgroupfs)");
        return;
    }
    let node = "kube-down-node";
    let api = KubeApi::start();
    api.add_node(node, json!(null));
    let agent = Agent::start("kube-down", node, &api, "", &["kubernetes.heartbeat=1h"]).await;
    assert!(
        until(STEP, || has(
            &api,
            node,
            "NodewardDraining",
            "False",
            "NotDraining"
        ))
        .await,
        "the conditions never reached the Node: {:?}\n{}",
        api.node(node),
        agent.log_text()
    );

    api.down();
    let down_at = SystemTime::now();
    // While it is down the agent answers, and a drain begins.
    let mut client = agent.client.clone();
    client
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "kube-conditions-test".to_owned(),
            reason: "rollout".to_owned(),
            deadline_seconds: 600,
        })
        .await
        .expect("BeginDrain while the API server is down");
    let mut answers = 0;
    while down_at.elapsed().unwrap_or_default() < Duration::from_secs(60) {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            client.get_node_health(pb::GetNodeHealthRequest {}),
        )
        .await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "GetNodeHealth failed while the API server was down: {r:?}"
        );
        answers += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(answers >= 30, "{answers} answers in a minute");
    assert!(
        has(&api, node, "NodewardDraining", "False", "NotDraining"),
        "written while down?"
    );
    api.recover();
    assert!(
        until(STEP, || has(
            &api,
            node,
            "NodewardDraining",
            "True",
            "DrainRequested"
        ))
        .await,
        "the drain never reached the Node after the API server came back: {:?}\n{}",
        api.node(node),
        agent.log_text()
    );
    let message = api.node(node).and_then(|n| {
        n["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "NodewardDraining")
            .map(|c| c["message"].clone())
    });
    assert!(
        message.is_some_and(|m| m
            .as_str()
            .is_some_and(|m| m.contains("kube-conditions-test"))),
        "{:?}",
        api.node(node)
    );
    assert!(
        until(STEP, || api
            .events()
            .iter()
            .any(|e| e["reason"] == "DrainRequested"))
        .await,
        "the drain's Event was not sent after the outage: {:?}",
        api.events()
    );
    assert!(
        agent.log_text().contains("answers again"),
        "{}",
        agent.log_text()
    );
    agent.stop().await;
}

/// The (verb, resource, subresource) triples the shipped ClusterRole grants.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_role_grants_exactly_the_calls_the_agent_makes() {
    const TEST: &str = "kube_conditions::rbac";
    if !is_root() {
        skip(TEST, "needs root (the agent reads cgroupfs)");
        return;
    }
    let Some(granted) = granted() else {
        skip(
            TEST,
            "python3 with PyYAML is not installed (tests/requirements.txt)",
        );
        return;
    };
    let node = "kube-rbac-node";
    let api = KubeApi::start();
    api.add_node(node, json!(null));
    // A short heartbeat, so the run holds heartbeats as well as changes.
    let agent = Agent::start("kube-rbac", node, &api, "", &["kubernetes.heartbeat=2s"]).await;
    let mut client = agent.client.clone();
    assert!(
        until(STEP, || has(
            &api,
            node,
            "NodewardDraining",
            "False",
            "NotDraining"
        ))
        .await,
        "{}",
        agent.log_text()
    );
    // A drain begun and cancelled: two transitions, two Events.
    client
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "kube-rbac-test".to_owned(),
            reason: "rbac".to_owned(),
            deadline_seconds: 600,
        })
        .await
        .expect("BeginDrain");
    assert!(
        until(STEP, || has(
            &api,
            node,
            "NodewardDraining",
            "True",
            "DrainRequested"
        ))
        .await
    );
    client
        .cancel_drain(pb::CancelDrainRequest {
            requested_by: "kube-rbac-test".to_owned(),
            ..Default::default()
        })
        .await
        .expect("CancelDrain");
    assert!(
        until(STEP, || api.events().len() >= 2).await,
        "{:?}",
        api.events()
    );
    // The window starts at a heartbeat, after the last Event's request is in the log.
    let after_events = api.requests().len();
    assert!(
        until(STEP, || !status_patches(
            &api.requests()[after_events..],
            node
        )
        .is_empty())
        .await,
        "no heartbeat patch"
    );
    let heartbeats_from = api.requests().len();
    let heartbeats = |n: usize| status_patches(&api.requests()[heartbeats_from..], node).len() >= n;
    assert!(until(STEP, || heartbeats(6)).await, "no heartbeat patches");
    // The steady state's cost, for docs/cluster.md (a measurement, not an assertion): requests
    // per heartbeat with nothing changing; per minute at the default 5 min heartbeat it is a
    // fifth of that.
    let steady = api.requests().split_off(heartbeats_from);
    let beats = status_patches(&steady, node).len();
    eprintln!(
        "steady state: {} API requests over {beats} heartbeats: {:?}",
        steady.len(),
        steady
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<BTreeSet<_>>()
    );
    agent.stop().await;

    let requests = api.requests();
    let called: BTreeSet<(String, String, String)> =
        requests.iter().filter_map(Recorded::rbac).collect();
    assert!(
        requests.iter().all(|r| r.status < 400),
        "a call the stand-in refused: {:?}",
        requests
            .iter()
            .filter(|r| r.status >= 400)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        called, granted,
        "the ClusterRole in packaging/kubernetes/10-rbac.yaml must grant exactly what the agent \
         calls (left: called, right: granted)"
    );
}
