//! Connections older than the TCP source's programs.
//!
//! sock_ops callbacks are enabled on a connection when it becomes established, so one that was
//! established before the programs attached (an agent restart, a restart of the source with
//! fresh maps) never reaches the flow map: without this, a drain could read ready while its
//! viewers are still connected. On its first read the source takes one sock_diag dump (with
//! each socket's cgroup id) and keeps the established sockets the flow map does not know; it
//! reports them as open flows of unknown direction (held by a drain) and dumps again on each
//! tick, to see them close, until none is left. Their RTT is not followed: no callback runs on
//! them.
//!
//! Without `CAP_SYS_ADMIN` (the DaemonSet) sock_diag cannot enter the pods' namespaces. The
//! agent's own namespace is then dumped without entering it, and each other namespace is read
//! from `/proc/<pid>/net/tcp{,6}` of one of its processes (`procnet.rs`): every established
//! socket there is counted, attributed to that process's cgroup (or, where that cannot be
//! resolved, to an id made of the namespace's inode, so that it still holds a drain), keyed by
//! its inode, until it is gone from the listing. No cookie there: a connection established
//! between the programs' attach and the first dump is counted twice until it closes (a drain
//! waits a little longer, never less).

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
};

use agent_ebpf::{tcp::direction, FlowState};

use super::{diag, procnet, window::RawRead};

/// Keys of sockets read from `/proc/<pid>/net/tcp`: the socket inode with the top bit set, so
/// that they never meet a socket cookie (a counter from 1).
const PROC_KEY: u64 = 1 << 63;

/// What the seed keeps of one connection older than the programs: enough to report it as an
/// open flow (48 bytes, against 136 for a `FlowState` and about 90 for a `DiagSocket`).
#[derive(Debug, Clone, Copy)]
struct OldFlow {
    cgroup_id: u64,
    remote: [u32; 4],
    bytes_acked: u64,
    bytes_received: u64,
    remote_port: u16,
    local_port: u16,
    family: u8,
    /// Listed by the dump in progress (cleared before each).
    seen: bool,
}

impl OldFlow {
    fn of(s: &diag::DiagSocket) -> Option<Self> {
        Some(Self {
            cgroup_id: s.cgroup_id.filter(|id| *id != 0)?,
            remote: s.remote,
            bytes_acked: s.bytes_acked,
            bytes_received: s.bytes_received,
            remote_port: s.remote_port,
            local_port: s.local_port,
            family: s.family,
            seen: true,
        })
    }

    fn flow(&self, start_ns: u64) -> FlowState {
        FlowState {
            cgroup_id: self.cgroup_id,
            start_ns,
            remote: self.remote,
            remote_port: u32::from(self.remote_port),
            local_port: u32::from(self.local_port),
            family: u32::from(self.family),
            passive: direction::UNKNOWN,
            bytes_acked: self.bytes_acked,
            bytes_received: self.bytes_received,
            ..FlowState::default()
        }
    }
}

/// One dump's worth of work, fed a socket at a time as the netlink replies are read (no list
/// of the node's sockets is built).
struct Pass {
    open: HashMap<u64, OldFlow>,
    /// On the first read, the cookies the flow map already holds; `None` on later reads,
    /// which only follow the connections found then.
    known: Option<HashSet<u64>>,
}

impl Pass {
    fn visit(&mut self, s: &diag::DiagSocket) {
        match &self.known {
            Some(known) => {
                if !known.contains(&s.cookie) {
                    if let Some(f) = OldFlow::of(s) {
                        self.open.insert(s.cookie, f);
                    }
                }
            }
            None => {
                if let Some(f) = self.open.get_mut(&s.cookie) {
                    f.seen = true;
                    // No callback runs on these sockets: the dump is where their bytes move.
                    (f.bytes_acked, f.bytes_received) = (s.bytes_acked, s.bytes_received);
                }
            }
        }
    }
}

#[derive(Debug)]
pub struct Seed {
    proc_root: PathBuf,
    cgroup_root: PathBuf,
    /// Pre-existing connections still open, by socket cookie; `None` before the first read.
    open: Option<HashMap<u64, OldFlow>>,
    /// When the first read found them (they count as opened then).
    start_ns: u64,
}

impl Seed {
    pub fn new(proc_root: PathBuf, cgroup_root: PathBuf) -> Self {
        Self {
            proc_root,
            cgroup_root,
            open: None,
            start_ns: 0,
        }
    }

    /// The sockets of the namespaces sock_diag could not enter: the agent's own dumped without
    /// entering it, the others read from `/proc/<pid>/net/tcp{,6}`.
    fn unentered(&self, denied: &[PathBuf]) -> Vec<diag::DiagSocket> {
        let own = std::fs::read_link(self.proc_root.join("self/ns/net")).ok();
        let mut out = Vec::new();
        for ns in denied {
            let link = std::fs::read_link(ns).ok();
            if link.is_some() && link == own {
                match diag::dump() {
                    Ok(sockets) => out.extend(sockets),
                    Err(e) => {
                        tracing::warn!(error = %e, "sock_diag dump of the agent's own namespace failed")
                    }
                }
                continue;
            }
            let Some(pid_dir) = ns.parent().and_then(std::path::Path::parent) else {
                continue;
            };
            let Some(sockets) = procnet::established(pid_dir) else {
                continue;
            };
            let netns = link
                .as_deref()
                .and_then(|l| l.to_str())
                .and_then(|l| l.strip_prefix("net:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            let Some(cgroup_id) =
                procnet::cgroup_id_of(pid_dir, &self.cgroup_root).or((netns != 0).then_some(netns))
            else {
                continue;
            };
            out.extend(
                sockets
                    .into_iter()
                    .map(|s| s.to_diag(PROC_KEY | s.inode, cgroup_id)),
            );
        }
        out
    }

    /// Starts a pass over one dump: on the first read, of every socket the flow map lacks.
    fn begin(&mut self, raw: &RawRead) -> Pass {
        match self.open.take() {
            None => {
                self.start_ns = raw.now_ns;
                Pass {
                    open: HashMap::new(),
                    known: Some(raw.flows.iter().map(|(c, _)| *c).collect()),
                }
            }
            Some(mut open) => {
                open.values_mut().for_each(|f| f.seen = false);
                Pass { open, known: None }
            }
        }
    }

    /// Ends a pass: a connection the dump no longer listed is closed; the rest stay, for
    /// [`Seed::flows`].
    fn finish(&mut self, pass: Pass) {
        let Pass { mut open, known } = pass;
        if known.is_some() {
            if !open.is_empty() {
                tracing::info!(
                    connections = open.len(),
                    "TCP connections established before the source started: counted as open, direction unknown, no RTT"
                );
            }
        } else {
            open.retain(|_, f| f.seen);
        }
        self.open = Some(open);
    }

    /// The pre-existing connections still open after the last [`Seed::fill`], as open flows
    /// made one at a time: the tracker takes them beside `raw.flows`
    /// ([`super::window::Tracker::update_with`]) rather than as a copy there.
    pub fn flows(&self) -> impl Iterator<Item = (u64, FlowState)> + '_ {
        self.open
            .iter()
            .flatten()
            .map(|(c, f)| (*c, f.flow(self.start_ns)))
    }

    /// Finds which pre-existing connections are still open (on the first read, those that
    /// `raw.flows` lacks); dumps nothing once they are all gone. Each socket is handled as the
    /// dump reads it.
    pub fn fill(&mut self, raw: &RawRead) {
        if self.open.as_ref().is_some_and(HashMap::is_empty) {
            return;
        }
        let first = self.open.is_none();
        let mut pass = self.begin(raw);
        let dump = diag::dump_all_each(&self.proc_root, &mut |s| pass.visit(&s));
        if !dump.denied.is_empty() {
            if first {
                tracing::info!(
                    namespaces = dump.denied.len(),
                    first = %dump.denied[0],
                    "sock_diag cannot enter these network namespaces (no CAP_SYS_ADMIN): \
                     connections older than the TCP source are read from /proc/<pid>/net/tcp \
                     there instead"
                );
            }
            for s in self.unentered(&dump.denied_paths) {
                pass.visit(&s);
            }
        }
        self.finish(pass);
    }

    /// `fill` on a given dump (separate for the tests).
    pub fn apply(&mut self, sockets: &[diag::DiagSocket], raw: &RawRead) {
        let mut pass = self.begin(raw);
        for s in sockets {
            pass.visit(s);
        }
        self.finish(pass);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(cookie: u64, cgroup_id: Option<u64>) -> diag::DiagSocket {
        diag::DiagSocket {
            family: 2,
            cookie,
            remote: [u32::from_ne_bytes([10, 0, 0, 2]), 0, 0, 0],
            remote_port: 50_000,
            local_port: 1935,
            cgroup_id,
            srtt_us: 0,
            total_retrans: 0,
            segs_out: 0,
            bytes_acked: cookie * 100,
            bytes_received: 0,
        }
    }

    fn raw(flows: Vec<(u64, FlowState)>) -> RawRead {
        RawRead {
            flows,
            now_ns: 5,
            ..RawRead::default()
        }
    }

    #[test]
    fn sockets_the_flow_map_lacks_at_start_are_open_until_a_dump_misses_them() {
        let mut seed = Seed::new(PathBuf::from("/proc"), PathBuf::from("/sys/fs/cgroup"));
        let known = FlowState {
            cgroup_id: 9,
            ..FlowState::default()
        };
        // 1: seen by sock_ops; 2 and 3: older than the programs; 4: no cgroup to count it in.
        let dump = [
            socket(1, Some(9)),
            socket(2, Some(7)),
            socket(3, Some(7)),
            socket(4, None),
        ];
        seed.apply(&dump, &raw(vec![(1, known)]));
        let mut cookies: Vec<u64> = seed.flows().map(|f| f.0).collect();
        cookies.sort_unstable();
        assert_eq!(cookies, [2, 3], "1 is the flow map's");
        let f = seed.flows().find(|f| f.0 == 2).expect("seeded").1;
        assert_eq!(
            (f.cgroup_id, f.passive, f.local_port, f.bytes_acked),
            (7, direction::UNKNOWN, 1935, 200)
        );

        // 3 closed; a new socket (5) is sock_ops' business, not the seed's; 2 sent more.
        let mut two = socket(2, Some(7));
        two.bytes_acked = 9_000;
        seed.apply(&[two, socket(5, Some(7))], &raw(Vec::new()));
        let next: Vec<(u64, FlowState)> = seed.flows().collect();
        assert_eq!(next.iter().map(|f| f.0).collect::<Vec<_>>(), [2]);
        assert_eq!(next[0].1.bytes_acked, 9_000, "bytes follow the dumps");
        seed.apply(&[], &raw(Vec::new()));
        assert_eq!(seed.flows().count(), 0);
        assert!(seed.open.as_ref().is_some_and(HashMap::is_empty), "done");
    }
}
