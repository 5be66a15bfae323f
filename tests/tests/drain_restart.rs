//! The drain outlives the agent: SIGKILL mid-drain (as an OOM kill or a crash would) and a new
//! agent on the same state file is still draining, with the same deadline, requesters and start
//! time, and still counts the live stream; a TCP-source restart mid-drain is never read as "no
//! streams"; a state file that cannot be read is reported and never read as "not draining".

use std::time::Duration;

use nodeward::api::pb;
use nodeward_tests::{
    api::TempDir,
    cgroup_v2_root,
    drain::{have_python, key_of, DrainAgent, LiveConnection},
    is_root, skip, Cgroup,
};

const BY: [&str; 2] = ["rollout-controller/a", "rollout-controller/b"];

fn requesters(d: &pb::DrainInfo) -> Vec<(String, i64)> {
    d.requesters
        .iter()
        .map(|r| (r.requested_by.clone(), r.requested_unix_ms))
        .collect()
}

fn counted(s: &pb::GetDrainStatusResponse, key: &str) -> bool {
    s.streams_known
        && s.containers
            .iter()
            .any(|c| c.container_id == key && c.live_streams > 0)
}

/// Root, cgroup v2 and python3, or the skip line.
fn prerequisites(test: &str) -> Option<std::path::PathBuf> {
    if !is_root() {
        skip(test, "needs root (eBPF, cgroups)");
        return None;
    }
    let Some(v2) = cgroup_v2_root() else {
        skip(test, "no cgroup v2 hierarchy");
        return None;
    };
    if !have_python() {
        skip(test, "python3 is missing (the echo server)");
        return None;
    }
    Some(v2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_drain_restores_the_drain_and_still_counts_the_stream() {
    const TEST: &str = "sigkill_mid_drain_restores_the_drain_and_still_counts_the_stream";
    let Some(v2) = prerequisites(TEST) else {
        return;
    };
    let dir = TempDir::new("drain-sigkill");
    let first = DrainAgent::start(&dir.0, "first", &[], &[]).await;
    let cgroup = Cgroup::new("drain-sigkill");
    let key = key_of(&cgroup, &v2);
    let _live = LiveConnection::open(&cgroup);
    first
        .wait_status("the live connection counts", |s| counted(s, &key))
        .await;
    let begun = first.begin(BY[0], 3_600).await;
    first.begin(BY[1], 60).await;
    let before = first.health().await.drain.expect("drain");
    assert_eq!(before.state, pb::DrainState::Draining as i32);
    assert_eq!(requesters(&before).len(), 2);
    assert_eq!(
        before.deadline_unix_ms,
        begun.drain.expect("drain").deadline_unix_ms
    );
    first.kill();

    let second = DrainAgent::start(&dir.0, "second", &[], &[]).await;
    let after = second.health().await.drain.expect("drain");
    assert_eq!(
        after.state,
        pb::DrainState::Draining as i32,
        "the drain survives SIGKILL: {after:?}\n{}",
        second.log_text()
    );
    assert_eq!(
        after.deadline_unix_ms, before.deadline_unix_ms,
        "same deadline"
    );
    assert_eq!(after.started_unix_ms, before.started_unix_ms, "same start");
    assert_eq!(requesters(&after), requesters(&before), "same requesters");
    assert_eq!(after.state_problem, "");
    // The new agent counts the connection again (its TCP source finds it by its traffic; a
    // start-up seed of existing sockets, which closes the gap before that, is the eBPF side's).
    let s = second
        .wait_status("the restarted agent counts the live connection", |s| {
            counted(s, &key)
        })
        .await;
    assert!(!s.ready_to_drain, "{s:?}");
    assert!(
        second
            .log_text()
            .contains("drain restored from the state file"),
        "{}",
        second.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_source_restart_mid_drain_is_not_read_as_no_streams() {
    const TEST: &str = "a_tcp_source_restart_mid_drain_is_not_read_as_no_streams";
    let Some(v2) = prerequisites(TEST) else {
        return;
    };
    let dir = TempDir::new("drain-tcp-restart");
    // The TCP task panics after 60 ticks (30 s at 500 ms) and waits 10 s before its restart.
    let agent = DrainAgent::start(
        &dir.0,
        "agent",
        &[],
        &[("NODEWARD_FAULT_INJECT", "panic:ebpf/tcp:60:10s")],
    )
    .await;
    let begun = agent.begin(BY[0], 3_600).await.drain.expect("drain");
    let cgroup = Cgroup::new("drain-tcp-restart");
    let key = key_of(&cgroup, &v2);
    let _live = LiveConnection::open(&cgroup);
    agent
        .wait_status("the live connection counts", |s| counted(s, &key))
        .await;
    // While the task waits out its back-off, the counts are unknown and the drain not ready.
    let down = agent
        .wait_status("the restart shows", |s| {
            s.ready_reason.contains("ebpf/tcp is restarting")
        })
        .await;
    assert!(!down.streams_known && !down.ready_to_drain, "{down:?}");
    // Once it runs again, it must report in its new run before the counts are trusted; then
    // the stream is counted again and the drain is the same one.
    let s = agent
        .wait_status("the restarted TCP source counts the connection", |s| {
            counted(s, &key) && !s.ready_reason.contains("ebpf/tcp")
        })
        .await;
    assert!(!s.ready_to_drain, "{s:?}");
    let d = s.drain.expect("drain");
    assert_eq!(d.deadline_unix_ms, begun.deadline_unix_ms);
    assert_eq!(requesters(&d), requesters(&begun));
    let log = agent.log_text();
    assert!(log.contains("fault injected into ebpf/tcp"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_is_moved_aside_reported_and_never_read_as_ready() {
    const TEST: &str = "a_corrupt_state_file_is_moved_aside_reported_and_never_read_as_ready";
    if !is_root() {
        return skip(TEST, "needs root (the agent's sources)");
    }
    let dir = TempDir::new("drain-corrupt");
    let state = dir.0.join("drain.json");
    std::fs::write(
        &state,
        b"{\"version\": 1, \"drain\": {\"started_unix_ms\": 17",
    )
    .expect("write");
    let agent = DrainAgent::start(&dir.0, "agent", &[], &[]).await;

    let d = agent.health().await.drain.expect("drain");
    assert_eq!(
        d.state,
        pb::DrainState::Draining as i32,
        "an unreadable state is never 'not draining': {d:?}"
    );
    assert!(d.state_problem.contains("could not be read"), "{d:?}");
    assert_eq!(d.deadline_unix_ms, 0, "no deadline is known");
    let moved: Vec<_> = std::fs::read_dir(&dir.0)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("drain.json.unreadable-"))
        .collect();
    assert_eq!(moved.len(), 1, "moved aside with a suffix: {moved:?}");
    assert!(d.state_problem.contains(&moved[0]), "{d:?}");
    // Reported: an ERROR line and a DrainState condition.
    let log = agent.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("\"ERROR\"") && l.contains("drain state file cannot be read")),
        "{log}"
    );
    let health = nodeward_tests::api::eventually(Duration::from_secs(60), || async {
        let h = agent.health().await;
        h.conditions
            .iter()
            .any(|c| c.r#type == "DrainState" && c.reason == "Unreadable")
            .then_some(h)
    })
    .await;
    assert!(health.is_some(), "a DrainState condition is raised");
    // Not ready, however long it waits (the sources have reported by now).
    let s = agent
        .wait_status("the network source reports", |s| {
            s.evaluated_unix_ms > 0 && !s.ready_reason.is_empty()
        })
        .await;
    assert!(!s.ready_to_drain, "{s:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = agent.status().await;
    assert!(!s.ready_to_drain, "{s:?}");

    // A caller decides: CancelDrain ends it, and the condition clears.
    let cancelled = agent
        .client
        .clone()
        .cancel_drain(pb::CancelDrainRequest {
            requested_by: "operator".into(),
            reason: "checked the node".into(),
        })
        .await
        .expect("CancelDrain")
        .into_inner();
    assert!(cancelled.was_draining);
    let cleared = nodeward_tests::api::eventually(Duration::from_secs(60), || async {
        let h = agent.health().await;
        (!h.conditions.iter().any(|c| c.r#type == "DrainState")).then_some(h)
    })
    .await;
    assert!(
        cleared.is_some(),
        "the condition clears once a caller decided"
    );
    assert!(state.exists(), "the new state (no drain) is saved");
}
