//! TCP state transitions per cgroup, from the `sock:inet_sock_set_state` tracepoint.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{config::Config, ebpf::TcpStateCounter, probe::Capabilities};

pub const NAME: &str = "ebpf/tcp_state";

pub struct Source {
    counter: TcpStateCounter,
    tick: Duration,
}

impl Source {
    /// Loads and attaches the program, or says why it cannot run on this node.
    pub fn start(config: &Config, caps: &Capabilities) -> Result<Self, String> {
        if !caps.is_root {
            return Err("not running as root (CAP_BPF and CAP_PERFMON are needed)".to_owned());
        }
        let tracefs = caps
            .tracefs
            .as_deref()
            .ok_or_else(|| "tracefs is not mounted".to_owned())?;
        if !caps.has_tracepoint("sock:inet_sock_set_state") {
            return Err("tracepoint sock:inet_sock_set_state is missing".to_owned());
        }
        let counter = TcpStateCounter::attach(tracefs).map_err(|e| e.to_string())?;
        tracing::info!(program = "nodeward_tcp_state", "attached to sock:inet_sock_set_state");
        Ok(Self {
            counter,
            tick: config.agent.tick,
        })
    }

    /// Reads the map on every tick until cancelled; the program is detached when this returns.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), String> {
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    let counts = self.counter.counts().map_err(|e| e.to_string())?;
                    let total: u64 = counts.values().sum();
                    let cgroups = counts.keys().map(|k| k.cgroup_id).collect::<std::collections::HashSet<_>>().len();
                    tracing::debug!(total, cgroups, "tcp state transitions");
                }
            }
        }
        drop(self.counter);
        tracing::debug!(program = "nodeward_tcp_state", "detached");
        Ok(())
    }
}
