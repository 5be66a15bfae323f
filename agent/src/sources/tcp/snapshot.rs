//! The TCP latency snapshot the API reads: per container (cgroup) and window, the RTT
//! distribution, jitter, retransmits and connection counts; per remote peer, the same sums
//! without percentiles. Units are in the field names (`_us` microseconds, `_s` seconds).

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use agent_ebpf::{
    tcp::{direction, drop_reason},
    CgroupTcpStats,
};
use serde::Serialize;

use super::{hist::Histogram, window::PeerDelta, Recorder};
use crate::store::{NetworkTotals, Peer, StreamDirection, Window};

/// Everything the TCP source knows at one tick.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TcpSnapshot {
    /// Ticks since the source started.
    pub tick: u64,
    pub fidelity: Fidelity,
    /// By cgroup v2 id.
    pub containers: BTreeMap<u64, ContainerTcp>,
    pub drops: Drops,
    /// The agent's own cgroup id, from the cgroup the kernel recorded for a socket the source
    /// opened (see `own.rs`); `None` until found, and on the namespace-keyed path.
    pub own_cgroup_id: Option<u64>,
}

impl TcpSnapshot {
    pub fn container(&self, cgroup_id: u64) -> Option<&ContainerTcp> {
        self.containers.get(&cgroup_id)
    }
}

/// Which hook produced the data, and so how far to trust it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Fidelity {
    /// The hook chain in use (`None` only in the placeholder before the first tick). It also
    /// says what the ids in `containers` are: [`Recorder::ids`].
    pub path: Option<Recorder>,
    pub rtt_sample: RttSample,
    /// `tcp.rtt_method` as resolved on this kernel (`kernel`, `segment` or `srtt`); `None` only in the
    /// placeholder before the first tick.
    pub rtt_method: Option<super::RttMethod>,
    /// Paths of the `auto` chain that were tried first and failed to load or attach, each as
    /// `<path> failed (<reason>)`; empty when the first path attached.
    pub fell_back_from: Vec<String>,
}

/// Which RTT the samples carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RttSample {
    /// No sample yet.
    #[default]
    None,
    /// A real RTT per measurement: the one the kernel passes to sock_ops (≥ 6.10), or a data
    /// segment the programs timed themselves (`segment`).
    Raw,
    /// The kernel's smoothed srtt after each measurement (older kernels, sock_diag).
    Smoothed,
    /// Both kinds in one window.
    Mixed,
}

impl RttSample {
    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Raw => "raw",
            Self::Smoothed => "smoothed",
            Self::Mixed => "mixed",
        }
    }
}

impl std::fmt::Display for RttSample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Fidelity {
    pub(super) fn from_counts<'a>(
        path: Recorder,
        containers: impl Iterator<Item = &'a ContainerTcp>,
    ) -> Self {
        let (mut raw, mut all) = (0, 0);
        for c in containers {
            if let Some(w) = c.windows.last() {
                raw += w.raw_samples;
                all += w.samples;
            }
        }
        let rtt_sample = match (raw, all) {
            (_, 0) => RttSample::None,
            (r, a) if r == a => RttSample::Raw,
            (0, _) => RttSample::Smoothed,
            _ => RttSample::Mixed,
        };
        Self {
            path: Some(path),
            rtt_sample,
            rtt_method: None,
            fell_back_from: Vec::new(),
        }
    }

    /// What the RTT figures mean, in words, for the provenance: the kind of sample, the
    /// method, and that the distribution is the path's (think time left out).
    pub fn rtt_meaning(&self) -> String {
        let method = self.rtt_method.map_or("none", super::RttMethod::name);
        let figure = if self.path == Some(Recorder::SockDiag) {
            "smoothed RTT per tick (peer think time not told apart)"
        } else {
            "path RTT: handshake and samples that did not wait on the peer"
        };
        format!(
            "rtt samples {} (method {method}); {figure}",
            self.rtt_sample
        )
    }
}

/// Events the kernel programs could not record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Drops {
    pub hist_full: u64,
    pub stats_full: u64,
    pub flow_insert_failed: u64,
    /// RTT samples from sockets created before the agent started (no recorded cgroup).
    pub no_cgroup: u64,
    pub flow_evicted: u64,
}

impl Drops {
    pub(super) fn from_array(a: &[u64; drop_reason::COUNT as usize]) -> Self {
        let at = |i: u32| a.get(i as usize).copied().unwrap_or(0);
        Self {
            hist_full: at(drop_reason::HIST_FULL),
            stats_full: at(drop_reason::STATS_FULL),
            flow_insert_failed: at(drop_reason::FLOW_INSERT),
            no_cgroup: at(drop_reason::NO_CGROUP),
            flow_evicted: at(drop_reason::FLOW_EVICTED),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ContainerTcp {
    pub cgroup_id: u64,
    /// Path of the cgroup under the v2 hierarchy, when it still exists.
    pub cgroup_path: Option<String>,
    /// One entry per configured window, shortest first (absent while the window is empty).
    pub windows: Vec<WindowStats>,
    /// Established connections now, and their ages.
    pub established: u64,
    /// The same connections by who opened them (served + outbound + unknown = established).
    pub established_by: DirectionCounts,
    pub established_age_max_s: f64,
    pub established_age_mean_s: f64,
    /// Established connections (opened minus closed, from the kernel's exact counters) that
    /// the bounded flow map does not hold, so without age or peer.
    pub established_untracked: u64,
    /// The established connections the flow map holds, one by one (in no set order); left out
    /// of the serialised form, which summarises.
    #[serde(skip)]
    pub connections: Vec<Connection>,
    pub peers: Vec<PeerTcp>,
    /// Remote hosts that connections accepted by the container came from lately (see
    /// `viewers.rs`), most recent first.
    pub viewers: Vec<super::viewers::ServedPeer>,
    /// Counters since the agent started, carried across restarts of the source (the RTP
    /// fields stay 0: they are the UDP source's).
    pub totals: NetworkTotals,
}

impl ContainerTcp {
    pub(super) fn new(cgroup_id: u64) -> Self {
        Self {
            cgroup_id,
            ..Self::default()
        }
    }

    pub(super) fn set_established(&mut self, open: impl Iterator<Item = Connection>) {
        let (mut n, mut sum, mut max) = (0u64, 0f64, 0f64);
        self.connections.clear();
        self.connections.reserve_exact(open.size_hint().0);
        for conn in open {
            self.established_by.add(conn.direction, 1);
            let s = conn.age.as_secs_f64();
            self.connections.push(conn);
            n += 1;
            sum += s;
            max = max.max(s);
        }
        self.established = n;
        self.established_age_max_s = max;
        #[expect(clippy::cast_precision_loss, reason = "a count")]
        let mean = if n > 0 { sum / n as f64 } else { 0.0 };
        self.established_age_mean_s = mean;
    }

    /// The window of this length, if it holds data.
    pub fn window(&self, window: Window) -> Option<&WindowStats> {
        self.windows.iter().find(|w| w.window == window)
    }
}

/// One established connection of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    pub remote: SocketAddr,
    /// The container's side: for a served connection the port it serves on.
    pub local_port: u16,
    pub direction: StreamDirection,
    /// Since the source first saw it: its establishment for sock_ops, the source's start for a
    /// connection older than that (the seed).
    pub age: Duration,
    /// Bytes since the previous read; `None` on the connection's first read.
    pub bytes: Option<ByteCounts>,
}

/// Bytes a connection moved over a span: what the peer acknowledged (sent) and what arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteCounts {
    pub acked: u64,
    pub received: u64,
    pub over: Duration,
}

/// One container over one window.
#[derive(Debug, Clone, Serialize)]
pub struct WindowStats {
    pub window: Window,
    /// RTT measurements the kernel took (one per RTT callback), path samples or not.
    pub samples: u64,
    pub raw_samples: u64,
    /// Samples of the path's RTT (connections' handshakes and the measurements that did not
    /// wait on the peer): the histogram, the mean and the jitter are over these.
    pub path_samples: u64,
    /// Mean of every measurement as the kernel took it, think time and delayed ACKs included.
    pub measured_mean_rtt_us: f64,
    /// Percentiles from the log-linear histogram (error at most 1/32 of the value); min and max
    /// are the edges of the lowest and highest occupied buckets.
    pub min_rtt_us: f64,
    pub p50_rtt_us: f64,
    pub p90_rtt_us: f64,
    pub p99_rtt_us: f64,
    pub max_rtt_us: f64,
    pub mean_rtt_us: f64,
    /// RFC 3550 jitter: each connection's running estimate J += (|ΔRTT| − J) / 16, kept by
    /// the kernel per connection, averaged over the samples of the window that updated it.
    pub jitter_rfc3550_us: f64,
    pub retrans: u64,
    pub segs_out: u64,
    /// Retransmitted segments per segment sent.
    pub retrans_rate: f64,
    pub opened: u64,
    pub closed: u64,
    /// Samples taken in softirq while another container's task ran: proof that attribution
    /// by the socket's cgroup mattered.
    pub foreign_context_samples: u64,
}

#[expect(
    clippy::cast_precision_loss,
    reason = "statistics over counts far below 2^52"
)]
fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

impl WindowStats {
    /// A window with nothing counted.
    pub fn new(window: Window) -> Self {
        Self::from_parts(window, &CgroupTcpStats::default(), &Histogram::default())
    }

    pub(super) fn from_parts(window: Window, s: &CgroupTcpStats, h: &Histogram) -> Self {
        Self {
            window,
            samples: s.samples,
            raw_samples: s.raw_samples,
            path_samples: s.path_samples,
            measured_mean_rtt_us: ratio(s.sum_measured_rtt_us, s.samples),
            min_rtt_us: h.min().unwrap_or(0.0),
            p50_rtt_us: h.quantile(0.5).unwrap_or(0.0),
            p90_rtt_us: h.quantile(0.9).unwrap_or(0.0),
            p99_rtt_us: h.quantile(0.99).unwrap_or(0.0),
            max_rtt_us: h.max().unwrap_or(0.0),
            mean_rtt_us: ratio(s.sum_rtt_us, s.path_samples),
            jitter_rfc3550_us: ratio(s.sum_jitter16_us, s.diffs) / 16.0,
            retrans: s.retrans,
            segs_out: s.segs_out,
            retrans_rate: ratio(s.retrans, s.segs_out),
            opened: s.opened_active + s.opened_passive,
            closed: s.closed,
            foreign_context_samples: s.foreign_context,
        }
    }
}

/// Established connections by who opened them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DirectionCounts {
    /// Accepted on one of the container's listening sockets.
    pub served: u64,
    /// Opened by the container (`connect`).
    pub outbound: u64,
    /// Not told apart (sock_diag fallback).
    pub unknown: u64,
}

impl DirectionCounts {
    pub fn add(&mut self, direction: StreamDirection, n: u64) {
        match direction {
            StreamDirection::Served => self.served += n,
            StreamDirection::Outbound => self.outbound += n,
            StreamDirection::Unknown => self.unknown += n,
        }
    }

    pub fn remove(&mut self, direction: StreamDirection, n: u64) {
        match direction {
            StreamDirection::Served => self.served = self.served.saturating_sub(n),
            StreamDirection::Outbound => self.outbound = self.outbound.saturating_sub(n),
            StreamDirection::Unknown => self.unknown = self.unknown.saturating_sub(n),
        }
    }

    pub fn get(&self, direction: StreamDirection) -> u64 {
        match direction {
            StreamDirection::Served => self.served,
            StreamDirection::Outbound => self.outbound,
            StreamDirection::Unknown => self.unknown,
        }
    }

    pub fn total(&self) -> u64 {
        self.served + self.outbound + self.unknown
    }
}

/// A flow's direction from the kernel's [`FlowState::passive`](agent_ebpf::FlowState).
pub fn flow_direction(passive: u32) -> StreamDirection {
    match passive {
        direction::PASSIVE => StreamDirection::Served,
        direction::ACTIVE => StreamDirection::Outbound,
        _ => StreamDirection::Unknown,
    }
}

/// One remote peer (or prefix) of a container.
#[derive(Debug, Clone, Serialize)]
pub struct PeerTcp {
    /// One address and port, or a prefix once the container has more peers than the bound.
    pub peer: Peer,
    pub established: u64,
    /// The same connections by who opened them.
    pub established_by: DirectionCounts,
    pub windows: Vec<PeerWindow>,
}

/// One peer over one window: sums per connection, no histogram, so a mean and no percentiles.
#[derive(Debug, Clone, Serialize)]
pub struct PeerWindow {
    pub window: Window,
    pub samples: u64,
    pub mean_rtt_us: f64,
    /// As the container's: the RFC 3550 jitter of the peer's connections, averaged.
    pub jitter_rfc3550_us: f64,
    pub retrans: u64,
    pub segs_out: u64,
}

impl PeerWindow {
    /// A window with nothing counted.
    pub fn new(window: Window) -> Self {
        Self::from_delta(window, &PeerDelta::default())
    }

    pub(super) fn from_delta(window: Window, d: &PeerDelta) -> Self {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let (n, diffs) = (d.samples as f64, d.diffs as f64);
        Self {
            window,
            samples: d.samples,
            mean_rtt_us: if n > 0.0 { d.sum_rtt_us / n } else { 0.0 },
            jitter_rfc3550_us: if diffs > 0.0 {
                d.sum_jitter16_us / diffs / 16.0
            } else {
                0.0
            },
            retrans: d.retrans,
            segs_out: d.segs_out,
        }
    }
}
