//! Sources collect and never decide. Each one that can run on this node is spawned into the
//! daemon's task set; one that cannot (no tracefs, not root, no GPU) logs why and the others
//! keep working.
//!
//! Every source runs the same way, through [`Source`] and [`supervised`]: started afresh for
//! each run (a panicked run may have left its state half-updated), restarted with back-off by
//! [`crate::supervise`], publishing into one channel that outlives its runs, so readers never
//! notice a restart except through its [`TaskHealth`]. Each source is handed only its own config
//! section and the [`Shared`] bits, never the root config.

use std::{sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    containers::ContainersConfig,
    paths::PathsConfig,
    probe::Capabilities,
    supervise::{TaskError, TaskHealth, TaskResult},
};

pub mod cgroup;
pub mod cgroup_path;
pub mod gpu;
pub mod node;
pub mod rates;
pub mod tcp;
pub mod udp;

/// What sources need besides their own section.
#[derive(Debug, Clone, PartialEq)]
pub struct Shared {
    /// `agent.tick`: how often sources read.
    pub tick: Duration,
    /// `[paths]`: the host's cgroup, proc, BTF and tracefs.
    pub paths: PathsConfig,
    /// `ebpf.enabled`: whether eBPF programs may be loaded at all.
    pub ebpf: bool,
    /// `network.windows`: the sliding windows the TCP and UDP sources keep, shortest first.
    pub windows: Vec<crate::store::Window>,
}

/// The config sections of every source, each handed only to its own source.
#[derive(Debug, Clone, PartialEq)]
pub struct Sections {
    pub tcp: tcp::TcpConfig,
    pub udp: udp::UdpConfig,
    pub gpu: gpu::GpuConfig,
    pub containers: ContainersConfig,
    pub node: node::NodeConfig,
    pub shared: Shared,
}

/// A task that runs under supervision, made afresh for every run.
pub trait Source: Sized + Send + 'static {
    /// The supervised task's name (`ebpf/tcp`, `gpu`, ...): in logs, conditions and metrics.
    const NAME: &'static str;
    /// What [`Source::start`] reads: the source's own config section and what it shares.
    type Settings: Send + 'static;
    /// What it publishes.
    type Snapshot: Send + Sync + 'static;
    /// Why it cannot start: on the first start, the reason it is unavailable on this node.
    type StartError: Into<Box<dyn std::error::Error + Send + Sync>>
        + std::fmt::Display
        + Send
        + 'static;

    /// Opens, attaches or checks what the source reads.
    fn start(settings: &Self::Settings) -> Result<Self, Self::StartError>;

    /// What readers see until the first run publishes.
    fn initial(&self) -> Self::Snapshot;

    /// Publishes into `out` until `cancel`; an early return or an error is a failure.
    fn run(
        self,
        out: watch::Sender<Self::Snapshot>,
        cancel: CancellationToken,
    ) -> impl std::future::Future<Output = Result<(), TaskError>> + Send;
}

/// A source running under supervision.
#[derive(Debug)]
pub struct Running<T> {
    /// What it publishes, across its restarts.
    pub snapshots: watch::Receiver<T>,
    /// Its restarts and last failure.
    pub health: watch::Receiver<TaskHealth>,
}

/// Starts `S` and spawns it into `tasks` under [`crate::supervise::spawn`]: each restart starts
/// a fresh `S` and publishes into the same channel; a run's own cancellation token is cancelled
/// when the run is dropped (a failed run's threads and eBPF links go with it). With the
/// `fault-injection` feature, the run goes through `crate::fault::inject`, counting the
/// snapshots it publishes. Fails, with the reason, when the first start fails.
pub fn supervised<S: Source>(
    settings: S::Settings,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<TaskResult>,
) -> Result<Running<S::Snapshot>, S::StartError> {
    let first = S::start(&settings)?;
    let (tx, snapshots) = watch::channel(first.initial());
    let (mut first, c) = (Some(first), cancel.clone());
    let health = crate::supervise::spawn(S::NAME, cancel, tasks, move || {
        let source = first.take().map_or_else(|| S::start(&settings), Ok);
        let (tx, cancel) = (tx.clone(), c.child_token());
        #[cfg(feature = "fault-injection")]
        let ticks = tx.subscribe();
        let run = async move {
            let _stop_with_the_run = cancel.clone().drop_guard();
            source.map_err(TaskError::failed)?.run(tx, cancel).await
        };
        #[cfg(feature = "fault-injection")]
        let run = crate::fault::inject(S::NAME, ticks, run);
        run
    });
    Ok(Running { snapshots, health })
}

/// What the started sources publish, for the health engine and the API to read.
#[derive(Debug, Default)]
pub struct Feeds {
    /// Names of the sources that started.
    pub started: Vec<&'static str>,
    /// Sources that could not start, with the reason.
    pub unavailable: Vec<(&'static str, String)>,
    pub tcp: Option<watch::Receiver<Arc<tcp::snapshot::TcpSnapshot>>>,
    pub udp: Option<watch::Receiver<udp::model::UdpSnapshot>>,
    pub gpu: Option<watch::Receiver<gpu::model::GpuSnapshot>>,
    /// Restarts and last failure of each task run under supervision: every source, and the
    /// health engine (the daemon adds it).
    pub supervised: Vec<(&'static str, watch::Receiver<TaskHealth>)>,
}

impl Feeds {
    /// Spawns `S`, recording it as started (returning what it publishes) or unavailable.
    fn spawn<S: Source>(
        &mut self,
        settings: S::Settings,
        cancel: &CancellationToken,
        tasks: &mut JoinSet<TaskResult>,
    ) -> Option<watch::Receiver<S::Snapshot>> {
        match supervised::<S>(settings, cancel, tasks) {
            Ok(running) => {
                self.started.push(S::NAME);
                self.supervised.push((S::NAME, running.health));
                Some(running.snapshots)
            }
            Err(reason) => {
                self.unavailable(S::NAME, reason.to_string());
                None
            }
        }
    }

    fn unavailable(&mut self, name: &'static str, reason: String) {
        tracing::warn!(source = name, %reason, "source unavailable");
        self.unavailable.push((name, reason));
    }
}

/// Starts every source the node supports.
pub fn start(
    sections: &Sections,
    caps: &Capabilities,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<TaskResult>,
) -> Feeds {
    let mut feeds = Feeds::default();
    let shared = &sections.shared;
    // TCP runs with eBPF disabled too: it then polls sock_diag.
    if sections.tcp.enabled {
        let settings = (sections.tcp.clone(), shared.clone(), caps.clone());
        feeds.tcp = feeds.spawn::<tcp::Source>(settings, cancel, tasks);
    }
    if !shared.ebpf {
        tracing::info!("eBPF sources disabled by config (ebpf.enabled = false)");
    } else if !sections.udp.enabled {
        tracing::info!("UDP/RTP source disabled by config (udp.enabled = false)");
    } else {
        let settings = (sections.udp.clone(), shared.clone(), caps.clone());
        feeds.udp = feeds.spawn::<udp::Source>(settings, cancel, tasks);
    }
    if sections.gpu.enabled {
        let settings = (sections.gpu.clone(), shared.clone());
        feeds.gpu = feeds.spawn::<gpu::Source>(settings, cancel, tasks);
    } else {
        tracing::info!("GPU source disabled by config (gpu.enabled = false)");
    }
    let settings = (
        sections.containers.clone(),
        sections.node.clone(),
        shared.clone(),
    );
    // Readers take the cgroup snapshots from `cgroup::latest()`.
    let _ = feeds.spawn::<cgroup::Source>(settings, cancel, tasks);
    feeds
}

/// Attaches the TCP programs (or the sock_diag poller) afresh on each run; a failed run's
/// programs and links are dropped with it.
impl Source for tcp::Source {
    const NAME: &'static str = tcp::NAME;
    /// `[tcp]`, the shared bits, and what the start-up probe found.
    type Settings = (tcp::TcpConfig, Shared, Capabilities);
    type Snapshot = Arc<tcp::TcpSnapshot>;
    type StartError = tcp::TcpError;

    fn start((tcp, shared, caps): &Self::Settings) -> Result<Self, tcp::TcpError> {
        tcp::Source::start(tcp, shared, caps).map(|(source, _)| source)
    }

    fn initial(&self) -> Self::Snapshot {
        Arc::new(tcp::TcpSnapshot::default())
    }

    async fn run(
        self,
        out: watch::Sender<Self::Snapshot>,
        cancel: CancellationToken,
    ) -> Result<(), TaskError> {
        self.publish_into(out)
            .run(cancel)
            .await
            .map_err(TaskError::failed)
    }
}

/// Attaches the UDP/RTP programs afresh on each run.
impl Source for udp::Source {
    const NAME: &'static str = udp::NAME;
    /// `[udp]`, `agent.tick`, and what the start-up probe found.
    type Settings = (udp::UdpConfig, Shared, Capabilities);
    type Snapshot = udp::model::UdpSnapshot;
    type StartError = String;

    fn start((udp, shared, caps): &Self::Settings) -> Result<Self, String> {
        udp::Source::start(udp, shared.tick, &shared.windows, caps)
    }

    fn initial(&self) -> Self::Snapshot {
        udp::model::UdpSnapshot::default()
    }

    async fn run(
        self,
        out: watch::Sender<Self::Snapshot>,
        cancel: CancellationToken,
    ) -> Result<(), TaskError> {
        udp::Source::run(self, out, cancel)
            .await
            .map_err(TaskError::failed)
    }
}

/// Opens NVML afresh on each run; the run's token stops its event thread when it fails.
impl Source for gpu::Source {
    const NAME: &'static str = gpu::NAME;
    /// `[gpu]` and the shared bits.
    type Settings = (gpu::GpuConfig, Shared);
    type Snapshot = gpu::model::GpuSnapshot;
    type StartError = gpu::GpuError;

    fn start((gpu, shared): &Self::Settings) -> Result<Self, gpu::GpuError> {
        gpu::Source::start(gpu, shared)
    }

    fn initial(&self) -> Self::Snapshot {
        self.subscribe().borrow().clone()
    }

    async fn run(
        self,
        out: watch::Sender<Self::Snapshot>,
        cancel: CancellationToken,
    ) -> Result<(), TaskError> {
        self.publish_into(out)
            .run(cancel)
            .await
            .map_err(TaskError::failed)
    }
}

/// Scans the cgroup tree; it publishes into `cgroup::latest()`, which a run copies into `out`.
impl Source for cgroup::Source {
    const NAME: &'static str = cgroup::NAME;
    /// `[containers]`, `[node]` and the shared bits.
    type Settings = (ContainersConfig, node::NodeConfig, Shared);
    type Snapshot = Arc<cgroup::Snapshot>;
    type StartError = String;

    fn start((containers, node, shared): &Self::Settings) -> Result<Self, String> {
        cgroup::Source::start(containers, node, shared)
    }

    fn initial(&self) -> Self::Snapshot {
        cgroup::latest().borrow().clone()
    }

    async fn run(
        self,
        out: watch::Sender<Self::Snapshot>,
        cancel: CancellationToken,
    ) -> Result<(), TaskError> {
        let mut latest = cgroup::latest();
        let copy = async {
            while latest.changed().await.is_ok() {
                out.send_replace(latest.borrow_and_update().clone());
            }
        };
        tokio::select! {
            result = cgroup::Source::run(self, cancel) => result.map_err(TaskError::failed),
            // The static sender is never dropped: this branch does not end.
            () = copy => Ok(()),
        }
    }
}
