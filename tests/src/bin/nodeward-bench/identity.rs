//! `identity`: what pod identity from the container runtime costs the agent with many named
//! containers. A stand-in runtime (`nodeward_tests::cri_server`) lists N pods, one container
//! each, whose ids match a fake cgroupfs of N containers; the agent (`--agent`) runs against
//! them three times:
//! - `none`: `containers.runtime_endpoint = "none"`, a tick of 60 s (one scan, at start, before the window): the baseline;
//! - `named`: the stand-in runtime resynced every second, the same tick: the CPU above the
//!   baseline per resync, and the RSS above the baseline's;
//! - `ticks`: the stand-in runtime resynced every 60 s and a scan every 200 ms: the runtime
//!   calls made while the agent ticks (none are expected: the scan reads the identity table).

use std::{
    path::Path,
    process::{Child, Command, ExitCode, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use clap::Args;
use nodeward::containers::fixture::{write_tree, Driver, FixtureLayout, TempDir};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct IdentityArgs {
    /// The agent binary to measure.
    #[arg(long)]
    agent: std::path::PathBuf,
    /// Containers (and pods) listed by the stand-in runtime and in the fake cgroupfs.
    #[arg(long, default_value_t = 1000)]
    containers: usize,
    /// Length of each measured window, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

#[derive(Serialize)]
struct Report {
    containers: usize,
    seconds: f64,
    /// Agent CPU per second of the window (user + system), each run.
    cpu_per_second_none: f64,
    cpu_per_second_named: f64,
    /// Resyncs in the `named` window (listings: two runtime calls each).
    resyncs_named: f64,
    /// Agent RSS at the end of each window, in bytes.
    rss_none_bytes: f64,
    rss_named_bytes: f64,
    /// Runtime calls and agent ticks in the `ticks` window.
    calls_during_ticks: u64,
    ticks: f64,
}

fn rss_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb * 1024.0)
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(agent: &Path, dir: &Path, name: &str, sets: &[String]) -> std::io::Result<Agent> {
    let mut cmd = Command::new(agent);
    cmd.args(["run", "--config", "/dev/null"])
        .arg("--set")
        .arg(format!("paths.cgroup_root={}", dir.join("cg").display()))
        .args(["--set", "ebpf.enabled=false", "--set", "gpu.enabled=false"])
        .args(["--set", "metrics.enabled=false", "--set", "api.tcp_listen="])
        .args(["--set", "node.enabled=false"])
        // The TCP source runs without eBPF too (sock_diag): the host's other sockets, in cgroups
        // outside the fake tree, would make it walk and cache the 1,000-container tree at
        // whatever moments they come and go — megabytes unrelated to identity, different in
        // each run.
        .args(["--set", "tcp.enabled=false"])
        .arg("--set")
        .arg(format!(
            "api.unix_socket={}",
            dir.join(format!("{name}.sock")).display()
        ));
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.env("NODEWARD_LOG", "warn")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(Agent(cmd.spawn()?))
}

/// Waits `warmup`, then measures the agent's CPU and the runtime calls over `window`.
fn window(
    agent: &Agent,
    calls: &std::sync::atomic::AtomicU64,
    warmup: Duration,
    window: Duration,
) -> (f64, u64, f64) {
    std::thread::sleep(warmup);
    let pid = agent.0.id();
    let (cpu0, calls0, t0) = (
        nodeward_tests::process_cpu_seconds(pid),
        calls.load(Ordering::Relaxed),
        Instant::now(),
    );
    std::thread::sleep(window);
    let cpu = nodeward_tests::process_cpu_seconds(pid) - cpu0;
    let secs = t0.elapsed().as_secs_f64();
    (cpu / secs, calls.load(Ordering::Relaxed) - calls0, secs)
}

pub fn identity(args: &IdentityArgs) -> ExitCode {
    match run(args) {
        Ok(r) => crate::print(&r),
        Err(e) => crate::fail(e),
    }
}

fn run(args: &IdentityArgs) -> anyhow::Result<Report> {
    let dir = TempDir::new("nodeward-bench-identity")?;
    let written = write_tree(
        &dir.path.join("cg"),
        FixtureLayout::V2,
        Driver::Systemd,
        args.containers,
        0,
    )?;
    let ids: Vec<String> = written.iter().map(|w| w.container_id.clone()).collect();
    let rt = crate::runtime()?;
    let stop = CancellationToken::new();
    let socket = dir.path.join("cri.sock");
    let calls =
        rt.block_on(async { nodeward_tests::cri_server::serve(&socket, &ids, stop.clone()) })?;
    let endpoint = format!("containers.runtime_endpoint=unix://{}", socket.display());
    let len = Duration::from_secs(args.seconds);
    // A first scan and a first listing of 1,000 containers take well under this.
    let warmup = Duration::from_secs(4);

    let none = start(
        &args.agent,
        &dir.path,
        "none",
        &[
            "containers.runtime_endpoint=none".to_owned(),
            "agent.tick=60s".to_owned(),
        ],
    )?;
    let (cpu_none, _, _) = window(&none, &calls, warmup, len);
    let rss_none = rss_of(none.0.id());
    drop(none);

    let named = start(
        &args.agent,
        &dir.path,
        "named",
        &[
            endpoint.clone(),
            "containers.runtime_resync=1s".to_owned(),
            "agent.tick=60s".to_owned(),
        ],
    )?;
    let (cpu_named, named_calls, secs) = window(&named, &calls, warmup, len);
    let rss_named = rss_of(named.0.id());
    drop(named);

    let ticking = start(
        &args.agent,
        &dir.path,
        "ticks",
        &[
            endpoint,
            "containers.runtime_resync=60s".to_owned(),
            "agent.tick=200ms".to_owned(),
        ],
    )?;
    let (_, calls_during_ticks, tick_secs) = window(&ticking, &calls, warmup, len);
    drop(ticking);
    stop.cancel();

    Ok(Report {
        containers: args.containers,
        seconds: secs,
        cpu_per_second_none: cpu_none,
        cpu_per_second_named: cpu_named,
        // Each listing is ListPodSandbox + ListContainers.
        resyncs_named: named_calls as f64 / 2.0,
        rss_none_bytes: rss_none,
        rss_named_bytes: rss_named,
        calls_during_ticks,
        ticks: tick_secs / 0.2,
    })
}
