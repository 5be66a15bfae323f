//! Per-workload cgroup stats (CPU, throttling, memory, OOM, IO, PIDs, PSI), v2 and v1, and the
//! source task that scans workloads and the node on every tick.
//!
//! The latest [`Snapshot`] is published on a `tokio::sync::watch` channel that any module can
//! read with [`latest`]: the API and the health rules read it, the eBPF sources use its
//! inventory to turn cgroup ids and network namespaces into containers.

use std::{
    sync::{Arc, LazyLock},
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    containers::ContainersConfig,
    sources::{node::NodeConfig, Shared},
};

pub mod parse;
pub mod read;
pub mod scan;

pub use read::{CgroupStats, Reader};
pub use scan::{Scanner, Snapshot, Workload};

pub const NAME: &str = "cgroup";

static LATEST: LazyLock<watch::Sender<Arc<Snapshot>>> =
    LazyLock::new(|| watch::channel(Arc::new(Snapshot::default())).0);

/// The latest snapshot, and a way to wait for the next one. Before the first scan it holds an
/// empty snapshot (`taken_at` at the epoch).
pub fn latest() -> watch::Receiver<Arc<Snapshot>> {
    LATEST.subscribe()
}

pub struct Source {
    scanner: Scanner,
    tick: Duration,
}

impl Source {
    /// Says why the source cannot run: both parts disabled, or no cgroup hierarchy at the root.
    pub fn start(
        containers: &ContainersConfig,
        node: &NodeConfig,
        shared: &Shared,
    ) -> Result<Self, String> {
        if !containers.enabled && !node.enabled {
            return Err(
                "disabled by config (containers.enabled = false, node.enabled = false)".to_owned(),
            );
        }
        let scanner = Scanner::new(containers, node, &shared.paths).map_err(|e| {
            format!("{e} (set paths.cgroup_root, or containers.enabled = false to keep node stats)")
        })?;
        if let Some(layout) = scanner.layout() {
            tracing::info!(?layout, "cgroup layout");
        }
        Ok(Self {
            scanner,
            tick: shared.tick,
        })
    }

    /// Scans on every tick until cancelled. The scan reads many small files, so it runs on the
    /// blocking pool rather than stalling the runtime's workers.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), String> {
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut scanner = Some(self.scanner);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                at = tick.tick() => {
                    let Some(mut s) = scanner.take() else { break };
                    let at: Instant = at.into_std();
                    let (s, snap) = tokio::task::spawn_blocking(move || {
                        let snap = s.scan(at);
                        (s, snap)
                    })
                    .await
                    .map_err(|e| format!("scan task: {e}"))?;
                    scanner = Some(s);
                    log_summary(&snap);
                    LATEST.send_replace(Arc::new(snap));
                }
            }
        }
        Ok(())
    }
}

fn log_summary(s: &Snapshot) {
    let cores = s
        .workloads
        .iter()
        .filter_map(|w| w.rates.cpu[0])
        .fold(0.0, |a, b| a + b);
    let memory: u64 = s
        .workloads
        .iter()
        .filter_map(|w| w.stats.memory.current_bytes)
        .sum();
    tracing::debug!(
        workloads = s.workloads.len(),
        vanished = s.vanished,
        quiet = s.quiet,
        cpu_cores_10s = format_args!("{cores:.2}"),
        memory_mib = memory >> 20,
        node_cpu_busy_10s = format_args!("{:.2}", s.node_rates.cpu_busy[0].unwrap_or(0.0)),
        clock_synchronized = ?s.node.as_ref().and_then(|n| n.clock.as_ref()).map(|c| c.synchronized),
        scan_ms = format_args!("{:.1}", s.scan_duration.as_secs_f64() * 1e3),
        parse_errors = s.parse_errors,
        "cgroup and node scan"
    );
}
