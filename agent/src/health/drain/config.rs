//! The `[drain]` config section: where the drain state is kept, how large replies may grow, and
//! which streams the drain waits for.
//! Every default is documented here and in `packaging/nodeward.toml`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::health::streams::{PortFilter, StreamPolicy};

/// The state file's name when `drain.state_file` is empty.
pub const STATE_FILE_NAME: &str = "drain.json";
/// Where the state goes when neither `drain.state_file` nor `api.unix_socket` names a place.
pub const DEFAULT_RUN_DIR: &str = "/run/nodeward";
/// `drain.viewer_idle` by default.
pub const DEFAULT_VIEWER_IDLE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// The file the drain state is kept in across restarts of the agent. Empty: `drain.json` in
    /// the directory of `api.unix_socket` (`/run/nodeward`, which the DaemonSet mounts from
    /// the host), or in `/run/nodeward` when there is no Unix socket.
    pub state_file: PathBuf,
    /// Callers listed per drain (the first ones); later joins by other callers are counted
    /// (`requesters_not_kept`), not listed. At least 1.
    pub max_requesters: usize,
    /// Streams listed in one `GetDrainStatus` reply, over all containers (oldest first per
    /// container); the counts stay exact and `truncated` says when some were left out.
    pub max_streams_listed: usize,
    /// Whether a container's outbound TCP connections (its dependencies) hold a drain.
    pub wait_for_outbound: bool,
    /// Cgroup v2 paths of the host (`/`-prefixed) whose connections are never streams: each
    /// entry covers that cgroup and every cgroup below it, except `/`, which covers the root
    /// cgroup alone. Empty: every cgroup's connections count.
    pub host_cgroups: Vec<String>,
    /// A remote host that a container served (a connection accepted by it) holds the drain for
    /// this long after its last connection closed, so that HLS/DASH players fetching segments
    /// on new connections count between fetches. 0 s: only open connections count. At most
    /// 10 min (how long the TCP source remembers them).
    #[serde(with = "humantime_serde")]
    pub viewer_idle: Duration,
    /// Containers whose streams and viewers never hold a drain (and are not listed in
    /// `GetDrainStatus`): each entry a container id or a pod name, matched exactly (no globs).
    pub exclude_containers: Vec<String>,
    /// Served ports (TCP and UDP, 1-65535) whose streams and viewers hold a drain; empty: every
    /// port not in `exclude_ports`. Outbound connections go by `wait_for_outbound` instead.
    pub include_ports: Vec<u16>,
    /// Served ports whose streams and viewers never hold a drain (they are still listed): a
    /// metrics or health endpoint, whose scraper would otherwise be a viewer for ever.
    pub exclude_ports: Vec<u16>,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            state_file: PathBuf::new(),
            max_requesters: 64,
            max_streams_listed: 1_000,
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
            viewer_idle: DEFAULT_VIEWER_IDLE,
            exclude_containers: Vec::new(),
            include_ports: Vec::new(),
            exclude_ports: Vec::new(),
        }
    }
}

impl DrainConfig {
    /// A config error in words, or `None`.
    pub fn check(&self) -> Option<String> {
        use crate::sources::tcp::viewers::VIEWER_RETAIN;
        if self.viewer_idle > VIEWER_RETAIN {
            return Some(format!(
                "drain.viewer_idle is above {} (how long viewers are remembered)",
                humantime::format_duration(VIEWER_RETAIN)
            ));
        }
        if let Some(p) = self.host_cgroups.iter().find(|p| !p.starts_with('/')) {
            return Some(format!("{p:?} is not a cgroup path starting with '/'"));
        }
        for (key, ports) in [
            ("include_ports", &self.include_ports),
            ("exclude_ports", &self.exclude_ports),
        ] {
            if ports.contains(&0) {
                return Some(format!("drain.{key}: 0 is not a port (1-65535)"));
            }
        }
        self.include_ports
            .iter()
            .find(|p| self.exclude_ports.contains(p))
            .map(|p| format!("port {p} is in both drain.include_ports and drain.exclude_ports"))
    }

    /// What the drain waits for.
    pub fn policy(&self) -> StreamPolicy {
        StreamPolicy {
            wait_for_outbound: self.wait_for_outbound,
            viewer_idle: self.viewer_idle,
            ports: PortFilter::new(&self.include_ports, &self.exclude_ports),
        }
    }

    /// The state file, resolved as `state_file` documents.
    pub fn state_path(&self, unix_socket: &Path) -> PathBuf {
        if !self.state_file.as_os_str().is_empty() {
            return self.state_file.clone();
        }
        match unix_socket.parent() {
            Some(dir) if !unix_socket.as_os_str().is_empty() && !dir.as_os_str().is_empty() => {
                dir.join(STATE_FILE_NAME)
            }
            _ => Path::new(DEFAULT_RUN_DIR).join(STATE_FILE_NAME),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_file_sits_next_to_the_socket_unless_named() {
        let c = DrainConfig::default();
        assert_eq!(
            c.state_path(Path::new("/run/nodeward/nodeward.sock")),
            Path::new("/run/nodeward/drain.json")
        );
        assert_eq!(
            c.state_path(Path::new("")),
            Path::new("/run/nodeward/drain.json")
        );
        let named = DrainConfig {
            state_file: "/var/lib/x/d.json".into(),
            ..c
        };
        assert_eq!(
            named.state_path(Path::new("/tmp/s.sock")),
            Path::new("/var/lib/x/d.json")
        );
    }

    #[test]
    fn host_cgroup_entries_must_be_paths() {
        assert!(DrainConfig::default().check().is_none());
        let bad = DrainConfig {
            host_cgroups: vec!["system.slice".to_owned()],
            ..DrainConfig::default()
        };
        assert!(bad.check().is_some());
        let too_long = DrainConfig {
            viewer_idle: Duration::from_secs(601),
            ..DrainConfig::default()
        };
        assert!(too_long.check().is_some());
    }

    #[test]
    fn port_lists_refuse_zero_out_of_range_values_and_a_port_in_both() {
        let ports = |include: &[u16], exclude: &[u16]| DrainConfig {
            include_ports: include.to_vec(),
            exclude_ports: exclude.to_vec(),
            ..DrainConfig::default()
        };
        assert!(ports(&[1935, 554], &[9100]).check().is_none());
        let zero = ports(&[], &[0]).check().expect("refused");
        assert!(zero.contains("drain.exclude_ports"), "{zero}");
        let both = ports(&[1935], &[9100, 1935]).check().expect("refused");
        assert!(both.contains("1935"), "{both}");
        let parsed: Result<DrainConfig, _> = toml::from_str("include_ports = [70000]");
        let e = parsed.expect_err("a port above 65535").to_string();
        assert!(e.contains("70000"), "{e}");
        let parsed: Result<DrainConfig, _> = toml::from_str("exclude_ports = [\"http\"]");
        assert!(parsed.is_err(), "a name, not a number");
        let parsed: DrainConfig = toml::from_str("exclude_ports = [9100]").expect("parses");
        assert!(!parsed.policy().ports.holds(9100));
        assert!(parsed.policy().ports.holds(1935));
    }
}
