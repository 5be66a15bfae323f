//! TCP and UDP/RTP snapshots → the store's [`NetworkSnapshot`]: one entry per container with the
//! two sources' windows merged by length, the per-peer breakdown, and the live streams the
//! drain handshake waits for.
//!
//! What counts as a live stream:
//! - UDP: exactly what the UDP source counts in `ContainerUdp::live_streams`: every live RTP
//!   stream, and every live non-RTP flow that has lasted `udp.stream_min_duration` (SRT, QUIC).
//! - TCP: every established connection of the container, with its direction: accepted on one
//!   of its listening sockets (served: a viewer or a publisher), or opened by it (outbound: a
//!   dependency, which the drain lists but by default does not wait for); with its local port,
//!   its kind told from the serving port, and the bytes it moved over the source's last tick.
//!
//! Viewers: the remote hosts the TCP source saw a container serve lately, connected or not
//! (`sources::tcp::viewers`), each with when it was last seen; the drain decides how recent
//! still counts.
//!
//! Neither source's streams (nor viewers) count for the host's cgroups (`drain.host_cgroups`: the root,
//! system.slice, ...) nor for the agent's own cgroup, so that kubelet, sshd and a controller
//! polling `GetDrainStatus` over TCP do not hold up a drain. The agent's cgroup is the id the
//! TCP source found for a socket of its own (right under a private cgroup namespace too), else
//! the path in `/proc/self/cgroup` unless that reads `/` (a private namespace's root, not the
//! host's).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, SystemTime},
};

use crate::{
    containers::Inventory,
    sources::{
        tcp::{
            snapshot::{ContainerTcp, PeerTcp, TcpSnapshot, WindowStats as TcpWindow},
            Ids, Recorder,
        },
        udp::model::{ContainerUdp, Endpoint, UdpSnapshot, WindowStats as UdpWindow},
    },
    store::{
        ContainerMeta, ContainerNetwork, LiveStream, NetworkSnapshot, NetworkWindow, PeerNetwork,
        Provenance, StreamBytes, StreamDirection, StreamKind, StreamProtocol, Viewer, Window,
    },
};

use super::key::{add_network_meta, network_key, KeyedBy};

/// What the mapping needs besides the snapshots.
#[derive(Debug, Clone, Copy)]
pub struct NetworkParams<'a> {
    /// `udp.stream_min_duration`: a non-RTP flow younger than this is not a stream.
    pub udp_min_flow_age: Duration,
    /// The window the per-peer breakdown is taken over: `health.network_window`, the one
    /// the rules read.
    pub peer_window: Window,
    /// The agent's own cgroup v2 path (`/`-prefixed) from `/proc/self/cgroup`: its
    /// connections are API clients, not streams.
    pub own_cgroup_path: Option<&'a str>,
    /// `drain.host_cgroups`: the host's cgroups, whose connections are not streams.
    pub host_cgroups: &'a [String],
    pub now: SystemTime,
}

/// Merges the two sources into the store's snapshot. Either may be absent (disabled or not
/// started); the result then holds what the other one knows.
pub fn network_snapshot(
    tcp: Option<&TcpSnapshot>,
    udp: Option<&UdpSnapshot>,
    inventory: &Inventory,
    params: &NetworkParams<'_>,
) -> NetworkSnapshot {
    let mut out: BTreeMap<String, ContainerNetwork> = BTreeMap::new();
    let own_id = tcp.and_then(|t| t.own_cgroup_id);
    if let Some(tcp) = tcp {
        let keyed = keyed_by(tcp);
        for c in tcp.containers.values() {
            let key = network_key(c.cgroup_id, c.cgroup_path.as_deref(), keyed, inventory);
            let streams = keyed != KeyedBy::CgroupId
                || !not_streams(c.cgroup_id, c.cgroup_path.as_deref(), own_id, params);
            add_tcp(out.entry(key).or_default(), c, streams, params);
        }
    }
    if let Some(udp) = udp {
        for c in &udp.containers {
            let key = network_key(
                c.cgroup_id,
                c.cgroup_path.as_deref(),
                KeyedBy::CgroupId,
                inventory,
            );
            let streams = !not_streams(c.cgroup_id, c.cgroup_path.as_deref(), own_id, params);
            add_udp(out.entry(key).or_default(), c, streams, params);
        }
    }
    for c in out.values_mut() {
        c.windows.sort_by_key(|w| w.window);
        c.streams.sort_by_key(|s| s.started_at);
        c.viewers.sort_by_key(|v| std::cmp::Reverse(v.last_seen));
    }
    // The feeds are the bridge's to fill: only it sees the sources' tasks.
    NetworkSnapshot {
        containers: out,
        feeds: BTreeMap::new(),
    }
}

/// Whether the cgroup at `path` (`/`-prefixed, as the sources report it) is one of the host's:
/// `/` matches the root cgroup alone, any other entry itself and what lies below it.
pub fn is_host_cgroup(path: &str, host: &[String]) -> bool {
    host.iter().any(|h| {
        let h = h.trim_end_matches('/');
        if h.is_empty() {
            return path == "/";
        }
        path.strip_prefix(h)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// Whether a cgroup's connections and flows are not streams: the agent's own, or the host's.
fn not_streams(
    cgroup_id: u64,
    path: Option<&str>,
    own_id: Option<u64>,
    params: &NetworkParams<'_>,
) -> bool {
    if own_id == Some(cgroup_id) {
        return true;
    }
    let Some(path) = path else {
        return false;
    };
    // In a private cgroup namespace `/proc/self/cgroup` reads `/`: that names the agent's
    // namespace root, not the host's root cgroup.
    let own_path = params.own_cgroup_path.filter(|p| *p != "/");
    own_path == Some(path) || is_host_cgroup(path, params.host_cgroups)
}

/// What the TCP snapshot's ids are, from the hook path that produced it.
fn keyed_by(tcp: &TcpSnapshot) -> KeyedBy {
    match tcp.fidelity.path.map(Recorder::ids) {
        Some(Ids::NetnsCookie) => KeyedBy::NetnsCookie,
        Some(Ids::CgroupV2) | None => KeyedBy::CgroupId,
    }
}

/// Adds an identity (cgroup id and path) for each container only the network sources know.
pub fn network_meta(
    tcp: Option<&TcpSnapshot>,
    udp: Option<&UdpSnapshot>,
    inventory: &Inventory,
    meta: &mut BTreeMap<String, ContainerMeta>,
) {
    if let Some(tcp) = tcp.filter(|t| keyed_by(t) == KeyedBy::CgroupId) {
        for c in tcp.containers.values() {
            let key = network_key(
                c.cgroup_id,
                c.cgroup_path.as_deref(),
                KeyedBy::CgroupId,
                inventory,
            );
            add_network_meta(meta, &key, c.cgroup_id, c.cgroup_path.as_deref());
        }
    }
    for c in udp.map(|u| u.containers.as_slice()).unwrap_or_default() {
        let key = network_key(
            c.cgroup_id,
            c.cgroup_path.as_deref(),
            KeyedBy::CgroupId,
            inventory,
        );
        add_network_meta(meta, &key, c.cgroup_id, c.cgroup_path.as_deref());
    }
}

/// Provenance of the merged snapshot: the hook and fidelity each source reports.
pub fn network_provenance(tcp: Option<&TcpSnapshot>, udp: Option<&UdpSnapshot>) -> Provenance {
    let mut hooks = Vec::new();
    let mut fidelity = Vec::new();
    if let Some(t) = tcp {
        let path = t.fidelity.path.map_or("none", Recorder::name);
        hooks.push(format!("tcp: {path}"));
        fidelity.push(format!(
            "tcp: {}; attribution: {}; per-peer RTT is a mean (no per-peer histogram)",
            t.fidelity.rtt_meaning(),
            t.fidelity.path.map_or("none", Recorder::attribution)
        ));
        if !t.fidelity.fell_back_from.is_empty() {
            fidelity.push(format!(
                "tcp: fell back to {path}: {}",
                t.fidelity.fell_back_from.join("; ")
            ));
        }
    }
    if let Some(u) = udp {
        hooks.push(format!("udp: {}", u.hook));
        fidelity.push("udp: RTP loss and RFC 3550 jitter per stream".to_owned());
    }
    Provenance {
        hook: hooks.join("; "),
        fidelity: fidelity.join("; "),
    }
}

fn us(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        // Saturating float-to-int: RTTs are far below u64::MAX microseconds.
        v.round() as u64
    } else {
        0
    }
}

fn window_mut(c: &mut ContainerNetwork, window: Window) -> &mut NetworkWindow {
    if let Some(i) = c.windows.iter().position(|w| w.window == window) {
        &mut c.windows[i]
    } else {
        c.windows.push(NetworkWindow::new(window));
        let last = c.windows.len() - 1;
        &mut c.windows[last]
    }
}

fn set_tcp_window(w: &mut NetworkWindow, t: &TcpWindow) {
    w.samples = t.samples;
    w.rtt_min_us = us(t.min_rtt_us);
    w.rtt_p50_us = us(t.p50_rtt_us);
    w.rtt_p90_us = us(t.p90_rtt_us);
    w.rtt_p99_us = us(t.p99_rtt_us);
    w.rtt_max_us = us(t.max_rtt_us);
    w.jitter_rfc3550_us = us(t.jitter_rfc3550_us);
    w.retransmits = t.retrans;
    w.retransmits_per_second = t.retrans as f64 / w.window.duration().as_secs_f64().max(1.0);
}

fn unspecified() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
}

fn add_tcp(c: &mut ContainerNetwork, t: &ContainerTcp, streams: bool, params: &NetworkParams<'_>) {
    for tw in &t.windows {
        set_tcp_window(window_mut(c, tw.window), tw);
    }
    let established = t.established + t.established_untracked;
    c.established_connections = c
        .established_connections
        .saturating_add(u32::try_from(established).unwrap_or(u32::MAX));
    c.peers
        .extend(t.peers.iter().filter_map(|p| peer(p, params.peer_window)));
    c.totals += &t.totals;
    if streams {
        c.streams.extend(tcp_streams(t, params.now));
        c.viewers.extend(t.viewers.iter().map(|v| Viewer {
            addr: v.addr,
            port: v.port,
            last_seen: params.now.checked_sub(v.idle).unwrap_or(params.now),
        }));
    }
}

fn peer(p: &PeerTcp, window: Window) -> Option<PeerNetwork> {
    let w = p
        .windows
        .iter()
        .find(|w| w.window == window)
        .or_else(|| p.windows.first())?;
    Some(PeerNetwork {
        remote: p.peer,
        samples: w.samples,
        rtt_mean_us: us(w.mean_rtt_us),
        jitter_rfc3550_us: us(w.jitter_rfc3550_us),
        retransmits: w.retrans,
    })
}

/// One stream per established connection the flow map holds, with its direction, local
/// (served) port, kind told from the serving port, age and bytes over the last tick; then one of
/// unknown direction and endpoints for each connection the bounded flow map does not hold.
fn tcp_streams(t: &ContainerTcp, now: SystemTime) -> Vec<LiveStream> {
    let mut out: Vec<LiveStream> = t
        .connections
        .iter()
        .map(|conn| {
            let serving_port = match conn.direction {
                StreamDirection::Outbound => conn.remote.port(),
                StreamDirection::Served | StreamDirection::Unknown => conn.local_port,
            };
            LiveStream {
                protocol: StreamProtocol::Tcp,
                kind: StreamKind::of_tcp_port(serving_port),
                direction: conn.direction,
                local: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), conn.local_port),
                remote: conn.remote,
                started_at: now.checked_sub(conn.age).unwrap_or(now),
                viewers: 0,
                bytes: conn.bytes.map(|b| StreamBytes {
                    sent: b.acked,
                    received: b.received,
                    over: b.over,
                }),
                viewer_reports: None,
            }
        })
        .collect();
    let untracked = LiveStream {
        protocol: StreamProtocol::Tcp,
        kind: StreamKind::Tcp,
        direction: StreamDirection::Unknown,
        local: unspecified(),
        remote: unspecified(),
        started_at: now,
        viewers: 0,
        bytes: None,
        viewer_reports: None,
    };
    let n = usize::try_from(t.established_untracked).unwrap_or(usize::MAX);
    out.extend(std::iter::repeat_n(untracked, n));
    out
}

fn set_udp_window(w: &mut NetworkWindow, u: &UdpWindow) {
    w.rtp_packets = u.rtp_received;
    w.rtp_lost = u.rtp_lost;
    w.rtp_jitter_us = u.mean_jitter_seconds.map_or(0, |s| us(s * 1e6));
}

fn socket(e: &Endpoint) -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::new(e.local, e.local_port),
        SocketAddr::new(e.remote, e.remote_port),
    )
}

fn started(now: SystemTime, age_seconds: f64) -> SystemTime {
    let age = Duration::try_from_secs_f64(age_seconds).unwrap_or_default();
    now.checked_sub(age).unwrap_or(now)
}

fn add_udp(c: &mut ContainerNetwork, u: &ContainerUdp, streams: bool, params: &NetworkParams<'_>) {
    c.totals += &u.totals;
    for uw in &u.windows {
        set_udp_window(window_mut(c, uw.window), uw);
    }
    if !streams {
        return;
    }
    for s in u.streams.iter().filter(|s| s.live) {
        let (local, remote) = socket(&s.endpoint);
        c.streams.push(LiveStream {
            protocol: StreamProtocol::Udp,
            kind: StreamKind::Rtp,
            // As today, every live UDP stream and flow holds the drain.
            direction: StreamDirection::Served,
            local,
            remote,
            started_at: started(params.now, s.age_seconds),
            viewers: 0,
            bytes: None,
            viewer_reports: s.viewer_reports.clone(),
        });
    }
    for f in u
        .flows
        .iter()
        .filter(|f| f.is_stream(params.udp_min_flow_age))
    {
        let (local, remote) = socket(&f.endpoint);
        c.streams.push(LiveStream {
            protocol: StreamProtocol::Udp,
            kind: StreamKind::of_udp_port(local.port()),
            // As today, every live UDP stream and flow holds the drain.
            direction: StreamDirection::Served,
            local,
            remote,
            started_at: started(params.now, f.age_seconds),
            viewers: 0,
            bytes: None,
            viewer_reports: None,
        });
    }
}

#[cfg(test)]
#[path = "network_tests.rs"]
mod tests;
