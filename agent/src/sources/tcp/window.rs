//! Sliding windows over the kernel's cumulative counters.
//!
//! Every tick the reader hands over what it read from the maps ([`RawRead`]); the [`Tracker`]
//! turns cumulative counters into per-tick differences, keeps the last ticks in a ring as long
//! as the longest window, and sums the newest ones for each window. Memory is bounded by the
//! map sizes (what the kernel can hold), the number of ticks in the longest window, and the
//! peer bound per container.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use agent_ebpf::{tcp::bucket_bounds, CgroupTcpStats, FlowState, HistKey};

pub use crate::ebpf::tcp::{Cleanup, RawRead};
use crate::store::{NetworkTotals, Peer, RttHistogram, StreamDirection, Window};

use super::{
    hist::Histogram,
    prev::PrevFlow,
    snapshot::{
        flow_direction, ByteCounts, Connection, ContainerTcp, DirectionCounts, Drops, PeerTcp,
        PeerWindow, TcpSnapshot, WindowStats,
    },
    viewers::{ServedPeer, ServedPeers},
};

/// An established connection in this read.
#[derive(Debug, Clone, Copy)]
struct OpenFlow {
    peer: Peer,
    conn: Connection,
}

#[expect(clippy::cast_possible_truncation, reason = "a port fits in u16")]
fn flow_port(port: u32) -> u16 {
    port as u16
}

fn flow_local_port(flow: &FlowState) -> u16 {
    flow_port(flow.local_port)
}

fn flow_addr(flow: &FlowState) -> IpAddr {
    if flow.family == 2 {
        IpAddr::V4(Ipv4Addr::from(u32::from_be(flow.remote[0])))
    } else {
        let mut b = [0u8; 16];
        for (i, w) in flow.remote.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let v6 = Ipv6Addr::from(b);
        // A dual-stack socket talking to an IPv4 peer: show (and fold) it as IPv4, or every
        // such peer would share one ::ffff:0:0/64 prefix.
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    }
}

fn prefix_of(addr: IpAddr) -> Peer {
    match addr {
        IpAddr::V4(a) => Peer::Prefix(IpAddr::V4(Ipv4Addr::from(u32::from(a) & 0xFFFF_FF00)), 24),
        IpAddr::V6(a) => {
            let masked = u128::from(a) & !((1u128 << 64) - 1);
            Peer::Prefix(IpAddr::V6(Ipv6Addr::from(masked)), 64)
        }
    }
}

/// Per-tick (or per-window) sums for one peer of one container.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerDelta {
    pub samples: u64,
    pub sum_rtt_us: f64,
    pub diffs: u64,
    pub sum_jitter16_us: f64,
    pub retrans: u64,
    pub segs_out: u64,
}

impl PeerDelta {
    fn add(&mut self, o: &PeerDelta) {
        self.samples += o.samples;
        self.sum_rtt_us += o.sum_rtt_us;
        self.diffs += o.diffs;
        self.sum_jitter16_us += o.sum_jitter16_us;
        self.retrans += o.retrans;
        self.segs_out += o.segs_out;
    }
}

/// One container's counters since the agent started: what this tracker summed from the
/// kernel's deltas, on top of what an earlier run of the source had counted (`carried`).
#[derive(Debug, Clone, Default)]
struct Totals {
    carried: NetworkTotals,
    stats: CgroupTcpStats,
    hist: Histogram,
    /// Tick of the last change, to forget the idlest first.
    last_active: u64,
}

impl Totals {
    fn network(&self) -> NetworkTotals {
        let mut out = self.carried.clone();
        let mut rtt = RttHistogram::default();
        for (bucket, count) in self.hist.iter() {
            rtt.add_bucket(bucket_bounds(bucket).1, count);
        }
        rtt.sum_us = self.stats.sum_rtt_us;
        out += &NetworkTotals {
            rtt,
            tcp_retransmits: self.stats.retrans,
            tcp_segments_out: self.stats.segs_out,
            tcp_connections_opened: self.stats.opened_active + self.stats.opened_passive,
            tcp_connections_closed: self.stats.closed,
            ..NetworkTotals::default()
        };
        out
    }
}

#[derive(Debug, Clone, Default)]
struct CgroupDelta {
    stats: CgroupTcpStats,
    hist: Histogram,
}

#[derive(Debug, Default)]
struct Tick {
    cgroups: HashMap<u64, CgroupDelta>,
    peers: HashMap<(u64, Peer), PeerDelta>,
}

/// Window lengths in ticks, and the bounds the tracker keeps to.
#[derive(Debug, Clone)]
pub struct Limits {
    /// (window, its length in ticks), shortest first.
    pub windows: Vec<(Window, usize)>,
    /// Distinct exact peers per container before new ones are folded into prefixes.
    pub max_peers: usize,
    /// The hook chain in use, reported in the snapshot's fidelity.
    pub recorder: super::Recorder,
    /// Containers whose totals since the agent started are kept; beyond it, those idle the
    /// longest are forgotten (their counters then restart from 0 if they come back).
    pub max_totals: usize,
}

/// Sizes of the tracker's structures; each is bounded by a map size or a config value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerFootprint {
    /// Ticks kept (≤ the longest window in ticks).
    pub ticks: usize,
    /// Flows remembered from the last read (≤ `max_flows`).
    pub flows: usize,
    /// Cgroups and histogram entries remembered (≤ `max_cgroups`, `max_hist_entries`).
    pub cgroups: usize,
    pub hist_entries: usize,
    /// Exact peers remembered for the busiest container (≤ `max_peers`).
    pub peers_per_cgroup_max: usize,
    /// Entries in the largest kept tick (cgroups plus (cgroup, peer) pairs).
    pub tick_entries_max: usize,
}

/// Turns cumulative kernel counters into sliding-window statistics.
#[derive(Debug)]
pub struct Tracker {
    limits: Limits,
    ring: VecDeque<Tick>,
    prev_stats: HashMap<u64, CgroupTcpStats>,
    prev_hist: HashMap<HistKey, u64>,
    prev_flows: HashMap<u64, PrevFlow>,
    /// Exact peers each container has, with the tick they were last seen.
    known_peers: HashMap<u64, HashMap<(IpAddr, u16), u64>>,
    /// The tick each container's full peer table was last swept of expired peers.
    peers_pruned_at: HashMap<u64, u64>,
    /// Last tick a cgroup's counters changed.
    last_active: HashMap<u64, u64>,
    totals: HashMap<u64, Totals>,
    /// Cgroups cleaned up whose directory is gone: their totals go once nothing else of
    /// theirs is reported.
    gone: std::collections::HashSet<u64>,
    /// Remote hosts each container served lately (its viewers).
    served: ServedPeers,
    tick_no: u64,
    /// `now_ns` of the previous read: the span each connection's byte counts cover.
    prev_now_ns: u64,
}

impl Tracker {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ring: VecDeque::new(),
            prev_stats: HashMap::new(),
            prev_hist: HashMap::new(),
            prev_flows: HashMap::new(),
            known_peers: HashMap::new(),
            peers_pruned_at: HashMap::new(),
            last_active: HashMap::new(),
            totals: HashMap::new(),
            gone: std::collections::HashSet::new(),
            served: ServedPeers::default(),
            tick_no: 0,
            prev_now_ns: 0,
        }
    }

    /// Carries the totals of an earlier run of the source (its last snapshot) forward, so
    /// that a restart with fresh kernel maps does not take any counter backwards.
    pub fn carry(&mut self, prior: &TcpSnapshot) {
        for (id, c) in &prior.containers {
            if c.totals != NetworkTotals::default() {
                self.totals.entry(*id).or_default().carried += &c.totals;
            }
        }
    }

    fn add_totals(&mut self, tick: &Tick) {
        for (id, d) in &tick.cgroups {
            if d.stats == CgroupTcpStats::default() && d.hist.is_empty() {
                continue;
            }
            let t = self.totals.entry(*id).or_default();
            t.stats += d.stats;
            t.hist.merge(&d.hist);
            t.last_active = self.tick_no;
        }
        let excess = self.totals.len().saturating_sub(self.limits.max_totals);
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
    }

    /// How much the tracker holds, to check its bounds.
    pub fn footprint(&self) -> TrackerFootprint {
        TrackerFootprint {
            ticks: self.ring.len(),
            flows: self.prev_flows.len(),
            cgroups: self.prev_stats.len(),
            hist_entries: self.prev_hist.len(),
            peers_per_cgroup_max: self
                .known_peers
                .values()
                .map(HashMap::len)
                .max()
                .unwrap_or(0),
            tick_entries_max: self
                .ring
                .iter()
                .map(|t| t.cgroups.len() + t.peers.len())
                .max()
                .unwrap_or(0),
        }
    }

    fn longest(&self) -> usize {
        self.limits
            .windows
            .iter()
            .map(|w| w.1)
            .max()
            .unwrap_or(1)
            .max(1)
    }

    fn peer_key(&mut self, cgroup_id: u64, flow: &FlowState) -> Peer {
        let addr = flow_addr(flow);
        #[expect(clippy::cast_possible_truncation, reason = "a port fits in u16")]
        let exact = (addr, flow.remote_port as u16);
        let tick = self.tick_no;
        let longest = self.longest() as u64;
        let known = self.known_peers.entry(cgroup_id).or_default();
        if let Some(seen) = known.get_mut(&exact) {
            *seen = tick;
            return Peer::Addr(SocketAddr::new(exact.0, exact.1));
        }
        // Make room by forgetting peers unseen for the longest window; once per tick and
        // container at most, or a full table costs a sweep per connection.
        if known.len() >= self.limits.max_peers
            && self.peers_pruned_at.insert(cgroup_id, tick) != Some(tick)
        {
            known.retain(|_, seen| tick.saturating_sub(*seen) <= longest);
        }
        if known.len() < self.limits.max_peers {
            known.insert(exact, tick);
            return Peer::Addr(SocketAddr::new(exact.0, exact.1));
        }
        prefix_of(addr)
    }

    /// Takes one tick's read; returns the new snapshot and what to delete from the maps.
    pub fn update(
        &mut self,
        raw: RawRead,
        resolve: &mut dyn FnMut(u64) -> Option<String>,
    ) -> (TcpSnapshot, Cleanup) {
        self.update_with(raw, std::iter::empty(), resolve)
    }

    /// `update` with more flows read beside `raw.flows`, taken one at a time as `seeded` makes
    /// them: the start-up seed's connections, which as a copy in `raw.flows` would cost 144
    /// bytes each (14 MiB at 100,000 sockets) on top of the seed's own 56.
    pub fn update_with(
        &mut self,
        mut raw: RawRead,
        seeded: impl Iterator<Item = (u64, FlowState)>,
        resolve: &mut dyn FnMut(u64) -> Option<String>,
    ) -> (TcpSnapshot, Cleanup) {
        self.tick_no += 1;
        let mut tick = Tick::default();
        let mut cleanup = Cleanup::default();

        for (id, cur) in &raw.stats {
            let prev = self.prev_stats.get(id).copied().unwrap_or_default();
            let d = *cur - prev;
            if d != CgroupTcpStats::default() {
                self.last_active.insert(*id, self.tick_no);
            }
            tick.cgroups.entry(*id).or_default().stats = d;
            self.prev_stats.insert(*id, *cur);
        }
        for (key, cur) in &raw.hist {
            let prev = self.prev_hist.get(key).copied().unwrap_or(0);
            tick.cgroups
                .entry(key.cgroup_id)
                .or_default()
                .hist
                .add(key.bucket, cur.wrapping_sub(prev));
            self.prev_hist.insert(*key, *cur);
        }

        let mut open: HashMap<u64, Vec<OpenFlow>> = HashMap::new();
        // Moved out, so that the read (160 bytes a flow) is freed before the snapshot is built.
        let flows = std::mem::take(&mut raw.flows);
        let tick_no = self.tick_no;
        for (cookie, flow) in flows.into_iter().chain(seeded) {
            if flow.cgroup_id == 0 {
                // Not attributed yet (an accepted socket that has sent nothing, on the egress
                // path); it is closed, and never had a sample, if `closed_ns` is set.
                if flow.closed_ns != 0 {
                    cleanup.flows.push(cookie);
                }
                continue;
            }
            // A flow evicted and re-created between two reads restarts its sums: its start
            // time tells it apart from the one remembered.
            let known = self
                .prev_flows
                .get(&cookie)
                .filter(|p| p.start_ns == flow.start_ns)
                .copied();
            let prev = known.unwrap_or_default();
            let peer = self.peer_key(flow.cgroup_id, &flow);
            if flow_direction(flow.passive) == StreamDirection::Served {
                let seen = if flow.closed_ns != 0 {
                    flow.closed_ns
                } else {
                    raw.now_ns
                };
                self.served.saw(
                    flow.cgroup_id,
                    (flow_addr(&flow), flow_local_port(&flow)),
                    seen,
                    self.limits.max_peers,
                );
            }
            #[expect(
                clippy::cast_precision_loss,
                reason = "µs sums far below 2^52 per tick"
            )]
            let d = PeerDelta {
                samples: flow.path_samples.wrapping_sub(prev.path_samples),
                sum_rtt_us: flow.sum_rtt_us.wrapping_sub(prev.sum_rtt_us) as f64,
                diffs: flow.diffs.wrapping_sub(prev.diffs),
                sum_jitter16_us: flow.sum_jitter16_us.wrapping_sub(prev.sum_jitter16_us) as f64,
                retrans: flow.retrans.wrapping_sub(prev.retrans),
                segs_out: flow.segs_out.wrapping_sub(prev.segs_out),
            };
            tick.peers
                .entry((flow.cgroup_id, peer))
                .or_default()
                .add(&d);
            if flow.closed_ns != 0 {
                cleanup.flows.push(cookie);
                self.prev_flows.remove(&cookie);
            } else {
                // Bytes need a previous read of the same connection; its first has none.
                let bytes = known.map(|p| ByteCounts {
                    acked: flow.bytes_acked.wrapping_sub(p.bytes_acked),
                    received: flow.bytes_received.wrapping_sub(p.bytes_received),
                    over: std::time::Duration::from_nanos(
                        raw.now_ns.saturating_sub(self.prev_now_ns),
                    ),
                });
                open.entry(flow.cgroup_id).or_default().push(OpenFlow {
                    peer,
                    conn: Connection {
                        remote: SocketAddr::new(flow_addr(&flow), flow_port(flow.remote_port)),
                        local_port: flow_local_port(&flow),
                        direction: flow_direction(flow.passive),
                        age: std::time::Duration::from_nanos(
                            raw.now_ns.saturating_sub(flow.start_ns),
                        ),
                        bytes,
                    },
                });
                self.prev_flows.insert(cookie, PrevFlow::of(&flow, tick_no));
            }
        }
        // Flows the LRU map evicted: forget them.
        self.prev_flows.retain(|_, p| p.seen_tick == tick_no);

        // Cgroups idle past the longest window with nothing open: drop their kernel entries.
        let longest = self.longest() as u64;
        for (id, _) in &raw.stats {
            let idle = self
                .tick_no
                .saturating_sub(self.last_active.get(id).copied().unwrap_or(0));
            if idle > longest && !open.contains_key(id) {
                cleanup.cgroups.push(*id);
            }
        }
        let mut forget = Vec::new();
        for id in &cleanup.cgroups {
            self.prev_stats.remove(id);
            self.last_active.remove(id);
            self.known_peers.remove(id);
            self.peers_pruned_at.remove(id);
            // A container whose cgroup is gone will never count again: forget its totals too
            // (after this last snapshot), or it would be reported and exported for ever.
            // Namespace cookies name no cgroup; theirs go only by the `max_totals` bound.
            if self.limits.recorder.ids() == super::Ids::CgroupV2 && resolve(*id).is_none() {
                forget.push(*id);
            }
        }
        self.prev_hist.retain(|k, _| {
            let gone = cleanup.cgroups.contains(&k.cgroup_id);
            if gone {
                cleanup.hist.push(*k);
            }
            !gone
        });

        self.add_totals(&tick);
        self.ring.push_front(tick);
        self.ring.truncate(self.longest());
        self.prev_now_ns = raw.now_ns;
        let viewers = self.served.current(raw.now_ns);
        let mut snapshot = self.snapshot(&raw, open, viewers, resolve);
        // Gone cgroups keep their totals while their windows still report them, so that no
        // snapshot shows a counter of theirs at 0; then they leave the snapshot altogether.
        let mut gone = std::mem::take(&mut self.gone);
        gone.extend(forget);
        gone.retain(|id| {
            let only_totals = snapshot.containers.get(id).is_none_or(|c| {
                c.windows.is_empty()
                    && c.peers.is_empty()
                    && c.established == 0
                    && c.established_untracked == 0
                    && c.viewers.is_empty()
            });
            if only_totals {
                self.totals.remove(id);
                snapshot.containers.remove(id);
            }
            !only_totals
        });
        self.gone = gone;
        (snapshot, cleanup)
    }

    fn snapshot(
        &self,
        raw: &RawRead,
        open: HashMap<u64, Vec<OpenFlow>>,
        viewers: HashMap<u64, Vec<ServedPeer>>,
        resolve: &mut dyn FnMut(u64) -> Option<String>,
    ) -> TcpSnapshot {
        let mut containers: BTreeMap<u64, ContainerTcp> = BTreeMap::new();
        let mut peer_windows: BTreeMap<(u64, Peer), Vec<PeerWindow>> = BTreeMap::new();
        for &(window, len) in &self.limits.windows {
            let mut cg: HashMap<u64, CgroupDelta> = HashMap::new();
            let mut peers: HashMap<(u64, Peer), PeerDelta> = HashMap::new();
            for t in self.ring.iter().take(len) {
                for (id, d) in &t.cgroups {
                    let e = cg.entry(*id).or_default();
                    e.stats += d.stats;
                    e.hist.merge(&d.hist);
                }
                for (k, d) in &t.peers {
                    peers.entry(*k).or_default().add(d);
                }
            }
            for (id, d) in cg {
                let c = containers
                    .entry(id)
                    .or_insert_with(|| ContainerTcp::new(id));
                c.windows
                    .push(WindowStats::from_parts(window, &d.stats, &d.hist));
            }
            for (k, d) in peers {
                peer_windows
                    .entry(k)
                    .or_default()
                    .push(PeerWindow::from_delta(window, &d));
            }
        }
        // Open connections by (container, peer), in one pass: a scan of a container's
        // connections per peer is quadratic at 100,000 connections.
        // The connections move into the snapshot: one copy of them at a time.
        let mut open_by_peer: HashMap<(u64, Peer), DirectionCounts> = HashMap::new();
        let mut seen: HashMap<u64, u64> = HashMap::with_capacity(open.len());
        for (id, flows) in open {
            for f in &flows {
                open_by_peer
                    .entry((id, f.peer))
                    .or_default()
                    .add(f.conn.direction, 1);
            }
            seen.insert(id, flows.len() as u64);
            containers
                .entry(id)
                .or_insert_with(|| ContainerTcp::new(id))
                .set_established(flows.into_iter().map(|f| f.conn));
        }
        for ((id, key), windows) in peer_windows {
            let established_by = open_by_peer.get(&(id, key)).copied().unwrap_or_default();
            let c = containers
                .entry(id)
                .or_insert_with(|| ContainerTcp::new(id));
            c.peers.push(PeerTcp {
                peer: key,
                established: established_by.total(),
                established_by,
                windows,
            });
        }
        for (id, s) in &self.prev_stats {
            let expected = (s.opened_active + s.opened_passive).saturating_sub(s.closed);
            let seen = seen.get(id).copied().unwrap_or(0);
            if expected > seen {
                containers
                    .entry(*id)
                    .or_insert_with(|| ContainerTcp::new(*id))
                    .established_untracked = expected - seen;
            }
        }
        for (id, t) in &self.totals {
            containers
                .entry(*id)
                .or_insert_with(|| ContainerTcp::new(*id))
                .totals = t.network();
        }
        for (id, v) in viewers {
            containers
                .entry(id)
                .or_insert_with(|| ContainerTcp::new(id))
                .viewers = v;
        }
        for c in containers.values_mut() {
            c.cgroup_path = resolve(c.cgroup_id);
        }
        TcpSnapshot {
            tick: self.tick_no,
            fidelity: super::snapshot::Fidelity::from_counts(
                self.limits.recorder,
                containers.values(),
            ),
            containers,
            drops: Drops::from_array(&raw.drops),
            own_cgroup_id: None,
        }
    }
}

#[cfg(test)]
#[path = "window_tests.rs"]
mod tests;
