//! Viewers: the remote hosts that a container served over TCP lately, connected or not.
//!
//! An HLS or DASH player fetches a segment every few seconds, often on a new connection: between
//! two fetches it holds no connection at all, yet it is still watching. So the source remembers,
//! per container, each remote address (not address and port: every fetch comes from a new
//! ephemeral port) that a connection accepted on one of the container's listening sockets came
//! from, with the port it was served on and when it was last seen: now while a connection from
//! it is open, else when its last one closed. The served port lets `drain.exclude_ports` leave
//! out a metrics scraper or a health prober, which would otherwise be a viewer for ever. The
//! drain decides how long ago still counts (`drain.viewer_idle`).
//!
//! Built from the flows the reader already hands over each tick: no work per packet. Bounded:
//! at most `max_peers` (address, served port) entries per container (the idlest forgotten first), each for at most
//! [`VIEWER_RETAIN`].

use std::{collections::HashMap, net::IpAddr, time::Duration};

use serde::Serialize;

/// How long a viewer is remembered after its last connection closed: the most that
/// `drain.viewer_idle` may be.
pub const VIEWER_RETAIN: Duration = Duration::from_secs(600);

/// A remote host that a container served lately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ServedPeer {
    pub addr: IpAddr,
    /// The container's port it was served on.
    pub port: u16,
    /// Time since its last connection closed; zero while one is open.
    pub idle: Duration,
}

/// Last-seen times (kernel monotonic ns) of served remote hosts, per container.
#[derive(Debug, Default)]
pub(super) struct ServedPeers {
    by_cgroup: HashMap<u64, HashMap<(IpAddr, u16), u64>>,
}

impl ServedPeers {
    /// Records that `addr` was served by `cgroup_id` on a port at `seen_ns`, keeping at most
    /// `bound` entries for the container (a new one replaces the idlest).
    pub(super) fn saw(&mut self, cgroup_id: u64, addr: (IpAddr, u16), seen_ns: u64, bound: usize) {
        let peers = self.by_cgroup.entry(cgroup_id).or_default();
        if let Some(last) = peers.get_mut(&addr) {
            *last = (*last).max(seen_ns);
            return;
        }
        if peers.len() >= bound.max(1) {
            let idlest = peers.iter().min_by_key(|(_, t)| **t).map(|(a, _)| *a);
            match idlest {
                Some(a) if peers.get(&a).is_some_and(|t| *t < seen_ns) => {
                    peers.remove(&a);
                }
                _ => return,
            }
        }
        peers.insert(addr, seen_ns);
    }

    /// Forgets what is older than [`VIEWER_RETAIN`] at `now_ns`, and returns each container's
    /// served hosts, most recent first.
    pub(super) fn current(&mut self, now_ns: u64) -> HashMap<u64, Vec<ServedPeer>> {
        let retain = u64::try_from(VIEWER_RETAIN.as_nanos()).unwrap_or(u64::MAX);
        let mut out = HashMap::new();
        self.by_cgroup.retain(|id, peers| {
            peers.retain(|_, t| now_ns.saturating_sub(*t) <= retain);
            if peers.is_empty() {
                return false;
            }
            let mut list: Vec<ServedPeer> = peers
                .iter()
                .map(|((addr, port), t)| ServedPeer {
                    addr: *addr,
                    port: *port,
                    idle: Duration::from_nanos(now_ns.saturating_sub(*t)),
                })
                .collect();
            list.sort_by_key(|p| (p.idle, p.addr, p.port));
            out.insert(*id, list);
            true
        });
        out
    }

    /// Addresses remembered for the container that holds the most.
    #[cfg(test)]
    pub(super) fn max_per_cgroup(&self) -> usize {
        self.by_cgroup.values().map(HashMap::len).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn ip(last: u8) -> (IpAddr, u16) {
        (IpAddr::from([10, 0, 0, last]), 8080)
    }

    #[test]
    fn a_host_is_one_viewer_whatever_its_connections_and_keeps_its_latest_time() {
        let mut v = ServedPeers::default();
        v.saw(7, ip(1), 10 * S, 8);
        v.saw(7, ip(1), 12 * S, 8);
        v.saw(7, ip(1), 11 * S, 8);
        let now = v.current(15 * S);
        assert_eq!(
            now[&7],
            [ServedPeer {
                addr: ip(1).0,
                port: 8080,
                idle: Duration::from_secs(3)
            }]
        );
    }

    #[test]
    fn a_host_served_on_two_ports_is_kept_once_per_port() {
        let mut v = ServedPeers::default();
        v.saw(7, ip(1), 10 * S, 8);
        v.saw(7, (ip(1).0, 1935), 12 * S, 8);
        let ports: Vec<u16> = v.current(12 * S)[&7].iter().map(|p| p.port).collect();
        assert_eq!(ports, [1935, 8080]);
    }

    #[test]
    fn the_idlest_host_makes_room_and_old_ones_are_forgotten() {
        let mut v = ServedPeers::default();
        v.saw(7, ip(1), 10 * S, 2);
        v.saw(7, ip(2), 20 * S, 2);
        v.saw(7, ip(3), 30 * S, 2);
        let addrs: Vec<IpAddr> = v.current(30 * S)[&7].iter().map(|p| p.addr).collect();
        assert_eq!(addrs, [ip(3).0, ip(2).0]);
        assert_eq!(v.max_per_cgroup(), 2);
        let retain = VIEWER_RETAIN.as_secs();
        let later = v.current((21 + retain) * S);
        let addrs: Vec<IpAddr> = later[&7].iter().map(|p| p.addr).collect();
        assert_eq!(addrs, [ip(3).0]);
        assert!(v.current((31 + retain) * S).is_empty());
    }
}
