//! Sources collect and never decide. Each one that can run on this node is spawned into the
//! daemon's task set; one that cannot (no tracefs, not root, no GPU) logs why and the others
//! keep working.

use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{config::Config, daemon::TaskResult, probe::Capabilities};

pub mod cgroup_paths;
pub mod gpu;
pub mod tcp_state;
pub mod udp;

/// What the started sources publish, for the health engine and the API to read.
#[derive(Debug, Default)]
pub struct Feeds {
    /// Names of the sources that started.
    pub started: Vec<&'static str>,
    /// Sources that could not start, with the reason.
    pub unavailable: Vec<(&'static str, String)>,
    pub udp: Option<watch::Receiver<udp::model::UdpSnapshot>>,
    pub gpu: Option<watch::Receiver<gpu::model::GpuSnapshot>>,
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
    if config.ebpf.enabled {
        start_ebpf(config, caps, cancel, tasks, &mut feeds);
    } else {
        tracing::info!("eBPF sources disabled by config (ebpf.enabled = false)");
    }
    if !config.gpu.enabled {
        tracing::info!("GPU source disabled by config (gpu.enabled = false)");
    } else {
        match gpu::Source::start(config) {
            Ok(source) => {
                feeds.gpu = Some(source.subscribe());
                let cancel = cancel.clone();
                tasks.spawn(async move { (gpu::NAME, source.run(cancel).await) });
                feeds.started.push(gpu::NAME);
            }
            // The reason reads "GPU source unavailable: <why>".
            Err(reason) => feeds.unavailable(gpu::NAME, reason.to_string()),
        }
    }
    feeds
}

fn start_ebpf(
    config: &Config,
    caps: &Capabilities,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<TaskResult>,
    feeds: &mut Feeds,
) {
    match tcp_state::Source::start(config, caps) {
        Ok(source) => {
            let cancel = cancel.clone();
            tasks.spawn(async move { (tcp_state::NAME, source.run(cancel).await) });
            feeds.started.push(tcp_state::NAME);
        }
        Err(reason) => feeds.unavailable(tcp_state::NAME, reason),
    }
    if !config.udp.enabled {
        tracing::info!("UDP/RTP source disabled by config (udp.enabled = false)");
        return;
    }
    match udp::Source::start(config, caps) {
        Ok(source) => {
            let (tx, rx) = watch::channel(udp::model::UdpSnapshot::default());
            let cancel = cancel.clone();
            tasks.spawn(async move { (udp::NAME, source.run(tx, cancel).await) });
            feeds.started.push(udp::NAME);
            feeds.udp = Some(rx);
        }
        Err(reason) => feeds.unavailable(udp::NAME, reason),
    }
}
