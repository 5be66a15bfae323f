//! The eBPF network sources' own counters: what their programs saw and what they could not
//! record. They describe the sources, not a container, so they sit beside the
//! [`NetworkSnapshot`](super::NetworkSnapshot) rather than in it.

/// Events the TCP programs could not record, by reason, since they were loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpDrops {
    /// A socket without a recorded cgroup: the sample is counted in no container.
    pub no_cgroup: u64,
    /// `tcp.max_cgroups` reached: the sample is lost.
    pub stats_full: u64,
    /// A flow map insert failed: the sample is lost and the connection left untracked.
    pub flow_insert_failed: u64,
    /// The sample is counted, its RTT missing from the percentiles.
    pub hist_full: u64,
    /// The sample is counted and the evicted flow rebuilt.
    pub flow_evicted: u64,
}

/// The UDP/RTP programs' counters, summed over CPUs since they were loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpCounters {
    /// UDP packets seen, both directions.
    pub udp_packets: u64,
    /// Of those, recognised as RTP, RTCP and STUN.
    pub rtp_packets: u64,
    pub rtcp_packets: u64,
    pub stun_packets: u64,
    /// Too short for the header they claimed.
    pub truncated: u64,
    /// IP fragments (not parsed).
    pub fragments: u64,
    pub flows_created: u64,
    pub streams_created: u64,
    /// Flows or streams the kernel maps could not take.
    pub not_tracked: u64,
    /// New flows and streams put on probation: each needs a second packet (a second packet in
    /// sequence, for RTP) before it enters the maps. `*_on_probation - *_created` were refused:
    /// one-packet flows, a flood from random source ports.
    pub flows_on_probation: u64,
    pub streams_on_probation: u64,
    /// Inbound RTCP datagrams from which at least one report block was read.
    pub rtcp_with_reports: u64,
    /// In the kernel maps now (gauges); `viewer_reports_tracked` counts (container, SSRC,
    /// viewer) RTCP reports.
    pub viewer_reports_tracked: u64,
    pub flows_tracked: u64,
    pub streams_tracked: u64,
}

/// The UDP/RTP source's program state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpDiagnostics {
    /// The kernel hook the programs run on (`cgroup_skb`, ...).
    pub hook: String,
    pub counters: UdpCounters,
}

/// What the eBPF network sources report about themselves; a source that has not reported is
/// `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkDiagnostics {
    pub tcp: Option<TcpDrops>,
    pub udp: Option<UdpDiagnostics>,
}
