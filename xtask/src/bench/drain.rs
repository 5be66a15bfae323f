//! Issue 15 at scale: the TCP source's start-up seed with 50,000 connections open, measured by
//! `nodeward-bench seed` (`tests/src/bin/nodeward-bench/seed.rs`, the agent's own `Seed`), and
//! `GetDrainStatus` with 50,000 live streams, called by `nodeward-bench drain-status` on the
//! release agent.

use std::{path::Path, process::Command};

use super::{
    agent::Agent,
    bench_bin,
    collector::json_of,
    median,
    scenarios::{row, ALL_PROGRAMS},
    Plan, Row,
};

pub const DESCRIPTION: &str = "\
- **TCP start-up seed, 50,000 connections**: `nodeward-bench seed` opens 50,000 loopback \
connections (100,000 established sockets; child processes hold at most 9,000 connections \
each, both ends, under the hard open-file limit of 20,000) and runs the agent's own start-up seed on them \
(`agent/src/sources/tcp/seed.rs`): one sock_diag dump of every network namespace with each \
socket's cgroup, every socket kept by cookie, as the TCP source's first read does. Time is wall \
time and the process's CPU time of that read; memory is the growth of the peak resident set \
(VmHWM, reset just before) over it. Then the read the source repeats on every tick while any \
seeded connection is open (a dump again, to see them close): its wall time per tick. Target \
(issue 15): the first read under 1 s and under 20 MiB.
- **drain status, 50,000 streams**: the release agent (`tcp.max_flows` 262,144, so that both \
ends of every connection fit the flow map; its drain state in a file of its own) and \
`nodeward-bench drain-status`, whose child processes bind their listeners inside a cgroup made \
for the run under the cgroup v2 root (a container to the agent) and connect 50,000 loopback \
clients to them from outside it; it \
begins a drain, waits until the agent counts the 50,000 accepted connections as live streams \
(that wait is a row too: how far the agent's count lags), then calls `GetDrainStatus` 200 times \
in a row on one connection; latency percentiles over those calls (the reply lists at most \
`drain.max_streams_listed`, 1,000, with exact counts). Before the calls, the agent's CPU time \
over 10 s while it holds the streams and nobody calls: with a 1 s tick, the CPU per second is \
about the CPU of one TCP-source tick over the 100,000 flows (both ends of each connection). \
Target (issue 15): p99 under 50 ms.";

const CONNECTIONS: usize = 50_000;
const SCENARIO: &str = "TCP start-up seed, 50,000 connections (100,000 sockets)";

pub fn seed(_root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    let mut first_wall = Vec::new();
    let mut first_cpu = Vec::new();
    let mut first_mib = Vec::new();
    let mut tick_ms = Vec::new();
    let mut flows = Vec::new();
    for round in 0..plan.rounds {
        crate::say(&format!("  seed: round {}/{}", round + 1, plan.rounds));
        let v = json_of(Command::new(bench_bin(agent_bin)).args([
            "seed",
            "--connections",
            &CONNECTIONS.to_string(),
            "--ticks",
            "5",
        ]))?;
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        first_wall.push(f("first_wall_seconds") * 1e3);
        first_cpu.push(f("first_cpu_seconds") * 1e3);
        first_mib.push(f("first_peak_growth_bytes") / 1_048_576.0);
        flows.push(f("seeded_flows"));
        tick_ms.extend(
            v["tick_wall_seconds"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(serde_json::Value::as_f64)
                .map(|s| s * 1e3),
        );
    }
    let wall = median(&first_wall).unwrap_or(f64::NAN);
    let mib = median(&first_mib).unwrap_or(f64::NAN);
    let seeded = median(&flows).unwrap_or(f64::NAN);
    let mut rows = Vec::new();
    let mut r = row(
        SCENARIO,
        &format!("first read (dump, {seeded:.0} flows seeded): wall time"),
        "ms",
        vec![],
        first_wall,
    );
    r.target = Some(("< 1 s".to_owned(), wall < 1_000.0));
    rows.push(r);
    rows.push(row(
        SCENARIO,
        "first read: CPU time",
        "ms",
        vec![],
        first_cpu,
    ));
    let mut r = row(
        SCENARIO,
        "first read: peak resident memory growth",
        "MiB",
        vec![],
        first_mib,
    );
    r.target = Some(("< 20 MiB".to_owned(), mib < 20.0));
    rows.push(r);
    rows.push(row(
        SCENARIO,
        "re-dump on each later tick while they stay open: wall time",
        "ms",
        vec![],
        tick_ms,
    ));
    Ok(rows)
}

/// `GetDrainStatus` with 50,000 live streams in one container.
pub fn status(_root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    const SCENARIO: &str = "drain status, 50,000 live streams";
    let (mut p50, mut p99, mut counted, mut lag, mut kib, mut cpu) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for round in 0..plan.rounds {
        crate::say(&format!(
            "  drain status: round {}/{}",
            round + 1,
            plan.rounds
        ));
        let state = format!("/run/nodeward-bench-drain-{}.json", std::process::id());
        let agent = Agent::start(
            agent_bin,
            &[
                "--set",
                "gpu.enabled=false",
                "--set",
                "tcp.max_flows=262144",
                "--set",
                &format!("drain.state_file={state}"),
            ],
            ALL_PROGRAMS,
        )?;
        let addr = format!("unix:{}", agent.socket);
        let v = json_of(Command::new(bench_bin(agent_bin)).args([
            "drain-status",
            "--addr",
            &addr,
            "--connections",
            &CONNECTIONS.to_string(),
            "--agent-pid",
            &agent.pid().to_string(),
        ]));
        agent.stop()?;
        let _ = std::fs::remove_file(&state);
        let v = v?;
        let mut lat: Vec<f64> = v["latency_ms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_f64)
            .collect();
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        p50.push(pct(0.5));
        p99.push(pct(0.99));
        counted.push(v["live_streams"].as_f64().unwrap_or(f64::NAN));
        lag.push(v["counted_after_seconds"].as_f64().unwrap_or(f64::NAN));
        cpu.push(v["agent_cpu_per_second"].as_f64().unwrap_or(f64::NAN));
        kib.push(v["reply_bytes"].as_f64().unwrap_or(f64::NAN) / 1024.0);
    }
    let m = median(&p99).unwrap_or(f64::NAN);
    let mut rows = vec![row(SCENARIO, "GetDrainStatus p50", "ms", vec![], p50)];
    let mut r = row(SCENARIO, "GetDrainStatus p99", "ms", vec![], p99);
    r.target = Some(("< 50 ms".to_owned(), m < 50.0));
    rows.push(r);
    rows.push(row(
        SCENARIO,
        "live streams the agent counted (of 50,000)",
        "",
        vec![],
        counted,
    ));
    rows.push(row(
        SCENARIO,
        "time from the last connection until all were counted (or the 300 s wait ended)",
        "s",
        vec![],
        lag,
    ));
    rows.push(row(SCENARIO, "reply size", "KiB", vec![], kib));
    rows.push(row(
        SCENARIO,
        "agent CPU while it holds them, uncalled (its 1 s ticks over 100,000 flows), 10 s",
        "s/s",
        vec![],
        cpu,
    ));
    Ok(rows)
}
