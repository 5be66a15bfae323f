//! Collector and API figures for `cargo xtask bench` (scenarios `cgroup scan scaling` and `API
//! latency and Watch memory`):
//!
//! - `scan`: one cgroup scan of a fake cgroupfs of N containers (the fixture the tests use),
//!   repeated; CPU time per scan from the thread's own rusage, and resident memory after the
//!   first and the last scan, to show it stays flat.
//! - `api`: `GetNodeHealth` from C concurrent callers, each on its own connection to the
//!   agent's socket; latency percentiles.
//! - `watch`: holds N `WatchNodeHealth` streams open; says `ready` on stdout once every stream
//!   has its first message, so the caller can read the agent's memory meanwhile.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Args;
use nodeward::{
    api::pb::{self, node_health_client::NodeHealthClient},
    client::ClientError,
    config::Config,
    containers::fixture::{write_tree, Driver, FixtureLayout, TempDir},
    sources::cgroup::Scanner,
};
use serde::Serialize;

use crate::{conn, fail, print, runtime};

#[derive(Debug, Clone, Args)]
pub struct ScanArgs {
    /// Containers in the fake cgroupfs.
    #[arg(long, default_value_t = 1000)]
    pub containers: usize,
    /// Scans to run (the first one, which also fills the rate history, is included).
    #[arg(long, default_value_t = 20)]
    pub scans: usize,
    /// How old a quiet container's full read may get (the agent's bound); 0s reads every file
    /// of every container on every scan.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub full_read_every: Duration,
    /// Move every container's CPU counter before each scan (untimed), so that none is quiet.
    #[arg(long)]
    pub busy: bool,
    /// Walk the hierarchies on every scan rather than when they changed (the scan as it was).
    #[arg(long)]
    pub walk_every_scan: bool,
    /// Time from the start of one scan to the start of the next, as the agent's tick (0s: back
    /// to back). With 1s and more than 300 scans the rate history reaches its longest window
    /// (5 min), so `rss_bytes` shows whether memory levels off there.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Agent address, as for the client subcommands.
    #[arg(long)]
    pub addr: String,
    /// Concurrent callers, each on its own connection.
    #[arg(long, default_value_t = 100)]
    pub callers: usize,
    /// Calls per second per caller; 0 = each caller calls again as soon as it has an answer
    /// (closed loop: measures saturation rather than latency at a given load).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// How long the callers call.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    #[arg(long)]
    pub addr: String,
    /// Streams to hold.
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// Connections the streams share (HTTP/2 multiplexes them).
    #[arg(long, default_value_t = 10)]
    pub connections: usize,
    /// How long to hold them after `ready`.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
}

/// This thread's user + system CPU time, in seconds (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// Resident set size now (VmRSS), in bytes.
fn rss_bytes() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb * 1024.0)
}

#[derive(Serialize)]
struct ScanReport {
    containers: usize,
    workloads_found: usize,
    /// CPU seconds (user + system) of each scan.
    cpu_seconds: Vec<f64>,
    /// Wall seconds of each scan.
    wall_seconds: Vec<f64>,
    rss_after_first_bytes: f64,
    rss_after_last_bytes: f64,
    /// Resident memory after each scan.
    rss_bytes: Vec<f64>,
}

pub fn scan(config: &Config, args: &ScanArgs) -> ExitCode {
    let dir = match TempDir::new("nodeward-bench-scan") {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    // Pure v2 with the systemd driver: the layout of the production hosts.
    let written = match write_tree(
        &dir.path,
        FixtureLayout::V2,
        Driver::Systemd,
        args.containers,
        4,
    ) {
        Ok(w) => w,
        Err(e) => return fail(format!("write the fake cgroupfs: {e}")),
    };
    let mut config = config.clone();
    config.paths.cgroup_root = dir.path.clone();
    config.containers.enabled = true;
    let mut scanner = match Scanner::new(&config.containers, &config.node, &config.paths) {
        Ok(s) if args.walk_every_scan => s
            .with_full_read_every(args.full_read_every)
            .walking_every_scan(),
        Ok(s) => s.with_full_read_every(args.full_read_every),
        Err(e) => return fail(e),
    };
    let mut report = ScanReport {
        containers: args.containers,
        workloads_found: 0,
        cpu_seconds: Vec::new(),
        wall_seconds: Vec::new(),
        rss_after_first_bytes: f64::NAN,
        rss_after_last_bytes: f64::NAN,
        rss_bytes: Vec::new(),
    };
    let mut next = Instant::now();
    for i in 0..args.scans.max(1) {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += args.interval;
        if args.busy {
            for w in &written {
                let usec = w.cpu_usage_ns / 1000 + u64::try_from(i).unwrap_or(0);
                let text = format!("usage_usec {usec}\nuser_usec {usec}\nsystem_usec 0\n");
                if let Err(e) = std::fs::write(dir.path.join(&w.path).join("cpu.stat"), text) {
                    return fail(format!("move a CPU counter: {e}"));
                }
            }
        }
        let (cpu0, wall0) = (thread_cpu_seconds(), Instant::now());
        let snap = scanner.scan(Instant::now());
        report.cpu_seconds.push(thread_cpu_seconds() - cpu0);
        report.wall_seconds.push(wall0.elapsed().as_secs_f64());
        report.workloads_found = snap.workloads.len();
        drop(snap);
        report.rss_bytes.push(rss_bytes());
        if i == 0 {
            report.rss_after_first_bytes = rss_bytes();
        }
    }
    report.rss_after_last_bytes = rss_bytes();
    print(&report)
}

#[derive(Serialize)]
struct ApiReport {
    callers: usize,
    calls: usize,
    errors: usize,
    calls_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

pub fn api(default_socket: &std::path::Path, args: &ApiArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    let socket = default_socket.to_path_buf();
    let result = rt.block_on(async {
        let mut clients = Vec::with_capacity(args.callers);
        for _ in 0..args.callers {
            clients.push(nodeward::client::connect(&conn(&args.addr), &socket).await?);
        }
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + args.duration;
        let mut tasks = tokio::task::JoinSet::new();
        let period = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
        for (i, mut c) in clients.into_iter().enumerate() {
            tasks.spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0usize;
                let mut tick = period.map(|p| {
                    // Spread the callers over the period so that they do not call in bursts.
                    let offset = p.mul_f64(i as f64 / 100.0 % 1.0);
                    tokio::time::interval_at(tokio::time::Instant::now() + offset, p)
                });
                while tokio::time::Instant::now() < deadline {
                    if let Some(t) = tick.as_mut() {
                        t.tick().await;
                    }
                    let t = Instant::now();
                    match c.get_node_health(pb::GetNodeHealthRequest {}).await {
                        Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            });
        }
        let mut lat = Vec::new();
        let mut errors = 0;
        while let Some(r) = tasks.join_next().await {
            let (l, e) = r.map_err(|e| ClientError::Usage(e.to_string()))?;
            lat.extend(l);
            errors += e;
        }
        Ok::<_, ClientError>((lat, errors, started.elapsed()))
    });
    let (mut lat, errors, elapsed) = match result {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize]
        }
    };
    print(&ApiReport {
        callers: args.callers,
        calls: lat.len(),
        errors,
        calls_per_second: lat.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
    })
}

#[derive(Serialize)]
struct WatchReport {
    streams: usize,
    /// Streams that received their first message.
    opened: usize,
    seconds_to_open: f64,
}

pub fn watch(default_socket: &std::path::Path, args: &WatchArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    let socket: PathBuf = default_socket.to_path_buf();
    let result = rt.block_on(async {
        let mut clients: Vec<NodeHealthClient<_>> = Vec::new();
        for _ in 0..args.connections.max(1) {
            clients.push(nodeward::client::connect(&conn(&args.addr), &socket).await?);
        }
        let started = Instant::now();
        let mut streams = Vec::with_capacity(args.streams);
        let mut opened = 0;
        for i in 0..args.streams {
            let mut c = clients[i % clients.len()].clone();
            let mut s = c
                .watch_node_health(pb::WatchNodeHealthRequest {
                    heartbeat_seconds: 0,
                })
                .await?
                .into_inner();
            if s.message().await?.is_some() {
                opened += 1;
            }
            streams.push(s);
        }
        let seconds_to_open = started.elapsed().as_secs_f64();
        println!("ready");
        tokio::time::sleep(args.hold).await;
        drop(streams);
        Ok::<_, ClientError>(WatchReport {
            streams: args.streams,
            opened,
            seconds_to_open,
        })
    });
    match result {
        Ok(r) => print(&r),
        Err(e) => fail(e),
    }
}
