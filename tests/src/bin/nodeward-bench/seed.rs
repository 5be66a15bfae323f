//! The TCP source's start-up seed (`agent/src/sources/tcp/seed.rs`) at scale, for `cargo xtask
//! bench` (scenario `TCP start-up seed`): child processes hold N loopback connections (2N
//! established sockets, `hold.rs`), then this process runs the agent's own `Seed` as the TCP
//! source does on its first read — a sock_diag dump of every network namespace, the sockets
//! kept by cookie — and then as on each later tick while any of them is open (a dump again, to
//! see them close). Wall and CPU time of each, and the growth of the peak resident memory
//! during the first.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use clap::Args;
use nodeward::sources::tcp::{seed::Seed, window::RawRead};
use serde::Serialize;

use crate::{fail, hold::Holders, print};

#[derive(Debug, Clone, Args)]
pub struct SeedArgs {
    /// Loopback connections to hold open (each is two established sockets).
    #[arg(long, default_value_t = 50_000)]
    pub connections: usize,
    /// Later ticks (re-dumps) to time after the first read.
    #[arg(long, default_value_t = 5)]
    pub ticks: usize,
}

#[derive(Serialize)]
struct SeedReport {
    connections: usize,
    /// Flows the first read held (established sockets of every namespace, this one's 2N among
    /// them).
    seeded_flows: usize,
    first_wall_seconds: f64,
    first_cpu_seconds: f64,
    /// Growth of the peak resident set (VmHWM, reset just before) over the first read.
    first_peak_growth_bytes: f64,
    tick_wall_seconds: Vec<f64>,
    tick_cpu_seconds: Vec<f64>,
    tick_flows: Vec<usize>,
}

/// This process's CPU time: the seed dumps from a thread of its own.
fn cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

fn status_bytes(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb * 1024.0)
}

pub fn seed(args: &SeedArgs) -> ExitCode {
    let held = match Holders::start(args.connections, None) {
        Ok(h) => h,
        Err(e) => return fail(format!("open {} connections: {e}", args.connections)),
    };
    let mut seed = Seed::new(PathBuf::from("/proc"), PathBuf::from("/sys/fs/cgroup"));
    // Reset the peak resident set ("5" to clear_refs) so that VmHWM after the read is its peak.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = status_bytes("VmRSS:");
    let raw = RawRead::default();
    let (wall, cpu) = (Instant::now(), cpu_seconds());
    seed.fill(&raw);
    // The flows as the tracker takes them (`Tracker::update_with`), made one at a time.
    let seeded_flows = seed.flows().count();
    let mut report = SeedReport {
        connections: args.connections,
        seeded_flows,
        first_wall_seconds: wall.elapsed().as_secs_f64(),
        first_cpu_seconds: cpu_seconds() - cpu,
        first_peak_growth_bytes: status_bytes("VmHWM:") - rss_before,
        tick_wall_seconds: Vec::new(),
        tick_cpu_seconds: Vec::new(),
        tick_flows: Vec::new(),
    };
    for _ in 0..args.ticks {
        let (wall, cpu) = (Instant::now(), cpu_seconds());
        seed.fill(&raw);
        let flows = seed.flows().count();
        report.tick_wall_seconds.push(wall.elapsed().as_secs_f64());
        report.tick_cpu_seconds.push(cpu_seconds() - cpu);
        report.tick_flows.push(flows);
    }
    drop(held);
    print(&report)
}
