//! Which live streams a drain waits for (`[drain]` in the config).
//!
//! The network sources list every stream of a container with its direction; the drain waits for
//! the ones the container serves (and those whose direction is unknown: it must not read ready
//! on a guess). Outbound connections — a container's own connections to its database or cache —
//! are listed as dependencies and waited for only with `drain.wait_for_outbound`. Host cgroups
//! and the agent's own are left out earlier, by the bridge: they are not streams at all.

use serde::{Deserialize, Serialize};

use crate::store::{LiveStream, StreamDirection};

/// The `[drain]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// Whether a container's outbound TCP connections (its dependencies) hold a drain.
    pub wait_for_outbound: bool,
    /// Cgroup v2 paths of the host (`/`-prefixed) whose connections are never streams: each
    /// entry covers that cgroup and every cgroup below it, except `/`, which covers the root
    /// cgroup alone. Empty: every cgroup's connections count.
    pub host_cgroups: Vec<String>,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            wait_for_outbound: false,
            host_cgroups: [
                "/",
                "/init.scope",
                "/system.slice",
                "/user.slice",
                "/kubelet.slice",
                "/runtime.slice",
            ]
            .map(str::to_owned)
            .to_vec(),
        }
    }
}

impl DrainConfig {
    /// A config error in words, or `None`.
    pub fn check(&self) -> Option<String> {
        self.host_cgroups
            .iter()
            .find(|p| !p.starts_with('/'))
            .map(|p| format!("{p:?} is not a cgroup path starting with '/'"))
    }

    pub fn policy(&self) -> StreamPolicy {
        StreamPolicy {
            wait_for_outbound: self.wait_for_outbound,
        }
    }
}

/// What the drain waits for, from [`DrainConfig`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamPolicy {
    pub wait_for_outbound: bool,
}

impl StreamPolicy {
    /// Whether the drain waits for this stream to end.
    pub fn holds_drain(self, stream: &LiveStream) -> bool {
        match stream.direction {
            StreamDirection::Served | StreamDirection::Unknown => true,
            StreamDirection::Outbound => self.wait_for_outbound,
        }
    }

    /// How many of `streams` the drain waits for.
    pub fn held(self, streams: &[LiveStream]) -> u32 {
        let n = streams.iter().filter(|s| self.holds_drain(s)).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::SystemTime};

    use super::*;
    use crate::store::StreamProtocol;

    fn stream(direction: StreamDirection) -> LiveStream {
        let a: SocketAddr = "10.0.0.1:5432".parse().expect("addr");
        LiveStream {
            protocol: StreamProtocol::Tcp,
            direction,
            local: a,
            remote: a,
            started_at: SystemTime::UNIX_EPOCH,
            viewers: 0,
        }
    }

    #[test]
    fn outbound_connections_hold_the_drain_only_when_configured() {
        let streams = [
            stream(StreamDirection::Served),
            stream(StreamDirection::Outbound),
            stream(StreamDirection::Unknown),
        ];
        assert_eq!(StreamPolicy::default().held(&streams), 2);
        let all = StreamPolicy {
            wait_for_outbound: true,
        };
        assert_eq!(all.held(&streams), 3);
    }

    #[test]
    fn host_cgroup_entries_must_be_paths() {
        assert!(DrainConfig::default().check().is_none());
        let bad = DrainConfig {
            host_cgroups: vec!["system.slice".to_owned()],
            ..DrainConfig::default()
        };
        assert!(bad.check().is_some());
    }
}
