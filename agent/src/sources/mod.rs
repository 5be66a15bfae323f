//! Sources collect and never decide. Each one that can run on this node is spawned into the
//! daemon's task set; one that cannot (no tracefs, not root, no GPU) logs why and the others
//! keep working.

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{config::Config, daemon::TaskResult, probe::Capabilities};

pub mod cgroup;
pub mod node;
pub mod rates;
pub mod tcp_state;

/// Starts every source the node supports; returns the names of those started.
pub fn start(
    config: &Config,
    caps: &Capabilities,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<TaskResult>,
) -> Vec<&'static str> {
    let mut started = Vec::new();
    if !config.ebpf.enabled {
        tracing::info!("eBPF sources disabled by config (ebpf.enabled = false)");
    } else {
        match tcp_state::Source::start(config, caps) {
            Ok(source) => {
                let cancel = cancel.clone();
                tasks.spawn(async move { (tcp_state::NAME, source.run(cancel).await) });
                started.push(tcp_state::NAME);
            }
            Err(reason) => tracing::warn!(source = tcp_state::NAME, %reason, "source unavailable"),
        }
    }
    match cgroup::Source::start(config) {
        Ok(source) => {
            let cancel = cancel.clone();
            tasks.spawn(async move { (cgroup::NAME, source.run(cancel).await) });
            started.push(cgroup::NAME);
        }
        Err(reason) => tracing::warn!(source = cgroup::NAME, %reason, "source unavailable"),
    }
    started
}
