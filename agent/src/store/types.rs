//! Plain data each source writes into the store. Base units everywhere: durations in
//! microseconds, sizes in bytes, shares as ratios in [0, 1], PSI as percentages (as the kernel
//! prints them). A value a source cannot measure is left at its default (0 / empty) and the
//! source's [`Provenance`](super::Provenance) says why; a GPU also names such readings
//! ([`GpuDevice::unreadable`], [`GpuDevice::unsupported`]) or holds `None`, so that /metrics
//! can leave them out.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

/// The length of a sliding network window (`[network] windows`): the one type every layer
/// uses for it, from the sources' rings through the health rules to the API's reply, where
/// it becomes seconds. Written in config and JSON as a humantime string (`"1m"`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Window(#[serde(with = "humantime_serde")] Duration);

impl Window {
    pub const fn from_secs(seconds: u64) -> Self {
        Self(Duration::from_secs(seconds))
    }

    pub const fn from_duration(d: Duration) -> Self {
        Self(d)
    }

    pub const fn duration(self) -> Duration {
        self.0
    }

    /// Whole seconds (what the API and the metric labels carry).
    pub const fn as_secs(self) -> u64 {
        self.0.as_secs()
    }

    /// How many ticks of `tick` the window spans (at least one).
    ///
    /// ```
    /// # use nodeward::store::Window;
    /// # use std::time::Duration;
    /// assert_eq!(Window::from_secs(60).ticks(Duration::from_secs(1)), 60);
    /// assert_eq!(Window::from_secs(10).ticks(Duration::from_millis(3000)), 4);
    /// ```
    pub fn ticks(self, tick: Duration) -> usize {
        let ticks = self.0.as_millis().div_ceil(tick.as_millis().max(1)).max(1);
        usize::try_from(ticks).unwrap_or(usize::MAX)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// The default `[network] windows`, shortest first.
pub const DEFAULT_NETWORK_WINDOWS: [Window; 3] = [
    Window::from_secs(10),
    Window::from_secs(60),
    Window::from_secs(300),
];

/// Identity of a container, as far as it is known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerMeta {
    /// Container id (runtime id, or the cgroup directory's name when not known).
    pub id: String,
    pub name: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub pod_uid: String,
    /// The pod's labels: the runtime identity table's own map, shared (1,000 pods' labels would
    /// otherwise be held twice).
    pub labels: std::sync::Arc<BTreeMap<String, String>>,
    /// The image reference the container was created from (from the runtime).
    pub image: String,
    /// The pod's allow-listed annotations (`containers.runtime_annotations`), shared likewise.
    pub annotations: std::sync::Arc<BTreeMap<String, String>>,
    /// The pod's QoS class, from where its cgroup sits; `None` outside Kubernetes.
    pub qos: Option<crate::containers::Qos>,
    /// cgroup v2 path relative to the cgroup root.
    pub cgroup_path: String,
    /// cgroup id (inode of the cgroup directory), the key eBPF uses.
    pub cgroup_id: u64,
}

// ---- network (eBPF) ----

/// One container's TCP statistics over one sliding window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetworkWindow {
    /// One of `[network] windows`.
    pub window: Window,
    /// RTT samples in the window.
    pub samples: u64,
    pub rtt_min_us: u64,
    pub rtt_p50_us: u64,
    pub rtt_p90_us: u64,
    pub rtt_p99_us: u64,
    pub rtt_max_us: u64,
    /// RFC 3550 jitter of the RTT: each connection's running estimate
    /// J += (|ΔRTT| − J) / 16, averaged over the window's samples (µs).
    pub jitter_rfc3550_us: u64,
    /// Retransmitted segments in the window.
    pub retransmits: u64,
    /// `retransmits` per second of the window.
    pub retransmits_per_second: f64,
    /// RTP packets received (0 when the container has no RTP/UDP media stream).
    pub rtp_packets: u64,
    /// RTP packets lost (sequence-number gaps).
    pub rtp_lost: u64,
    /// RTP interarrival jitter (RFC 3550).
    pub rtp_jitter_us: u64,
}

impl NetworkWindow {
    /// A window with nothing counted yet.
    pub fn new(window: Window) -> Self {
        Self {
            window,
            samples: 0,
            rtt_min_us: 0,
            rtt_p50_us: 0,
            rtt_p90_us: 0,
            rtt_p99_us: 0,
            rtt_max_us: 0,
            jitter_rfc3550_us: 0,
            retransmits: 0,
            retransmits_per_second: 0.0,
            rtp_packets: 0,
            rtp_lost: 0,
            rtp_jitter_us: 0,
        }
    }
}

/// Transport of a live stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StreamProtocol {
    #[default]
    Tcp,
    Udp,
}

/// What a stream carries, as far as it can be told cheaply: from the port it is served on
/// (TCP), or from what the UDP source saw in its packets (RTP). A guess by port names the
/// usual protocol of that port, not what the bytes are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StreamKind {
    /// TCP on another port.
    #[default]
    Tcp,
    /// TCP on 1935.
    Rtmp,
    /// TCP on 554.
    Rtsp,
    /// TCP on 80 or 8080.
    Http,
    /// TCP on 443 or 8443.
    Https,
    /// UDP packets that parse as RTP.
    Rtp,
    /// Non-RTP UDP on 443.
    Quic,
    /// Other UDP (SRT, WebRTC data, ...).
    Udp,
}

impl StreamKind {
    /// The kind of a TCP stream served on `port`.
    pub const fn of_tcp_port(port: u16) -> Self {
        match port {
            1935 => Self::Rtmp,
            554 => Self::Rtsp,
            80 | 8080 => Self::Http,
            443 | 8443 => Self::Https,
            _ => Self::Tcp,
        }
    }

    /// The kind of a non-RTP UDP flow served on `port`.
    pub const fn of_udp_port(port: u16) -> Self {
        match port {
            443 => Self::Quic,
            _ => Self::Udp,
        }
    }
}

/// Bytes a stream moved over a recent span (the TCP source's last tick): a live stream and an
/// idle keep-alive look different.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamBytes {
    /// Bytes the container sent that the peer acknowledged.
    pub sent: u64,
    pub received: u64,
    pub over: Duration,
}

/// Which side opened a stream, as the container sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamDirection {
    /// The container serves it: a TCP connection accepted on its listening socket, a UDP flow
    /// or RTP stream it sends or receives as a server. The drain waits for these.
    #[default]
    Served,
    /// The container opened it (`connect`): one of its dependencies, a database or a cache.
    /// Listed, and waited for only with `drain.wait_for_outbound`.
    Outbound,
    /// The source cannot tell (the sock_diag fallback; connections the bounded flow map does
    /// not hold). Waited for, as a served one: a drain must not read ready on a guess.
    Unknown,
}

/// One live stream (long-lived established TCP connection or active UDP/RTP flow). The network
/// source decides what counts (e.g. established TCP connections older than a minimum age, UDP
/// flows with packets in the last seconds); the drain handshake waits for the ones it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveStream {
    pub protocol: StreamProtocol,
    pub kind: StreamKind,
    pub direction: StreamDirection,
    /// The container's side; for TCP the address is unspecified (the source keeps the port).
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// When the stream was first seen.
    pub started_at: SystemTime,
    /// Viewers behind the stream where the protocol reveals them; 0 = unknown.
    pub viewers: u32,
    /// Bytes over the last tick, where the source keeps them (TCP, from its second read on).
    pub bytes: Option<StreamBytes>,
    /// For an RTP stream the container sends: what its viewers report in RTCP.
    pub viewer_reports: Option<super::ViewerReports>,
}

impl LiveStream {
    /// The port the stream is served on, for `drain.include_ports`/`exclude_ports`: the local
    /// port, except for an outbound connection, whose local port is an ephemeral one.
    pub fn served_port(&self) -> Option<u16> {
        match self.direction {
            StreamDirection::Served | StreamDirection::Unknown => Some(self.local.port()),
            StreamDirection::Outbound => None,
        }
    }
}

/// A remote host that a container served (a connection accepted on one of its listening
/// sockets came from it): one per address, whatever its ports, so that a player fetching each
/// segment on a new connection is one viewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Viewer {
    pub addr: IpAddr,
    /// The container's port it was served on.
    pub port: u16,
    /// Now while a connection from it is open, else when its last one closed.
    pub last_seen: SystemTime,
}

/// A container's remote peer: one address and port, or, once a container has more peers than
/// `tcp.max_peers`, the prefix (/24, /64) the rest are folded into. Written as `addr:port`
/// (`[v6]:port`), `prefix/len` or `other` only at the edges (API, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    Addr(SocketAddr),
    Prefix(IpAddr, u8),
    Other,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::Prefix(a, len) => write!(f, "{a}/{len}"),
            Self::Other => f.write_str("other"),
        }
    }
}

impl serde::Serialize for Peer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Per-peer breakdown over `health.network_window`. The TCP source keeps sums per connection
/// for a peer, not a histogram: a mean, no percentiles.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerNetwork {
    pub remote: Peer,
    /// RTT samples in the window.
    pub samples: u64,
    /// Mean RTT (µs).
    pub rtt_mean_us: u64,
    /// RFC 3550 jitter of the peer's connections, averaged over the samples (µs).
    pub jitter_rfc3550_us: u64,
    /// Segments retransmitted to the peer in the window.
    pub retransmits: u64,
}

/// One container's network counters since the agent started: what Prometheus `rate()` and
/// `histogram_quantile()` need. They only grow while the agent runs; a source that restarts
/// with fresh kernel maps carries its old totals forward so that nothing here goes backwards.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetworkTotals {
    /// TCP RTT samples at the kernel's histogram resolution.
    pub rtt: RttHistogram,
    /// TCP segments retransmitted and sent.
    pub tcp_retransmits: u64,
    pub tcp_segments_out: u64,
    /// TCP connections that reached ESTABLISHED (connect or accept), and that closed.
    pub tcp_connections_opened: u64,
    pub tcp_connections_closed: u64,
    /// RTP packets received, and lost (sequence-number gaps).
    pub rtp_packets: u64,
    pub rtp_lost: u64,
}

/// A cumulative RTT distribution: sparse, non-cumulative bucket counts at the resolution of the
/// kernel's log-linear histogram (`agent_ebpf::tcp::bucket_bounds`), ascending by upper bound.
/// The exporter folds them into Prometheus `le` buckets whose bounds are kernel bucket edges,
/// so the folding adds no error.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RttHistogram {
    /// (exclusive upper bound in microseconds, samples in that bucket), ascending.
    pub buckets: Vec<(u64, u64)>,
    /// Samples in all buckets.
    pub count: u64,
    /// Sum of the samples, in microseconds.
    pub sum_us: u64,
}

impl RttHistogram {
    /// Adds `count` samples to the bucket with this exclusive upper bound, keeping the buckets
    /// ascending and sparse (an empty count adds nothing). `sum_us` is the caller's to add.
    pub fn add_bucket(&mut self, upper_us: u64, count: u64) {
        if count == 0 {
            return;
        }
        match self.buckets.binary_search_by_key(&upper_us, |b| b.0) {
            Ok(i) => self.buckets[i].1 += count,
            Err(i) => self.buckets.insert(i, (upper_us, count)),
        }
        self.count += count;
    }
}

impl std::ops::AddAssign<&RttHistogram> for RttHistogram {
    fn add_assign(&mut self, other: &RttHistogram) {
        for &(upper, count) in &other.buckets {
            self.add_bucket(upper, count);
        }
        self.sum_us += other.sum_us;
    }
}

impl std::ops::AddAssign<&NetworkTotals> for NetworkTotals {
    /// Sums two sets of counters: two sources (TCP and UDP) or two ids that map to one
    /// container, or a restarted source's totals on top of those it carried forward.
    fn add_assign(&mut self, o: &NetworkTotals) {
        // Destructured so that a field added to the type cannot be forgotten here.
        let NetworkTotals {
            rtt,
            tcp_retransmits,
            tcp_segments_out,
            tcp_connections_opened,
            tcp_connections_closed,
            rtp_packets,
            rtp_lost,
        } = o;
        self.rtt += rtt;
        self.tcp_retransmits += tcp_retransmits;
        self.tcp_segments_out += tcp_segments_out;
        self.tcp_connections_opened += tcp_connections_opened;
        self.tcp_connections_closed += tcp_connections_closed;
        self.rtp_packets += rtp_packets;
        self.rtp_lost += rtp_lost;
    }
}

/// One container's network summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerNetwork {
    /// One entry per configured window, shortest first; a window with no data is absent.
    pub windows: Vec<NetworkWindow>,
    /// Established TCP connections right now.
    pub established_connections: u32,
    /// Live streams right now (oldest first).
    pub streams: Vec<LiveStream>,
    /// Remote hosts the container served over TCP lately, connected now or not (most recent
    /// first); the drain counts those seen within `drain.viewer_idle`. Empty for the host's
    /// cgroups and the agent's own, like `streams`.
    pub viewers: Vec<Viewer>,
    pub peers: Vec<PeerNetwork>,
    /// Counters since the agent started (what /metrics exports as `_total` and `_bucket`).
    pub totals: NetworkTotals,
}

impl ContainerNetwork {
    /// The window of this length, if the sources had data for it.
    pub fn window(&self, window: Window) -> Option<&NetworkWindow> {
        self.windows.iter().find(|w| w.window == window)
    }
}

/// What the network source reports each tick, keyed by container id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetworkSnapshot {
    pub containers: BTreeMap<String, ContainerNetwork>,
    /// Each enabled feed behind it (`ebpf/tcp`, `ebpf/udp`) and whether it has reported, so
    /// that the drain counts streams only when every feed has (empty: nobody said; the drain
    /// then treats the counts as unknown).
    pub feeds: BTreeMap<&'static str, FeedState>,
}

/// What one network feed last said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedState {
    /// Started (or restarted) and has not reported since.
    Waiting,
    /// Reported in the run of its task that followed `run` restarts (the supervisor's count).
    Reporting { run: u32 },
    /// Enabled but cannot see what it should (it could not start, or lacks a capability).
    Blind { reason: String },
}

// ---- cgroups ----

/// PSI of one resource, as in `/proc/pressure/*` and `*.pressure`: the averages in percent,
/// the totals (the kernel's `total=`) in microseconds of stall since boot or cgroup creation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pressure {
    pub some_avg10: f64,
    pub full_avg10: f64,
    pub some_avg60: f64,
    pub full_avg60: f64,
    /// Time some tasks stalled, microseconds (a counter: what Prometheus `rate()` needs).
    pub some_total_us: u64,
    /// Time all non-idle tasks stalled at once, microseconds; 0 where the kernel has no `full`.
    pub full_total_us: u64,
}

/// One container's cgroup statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerStats {
    /// CPU-seconds per second over the last tick.
    pub cpu_usage_cores: f64,
    /// CPU time the cgroup used since it was created, seconds (a counter).
    pub cpu_usage_seconds_total: f64,
    /// Throttled periods / periods over the last tick (0-1).
    pub cpu_throttled_ratio: f64,
    pub cpu_throttled_seconds_total: f64,
    pub memory_bytes: u64,
    /// 0 = unlimited.
    pub memory_limit_bytes: u64,
    /// OOM kills since the cgroup was created (monotonic).
    pub oom_kills_total: u64,
    pub io_read_bytes_per_second: f64,
    pub io_write_bytes_per_second: f64,
    /// Bytes read and written on block devices since the cgroup was created (counters).
    pub io_read_bytes_total: u64,
    pub io_write_bytes_total: u64,
    pub pids: u64,
    /// 0 = unlimited.
    pub pids_limit: u64,
    pub cpu_pressure: Pressure,
    pub memory_pressure: Pressure,
    pub io_pressure: Pressure,
}

/// What the cgroup source reports each tick, keyed by container id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupSnapshot {
    pub containers: BTreeMap<String, ContainerStats>,
}

// ---- node ----

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Disk {
    pub mount_point: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    /// used / total (0-1).
    pub used_ratio: f64,
    /// inodes used / inodes total (0-1).
    pub inodes_used_ratio: f64,
}

/// Node-wide statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeStats {
    pub cpu_pressure: Pressure,
    pub memory_pressure: Pressure,
    pub io_pressure: Pressure,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub load1: f64,
    pub disks: Vec<Disk>,
    /// NIC drops since boot, all interfaces.
    pub nic_drops_total: u64,
    /// `None` when the clock state could not be read.
    pub clock_synchronized: Option<bool>,
    pub clock_max_error_ms: f64,
}

// ---- GPU ----

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XidEvent {
    pub code: u32,
    pub seen_at: Option<SystemTime>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuProcess {
    pub pid: u32,
    /// The store key of the process's container (container id, else its cgroup path); empty
    /// when the process's cgroup could not be read.
    pub container_id: String,
    pub used_memory_bytes: u64,
    /// NVML's latest per-process utilisation sample since the previous poll; `None` when the
    /// process did not run on the GPU in that time or the GPU gives no per-process samples.
    pub sample: Option<GpuProcessSample>,
}

/// One process's share of a GPU's engines over NVML's sample period, each in percent (0-100).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuProcessSample {
    pub sm_percent: u32,
    pub memory_percent: u32,
    pub encoder_percent: u32,
    pub decoder_percent: u32,
}

/// A reading of a GPU whose field in [`GpuDevice`] holds a plain value (0 / empty) when NVML
/// did not give it; [`GpuDevice::unreadable`] and [`GpuDevice::unsupported`] name those, so
/// that a 0 is never taken for a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GpuReading {
    Uuid,
    Name,
    PciBusId,
    Utilization,
    MemoryUtilization,
    MemoryUsed,
    MemoryTotal,
    Temperature,
    Power,
    EccCorrected,
    EccUncorrected,
    RowRemapping,
}

impl GpuReading {
    /// The name the API and the provenance show.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Uuid => "uuid",
            Self::Name => "name",
            Self::PciBusId => "pci bus id",
            Self::Utilization => "utilization",
            Self::MemoryUtilization => "memory utilization",
            Self::MemoryUsed => "memory used",
            Self::MemoryTotal => "memory total",
            Self::Temperature => "temperature",
            Self::Power => "power",
            Self::EccCorrected => "ecc corrected",
            Self::EccUncorrected => "ecc uncorrected",
            Self::RowRemapping => "row remapping",
        }
    }
}

impl fmt::Display for GpuReading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The current clock of each clock domain, in MHz; `None` where NVML gave none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuClocks {
    pub graphics_mhz: Option<u32>,
    pub sm_mhz: Option<u32>,
    pub memory_mhz: Option<u32>,
    pub video_mhz: Option<u32>,
}

/// Memory rows remapped after ECC errors (Ampere and later), by error kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuRemappedRows {
    pub corrected: u32,
    pub uncorrected: u32,
}

/// One NVLink link's error counters since the driver loaded; `None` where NVML gave none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuNvLinkErrors {
    pub link: u32,
    pub replay: Option<u64>,
    pub recovery: Option<u64>,
    pub crc_flit: Option<u64>,
    pub crc_data: Option<u64>,
}

/// XID and ECC events within `gpu.xid_window`, counted exactly (unlike the bounded
/// [`GpuDevice::xids`] history).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuEventWindow {
    /// XID code → events in the window.
    pub xids: BTreeMap<u64, u32>,
    /// The codes in `xids` that are on `gpu.drain_xids`, ascending.
    pub drain_xids: Vec<u64>,
    pub single_bit_ecc_events: u32,
    pub double_bit_ecc_events: u32,
}

/// One GPU's stats and health. The plain readings (utilisation to row remapping) hold 0 when
/// NVML did not give them, and [`GpuDevice::unreadable`] or [`GpuDevice::unsupported`] names
/// them; the `Option` readings are `None` instead.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuDevice {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub pci_bus_id: String,
    pub utilization_percent: f64,
    pub memory_utilization_percent: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub temperature_celsius: f64,
    pub power_watts: f64,
    /// NVML names of the active throttle reasons ("HwSlowdown", ...).
    pub throttle_reasons: Vec<String>,
    /// ECC errors since the driver loaded (volatile).
    pub ecc_corrected_total: u64,
    pub ecc_uncorrected_total: u64,
    /// Recent XIDs, newest last (the source keeps a bounded history).
    pub xids: Vec<XidEvent>,
    pub row_remap_pending: u32,
    pub row_remap_failed: bool,
    /// NVML reports the GPU lost / fallen off the bus.
    pub lost: bool,
    pub processes: Vec<GpuProcess>,
    /// Readings NVML failed to give in the last poll (their fields above are 0, not measured).
    pub unreadable: Vec<GpuReading>,
    /// Readings the device does not support (their fields above are 0, not measured).
    pub unsupported: Vec<GpuReading>,
    /// Failed NVML calls on this GPU since the agent started, by error kind.
    pub nvml_errors_total: BTreeMap<String, u64>,
    /// The power management limit, in watts.
    pub power_limit_watts: Option<f64>,
    pub clocks: GpuClocks,
    /// Share of time the video encoder and decoder were busy, in percent.
    pub encoder_utilization_percent: Option<u32>,
    pub decoder_utilization_percent: Option<u32>,
    /// Active video encoder sessions.
    pub encoder_sessions: Option<u32>,
    pub ecc_enabled: Option<bool>,
    /// ECC errors over the GPU's lifetime (kept in its infoROM).
    pub ecc_aggregate_corrected_total: Option<u64>,
    pub ecc_aggregate_uncorrected_total: Option<u64>,
    /// Pages retired after ECC errors, by cause (GPUs before Ampere).
    pub retired_pages_single_bit: Option<u32>,
    pub retired_pages_double_bit: Option<u32>,
    /// A page retirement waits for the next driver reload or GPU reset.
    pub retired_pages_pending: Option<bool>,
    /// `None` where the GPU does not remap rows or the reading failed (see `unreadable`).
    pub remapped_rows: Option<GpuRemappedRows>,
    /// PCIe replays since the driver loaded.
    pub pcie_replays_total: Option<u32>,
    /// The active NVLink links; empty on GPUs without NVLink.
    pub nvlink: Vec<GpuNvLinkErrors>,
    /// `None` when the source keeps no event window for this GPU.
    pub event_window: Option<GpuEventWindow>,
    /// The one container the kubelet assigned this GPU to (pod-resources), where known.
    pub assigned: Option<GpuAssignment>,
    /// Whether MIG mode is on; `None` where the GPU has no MIG or NVML did not say.
    pub mig_enabled: Option<bool>,
    /// The MIG devices of a GPU in MIG mode (empty otherwise); see [`super::GpuMigDevice`].
    pub mig_devices: Vec<super::GpuMigDevice>,
}

/// A GPU's holder by device assignment (the kubelet's pod-resources API).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuAssignment {
    /// The store key: the container's runtime id where the runtime names it the same way,
    /// else `pod-resources:<namespace>/<pod>/<container>`.
    pub key: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// How a GPU's use was tied to a container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GpuAttribution {
    /// NVML's per-process samples, each process mapped to its container through its cgroup.
    #[default]
    ProcessSamples,
    /// NVML listed no process of a container: the whole device's figures go to the one
    /// container the kubelet assigned the GPU to.
    DeviceAssignment,
}

impl GpuDevice {
    /// Whether the plain field of `reading` holds a measurement of the last poll.
    pub fn measured(&self, reading: GpuReading) -> bool {
        !self.unreadable.contains(&reading) && !self.unsupported.contains(&reading)
    }

    /// The processes summed per container (by store key); processes whose container is
    /// unknown are left out. The API and `/metrics` both read this, so they agree.
    ///
    /// Where no process is attributed and the kubelet assigned the GPU to one container, that
    /// container gets the device's own figures ([`GpuAttribution::DeviceAssignment`]).
    pub fn by_container(&self) -> BTreeMap<&str, GpuContainerUsage> {
        let mut out = BTreeMap::<&str, GpuContainerUsage>::new();
        if let Some(a) = self
            .assigned
            .as_ref()
            .filter(|_| self.processes.iter().all(|p| p.container_id.is_empty()))
        {
            let percent = |v: f64| {
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a percentage, clamped to 0-100"
                )]
                let p = v.round().clamp(0.0, 100.0) as u32;
                p
            };
            out.insert(
                &a.key,
                GpuContainerUsage {
                    processes: 0,
                    used_memory_bytes: self.memory_used_bytes,
                    sampled: self.measured(GpuReading::Utilization),
                    sm_percent: percent(self.utilization_percent),
                    encoder_percent: self.encoder_utilization_percent.unwrap_or(0),
                    decoder_percent: self.decoder_utilization_percent.unwrap_or(0),
                    attribution: GpuAttribution::DeviceAssignment,
                },
            );
            return out;
        }
        for p in self.processes.iter().filter(|p| !p.container_id.is_empty()) {
            let u = out.entry(&p.container_id).or_default();
            u.processes += 1;
            u.used_memory_bytes += p.used_memory_bytes;
            if let Some(s) = p.sample {
                u.sampled = true;
                u.sm_percent += s.sm_percent;
                u.encoder_percent += s.encoder_percent;
                u.decoder_percent += s.decoder_percent;
            }
        }
        out
    }
}

/// One container's processes on one GPU, summed ([`GpuDevice::by_container`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuContainerUsage {
    pub processes: u32,
    pub used_memory_bytes: u64,
    /// Whether any of its processes had a utilisation sample in the last poll.
    pub sampled: bool,
    /// Sums of the processes' shares, in percent; more than 100 where NVML's samples overlap.
    pub sm_percent: u32,
    pub encoder_percent: u32,
    pub decoder_percent: u32,
    /// How these figures were tied to the container.
    pub attribution: GpuAttribution,
}

impl GpuContainerUsage {
    /// A summed share as a ratio, capped at 1 (the engine cannot be more than fully busy).
    pub fn ratio(percent: u32) -> f64 {
        (f64::from(percent) / 100.0).min(1.0)
    }
}

/// The GPU source's own state, beside the devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuSourceState {
    /// NVML could not even count the GPUs in the last poll (the device list is then empty
    /// because nothing could be read, not because there are none).
    pub poll_failed: bool,
    /// NVML fails as a whole and the source re-initialises it with back-off.
    pub degraded: bool,
    /// Times the source shut NVML down and initialised it again, successful or not.
    pub reinit_attempts_total: u64,
    /// Polls whose `nvmlDeviceGetCount` failed, since the source started.
    pub count_errors_total: u64,
    /// How long the last poll of every GPU took.
    pub poll_duration: Duration,
    pub driver_version: Option<String>,
    pub nvml_version: Option<String>,
    /// Whether XID and ECC events are received from the driver; `None` when the source does
    /// not say (it has not tried).
    pub events_watched: Option<bool>,
}

/// What the GPU source reports each tick.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuSnapshot {
    pub gpus: Vec<GpuDevice>,
    pub source: GpuSourceState,
}
