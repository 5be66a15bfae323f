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
    time::{Duration, SystemTime},
};

use nodeward::api::pb;
use nodeward_tests::{
    is_root,
    kubeapi::{condition, has, status_patches, until, Agent, KubeApi, STEP},
    skip,
};
use serde_json::{json, Value};

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
            "health.oom_kill_warning=false",
            "health.cpu_throttled_ratio_warning=1",
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

    // The panic: SourceRestarted counts, the node is Degraded. (Other conditions the machine's
    // other cgroups could raise are turned off at the agent's start; the message is checked
    // rather than the reason, which names the first cause in order.)
    let restart_shown = || {
        let message = api.node(node).and_then(|n| {
            n["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "NodewardNodeProblem" && c["status"] == "True")
                .and_then(|c| c["message"].as_str().map(str::to_owned))
        });
        message.is_some_and(|m| m.contains("SourceRestarted (cgroup)"))
    };
    assert!(
        until(STEP, restart_shown).await,
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
    // The stand-in records the conditions before its answer reaches the agent, which logs the
    // recovery only once it has that answer.
    assert!(
        until(STEP, || agent.log_text().contains("answers again")).await,
        "{}",
        agent.log_text()
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nothing_changing_each_heartbeat_costs_one_request() {
    const TEST: &str = "kube_conditions::steady_state";
    if !is_root() {
        skip(TEST, "needs root (the agent reads cgroupfs)");
        return;
    }
    let node = "kube-steady-node";
    let api = KubeApi::start();
    api.add_node(node, json!(null));
    // A short heartbeat, so the run holds heartbeats as well as changes.
    let agent = Agent::start("kube-steady", node, &api, "", &["kubernetes.heartbeat=2s"]).await;
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
            requested_by: "kube-steady-test".to_owned(),
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
            requested_by: "kube-steady-test".to_owned(),
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
    assert_eq!(
        steady.len(),
        beats,
        "only heartbeat patches in the steady state: {steady:?}"
    );
    agent.stop().await;
}
