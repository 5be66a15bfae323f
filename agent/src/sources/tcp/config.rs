//! The `[tcp]` config section: the bounds on kernel maps and peers (the windows are
//! `[network] windows`).

use serde::{Deserialize, Serialize};

/// How a socket's cgroup is recorded for the sock_ops program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attribution {
    /// `sock_create` where the kernel allows it, else `egress`; `netns` on cgroup-v1 hosts;
    /// `sock_diag` where no eBPF path fits.
    Auto,
    /// A `cgroup/sock_create` program stores the creating task's cgroup (needs socket storage
    /// in cgroup/sock programs: the probe checks; Debian's 5.10.223 has it, see docs/kernels.md).
    SockCreate,
    /// A `cgroup_skb/egress` program stores the cgroup of the socket that sends a packet
    /// (works on 5.10; costs a helper call per packet sent).
    Egress,
    /// Key by the socket's network namespace instead of its cgroup: what `auto` uses on hosts
    /// with cgroup v1 only, where every socket sits in the one cgroup2 root (pods still have a
    /// namespace each).
    Netns,
    /// No eBPF: poll every network namespace's sockets through netlink sock_diag each tick
    /// (smoothed RTT only, connections shorter than a tick unseen); `auto` falls back to it.
    SockDiag,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    /// Measure TCP RTT, jitter, retransmits and connections per container (needs eBPF).
    pub enabled: bool,
    /// How sockets are tied to their cgroup: `auto`, `sock_create` or `egress`.
    pub attribution: Attribution,
    /// Containers (cgroups) the kernel keeps counters for; more are counted as dropped.
    pub max_cgroups: u32,
    /// Connections tracked at once (LRU: the least recently active make room). Each entry
    /// costs 208 bytes of kernel memory (charged to the agent's memory cgroup).
    pub max_flows: u32,
    /// (cgroup, histogram bucket) pairs; a container usually needs 5 to 30.
    pub max_hist_entries: u32,
    /// Distinct remote address:port per container before new peers are folded into /24
    /// (IPv4) or /64 (IPv6) prefixes.
    pub max_peers: u32,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            attribution: Attribution::Auto,
            max_cgroups: 4096,
            max_flows: 262_144,
            max_hist_entries: 65536,
            max_peers: 256,
        }
    }
}

impl TcpConfig {
    /// Range checks, as (key, value, what is allowed) for the config module's error.
    pub fn check(&self) -> Result<(), (String, String, String)> {
        let sizes = [
            ("tcp.max_cgroups", self.max_cgroups, 16, 1 << 20),
            ("tcp.max_flows", self.max_flows, 64, 1 << 22),
            ("tcp.max_hist_entries", self.max_hist_entries, 64, 1 << 22),
            ("tcp.max_peers", self.max_peers, 1, 1 << 16),
        ];
        for (key, v, min, max) in sizes {
            if v < min || v > max {
                return Err((
                    key.to_owned(),
                    v.to_string(),
                    format!("must be between {min} and {max}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_peer_bound_is_rejected_by_key() {
        let c = TcpConfig {
            max_peers: 0,
            ..TcpConfig::default()
        };
        assert_eq!(c.check().map_err(|e| e.0), Err("tcp.max_peers".to_owned()));
    }
}
