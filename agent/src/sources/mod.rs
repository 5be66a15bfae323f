//! Sources collect and never decide. Each one that can run on this node is spawned into the
//! daemon's task set; one that cannot (no tracefs, not root, no GPU) logs why and the others
//! keep working.

use std::sync::Arc;

use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{config::Config, daemon::TaskResult, probe::Capabilities};

pub mod cgroup;
pub mod cgroup_path;
pub mod gpu;
pub mod node;
pub mod rates;
pub mod tcp;
pub mod udp;

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
    /// Restarts and last failure of each source run under `supervise` (every source).
    pub supervised: Vec<(&'static str, watch::Receiver<crate::supervise::TaskHealth>)>,
}

impl Feeds {
    fn unavailable(&mut self, name: &'static str, reason: String) {
        tracing::warn!(source = name, %reason, "source unavailable");
        self.unavailable.push((name, reason));
    }
}

/// Starts every source the node supports.
pub fn start(
    config: &Config,
    caps: &Capabilities,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<TaskResult>,
) -> Feeds {
    let mut feeds = Feeds::default();
    // TCP runs with eBPF disabled too: it then polls sock_diag.
    if config.tcp.enabled {
        match tcp::Source::start(config, caps) {
            Ok((source, _)) => {
                let (tx, rx) = watch::channel(Arc::new(tcp::TcpSnapshot::default()));
                // Restarted with back-off, publishing into the same channel. A failed run's
                // programs and links are dropped with it before the next run attaches afresh.
                let (mut first, config, caps, c) =
                    (Some(source), config.clone(), caps.clone(), cancel.clone());
                let health = crate::supervise::spawn(tcp::NAME, cancel, tasks, move || {
                    let source = first
                        .take()
                        .map_or_else(|| tcp::Source::start(&config, &caps).map(|(s, _)| s), Ok);
                    let (tx, cancel) = (tx.clone(), c.clone());
                    crate::fault::inject(tcp::NAME, tx.subscribe(), async move {
                        source
                            .map_err(|e| e.to_string())?
                            .publish_into(tx)
                            .run(cancel)
                            .await
                    })
                });
                feeds.started.push(tcp::NAME);
                feeds.tcp = Some(rx);
                feeds.supervised.push((tcp::NAME, health));
            }
            Err(reason) => feeds.unavailable(tcp::NAME, reason.to_string()),
        }
    }
    if !config.ebpf.enabled {
        tracing::info!("eBPF sources disabled by config (ebpf.enabled = false)");
    } else if !config.udp.enabled {
        tracing::info!("UDP/RTP source disabled by config (udp.enabled = false)");
    } else {
        match udp::Source::start(config, caps) {
            Ok(source) => {
                let (tx, rx) = watch::channel(udp::model::UdpSnapshot::default());
                // Restarted with back-off (programs attached afresh), publishing into the same
                // channel.
                let (mut first, config, caps, c) =
                    (Some(source), config.clone(), caps.clone(), cancel.clone());
                let health = crate::supervise::spawn(udp::NAME, cancel, tasks, move || {
                    let source = first
                        .take()
                        .map_or_else(|| udp::Source::start(&config, &caps), Ok);
                    let (tx, cancel) = (tx.clone(), c.clone());
                    crate::fault::inject(udp::NAME, tx.subscribe(), async move {
                        source?.run(tx, cancel).await
                    })
                });
                feeds.started.push(udp::NAME);
                feeds.udp = Some(rx);
                feeds.supervised.push((udp::NAME, health));
            }
            Err(reason) => feeds.unavailable(udp::NAME, reason),
        }
    }
    if !config.gpu.enabled {
        tracing::info!("GPU source disabled by config (gpu.enabled = false)");
    } else {
        match gpu::Source::start(config) {
            Ok(source) => {
                let (tx, rx) = watch::channel(source.subscribe().borrow().clone());
                // Restarted with back-off (NVML opened afresh), publishing into the same channel.
                let (mut first, config, c) = (Some(source), config.clone(), cancel.clone());
                let health = crate::supervise::spawn(gpu::NAME, cancel, tasks, move || {
                    let source = first.take().map_or_else(|| gpu::Source::start(&config), Ok);
                    // A run's own token: dropping a failed run cancels it, which stops that
                    // run's NVML event thread (otherwise it would wait for shutdown).
                    let (tx, cancel) = (tx.clone(), c.child_token());
                    crate::fault::inject(gpu::NAME, tx.subscribe(), async move {
                        let _stop_events = cancel.clone().drop_guard();
                        source
                            .map_err(|e| e.to_string())?
                            .publish_into(tx)
                            .run(cancel)
                            .await
                    })
                });
                feeds.gpu = Some(rx);
                feeds.started.push(gpu::NAME);
                feeds.supervised.push((gpu::NAME, health));
            }
            // The reason reads "GPU source unavailable: <why>".
            Err(reason) => feeds.unavailable(gpu::NAME, reason.to_string()),
        }
    }
    match cgroup::Source::start(config) {
        Ok(source) => {
            // Restarted with back-off if it fails or panics, as a fresh source each time.
            let (mut first, config, c) = (Some(source), config.clone(), cancel.clone());
            let health = crate::supervise::spawn(cgroup::NAME, cancel, tasks, move || {
                let source = first
                    .take()
                    .map_or_else(|| cgroup::Source::start(&config), Ok);
                let cancel = c.clone();
                crate::fault::inject(cgroup::NAME, cgroup::latest(), async move {
                    source?.run(cancel).await
                })
            });
            feeds.started.push(cgroup::NAME);
            feeds.supervised.push((cgroup::NAME, health));
        }
        Err(reason) => feeds.unavailable(cgroup::NAME, reason.to_string()),
    }
    feeds
}
