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

use std::{collections::HashMap, path::PathBuf};

use agent_ebpf::{tcp::direction, FlowState};

use super::{diag, procnet, window::RawRead};

/// Keys of sockets read from `/proc/<pid>/net/tcp`: the socket inode with the top bit set, so
/// that they never meet a socket cookie (a counter from 1).
const PROC_KEY: u64 = 1 << 63;

#[derive(Debug)]
pub struct Seed {
    proc_root: PathBuf,
    cgroup_root: PathBuf,
    /// Pre-existing connections still open, by socket cookie; `None` before the first read.
    open: Option<HashMap<u64, FlowState>>,
}

impl Seed {
    pub fn new(proc_root: PathBuf, cgroup_root: PathBuf) -> Self {
        Self {
            proc_root,
            cgroup_root,
            open: None,
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

    /// Adds the pre-existing connections still open to `raw.flows`; dumps nothing once they
    /// are all gone.
    pub fn fill(&mut self, raw: &mut RawRead) {
        if self.open.as_ref().is_some_and(HashMap::is_empty) {
            return;
        }
        let mut dump = diag::dump_all(&self.proc_root);
        if !dump.denied.is_empty() {
            if self.open.is_none() {
                tracing::info!(
                    namespaces = dump.denied.len(),
                    first = %dump.denied[0],
                    "sock_diag cannot enter these network namespaces (no CAP_SYS_ADMIN): \
                     connections older than the TCP source are read from /proc/<pid>/net/tcp \
                     there instead"
                );
            }
            let unentered = self.unentered(&dump.denied_paths);
            dump.sockets.extend(unentered);
        }
        self.apply(&dump.sockets, raw);
    }

    /// `fill` on a given dump (separate for the tests).
    pub fn apply(&mut self, sockets: &[diag::DiagSocket], raw: &mut RawRead) {
        match &mut self.open {
            None => {
                let known: std::collections::HashSet<u64> =
                    raw.flows.iter().map(|(c, _)| *c).collect();
                let open: HashMap<u64, FlowState> = sockets
                    .iter()
                    .filter(|s| !known.contains(&s.cookie))
                    .filter_map(|s| {
                        let cgroup_id = s.cgroup_id.filter(|id| *id != 0)?;
                        Some((
                            s.cookie,
                            FlowState {
                                cgroup_id,
                                start_ns: raw.now_ns,
                                remote: s.remote,
                                remote_port: u32::from(s.remote_port),
                                local_port: u32::from(s.local_port),
                                family: u32::from(s.family),
                                passive: direction::UNKNOWN,
                                bytes_acked: s.bytes_acked,
                                bytes_received: s.bytes_received,
                                ..FlowState::default()
                            },
                        ))
                    })
                    .collect();
                if !open.is_empty() {
                    tracing::info!(
                        connections = open.len(),
                        "TCP connections established before the source started: counted as open, direction unknown, no RTT"
                    );
                }
                self.open = Some(open);
            }
            Some(open) => {
                let alive: HashMap<u64, &diag::DiagSocket> =
                    sockets.iter().map(|s| (s.cookie, s)).collect();
                open.retain(|c, flow| {
                    let Some(s) = alive.get(c) else {
                        return false;
                    };
                    // No callback runs on these sockets: the dump is where their bytes move.
                    (flow.bytes_acked, flow.bytes_received) = (s.bytes_acked, s.bytes_received);
                    true
                });
            }
        }
        if let Some(open) = &self.open {
            raw.flows.extend(open.iter().map(|(c, f)| (*c, *f)));
        }
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
        let mut first = raw(vec![(1, known)]);
        seed.apply(&dump, &mut first);
        let mut cookies: Vec<u64> = first.flows.iter().map(|f| f.0).collect();
        cookies.sort_unstable();
        assert_eq!(cookies, [1, 2, 3]);
        let f = first.flows.iter().find(|f| f.0 == 2).expect("seeded").1;
        assert_eq!(
            (f.cgroup_id, f.passive, f.local_port, f.bytes_acked),
            (7, direction::UNKNOWN, 1935, 200)
        );

        // 3 closed; a new socket (5) is sock_ops' business, not the seed's; 2 sent more.
        let mut next = raw(Vec::new());
        let mut two = socket(2, Some(7));
        two.bytes_acked = 9_000;
        seed.apply(&[two, socket(5, Some(7))], &mut next);
        let cookies: Vec<u64> = next.flows.iter().map(|f| f.0).collect();
        assert_eq!(cookies, [2]);
        assert_eq!(next.flows[0].1.bytes_acked, 9_000, "bytes follow the dumps");
        let mut last = raw(Vec::new());
        seed.apply(&[], &mut last);
        assert!(last.flows.is_empty());
        assert!(seed.open.as_ref().is_some_and(HashMap::is_empty), "done");
    }
}
