//! The collector (kernel maps or sock_diag polls → sliding windows → snapshot) and the daemon
//! task around it.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    diag, ensure_cgroup2, plan, reader, window, Plan, Recorder, TcpConfig, TcpError, TcpSnapshot,
};
use crate::{config::Config, probe::Capabilities};

/// Where the counters come from.
#[derive(Debug)]
enum Input {
    Ebpf(reader::Reader),
    Diag(Box<diag::Poller>),
}

/// The collector without the task around it: attach, then call [`Collector::tick`]. The
/// integration tests drive it directly.
#[derive(Debug)]
pub struct Collector {
    input: Input,
    tracker: window::Tracker,
    paths: crate::sources::cgroup_path::CgroupPaths,
}

impl Collector {
    pub fn attach(
        cgroup_root: &std::path::Path,
        config: &TcpConfig,
        plan: &Plan,
        tick: Duration,
    ) -> Result<Self, TcpError> {
        if plan.mount_cgroup2 {
            ensure_cgroup2(cgroup_root)?;
        }
        let input = if plan.recorder == Recorder::SockDiag {
            Input::Diag(Box::new(diag::Poller::new(&plan.proc_root, config)))
        } else {
            Input::Ebpf(reader::Reader::attach(cgroup_root, config, plan)?)
        };
        let tracker = window::Tracker::new(window::Limits {
            windows: config.windows(tick),
            max_peers: usize::try_from(config.max_peers).unwrap_or(usize::MAX),
            path: plan.path().to_owned(),
            attribution: plan.attribution().to_owned(),
        });
        Ok(Self {
            input,
            tracker,
            // Namespace cookies are not cgroup inodes: nothing to resolve.
            paths: crate::sources::cgroup_path::CgroupPaths::new(
                (plan.recorder != Recorder::Netns).then(|| cgroup_root.to_path_buf()),
            ),
        })
    }

    /// Entries in the kernel maps (flows, cgroups, histogram) and the tracker's own sizes.
    pub fn footprint(&self) -> Result<(reader::MapUsage, window::TrackerFootprint), TcpError> {
        let usage = match &self.input {
            Input::Ebpf(r) => r.usage()?,
            Input::Diag(p) => p.usage(),
        };
        Ok((usage, self.tracker.footprint()))
    }

    /// Reads the maps once, advances the windows, and returns the new snapshot.
    pub fn tick(&mut self) -> Result<TcpSnapshot, TcpError> {
        let raw = match &mut self.input {
            Input::Ebpf(r) => r.read()?,
            Input::Diag(p) => p.read(reader::monotonic_ns()),
        };
        let live: Vec<u64> = raw.stats.iter().map(|s| s.0).collect();
        self.paths.next_tick(&live);
        let paths = &mut self.paths;
        let (snapshot, cleanup) = self.tracker.update(raw, &mut |id| paths.resolve(id));
        match &mut self.input {
            Input::Ebpf(r) => r.clean(&cleanup)?,
            Input::Diag(p) => p.clean(&cleanup),
        }
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
        // With eBPF turned off by config, only the sock_diag poller may run.
        let attribution = if config.ebpf.enabled {
            config.tcp.attribution
        } else {
            super::Attribution::SockDiag
        };
        let (root, mut plan) = plan(caps, attribution)?;
        plan.proc_root.clone_from(&config.paths.proc_root);
        let collector = Collector::attach(&root, &config.tcp, &plan, config.agent.tick)?;
        tracing::info!(path = plan.path(), cgroup_root = %root.display(), "TCP latency source started");
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

    /// Publishes into `tx` instead of the channel `start` made, so that a restarted source
    /// feeds the readers of the one before it.
    pub fn publish_into(self, tx: watch::Sender<Arc<TcpSnapshot>>) -> Self {
        Self { tx, ..self }
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
