//! The agent's own cgroup, as the kernel records it for the agent's sockets.
//!
//! `/proc/self/cgroup` names the cgroup relative to the reader's cgroup namespace: inside a pod
//! with a private one it reads `/`, which is the host's root cgroup to everyone else. The id the
//! kernel records for a socket does not depend on namespaces, so the source opens one loopback
//! connection of its own, takes the connecting socket's `SO_COOKIE`, and reads its cgroup from
//! the flow the programs (or the sock_diag poll) recorded under that cookie. The connection is
//! closed once it was found.

use std::net::{Ipv4Addr, TcpListener, TcpStream};

use super::window::RawRead;

/// Looking for the agent's own cgroup id.
#[derive(Debug, Default)]
pub enum OwnCgroup {
    /// Not looked for yet: the probe connection is made on the first read after the programs
    /// attached, since a socket older than them carries no cgroup.
    #[default]
    NotStarted,
    /// The probe connection is open; its connecting socket's cookie.
    Probing {
        cookie: u64,
        _client: TcpStream,
        _server: TcpStream,
    },
    Found(u64),
    /// The probe connection could not be made (no loopback, no `SO_COOKIE`): the agent falls
    /// back on `/proc/self/cgroup`.
    Failed,
}

fn probe() -> std::io::Result<(u64, TcpStream, TcpStream)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    let cookie = rustix::net::sockopt::get_socket_cookie(&client)?;
    Ok((cookie, client, server))
}

impl OwnCgroup {
    /// Starts the probe if it has not run, and looks for its socket in `raw`. Returns the id
    /// once known.
    pub fn observe(&mut self, raw: &RawRead) -> Option<u64> {
        match self {
            Self::NotStarted => {
                *self = match probe() {
                    Ok((cookie, client, server)) => Self::Probing {
                        cookie,
                        _client: client,
                        _server: server,
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot open the loopback connection that finds the agent's own cgroup; using /proc/self/cgroup");
                        Self::Failed
                    }
                };
                None
            }
            Self::Probing { cookie, .. } => {
                let id = raw
                    .flows
                    .iter()
                    .find(|(c, f)| c == cookie && f.cgroup_id != 0)
                    .map(|(_, f)| f.cgroup_id)?;
                tracing::info!(cgroup_id = id, "found the agent's own cgroup");
                *self = Self::Found(id);
                Some(id)
            }
            Self::Found(id) => Some(*id),
            Self::Failed => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use agent_ebpf::FlowState;

    use super::*;

    fn read(flows: Vec<(u64, FlowState)>) -> RawRead {
        RawRead {
            stats: Vec::new(),
            hist: Vec::new(),
            flows,
            drops: [0; agent_ebpf::tcp::drop_reason::COUNT as usize],
            now_ns: 0,
        }
    }

    #[test]
    fn the_probe_sockets_cookie_names_the_cgroup_and_other_flows_do_not() {
        let mut own = OwnCgroup::default();
        assert_eq!(own.observe(&read(Vec::new())), None, "the probe starts");
        let OwnCgroup::Probing { cookie, .. } = own else {
            panic!("loopback works in the test: {own:?}");
        };
        let flow = |cgroup_id| FlowState {
            cgroup_id,
            ..FlowState::default()
        };
        // Another socket's flow, and the probe's own before its cgroup is known.
        let pending = read(vec![(cookie + 1, flow(7)), (cookie, flow(0))]);
        assert_eq!(own.observe(&pending), None);
        let seen = read(vec![(cookie + 1, flow(7)), (cookie, flow(42))]);
        assert_eq!(own.observe(&seen), Some(42));
        assert_eq!(own.observe(&read(Vec::new())), Some(42), "kept once found");
    }
}
