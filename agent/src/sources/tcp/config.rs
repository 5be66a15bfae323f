//! The `[tcp]` config section: the bounds on kernel maps and peers (the windows are
//! `[network] windows`).

use serde::{Deserialize, Serialize};

use super::Recorder;

/// How a socket's cgroup is recorded for the sock_ops program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attribution {
    /// `listen` where the kernel allows it, else `sock_create` beside the egress program, else
    /// `egress`; `netns` on cgroup-v1 hosts; `sock_diag` where no eBPF path fits.
    Auto,
    /// The sock_ops program stores the cgroup of the task that calls `listen()` on the
    /// listener (accepted sockets inherit it), and the egress program every other socket's
    /// from its first packet: no program runs at `socket()` (needs `bpf_get_current_cgroup_id`
    /// in sock_ops: the probe checks).
    Listen,
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

/// Which RTT each sample takes (`tcp.rtt_method`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RttMethod {
    /// `kernel` where the kernel passes the measured RTT (≥ 6.10), else `segment` where the
    /// path attaches the egress program, else `srtt`.
    #[default]
    Auto,
    /// The RTT of each measurement, as the kernel passes it to sock_ops (Linux ≥ 6.10).
    Kernel,
    /// The programs time one data segment per flight themselves: the egress program stamps it,
    /// sock_ops ends it at the ACK that covers it (any kernel; needs the egress program).
    Segment,
    /// The kernel's smoothed RTT (srtt, an EWMA with gain 1/8) as it stood before each
    /// measurement: what kernels before 6.10 give. Percentiles are narrower than the path's
    /// and jitter is damped.
    Srtt,
}

impl RttMethod {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Kernel => "kernel",
            Self::Segment => "segment",
            Self::Srtt => "srtt",
        }
    }

    /// The method that runs on a kernel of this release (`/proc/sys/kernel/osrelease`) and
    /// attribution path: `auto` resolved, a forced one checked.
    pub fn resolve(self, kernel_release: &str, path: Recorder) -> Result<Self, RttMethodError> {
        // sock_diag has the smoothed srtt only, as kernels before 6.10 do.
        if path == Recorder::SockDiag {
            return match self {
                Self::Auto | Self::Srtt => Ok(Self::Srtt),
                Self::Kernel | Self::Segment => Err(RttMethodError::SockDiag { method: self }),
            };
        }
        let passes_rtt = kernel_passes_measured_rtt(kernel_release) == Some(true);
        let egress = path.attaches_egress();
        match self {
            Self::Auto if passes_rtt => Ok(Self::Kernel),
            Self::Auto if egress => Ok(Self::Segment),
            Self::Auto | Self::Srtt => Ok(Self::Srtt),
            Self::Kernel if passes_rtt => Ok(Self::Kernel),
            Self::Kernel => Err(RttMethodError::KernelTooOld {
                release: kernel_release.to_owned(),
            }),
            Self::Segment if egress => Ok(Self::Segment),
            Self::Segment => Err(RttMethodError::NoEgress { path }),
        }
    }

    /// The value of the programs' `RTT_METHOD` global for this (resolved) method.
    pub const fn program_value(self) -> u32 {
        use agent_ebpf::tcp::rtt_method;
        match self {
            Self::Auto => rtt_method::AUTO,
            Self::Kernel => rtt_method::KERNEL,
            Self::Segment => rtt_method::SEGMENT,
            Self::Srtt => rtt_method::SRTT,
        }
    }
}

impl std::fmt::Display for RttMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RttMethodError {
    #[error(
        "tcp.rtt_method = \"kernel\" needs Linux 6.10 or later (the kernel passes the measured \
         RTT to sock_ops since 6.10); this kernel is {release}: use \"auto\", \"segment\" or \
         \"srtt\""
    )]
    KernelTooOld { release: String },
    #[error(
        "tcp.rtt_method = \"{method}\" needs the sock_ops path: the sock_diag path polls the \
         smoothed srtt only; use \"auto\" or \"srtt\""
    )]
    SockDiag { method: RttMethod },
    #[error(
        "tcp.rtt_method = \"segment\" needs the cgroup_skb egress program, which the attribution \
         path {path} does not attach: use tcp.attribution = \"auto\" or \"egress\", or \
         tcp.rtt_method = \"auto\" or \"srtt\""
    )]
    NoEgress { path: Recorder },
}

/// Whether a kernel of this release passes the measured RTT to `BPF_SOCK_OPS_RTT_CB` (6.10
/// added the arguments); `None` when the release does not parse.
fn kernel_passes_measured_rtt(release: &str) -> Option<bool> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    Some((major, minor) >= (6, 10))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    /// Measure TCP RTT, jitter, retransmits and connections per container (needs eBPF).
    pub enabled: bool,
    /// How sockets are tied to their cgroup: `auto`, `listen`, `sock_create`, `egress`,
    /// `netns` or `sock_diag`.
    pub attribution: Attribution,
    /// Which RTT a sample takes: `auto`, `kernel` (≥ 6.10), `segment` or `srtt`.
    pub rtt_method: RttMethod,
    /// Containers (cgroups) the kernel keeps counters for; more are counted as dropped. Each
    /// holds a slot: per-CPU counters (104 bytes a CPU) and a 3 KiB histogram row per CPU up
    /// to 4, all allocated at load (12 MiB plus 104 KiB a CPU at the default, on 4 CPUs or
    /// more).
    pub max_cgroups: u32,
    /// Connections tracked at once (LRU: the least recently active make room). Each entry
    /// costs 208 bytes of kernel memory (charged to the agent's memory cgroup).
    pub max_flows: u32,
    /// (cgroup, histogram bucket) pairs the sock_diag fallback keeps; a container usually
    /// needs 5 to 30. (The eBPF programs keep a whole row per cgroup slot.)
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
            rtt_method: RttMethod::Auto,
            max_cgroups: 1024,
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
            ("tcp.max_cgroups", self.max_cgroups, 16, 1 << 14),
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

    const EGRESS: Recorder = Recorder::SockCreateAndEgress;

    #[test]
    fn the_measured_rtt_is_taken_from_6_10_and_refused_before() {
        assert_eq!(
            RttMethod::Auto.resolve("6.18.0-1-amd64", EGRESS),
            Ok(RttMethod::Kernel)
        );
        assert_eq!(
            RttMethod::Auto.resolve("6.10.0", Recorder::SockCreate),
            Ok(RttMethod::Kernel)
        );
        assert_eq!(
            RttMethod::Srtt.resolve("6.18.0", EGRESS),
            Ok(RttMethod::Srtt)
        );
        assert_eq!(
            RttMethod::Kernel.resolve("6.18.0", EGRESS),
            Ok(RttMethod::Kernel)
        );
        let e = RttMethod::Kernel.resolve("6.6.71-anolis", EGRESS);
        assert_eq!(
            e,
            Err(RttMethodError::KernelTooOld {
                release: "6.6.71-anolis".to_owned()
            })
        );
        assert!(e.is_err_and(|e| e.to_string().contains("6.10")));
        assert!(RttMethod::Kernel
            .resolve("unknown (no file)", EGRESS)
            .is_err());
    }

    #[test]
    fn before_6_10_auto_times_segments_where_the_egress_program_runs_else_takes_srtt() {
        for path in [
            Recorder::ListenAndEgress,
            Recorder::SockCreateAndEgress,
            Recorder::Egress,
        ] {
            assert_eq!(
                RttMethod::Auto.resolve("5.10.0-23-amd64", path),
                Ok(RttMethod::Segment)
            );
            assert_eq!(
                RttMethod::Auto.resolve("6.6.71-anolis", path),
                Ok(RttMethod::Segment)
            );
        }
        for path in [Recorder::SockCreate, Recorder::Netns] {
            assert_eq!(RttMethod::Auto.resolve("6.9.12", path), Ok(RttMethod::Srtt));
        }
        // Forced, it runs on any kernel whose path has the egress program.
        assert_eq!(
            RttMethod::Segment.resolve("6.18.0", EGRESS),
            Ok(RttMethod::Segment)
        );
        assert_eq!(
            RttMethod::Segment.resolve("5.10.0", Recorder::Egress),
            Ok(RttMethod::Segment)
        );
    }

    #[test]
    fn a_forced_method_the_path_cannot_run_is_refused_with_the_way_out() {
        let e = RttMethod::Segment
            .resolve("6.18.0", Recorder::SockCreate)
            .expect_err("no egress program on sock_create alone");
        assert_eq!(
            e,
            RttMethodError::NoEgress {
                path: Recorder::SockCreate
            }
        );
        let text = e.to_string();
        assert!(
            text.contains("\"segment\"") && text.contains("tcp.attribution"),
            "{text}"
        );
        assert!(RttMethod::Segment
            .resolve("6.18.0", Recorder::Netns)
            .is_err());
        for method in [RttMethod::Kernel, RttMethod::Segment] {
            assert_eq!(
                method.resolve("6.18.0", Recorder::SockDiag),
                Err(RttMethodError::SockDiag { method })
            );
        }
        assert_eq!(
            RttMethod::Auto.resolve("6.18.0", Recorder::SockDiag),
            Ok(RttMethod::Srtt)
        );
    }

    #[test]
    fn segment_is_spelled_segment_in_the_config() {
        #[derive(Deserialize)]
        struct T {
            m: RttMethod,
        }
        let t: T = toml::from_str("m = \"segment\"").expect("parses");
        assert_eq!(t.m, RttMethod::Segment);
        assert_eq!(RttMethod::Segment.to_string(), "segment");
    }

    #[test]
    fn a_zero_peer_bound_is_rejected_by_key() {
        let c = TcpConfig {
            max_peers: 0,
            ..TcpConfig::default()
        };
        assert_eq!(c.check().map_err(|e| e.0), Err("tcp.max_peers".to_owned()));
    }
}
