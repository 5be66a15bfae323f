//! Collector scaling and API latency, measured by `nodeward-bench scan`, `api` and `watch`
//! (`tests/src/bin/nodeward-bench`, built in release mode next to the agent), so that xtask does
//! not link the agent's library.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _};

use super::{
    agent::Agent,
    bench_bin, median,
    scenarios::{row, ALL_PROGRAMS},
    Plan, Row,
};

pub const DESCRIPTION: &str = "\
- **cgroup scan, N containers**: `nodeward-bench scan` writes the tests' fake cgroupfs \
(`agent/src/containers/fixture.rs`: pure v2, systemd driver, two containers per pod, every stat \
file) with N containers to `/dev/shm` and runs the agent's own `Scanner` on it repeatedly: \
discovery, every container's stats, the node's stats from the real `/proc`, the rates. CPU per \
scan is the scanning thread's user+system time (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`); the first scan \
also creates every container's rate history, so it is reported on its own. A container whose \
CPU counter has not moved since its last full read costs the agent that one file (its other \
figures are reused for up to 10 s), and the hierarchies are walked again only when inotify \
reports a directory made or removed (or 10 s after the last walk): the fixture's containers \
are idle, so the CPU row's baseline is the same scanner walking the tree and reading every \
file of every container on every scan (`--full-read-every 0s --walk-every-scan`, the scan as \
it was), and a second row at 1,000 containers moves every container's CPU \
counter before each scan (`--busy`, untimed), the agent's cost when no container is quiet. The \
RSS row puts the process's resident memory after the first scan in the baseline columns and \
after the last in the other: a ratio near 1 means memory stays flat over repeated scans. \
Target (issue 18): at most 25 ms of CPU per scan with 1,000 containers.
- **API, 100 callers**: the agent (idle) is called by `nodeward-bench api`, 100 \
callers each on its own connection to the agent's Unix socket, each calling `GetNodeHealth` \
10 times a second (1,000 calls/s in all; latency percentiles over every call of the run), then \
the same callers closed-loop (each calls again as soon as it has its answer: the rate the agent \
sustains while the callers compete with it for the same two cores; its latency is queueing, \
not service time). Target (issue 7): p99 under 2 ms (at the paced rate).
- **API, 1,000 Watch streams**: `nodeward-bench watch` opens 1,000 \
`WatchNodeHealth` streams over 10 connections, waits for each one's first message, and holds \
them; the metric is the agent's resident memory (VmRSS) then, minus before the streams were \
opened (after the latency runs). Target (issue 7): under 50 MB.";

pub fn json_of(cmd: &mut Command) -> anyhow::Result<serde_json::Value> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("JSON from {cmd:?}: {last}"))
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
        .unwrap_or_default()
}

/// One `nodeward-bench scan` run of `scans` scans of a fake cgroupfs of `n` containers.
fn scan_run(
    agent_bin: &Path,
    n: usize,
    scans: usize,
    extra: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let v = json_of(
        Command::new(bench_bin(agent_bin))
            .args(["--set", "gpu.enabled=false", "scan"])
            .args([
                "--containers",
                &n.to_string(),
                "--scans",
                &scans.to_string(),
            ])
            .args(extra)
            // The fake cgroupfs goes to memory: writing 5,000 containers' files to this
            // disk takes longer than the scans themselves.
            .env("TMPDIR", "/dev/shm"),
    )?;
    let found = v["workloads_found"].as_f64().unwrap_or(f64::NAN);
    if (found as usize) < n {
        bail!("the scan found {found} workloads of {n}");
    }
    Ok(v)
}

/// Milliseconds of CPU of every scan after the first.
fn steady_cpu_ms(v: &serde_json::Value) -> Vec<f64> {
    let cpu: Vec<f64> = floats(&v["cpu_seconds"]).iter().map(|s| s * 1e3).collect();
    cpu.get(1..).unwrap_or_default().to_vec()
}

/// One cgroup scan (discovery, every container's stats, the node's stats, the rates) of a fake
/// cgroupfs with 100, 1,000 and 5,000 containers: the agent's scan against the same scanner
/// reading every file of every container on every scan (the baseline), and with 1,000
/// containers once more with every container's CPU counter moving (none quiet).
pub fn scan(_root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    let scans = if plan.rounds <= 2 { 10 } else { 30 };
    let mut rows = Vec::new();
    for n in [100usize, 1_000, 5_000] {
        // Fewer scans of the largest tree: each takes about a second here.
        let scans = if n >= 5_000 { scans / 2 } else { scans };
        crate::say(&format!("  cgroup scan: {n} containers, {scans} scans"));
        let full = scan_run(
            agent_bin,
            n,
            scans,
            &["--full-read-every", "0s", "--walk-every-scan"],
        )?;
        let v = scan_run(agent_bin, n, scans, &[])?;
        let scenario = format!("cgroup scan, {n} containers (fake cgroupfs)");
        // The first scan also creates every container's rate history: reported on its own.
        let cpu: Vec<f64> = floats(&v["cpu_seconds"]).iter().map(|s| s * 1e3).collect();
        let wall: Vec<f64> = floats(&v["wall_seconds"]).iter().map(|s| s * 1e3).collect();
        let steady = steady_cpu_ms(&v);
        let m = median(&steady).unwrap_or(f64::NAN);
        let mut r = row(
            &scenario,
            "CPU per scan (after the first), idle containers; baseline: every file read",
            "ms",
            steady_cpu_ms(&full),
            steady,
        );
        if n == 1_000 {
            r.target = Some(("≤ 25 ms at 1,000".to_owned(), m <= 25.0));
        }
        rows.push(r);
        if n == 1_000 {
            let busy = scan_run(agent_bin, n, scans, &["--busy"])?;
            rows.push(row(
                &scenario,
                "CPU per scan (after the first), every container busy; baseline: every file read",
                "ms",
                steady_cpu_ms(&full),
                steady_cpu_ms(&busy),
            ));
        }
        rows.push(row(
            &scenario,
            "CPU of the first scan",
            "ms",
            vec![],
            cpu.first().copied().into_iter().collect(),
        ));
        rows.push(row(
            &scenario,
            "wall time per scan (after the first)",
            "ms",
            vec![],
            wall.get(1..).unwrap_or_default().to_vec(),
        ));
        let mib = |k: &str| v[k].as_f64().unwrap_or(f64::NAN) / 1_048_576.0;
        rows.push(row(
            &scenario,
            &format!("RSS after the first scan (baseline columns) and after scan {scans}"),
            "MiB",
            vec![mib("rss_after_first_bytes")],
            vec![mib("rss_after_last_bytes")],
        ));
    }
    Ok(rows)
}

/// `GetNodeHealth` latency with 100 callers over the Unix socket, paced and closed-loop, and the
/// agent's memory while it holds 1,000 `WatchNodeHealth` streams.
pub fn api(_root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    const SCENARIO: &str = "API, 100 callers on the Unix socket";
    // Every round pools thousands of calls: three rounds show the spread.
    let plan = Plan {
        rounds: plan.rounds.min(3),
        ..plan
    };
    let length = format!("{}s", plan.seconds);
    let (mut p50, mut p99, mut p50_sat, mut p99_sat, mut rate_sat) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut growth, mut opened) = (vec![], vec![]);
    for round in 0..plan.rounds {
        crate::say(&format!("  API (round {}/{})", round + 1, plan.rounds));
        let agent = Agent::start(agent_bin, &["--set", "gpu.enabled=false"], ALL_PROGRAMS)?;
        let addr = format!("unix:{}", agent.socket);
        // 100 callers at 10 calls/s each: latency at a steady 1,000 calls/s.
        let v = json_of(Command::new(bench_bin(agent_bin)).args([
            "api",
            "--addr",
            &addr,
            "--callers",
            "100",
            "--rate",
            "10",
            "--duration",
            &length,
        ]))?;
        p50.push(v["p50_ms"].as_f64().unwrap_or(f64::NAN));
        p99.push(v["p99_ms"].as_f64().unwrap_or(f64::NAN));
        // The same callers as fast as they can: what the agent sustains on this machine, where
        // the callers compete with it for the same two cores.
        let v = json_of(Command::new(bench_bin(agent_bin)).args([
            "api",
            "--addr",
            &addr,
            "--callers",
            "100",
            "--duration",
            &length,
        ]))?;
        p50_sat.push(v["p50_ms"].as_f64().unwrap_or(f64::NAN));
        p99_sat.push(v["p99_ms"].as_f64().unwrap_or(f64::NAN));
        rate_sat.push(v["calls_per_second"].as_f64().unwrap_or(f64::NAN));

        let before = agent.rss_bytes();
        let mut watch = Command::new(bench_bin(agent_bin))
            .args(["watch", "--addr", &addr, "--streams", "1000"])
            .args(["--hold", "2s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start nodeward-bench watch")?;
        let stdout = watch.stdout.take().context("nodeward-bench watch stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = lines.next().transpose()?.unwrap_or_default();
        if ready.trim() != "ready" {
            bail!("nodeward-bench watch said {ready:?} instead of ready");
        }
        // Let the agent settle with every stream open before reading its memory.
        std::thread::sleep(Duration::from_secs(1));
        growth.push((agent.rss_bytes() - before) / 1_048_576.0);
        let report = lines.next().transpose()?.unwrap_or_default();
        let _ = watch.wait();
        let v: serde_json::Value = serde_json::from_str(&report)
            .with_context(|| format!("nodeward-bench watch report: {report}"))?;
        opened.push(v["opened"].as_f64().unwrap_or(f64::NAN));
        agent.stop()?;
    }
    let p99_median = median(&p99).unwrap_or(f64::NAN);
    let growth_median = median(&growth).unwrap_or(f64::NAN);
    let mut r99 = row(
        SCENARIO,
        "`GetNodeHealth` p99, 10 calls/s per caller",
        "ms",
        vec![],
        p99,
    );
    r99.target = Some(("p99 < 2 ms".to_owned(), p99_median < 2.0));
    let mut mem = row(
        "API, 1,000 `WatchNodeHealth` streams held",
        "agent RSS growth",
        "MiB",
        vec![],
        growth,
    );
    mem.target = Some(("< 50 MB".to_owned(), growth_median * 1.048_576 < 50.0));
    Ok(vec![
        row(
            SCENARIO,
            "`GetNodeHealth` p50, 10 calls/s per caller",
            "ms",
            vec![],
            p50,
        ),
        r99,
        row(
            SCENARIO,
            "`GetNodeHealth` calls, closed loop (each caller calls again on its answer)",
            "/s",
            vec![],
            rate_sat,
        ),
        row(
            SCENARIO,
            "`GetNodeHealth` p50, closed loop",
            "ms",
            vec![],
            p50_sat,
        ),
        row(
            SCENARIO,
            "`GetNodeHealth` p99, closed loop",
            "ms",
            vec![],
            p99_sat,
        ),
        mem,
        row(
            "API, 1,000 `WatchNodeHealth` streams held",
            "streams that got their first message",
            "",
            vec![],
            opened,
        ),
    ])
}
