//! What the UDP source reports: per container, its RTP streams and UDP flows with their
//! quality, and totals over `network.windows` next to the TCP numbers.

use std::net::IpAddr;

use serde::Serialize;

use crate::store::{NetworkTotals, ViewerReports, Window};

#[derive(Debug, Clone, Default, Serialize)]
pub struct UdpSnapshot {
    /// Which hook produced the data, for the report's fidelity.
    pub hook: String,
    pub containers: Vec<ContainerUdp>,
    pub counters: UdpCounters,
}

impl UdpSnapshot {
    pub fn container(&self, cgroup_id: u64) -> Option<&ContainerUdp> {
        self.containers.iter().find(|c| c.cgroup_id == cgroup_id)
    }
}

/// Kernel-side counters, summed over CPUs since the programs were loaded.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct UdpCounters {
    pub udp_packets: u64,
    pub rtp_packets: u64,
    pub rtcp_packets: u64,
    pub stun_packets: u64,
    pub truncated: u64,
    pub fragments: u64,
    pub flows_created: u64,
    pub streams_created: u64,
    /// Flows/streams that could not be tracked at all (insert failed).
    pub not_tracked: u64,
    /// New flows and streams put on probation: each needs a second packet (a second packet in
    /// sequence, for RTP) before it enters the maps. `*_on_probation - *_created` were refused:
    /// one-packet flows, a flood from random source ports.
    pub flows_on_probation: u64,
    pub streams_on_probation: u64,
    /// Inbound RTCP datagrams from which at least one report block was read.
    pub rtcp_with_reports: u64,
    /// (container, SSRC, viewer) reports held in the kernel map now.
    pub viewer_reports_tracked: u64,
    /// Flows/streams tracked now; `created - tracked - expired` were evicted by the LRU.
    pub flows_tracked: u64,
    pub streams_tracked: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ContainerUdp {
    /// The cgroup v2 id (inode) of the sockets.
    pub cgroup_id: u64,
    /// The cgroup's path below the v2 root, when it still exists.
    pub cgroup_path: Option<String>,
    /// Live RTP streams plus long-lived non-RTP UDP flows (SRT, QUIC): what a drain waits for.
    pub live_streams: u32,
    pub streams: Vec<StreamQuality>,
    pub flows: Vec<FlowQuality>,
    /// One entry per window of `network.windows`, shortest first.
    pub windows: Vec<WindowStats>,
    /// RTP counters since the agent started, carried across restarts of the source (the TCP
    /// fields stay 0).
    pub totals: NetworkTotals,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Endpoint {
    pub local: IpAddr,
    pub local_port: u16,
    pub remote: IpAddr,
    pub remote_port: u16,
    /// `ingress` (received by the container) or `egress` (sent by it).
    pub direction: &'static str,
}

/// One RTP stream (flow + SSRC), cumulative since first seen.
#[derive(Debug, Clone, Serialize)]
pub struct StreamQuality {
    pub endpoint: Endpoint,
    pub ssrc: u32,
    pub payload_type: u8,
    /// Hz; `None` when the payload type's clock rate is unknown.
    pub clock_rate: Option<u32>,
    pub packets: u64,
    pub bytes: u64,
    pub expected: u64,
    pub lost: u64,
    pub reordered: u64,
    /// RFC 3550 interarrival jitter now, and mean/max over the stream, in seconds; `None`
    /// without a clock rate.
    pub jitter_seconds: Option<f64>,
    pub mean_jitter_seconds: Option<f64>,
    pub max_jitter_seconds: Option<f64>,
    /// RTP timestamp step between the last two packets, in timestamp units (reported when
    /// the clock rate is unknown).
    pub timestamp_step: Option<u32>,
    pub payload_type_changes: u32,
    pub sequence_wraps: u32,
    pub age_seconds: f64,
    pub idle_seconds: f64,
    pub live: bool,
    /// For a stream the container sends: its viewers' fresh RTCP reports about it.
    #[serde(skip)]
    pub viewer_reports: Option<ViewerReports>,
}

/// One UDP flow, cumulative since first seen.
#[derive(Debug, Clone, Serialize)]
pub struct FlowQuality {
    pub endpoint: Endpoint,
    pub packets: u64,
    pub bytes: u64,
    /// Mean and max of |Δ inter-arrival| (RFC 3393-style delay variation), seconds.
    pub mean_ipdv_seconds: Option<f64>,
    pub max_ipdv_seconds: Option<f64>,
    /// The longest gap between two packets, seconds.
    pub max_gap_seconds: f64,
    pub age_seconds: f64,
    pub idle_seconds: f64,
    pub live: bool,
    /// Whether the flow carries RTP (its quality is then in `streams`).
    pub rtp: bool,
    /// Whether the flow is the RTCP of an RTP flow: on its port + 1, between the same hosts
    /// (RFC 3550 without rtcp-mux). It belongs to that RTP stream, not a stream of its own.
    pub rtcp: bool,
}

impl FlowQuality {
    /// Whether the flow is a stream of its own (what a drain waits for): live, long-lived
    /// (`udp.stream_min_duration`), and neither RTP (counted by its streams) nor the RTCP of
    /// an RTP stream.
    pub fn is_stream(&self, min_age: std::time::Duration) -> bool {
        self.live && !self.rtp && !self.rtcp && self.age_seconds >= min_age.as_secs_f64()
    }
}

/// Totals over one window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WindowStats {
    pub window: Window,
    pub udp_packets: u64,
    pub udp_bytes: u64,
    pub rtp_received: u64,
    pub rtp_expected: u64,
    pub rtp_lost: u64,
    /// lost / expected over the window; `None` when nothing was expected.
    pub rtp_loss_ratio: Option<f64>,
    pub rtp_reordered: u64,
    /// Mean of the per-packet jitter estimates in the window, and the highest estimate a live
    /// stream had at any tick of the window, seconds.
    pub mean_jitter_seconds: Option<f64>,
    pub max_jitter_seconds: Option<f64>,
    pub mean_ipdv_seconds: Option<f64>,
}

impl WindowStats {
    /// A window with nothing counted.
    pub fn new(window: Window) -> Self {
        Self {
            window,
            udp_packets: 0,
            udp_bytes: 0,
            rtp_received: 0,
            rtp_expected: 0,
            rtp_lost: 0,
            rtp_loss_ratio: None,
            rtp_reordered: 0,
            mean_jitter_seconds: None,
            max_jitter_seconds: None,
            mean_ipdv_seconds: None,
        }
    }
}
