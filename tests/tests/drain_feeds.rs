//! Readiness only on full knowledge: with the UDP source reporting and the TCP source not yet
//! (its first report delayed by fault injection, as a slow start-up would), the drain does not
//! read "no streams" as ready; once TCP has reported, the counts are known.

use nodeward_tests::{api::TempDir, drain::DrainAgent, is_root, skip};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_reporting_first_is_not_ready_until_tcp_has_reported() {
    const TEST: &str = "udp_reporting_first_is_not_ready_until_tcp_has_reported";
    if !is_root() {
        return skip(TEST, "needs root (eBPF)");
    }
    let dir = TempDir::new("drain-udp-first");
    let agent = DrainAgent::start(
        &dir.0,
        "agent",
        &[],
        &[("NODEWARD_FAULT_INJECT", "delay:ebpf/tcp:20s")],
    )
    .await;
    agent.begin("rollout-controller/a", 3_600).await;
    // The network source reports (UDP ticks) while TCP still waits.
    let early = agent
        .wait_status("the network source reports from UDP", |s| {
            s.ready_reason.contains("ebpf/tcp has not reported")
                || s.streams_known
                || s.ready_to_drain
        })
        .await;
    assert!(
        !early.streams_known && !early.ready_to_drain,
        "UDP alone is not full knowledge: {early:?}\n{}",
        agent.log_text()
    );
    let health = agent.health().await;
    assert!(
        health
            .sources
            .iter()
            .any(|s| s.name == "network" && s.last_report_unix_ms > 0),
        "the network source did report (from UDP): {health:?}"
    );
    // Once TCP reports, the counts mean something.
    let known = agent
        .wait_status("TCP reports after its delay", |s| s.streams_known)
        .await;
    assert!(!known.ready_reason.contains("ebpf/tcp"), "{known:?}");
    assert!(
        agent.log_text().contains("the task's first run waits"),
        "the delay was armed: {}",
        agent.log_text()
    );
}
