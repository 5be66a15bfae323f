//! Per-container TCP round-trip time, jitter, retransmits and connection life, from eBPF.
//!
//! Hook chain (chosen from the start-up probe and `tcp.attribution`; see
//! `docs/tcp-latency.md`). Every path takes RTT samples, retransmits and state changes in a
//! `sock_ops` program (`BPF_SOCK_OPS_RTT_CB`: the raw RTT of each measurement on kernels
//! ≥ 6.10, the smoothed srtt after each measurement before that; the snapshot's `fidelity`
//! says which) and attributes them to the cgroup recorded in the socket's own storage:
//! 1. `sock_ops+listen_cb+cgroup_skb_egress`: the sock_ops program records the cgroup of the
//!    task calling `listen()` on the listener (`BPF_SOCK_OPS_TCP_LISTEN_CB`), so accepted
//!    sockets inherit it (`BPF_F_CLONE`) and are attributed before they send anything; a
//!    `cgroup_skb/egress` program records every other socket's cgroup from its first packet
//!    (a client's SYN). Nothing runs at `socket()`. Needs `bpf_get_current_cgroup_id` in
//!    sock_ops.
//! 2. `sock_ops+sock_create`: a `cgroup/sock_create` program records the creating task's
//!    cgroup at every TCP `socket()`; accepted sockets inherit the listener's. Where the egress
//!    program fits too, `auto` attaches both (`sock_ops+sock_create+cgroup_skb_egress`), so
//!    that sockets that predate the agent (an old listener's accepted connections) are covered.
//! 3. `sock_ops+cgroup_skb_egress`: the egress program alone (5.10 kernels, whose cgroup/sock
//!    programs cannot use socket storage). A listener is tagged by its first SYN-ACK, which
//!    the kernel sends through egress with the listener as its socket; where every SYN-ACK was
//!    a SYN cookie (no socket), an accepted socket is pending until it sends.
//! 4. `sock_ops+netns_cookie`: hosts with cgroup v1 only key by the socket's network
//!    namespace cookie (pods have one each), attaching to a cgroup2 mount of the agent's own.
//! 5. `sock_diag_poll`: no eBPF at all; every namespace's sockets are polled over netlink
//!    each tick (`diag.rs`), one smoothed-RTT sample per socket per tick.
//! 6. Not root: the source reports itself unavailable with the reason.
//!
//! With `auto`, the probe only says which paths the kernel should run; the verifier and the
//! attachment have the last word. When a program of the chosen path is rejected (or fails to
//! attach), [`Collector::attach_chain`] drops what that path attached and tries the next path
//! of [`chain`], down to sock_diag; the paths that failed, with their reasons, are reported in
//! the snapshot's fidelity. A path named in the config is tried alone.
//!
//! The kernel aggregates (per-CPU, per-cgroup histograms and counters; per-flow state in an LRU
//! map); this task reads the maps every `agent.tick`, keeps sliding windows, and publishes a
//! [`TcpSnapshot`] on a `watch` channel for the API.

use crate::probe::Capabilities;

mod collector;
pub mod config;
pub mod diag;
pub mod hist;
mod own;
mod prev;
mod procnet;
pub mod seed;
pub mod snapshot;
pub mod viewers;
pub mod window;

pub use collector::{Collector, Source};
pub use config::{Attribution, RttMethod, RttMethodError, TcpConfig};
pub use snapshot::TcpSnapshot;

pub const NAME: &str = "ebpf/tcp";

/// Where the fallback mounts a cgroup2 hierarchy on cgroup-v1 hosts: sock_ops programs attach
/// to a cgroup2 directory even when every socket lives in its root.
pub const CGROUP2_FALLBACK_MOUNT: &str = "/run/nodeward/cgroup2";

/// How sockets are tied to their container: the hook path, reported as the snapshot's
/// `fidelity.path` (by [`Recorder::name`] at the edges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorder {
    /// A listener's cgroup recorded at `listen()` by the sock_ops program (accepted sockets
    /// inherit it), every other socket's from its first packet by the egress program.
    ListenAndEgress,
    /// cgroup recorded at `socket()` by a `cgroup/sock_create` program.
    SockCreate,
    /// Both: `sock_create` for every new socket, and the egress program for sockets that
    /// predate the agent (a listener started before it, whose accepted children would
    /// otherwise inherit nothing).
    SockCreateAndEgress,
    /// cgroup recorded from each socket's first packet by a `cgroup_skb/egress` program.
    Egress,
    /// No recording: keyed by the socket's network-namespace cookie.
    Netns,
    /// No eBPF at all: every namespace's sockets polled through netlink sock_diag.
    SockDiag,
}

/// What the ids of a snapshot's containers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ids {
    /// cgroup v2 ids (inodes of the sockets' cgroup directories).
    CgroupV2,
    /// Network-namespace cookies (cgroup-v1 hosts): not cgroups at all.
    NetnsCookie,
}

impl Recorder {
    /// The hook chain's name, as logs, the API's provenance and the docs spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::ListenAndEgress => "sock_ops+listen_cb+cgroup_skb_egress",
            Self::SockCreate => "sock_ops+sock_create",
            Self::SockCreateAndEgress => "sock_ops+sock_create+cgroup_skb_egress",
            Self::Egress => "sock_ops+cgroup_skb_egress",
            Self::Netns => "sock_ops+netns_cookie",
            Self::SockDiag => "sock_diag_poll",
        }
    }

    /// Whether this path attaches the `cgroup_skb/egress` program (which `tcp.rtt_method =
    /// "segment"` needs: it stamps the segments timed).
    pub const fn attaches_egress(self) -> bool {
        matches!(
            self,
            Self::ListenAndEgress | Self::SockCreateAndEgress | Self::Egress
        )
    }

    /// What the snapshot's ids are on this path.
    pub const fn ids(self) -> Ids {
        match self {
            Self::Netns => Ids::NetnsCookie,
            _ => Ids::CgroupV2,
        }
    }

    /// How samples are attributed on this path, in words (the provenance's fidelity).
    pub const fn attribution(self) -> &'static str {
        match self {
            Self::ListenAndEgress => {
                "cgroup v2 id of the socket's own cgroup (socket storage; a listener's taken from \
                 the task that called listen()), never the task in softirq"
            }
            Self::SockCreate | Self::SockCreateAndEgress | Self::Egress => {
                "cgroup v2 id of the socket's own cgroup (socket storage), never the task in softirq"
            }
            Self::Netns => {
                "network-namespace cookie of the socket (cgroup v1 host: ids are not cgroups)"
            }
            Self::SockDiag => {
                "cgroup v2 id of the socket (INET_DIAG_CGROUP_ID); one srtt sample per socket per tick"
            }
        }
    }
}

impl std::fmt::Display for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Recorder {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// The hook chain chosen for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub recorder: Recorder,
    /// Count samples taken while another cgroup's task ran (needs `bpf_get_current_cgroup_id`
    /// in sock_ops, which 5.10 lacks; meaningless when keyed by namespace).
    pub count_foreign_context: bool,
    /// Mount a cgroup2 hierarchy at the attach point first (cgroup-v1 hosts).
    pub mount_cgroup2: bool,
    /// Where the sock_diag poller finds the node's processes (their network namespaces).
    pub proc_root: std::path::PathBuf,
}

impl Plan {
    /// The path's name (see [`Recorder::name`]).
    pub fn path(&self) -> &'static str {
        self.recorder.name()
    }

    /// The eBPF programs this path loads, in the order they are loaded.
    pub fn programs(&self) -> &'static [&'static str] {
        use crate::ebpf::tcp::{SOCK_CREATE, SOCK_OPS, TAG_EGRESS};
        match self.recorder {
            Recorder::ListenAndEgress => &[TAG_EGRESS, SOCK_OPS],
            Recorder::SockCreate => &[SOCK_CREATE, SOCK_OPS],
            Recorder::SockCreateAndEgress => &[TAG_EGRESS, SOCK_CREATE, SOCK_OPS],
            Recorder::Egress => &[TAG_EGRESS, SOCK_OPS],
            Recorder::Netns => &[SOCK_OPS],
            Recorder::SockDiag => &[],
        }
    }

    /// What the snapshot's ids are, in words (see [`Recorder::attribution`]).
    pub fn attribution(&self) -> &'static str {
        self.recorder.attribution()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("not running as root (CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON are needed)")]
    NotRoot,
    #[error("no cgroup v2 hierarchy: socket cgroups cannot be recorded (use attribution = \"netns\" or \"auto\")")]
    NoCgroupV2,
    #[error("kernel lacks {0}, needed by the sock_ops+sk_storage path (kernel ≥ 5.11)")]
    Missing(&'static str),
    #[error("cannot mount a cgroup2 hierarchy at {0} to attach to: {1}")]
    Mount(String, std::io::Error),
    /// No bpf_link for cgroups (before 5.7): attaching would outlive the agent.
    #[error("{0}")]
    NoCgroupLink(String),
    #[error(transparent)]
    Load(#[from] crate::ebpf::LoadError),
    #[error(transparent)]
    RttMethod(#[from] RttMethodError),
    #[error(transparent)]
    Diag(#[from] diag::DiagError),
}

impl TcpError {
    /// The eBPF program whose load or attachment failed, if one did.
    pub fn program(&self) -> Option<&'static str> {
        match self {
            Self::Load(e) => e.program(),
            _ => None,
        }
    }
}

fn has_helper(caps: &Capabilities, name: &str) -> bool {
    caps.helpers.get(name).is_some_and(|f| f.available)
}

/// Picks the hook chain from the probe and the configured attribution, or says why none fits.
/// Returns the cgroup2 directory to attach to. With `auto`, a node where no eBPF path fits
/// falls back to polling sock_diag, and the reason is logged.
pub fn plan(
    caps: &Capabilities,
    attribution: Attribution,
) -> Result<(std::path::PathBuf, Plan), TcpError> {
    if attribution == Attribution::SockDiag {
        return sock_diag_plan(caps);
    }
    match ebpf_plan(caps, attribution) {
        Err(reason) if attribution == Attribution::Auto && caps.is_root => {
            tracing::warn!(%reason, "no eBPF hook fits this kernel; polling sock_diag instead");
            sock_diag_plan(caps)
        }
        other => other,
    }
}

/// The paths to try in order: with `auto`, the one [`plan`] picks, then every later path of
/// the chain listen+egress → sock_create+egress → sock_create → egress → netns cookies →
/// sock_diag that the probe allows on this node; any other attribution, its own path alone.
pub fn chain(
    caps: &Capabilities,
    attribution: Attribution,
) -> Result<Vec<(std::path::PathBuf, Plan)>, TcpError> {
    let first = plan(caps, attribution)?;
    if attribution != Attribution::Auto {
        return Ok(vec![first]);
    }
    let rank = |r: Recorder| match r {
        Recorder::ListenAndEgress => 0,
        Recorder::SockCreateAndEgress => 1,
        Recorder::SockCreate => 2,
        Recorder::Egress => 3,
        Recorder::Netns => 4,
        Recorder::SockDiag => 5,
    };
    let after = rank(first.1.recorder);
    // sock_create beside egress has no attribution of its own: it is the sock_create plan
    // where the egress one fits too.
    let sock_create_and_egress = plan(caps, Attribution::SockCreate)
        .ok()
        .filter(|_| plan(caps, Attribution::Egress).is_ok())
        .map(|(root, p)| {
            let p = Plan {
                recorder: Recorder::SockCreateAndEgress,
                ..p
            };
            (root, p)
        });
    let mut out = vec![first];
    let next = [
        Attribution::SockCreate,
        Attribution::Egress,
        Attribution::Netns,
        Attribution::SockDiag,
    ]
    // A path the probe rules out is no fallback (the reason was logged by `plan` for auto).
    .map(|a| plan(caps, a).ok());
    for p in std::iter::once(sock_create_and_egress)
        .chain(next)
        .flatten()
    {
        if rank(p.1.recorder) > after && out.iter().all(|(_, q)| q.path() != p.1.path()) {
            out.push(p);
        }
    }
    Ok(out)
}

fn sock_diag_plan(caps: &Capabilities) -> Result<(std::path::PathBuf, Plan), TcpError> {
    if !caps.is_root {
        return Err(TcpError::NotRoot);
    }
    let root = caps.cgroup.unified().map_or_else(
        || std::path::PathBuf::from("/"),
        std::path::Path::to_path_buf,
    );
    let plan = Plan {
        recorder: Recorder::SockDiag,
        count_foreign_context: false,
        mount_cgroup2: false,
        proc_root: "/proc".into(),
    };
    Ok((root, plan))
}

fn ebpf_plan(
    caps: &Capabilities,
    attribution: Attribution,
) -> Result<(std::path::PathBuf, Plan), TcpError> {
    if !caps.is_root {
        return Err(TcpError::NotRoot);
    }
    if !caps.cgroup_link.available {
        return Err(TcpError::NoCgroupLink(caps.cgroup_link.detail.clone()));
    }
    if !caps.has_program_type("sock_ops") {
        return Err(TcpError::Missing("the sock_ops program type"));
    }
    if !has_helper(caps, "sock_ops/sk_storage_get") {
        return Err(TcpError::Missing("bpf_sk_storage_get in sock_ops (5.3)"));
    }
    let netns = has_helper(caps, "sock_ops/get_netns_cookie");
    let Some(root) = caps.cgroup.unified().map(std::path::Path::to_path_buf) else {
        // cgroup v1 only (or unknown): every socket sits in the cgroup2 root, so only the
        // network namespace tells pods apart.
        if !matches!(attribution, Attribution::Auto | Attribution::Netns) {
            return Err(TcpError::NoCgroupV2);
        }
        if !netns {
            return Err(TcpError::Missing(
                "bpf_get_netns_cookie in sock_ops (cgroup-v1 fallback)",
            ));
        }
        let plan = Plan {
            recorder: Recorder::Netns,
            count_foreign_context: false,
            mount_cgroup2: true,
            proc_root: "/proc".into(),
        };
        return Ok((CGROUP2_FALLBACK_MOUNT.into(), plan));
    };
    let sock_create = caps.has_program_type("cgroup_sock")
        && has_helper(caps, "cgroup_sock/sk_storage_get")
        && has_helper(caps, "cgroup_sock/get_current_cgroup_id");
    let egress = caps.has_program_type("cgroup_skb")
        && has_helper(caps, "cgroup_skb/sk_storage_get")
        && has_helper(caps, "cgroup_skb/skb_cgroup_id");
    // Listen tagging reads the current task's cgroup in sock_ops (at `listen()`, in the
    // listening task); the egress program tags every other socket.
    let current_in_sock_ops = has_helper(caps, "sock_ops/get_current_cgroup_id");
    let listen = current_in_sock_ops && egress;
    let recorder =
        match attribution {
            Attribution::Listen if !listen => return Err(TcpError::Missing(
                "bpf_get_current_cgroup_id in sock_ops, or socket storage and skb_cgroup_id in \
                 cgroup_skb programs",
            )),
            Attribution::SockCreate if !sock_create => {
                return Err(TcpError::Missing(
                    "socket storage in cgroup/sock_create programs",
                ))
            }
            Attribution::Egress if !egress => {
                return Err(TcpError::Missing(
                    "socket storage and skb_cgroup_id in cgroup_skb programs",
                ))
            }
            Attribution::Netns if !netns => {
                return Err(TcpError::Missing("bpf_get_netns_cookie in sock_ops"))
            }
            Attribution::SockDiag => Recorder::SockDiag,
            Attribution::Listen => Recorder::ListenAndEgress,
            Attribution::SockCreate => Recorder::SockCreate,
            Attribution::Egress => Recorder::Egress,
            Attribution::Netns => Recorder::Netns,
            Attribution::Auto if listen => Recorder::ListenAndEgress,
            Attribution::Auto if sock_create && egress => Recorder::SockCreateAndEgress,
            Attribution::Auto if sock_create => Recorder::SockCreate,
            Attribution::Auto if egress => Recorder::Egress,
            Attribution::Auto => {
                return Err(TcpError::Missing(
                    "socket storage in both cgroup/sock_create and cgroup_skb programs",
                ))
            }
        };
    let plan = Plan {
        recorder,
        count_foreign_context: recorder != Recorder::Netns && current_in_sock_ops,
        mount_cgroup2: false,
        proc_root: "/proc".into(),
    };
    Ok((root, plan))
}

/// Mounts a cgroup2 hierarchy at `at` unless one is there already.
pub(crate) fn ensure_cgroup2(at: &std::path::Path) -> Result<(), TcpError> {
    if crate::probe::cgroup_layout(at)
        == (crate::probe::CgroupLayout::V2 {
            unified: at.to_path_buf(),
        })
    {
        return Ok(());
    }
    std::fs::create_dir_all(at).map_err(|e| TcpError::Mount(at.display().to_string(), e))?;
    rustix::mount::mount(
        "none",
        at,
        "cgroup2",
        rustix::mount::MountFlags::empty(),
        "",
    )
    .map_err(|e| TcpError::Mount(at.display().to_string(), e.into()))?;
    Ok(())
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
