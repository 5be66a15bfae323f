//! UDP flows and RTP streams per container, from the `cgroup_skb` programs.
//!
//! Each tick reads the kernel maps, turns cumulative per-flow and per-stream state into the
//! report's [`UdpSnapshot`] (quality per stream, live streams per container, windows), removes
//! entries idle past `udp.expiry` from the maps, and publishes the snapshot on a watch channel.

pub mod config;
pub mod model;
pub mod viewers;
pub mod windows;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use agent_ebpf::rtp::{static_clock_rate, RtpState, UdpFlowKey, DIR_EGRESS, DIR_INGRESS};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use self::config::UdpConfig;
use self::{
    model::{ContainerUdp, Endpoint, FlowQuality, StreamQuality, UdpCounters, UdpSnapshot},
    viewers::{Fresh, Reports},
    windows::{Differ, History, Totals},
};
use super::cgroup_path::CgroupPaths;
use crate::{
    ebpf::{
        monotonic_ns,
        udp::{UdpMaps, UdpPrograms},
        LoadError,
    },
    probe::Capabilities,
    store::Window,
};

pub const NAME: &str = "ebpf/udp";
/// The hook path, reported with the data.
pub const HOOK: &str = "cgroup_skb ingress/egress at the cgroup v2 root (socket cgroup)";

pub struct Source {
    programs: UdpPrograms,
    config: UdpConfig,
    tick: Duration,
    /// `network.windows`, shortest first.
    windows: Vec<Window>,
    differ: Differ,
    history: HashMap<u64, History>,
    totals: HashMap<u64, Totals>,
    ticks: u64,
    paths: CgroupPaths,
    /// Viewers' RTCP reports, with the history their window loss needs.
    reports: Reports,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("udp::Source").finish_non_exhaustive()
    }
}

impl Source {
    /// Attaches the programs, or says why this node cannot run them.
    pub fn start(
        config: &UdpConfig,
        tick: Duration,
        windows: &[Window],
        caps: &Capabilities,
    ) -> Result<Self, String> {
        if !caps.is_root {
            return Err("not running as root (CAP_BPF and CAP_NET_ADMIN are needed)".to_owned());
        }
        if !caps.has_program_type("cgroup_skb") {
            return Err("the kernel does not load cgroup_skb programs".to_owned());
        }
        if !caps.cgroup_link.available {
            return Err(caps.cgroup_link.detail.clone());
        }
        let root = caps.cgroup.unified().ok_or_else(|| {
            "no cgroup v2 hierarchy: cgroup_skb needs one (tc on host interfaces is not implemented yet)"
                .to_owned()
        })?;
        Self::attach(root, config, tick, windows).map_err(|e| e.to_string())
    }

    /// Attaches at `cgroup_v2_root` with this configuration and `network.windows` (tests use
    /// it directly).
    pub fn attach(
        cgroup_v2_root: &Path,
        config: &UdpConfig,
        tick: Duration,
        windows: &[Window],
    ) -> Result<Self, LoadError> {
        let rates = config
            .clock_rates()
            .map_err(|e| LoadError::Config(e.to_string()))?;
        let programs =
            UdpPrograms::attach(cgroup_v2_root, &rates, config.max_flows, config.max_streams)?;
        tracing::info!(hook = HOOK, "UDP/RTP programs attached");
        Ok(Self {
            programs,
            config: config.clone(),
            tick,
            windows: windows.to_vec(),
            differ: Differ::default(),
            history: HashMap::new(),
            totals: HashMap::new(),
            ticks: 0,
            paths: CgroupPaths::new(Some(cgroup_v2_root.to_path_buf())),
            reports: Reports::default(),
        })
    }

    /// Publishes a snapshot every tick until cancelled; the programs detach when this returns.
    pub async fn run(
        mut self,
        tx: watch::Sender<UdpSnapshot>,
        cancel: CancellationToken,
    ) -> Result<(), String> {
        // A restarted source publishes into its predecessor's channel: what is there is the
        // last thing that run counted, and the totals go on from it.
        let prior = tx.borrow().clone();
        self.carry(&prior);
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    let snapshot = self.poll().map_err(|e| e.to_string())?;
                    tracing::debug!(
                        containers = snapshot.containers.len(),
                        live_streams = snapshot.containers.iter().map(|c| c.live_streams).sum::<u32>(),
                        udp_packets = snapshot.counters.udp_packets,
                        "udp tick"
                    );
                    tx.send_replace(snapshot);
                }
            }
        }
        Ok(())
    }

    /// One tick: read the maps, update the windows, expire idle entries, build the snapshot.
    pub fn poll(&mut self) -> Result<UdpSnapshot, LoadError> {
        let maps = self.programs.read()?;
        let now_ns = monotonic_ns();
        let now = Instant::now();
        let (fresh, stale_reports) = self.reports.tick(
            &maps.reports,
            now_ns,
            self.config.viewer_report_stale,
            self.report_window(),
        );
        let snapshot = self.build(&maps, &fresh, now_ns, now);
        let expiry = self.config.expiry.as_nanos() as u64;
        let stale_flows: Vec<_> = maps
            .flows
            .iter()
            .filter(|(_, f)| now_ns.saturating_sub(f.last_ns) > expiry)
            .map(|(k, _)| *k)
            .collect();
        let stale_streams: Vec<_> = maps
            .streams
            .iter()
            .filter(|(_, s)| now_ns.saturating_sub(s.last_arrival_ns) > expiry)
            .map(|(k, _)| *k)
            .collect();
        if !stale_flows.is_empty() || !stale_streams.is_empty() || !stale_reports.is_empty() {
            self.programs
                .remove(&stale_flows, &stale_streams, &stale_reports)?;
        }
        Ok(snapshot)
    }

    /// Carries the totals of an earlier run of the source (its last snapshot) forward.
    pub fn carry(&mut self, prior: &UdpSnapshot) {
        for c in &prior.containers {
            if c.totals != crate::store::NetworkTotals::default() {
                self.totals.insert(c.cgroup_id, Totals::carried(&c.totals));
            }
        }
    }

    /// Viewers' loss is given over the longest of `network.windows`.
    fn report_window(&self) -> Window {
        self.windows
            .last()
            .copied()
            .unwrap_or(Window::from_secs(60))
    }

    fn live(&self, idle_ns: u64) -> bool {
        idle_ns <= self.config.idle_timeout.as_nanos() as u64
    }

    fn build(&mut self, maps: &UdpMaps, fresh: &Fresh, now_ns: u64, now: Instant) -> UdpSnapshot {
        let idle_timeout = self.config.idle_timeout.as_nanos() as u64;
        let deltas = self.differ.tick(&maps.flows, &maps.streams, |s| {
            now_ns.saturating_sub(s.last_arrival_ns) <= idle_timeout
        });
        self.ticks += 1;
        let keep = self.windows.last().map_or(Duration::ZERO, |w| w.duration());
        for (cg, d) in deltas {
            let mut t = self.totals.get(&cg).copied().unwrap_or_default();
            if t.add(&d, self.ticks) {
                self.totals.insert(cg, t);
            }
            self.history.entry(cg).or_default().push(now, d, keep);
        }
        // Bounded like the streams map: a container that had RTP had a stream in it.
        let excess = self
            .totals
            .len()
            .saturating_sub(self.config.max_streams as usize);
        if excess > 0 {
            let mut idle: Vec<(u64, u64)> = self
                .totals
                .iter()
                .map(|(id, t)| (t.last_active, *id))
                .collect();
            idle.sort_unstable();
            for (_, id) in idle.into_iter().take(excess) {
                self.totals.remove(&id);
            }
        }
        // Containers with no tick in the longest window have no window left to report.
        self.history.retain(|_, h| !h.is_empty());
        let mut live_ids: Vec<u64> = maps.flows.iter().map(|(k, _)| k.cgroup_id).collect();
        live_ids.extend(maps.streams.iter().map(|(k, _)| k.flow.cgroup_id));
        live_ids.extend(self.history.keys());
        live_ids.extend(self.totals.keys());
        live_ids.sort_unstable();
        live_ids.dedup();
        self.paths.next_tick(&live_ids);

        let rtp_flows: HashSet<UdpFlowKey> = maps
            .streams
            .iter()
            .filter(|(_, s)| s.confirmed == 1)
            .map(|(k, _)| k.flow)
            .collect();
        // RTCP on RTP port + 1 (RFC 3550 11, without rtcp-mux) is part of its RTP session:
        // a flow on the port above an RTP flow's, between the same two hosts, in either
        // direction, is not a stream of its own.
        let rtp_ports: HashSet<RtpPort> = rtp_flows.iter().map(RtpPort::of).collect();
        let is_rtcp = |k: &UdpFlowKey| {
            k.local_port.checked_sub(1).is_some_and(|below| {
                rtp_ports.contains(&RtpPort {
                    local_port: below,
                    ..RtpPort::of(k)
                })
            })
        };
        let mut containers: HashMap<u64, ContainerUdp> = HashMap::new();
        let entry = |cg: u64, paths: &mut CgroupPaths| -> ContainerUdp {
            ContainerUdp {
                cgroup_id: cg,
                cgroup_path: paths.resolve(cg),
                live_streams: 0,
                streams: Vec::new(),
                flows: Vec::new(),
                windows: Vec::new(),
                totals: crate::store::NetworkTotals::default(),
            }
        };
        // Outbound streams per (container, SSRC): one SSRC may go to several viewers.
        let mut outbound: HashMap<(u64, u32), u32> = HashMap::new();
        for (k, _) in maps
            .streams
            .iter()
            .filter(|(k, s)| s.confirmed == 1 && k.flow.direction == DIR_EGRESS)
        {
            *outbound.entry((k.flow.cgroup_id, k.ssrc)).or_default() += 1;
        }
        let wall = SystemTime::now();
        let report_window = self.report_window();
        for (k, s) in maps.streams.iter().filter(|(_, s)| s.confirmed == 1) {
            let idle = now_ns.saturating_sub(s.last_arrival_ns);
            let live = self.live(idle);
            let mut q = stream_quality(&k.flow, k.ssrc, s, now_ns, live);
            if k.flow.direction == DIR_EGRESS {
                let sole = outbound.get(&(k.flow.cgroup_id, k.ssrc)) == Some(&1);
                q.viewer_reports = self.reports.for_stream(
                    fresh,
                    &k.flow,
                    k.ssrc,
                    sole,
                    q.clock_rate,
                    now_ns,
                    wall,
                    report_window,
                );
            }
            let c = containers
                .entry(k.flow.cgroup_id)
                .or_insert_with(|| entry(k.flow.cgroup_id, &mut self.paths));
            c.live_streams += u32::from(live);
            c.streams.push(q);
        }
        for (k, f) in &maps.flows {
            let idle = now_ns.saturating_sub(f.last_ns);
            let age = now_ns.saturating_sub(f.first_ns);
            let live = self.live(idle);
            let rtp = rtp_flows.contains(k);
            let rtcp = !rtp && is_rtcp(k);
            let c = containers
                .entry(k.cgroup_id)
                .or_insert_with(|| entry(k.cgroup_id, &mut self.paths));
            let flow = FlowQuality {
                endpoint: endpoint(k),
                packets: f.packets,
                bytes: f.bytes,
                mean_ipdv_seconds: (f.ipdv_count > 0)
                    .then(|| f.ipdv_sum_ns as f64 / f.ipdv_count as f64 / 1e9),
                max_ipdv_seconds: (f.ipdv_count > 0).then(|| f.ipdv_max_ns as f64 / 1e9),
                max_gap_seconds: f.max_gap_ns as f64 / 1e9,
                age_seconds: age as f64 / 1e9,
                idle_seconds: idle as f64 / 1e9,
                live,
                rtp,
                rtcp,
            };
            if flow.is_stream(self.config.stream_min_duration) {
                c.live_streams += 1;
            }
            c.flows.push(flow);
        }
        for (cg, h) in &self.history {
            let c = containers
                .entry(*cg)
                .or_insert_with(|| entry(*cg, &mut self.paths));
            c.windows = h.windows(now, &self.windows);
        }
        // A container with nothing left but its totals whose cgroup is gone will never count
        // again: forget it, or it would be reported and exported for ever.
        let paths = &mut self.paths;
        self.totals
            .retain(|cg, _| containers.contains_key(cg) || paths.resolve(*cg).is_some());
        for (cg, t) in &self.totals {
            containers
                .entry(*cg)
                .or_insert_with(|| entry(*cg, &mut self.paths))
                .totals = t.network();
        }
        let mut containers: Vec<ContainerUdp> = containers.into_values().collect();
        containers.sort_by_key(|c| c.cgroup_id);
        UdpSnapshot {
            hook: HOOK.to_owned(),
            containers,
            counters: counters(maps),
        }
    }
}

/// One end of an RTP flow as RTCP on port + 1 is matched to it: the container, both hosts
/// and the container's port (the direction left out: the RTCP of a stream the container sends
/// arrives, and that of one it receives leaves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct RtpPort {
    cgroup_id: u64,
    local_addr: [u32; 4],
    remote_addr: [u32; 4],
    local_port: u16,
}

impl RtpPort {
    fn of(k: &UdpFlowKey) -> Self {
        Self {
            cgroup_id: k.cgroup_id,
            local_addr: k.local_addr,
            remote_addr: k.remote_addr,
            local_port: k.local_port,
        }
    }
}

fn counters(maps: &UdpMaps) -> UdpCounters {
    use agent_ebpf::rtp::counter as c;
    let at = |i: u32| maps.counters[i as usize];
    UdpCounters {
        udp_packets: at(c::UDP_PACKETS),
        rtp_packets: at(c::RTP_PACKETS),
        rtcp_packets: at(c::RTCP_PACKETS),
        stun_packets: at(c::STUN_PACKETS),
        truncated: at(c::TRUNCATED),
        fragments: at(c::FRAGMENTS),
        flows_created: at(c::FLOWS_CREATED),
        streams_created: at(c::STREAMS_CREATED),
        not_tracked: at(c::FLOW_INSERT_FAILED) + at(c::STREAM_INSERT_FAILED),
        flows_on_probation: at(c::FLOWS_ON_PROBATION),
        streams_on_probation: at(c::STREAMS_ON_PROBATION),
        rtcp_with_reports: at(c::RTCP_WITH_REPORTS),
        viewer_reports_tracked: maps.reports.len() as u64,
        flows_tracked: maps.flows.len() as u64,
        streams_tracked: maps.streams.len() as u64,
    }
}

fn addr(words: &[u32; 4], version: u16) -> IpAddr {
    // The words hold the address bytes in network order, as loaded from the packet.
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    if version == 6 {
        let mut b = [0u8; 16];
        b.copy_from_slice(&bytes);
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

fn endpoint(k: &UdpFlowKey) -> Endpoint {
    Endpoint {
        local: addr(&k.local_addr, k.ip_version),
        local_port: k.local_port,
        remote: addr(&k.remote_addr, k.ip_version),
        remote_port: k.remote_port,
        direction: if k.direction == DIR_INGRESS {
            "ingress"
        } else {
            "egress"
        },
    }
}

fn stream_quality(
    flow: &UdpFlowKey,
    ssrc: u32,
    s: &RtpState,
    now_ns: u64,
    live: bool,
) -> StreamQuality {
    let pt = s.payload_type as u8;
    let rate = (s.clock_rate != 0).then_some(s.clock_rate);
    let has_jitter = rate.is_some() && s.jitter_samples > 0;
    let secs = |ns: u64| ns as f64 / 1e9;
    StreamQuality {
        endpoint: endpoint(flow),
        ssrc,
        payload_type: pt,
        clock_rate: rate.or_else(|| static_clock_rate(pt)),
        packets: s.packets,
        bytes: s.bytes,
        expected: s.expected(),
        lost: s.lost(),
        reordered: s.reordered,
        jitter_seconds: has_jitter.then(|| secs(s.jitter_ns())),
        mean_jitter_seconds: has_jitter.then(|| secs(s.jitter_sum_ns) / s.jitter_samples as f64),
        max_jitter_seconds: has_jitter.then(|| secs(s.jitter_max_ns)),
        timestamp_step: rate.is_none().then_some(s.last_ts_delta),
        payload_type_changes: s.payload_type_changes,
        sequence_wraps: s.cycles,
        age_seconds: secs(now_ns.saturating_sub(s.first_arrival_ns)),
        idle_seconds: secs(now_ns.saturating_sub(s.last_arrival_ns)),
        live,
        viewer_reports: None,
    }
}
