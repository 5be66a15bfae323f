//! Per-container TCP round-trip time, jitter, retransmits and connection life, from eBPF.
//!
//! Hook chain (chosen from the start-up probe, see `docs/tcp-latency.md`):
//! 1. `sock_ops+sk_storage`: a `cgroup/sock_create` program records each socket's cgroup in
//!    socket-local storage (inherited by accepted sockets), and a `sock_ops` program takes every
//!    RTT measurement (`BPF_SOCK_OPS_RTT_CB`), retransmit and state change, attributing each to
//!    the socket's recorded cgroup. Raw per-ACK RTTs on kernels ≥ 6.10, the smoothed srtt after
//!    each measurement before that (the snapshot's `fidelity` says which).
//! 2. Otherwise the source reports itself unavailable with the reason (the tracepoint and
//!    `sock_diag` fallbacks are not built yet).
//!
//! The kernel aggregates (per-CPU, per-cgroup histograms and counters; per-flow state in an LRU
//! map); this task reads the maps every `agent.tick`, keeps sliding windows, and publishes a
//! [`TcpSnapshot`] on a `watch` channel for the API.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{config::Config, probe::Capabilities};

pub mod cgroup_path;
pub mod config;
pub mod hist;
pub mod reader;
pub mod snapshot;
pub mod window;

pub use config::TcpConfig;
pub use snapshot::TcpSnapshot;

pub const NAME: &str = "ebpf/tcp";
/// The hook chain this build uses when the probe allows it.
pub const PATH: &str = "sock_ops+sk_storage";

#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("not running as root (CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON are needed)")]
    NotRoot,
    #[error("no cgroup v2 hierarchy: socket cgroups cannot be recorded (the v1 network-namespace fallback is not built yet)")]
    NoCgroupV2,
    #[error("kernel lacks {0}, needed by the sock_ops+sk_storage path (kernel ≥ 5.11)")]
    Missing(&'static str),
    #[error(transparent)]
    Reader(#[from] reader::ReaderError),
}

/// Checks the probe for everything the primary path needs.
pub fn check_capabilities(caps: &Capabilities) -> Result<std::path::PathBuf, TcpError> {
    if !caps.is_root {
        return Err(TcpError::NotRoot);
    }
    let root = caps
        .cgroup
        .unified()
        .ok_or(TcpError::NoCgroupV2)?
        .to_path_buf();
    for (kind, name) in [("program", "sock_ops"), ("program", "cgroup_sock")] {
        if kind == "program" && !caps.has_program_type(name) {
            return Err(TcpError::Missing(if name == "sock_ops" {
                "the sock_ops program type"
            } else {
                "the cgroup_sock program type"
            }));
        }
    }
    for (helper, what) in [
        ("sock_ops/sk_storage_get", "bpf_sk_storage_get in sock_ops"),
        (
            "cgroup_sock/sk_storage_get",
            "bpf_sk_storage_get in cgroup/sock_create",
        ),
        (
            "cgroup_sock/get_current_cgroup_id",
            "bpf_get_current_cgroup_id in cgroup/sock_create",
        ),
    ] {
        if !caps.helpers.get(helper).is_some_and(|f| f.available) {
            return Err(TcpError::Missing(what));
        }
    }
    Ok(root)
}

/// The collector without the task around it: attach, then call [`Collector::tick`]. The
/// integration tests drive it directly.
#[derive(Debug)]
pub struct Collector {
    reader: reader::Reader,
    tracker: window::Tracker,
    paths: cgroup_path::CgroupPaths,
}

impl Collector {
    pub fn attach(
        cgroup_root: &std::path::Path,
        config: &TcpConfig,
        tick: Duration,
    ) -> Result<Self, TcpError> {
        let reader = reader::Reader::attach(cgroup_root, config)?;
        let tracker = window::Tracker::new(window::Limits {
            windows: config.windows(tick),
            max_peers: usize::try_from(config.max_peers).unwrap_or(usize::MAX),
        });
        Ok(Self {
            reader,
            tracker,
            paths: cgroup_path::CgroupPaths::new(Some(cgroup_root.to_path_buf())),
        })
    }

    /// Reads the maps once, advances the windows, and returns the new snapshot.
    pub fn tick(&mut self) -> Result<TcpSnapshot, TcpError> {
        let raw = self.reader.read()?;
        let live: Vec<u64> = raw.stats.iter().map(|s| s.0).collect();
        self.paths.next_tick(&live);
        let paths = &mut self.paths;
        let (snapshot, cleanup) = self.tracker.update(raw, &mut |id| paths.resolve(id));
        self.reader.clean(&cleanup)?;
        Ok(snapshot)
    }
}

pub struct Source {
    collector: Collector,
    tick: Duration,
    tx: watch::Sender<Arc<TcpSnapshot>>,
}

impl Source {
    /// Attaches the programs, or says why this node cannot run them. The receiver always
    /// holds the latest snapshot.
    pub fn start(
        config: &Config,
        caps: &Capabilities,
    ) -> Result<(Self, watch::Receiver<Arc<TcpSnapshot>>), TcpError> {
        let root = check_capabilities(caps)?;
        let collector = Collector::attach(&root, &config.tcp, config.agent.tick)?;
        tracing::info!(path = PATH, cgroup_root = %root.display(), "TCP latency programs attached");
        let (tx, rx) = watch::channel(Arc::new(TcpSnapshot::default()));
        Ok((
            Self {
                collector,
                tick: config.agent.tick,
                tx,
            },
            rx,
        ))
    }

    /// Reads on every tick until cancelled; the programs are detached when this returns.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), String> {
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    let snapshot = self.collector.tick().map_err(|e| e.to_string())?;
                    tracing::debug!(containers = snapshot.containers.len(), sample = %snapshot.fidelity.rtt_sample, "tcp tick");
                    self.tx.send_replace(Arc::new(snapshot));
                }
            }
        }
        Ok(())
    }
}
