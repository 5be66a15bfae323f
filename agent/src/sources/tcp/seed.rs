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

use std::{collections::HashMap, path::PathBuf};

use agent_ebpf::{tcp::direction, FlowState};

use super::{diag, window::RawRead};

#[derive(Debug)]
pub struct Seed {
    proc_root: PathBuf,
    /// Pre-existing connections still open, by socket cookie; `None` before the first read.
    open: Option<HashMap<u64, FlowState>>,
}

impl Seed {
    pub fn new(proc_root: PathBuf) -> Self {
        Self {
            proc_root,
            open: None,
        }
    }

    /// Adds the pre-existing connections still open to `raw.flows`; dumps nothing once they
    /// are all gone.
    pub fn fill(&mut self, raw: &mut RawRead) {
        if self.open.as_ref().is_some_and(HashMap::is_empty) {
            return;
        }
        let dump = diag::dump_all(&self.proc_root);
        if self.open.is_none() && !dump.denied.is_empty() {
            // Without CAP_SYS_ADMIN the dump sees the agent's own network namespace only:
            // connections in the pods' namespaces that predate the source stay unseen.
            tracing::warn!(
                namespaces = dump.denied.len(),
                first = %dump.denied[0],
                "connections established before the TCP source started cannot be seen in these                  network namespaces (entering them needs CAP_SYS_ADMIN); they are counted once                  they close and reopen, or not at all"
            );
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
        let mut seed = Seed::new(PathBuf::from("/proc"));
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
