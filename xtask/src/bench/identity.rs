//! Pod identity from the container runtime at 1,000 containers, measured by `nodeward-bench
//! identity` (`tests/src/bin/nodeward-bench/identity.rs`) against a stand-in CRI runtime.

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _};

use super::{bench_bin, median, scenarios::row, Plan, Row};

pub const DESCRIPTION: &str = "\
- **pod identity, 1,000 containers**: `nodeward-bench identity` serves a stand-in CRI runtime \
(the generated `runtime.v1` server of the tests crate on a Unix socket) listing 1,000 pods of \
one container each (five labels per pod), whose ids match a fake cgroupfs of 1,000 containers \
that the agent scans (`paths.cgroup_root`; eBPF, the TCP source, GPU, node stats and /metrics off). The agent \
runs three times: runtime lookups off with a tick of 60 s, so that its one scan falls before \
the measured window (the baseline); the runtime listed every second with the same tick; and the runtime listed every 60 s with a scan every 200 ms. CPU \
per resync is the agent's user+system time per second above the baseline's, times the window, \
over the listings made in it (each `ListPodSandbox` + `ListContainers`, decoded, joined, \
published to the bridge and into the identity table); the RSS row is the agent's VmRSS at the \
end of the named run minus the baseline run's; the calls row counts the runtime's calls while \
the agent ticked every 200 ms (after its first listing). Targets (issue 16): under 100 ms of \
CPU per resync, no runtime call on the per-tick path, under 10 MiB of RSS growth.";

pub fn identity(_root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    const SCENARIO: &str = "pod identity, 1,000 containers (stand-in CRI runtime)";
    let seconds = (plan.seconds * 2).max(6);
    let (mut per_resync, mut rss, mut calls, mut ticks) = (vec![], vec![], vec![], vec![]);
    for round in 0..plan.rounds {
        crate::say(&format!("  identity (round {}/{})", round + 1, plan.rounds));
        let mut cmd = Command::new(bench_bin(agent_bin));
        cmd.args(["identity", "--agent"])
            .arg(agent_bin)
            .args(["--containers", "1000", "--seconds", &seconds.to_string()])
            .env("TMPDIR", "/dev/shm");
        let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
        if !out.status.success() {
            bail!(
                "{cmd:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default())
            .with_context(|| format!("JSON from {cmd:?}"))?;
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let resyncs = f("resyncs_named");
        if resyncs.is_nan() || resyncs < 1.0 {
            bail!("the agent made no listing in the window: {v}");
        }
        per_resync.push(
            (f("cpu_per_second_named") - f("cpu_per_second_none")) * f("seconds") / resyncs * 1e3,
        );
        rss.push((f("rss_named_bytes") - f("rss_none_bytes")) / 1_048_576.0);
        calls.push(f("calls_during_ticks"));
        ticks.push(f("ticks"));
    }
    let mut r = row(
        SCENARIO,
        "agent CPU per resync (listing, join, publish), above runtime lookups off",
        "ms",
        vec![],
        per_resync.clone(),
    );
    r.target = Some((
        "< 100 ms".to_owned(),
        median(&per_resync).is_some_and(|m| m < 100.0),
    ));
    let mut c = row(
        SCENARIO,
        &format!(
            "runtime calls while the agent ticked {:.0} times (200 ms ticks, 60 s resync)",
            median(&ticks).unwrap_or(f64::NAN)
        ),
        "calls",
        vec![],
        calls.clone(),
    );
    c.target = Some(("0".to_owned(), calls.iter().all(|&n| n == 0.0)));
    let mut m = row(
        SCENARIO,
        "agent RSS with 1,000 named containers, above runtime lookups off",
        "MiB",
        vec![],
        rss.clone(),
    );
    m.target = Some((
        "< 10 MiB".to_owned(),
        median(&rss).is_some_and(|v| v < 10.0),
    ));
    Ok(vec![r, c, m])
}
