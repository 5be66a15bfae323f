//! Who may call the drain RPCs (BeginDrain, CancelDrain). Read calls are open to whoever can
//! reach a listener; a drain changes the node, so:
//! - on the Unix socket, the peer must be root, in the socket's group (`api.unix_socket_group`,
//!   as its primary or a supplementary group), or on `api.drain_allowed_identities`;
//! - on TCP, the caller must be on `api.drain_allowed_identities` by one of its names (an
//!   empty list refuses every TCP caller: TCP has no file permissions to fall back on).

use std::path::Path;

use super::identity::{Caller, Identity, PeerCred};

/// The drain policy, built from `[api]` at load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainPolicy {
    pub allowed: Vec<Identity>,
    /// The gid of `api.unix_socket_group`, if one is set.
    pub socket_group: Option<u32>,
}

/// A refused drain call: the message the caller gets (PERMISSION_DENIED).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl DrainPolicy {
    /// The identity a permitted caller is recorded with, or why it is refused. `groups` gives
    /// a Unix peer's supplementary groups (from `/proc/<pid>/status` in the daemon).
    pub fn authorize(
        &self,
        caller: &Caller,
        rpc: &str,
        groups: impl FnOnce(&PeerCred) -> Vec<u32>,
    ) -> Result<Identity, Refused> {
        match caller {
            Caller::Unix(peer) => self.unix(peer, rpc, groups),
            Caller::Certificate(names) => self.listed(names, caller, rpc),
            Caller::Anonymous => self.listed(&[Identity::Anonymous], caller, rpc),
        }
    }

    fn unix(
        &self,
        peer: &PeerCred,
        rpc: &str,
        groups: impl FnOnce(&PeerCred) -> Vec<u32>,
    ) -> Result<Identity, Refused> {
        let id = Identity::Uid(peer.uid);
        if peer.uid == 0 || self.allowed.contains(&id) {
            return Ok(id);
        }
        if let Some(group) = self.socket_group {
            if peer.gid == group || groups(peer).contains(&group) {
                return Ok(id);
            }
        }
        let group = match self.socket_group {
            Some(g) => format!("in group {g} (api.unix_socket_group)"),
            None => "in the socket's group (api.unix_socket_group, not set)".to_owned(),
        };
        Err(Refused(format!(
            "{id} may not call {rpc}: on the Unix socket, drain calls need root, a peer {group} \
             or an entry in api.drain_allowed_identities{}",
            self.listing()
        )))
    }

    fn listed(&self, names: &[Identity], caller: &Caller, rpc: &str) -> Result<Identity, Refused> {
        if self.allowed.is_empty() {
            return Err(Refused(format!(
                "{} may not call {rpc}: drain calls over TCP need an identity listed in \
                 api.drain_allowed_identities, which is empty on this agent",
                caller.names()
            )));
        }
        match names.iter().find(|n| self.allowed.contains(n)) {
            Some(id) => Ok(id.clone()),
            None => Err(Refused(format!(
                "{} may not call {rpc}{}",
                caller.names(),
                self.listing()
            ))),
        }
    }

    fn listing(&self) -> String {
        if self.allowed.is_empty() {
            return String::new();
        }
        let list: Vec<String> = self.allowed.iter().map(ToString::to_string).collect();
        format!("; allowed: {}", list.join(", "))
    }
}

/// A process's supplementary groups, from the `Groups:` line of `/proc/<pid>/status` text,
/// when its effective uid (the `Uid:` line's second field) is `euid`. The status is read after
/// the connection was made, so the pid may by then belong to another process: one of another
/// user lends the peer nothing.
pub fn groups_in_status(status: &str, euid: u32) -> Vec<u32> {
    let line = |key: &str| status.lines().find_map(|l| l.strip_prefix(key));
    let effective = line("Uid:").and_then(|u| u.split_whitespace().nth(1)?.parse::<u32>().ok());
    if effective != Some(euid) {
        return Vec::new();
    }
    line("Groups:")
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A socket peer's supplementary groups, read now from `<proc_root>/<pid>/status`: empty when
/// the peer left, or is in another PID namespace (no pid), in which case only its primary gid
/// counts.
pub fn peer_groups(proc_root: &Path, peer: &PeerCred) -> Vec<u32> {
    let Some(pid) = peer.pid.filter(|p| *p > 0) else {
        return Vec::new();
    };
    std::fs::read_to_string(proc_root.join(pid.to_string()).join("status"))
        .map(|s| groups_in_status(&s, peer.uid))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tpython3\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
        Uid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nFDSize:\t64\n\
        Groups:\t4 24 27 992 1000 \nNStgid:\t4242\n";

    fn peer(uid: u32, gid: u32) -> PeerCred {
        PeerCred {
            uid,
            gid,
            pid: Some(4242),
        }
    }

    #[test]
    fn supplementary_groups_are_read_from_proc_status_text() {
        assert_eq!(groups_in_status(STATUS, 1000), vec![4, 24, 27, 992, 1000]);
        assert_eq!(
            groups_in_status(STATUS, 1001),
            Vec::<u32>::new(),
            "a pid now held by another user's process lends its groups to nobody"
        );
        let empty = "Uid:\t7\t7\t7\t7\nGroups:\t\n";
        assert_eq!(groups_in_status(empty, 7), Vec::<u32>::new());
        assert_eq!(groups_in_status("Name:\tx\n", 7), Vec::<u32>::new());
    }

    #[test]
    fn unix_peers_need_root_the_socket_group_or_the_list() {
        let policy = DrainPolicy {
            allowed: vec![Identity::Uid(1001)],
            socket_group: Some(992),
        };
        let none = |_: &PeerCred| Vec::new();
        let from_status = |p: &PeerCred| groups_in_status(STATUS, p.uid);
        let ok = |c: PeerCred, g: &dyn Fn(&PeerCred) -> Vec<u32>| {
            policy.authorize(&Caller::Unix(c), "BeginDrain", g)
        };
        assert_eq!(ok(peer(0, 0), &none), Ok(Identity::Uid(0)), "root");
        assert_eq!(
            ok(peer(1001, 1001), &none),
            Ok(Identity::Uid(1001)),
            "listed"
        );
        assert_eq!(ok(peer(65534, 992), &none), Ok(Identity::Uid(65534)), "gid");
        assert_eq!(
            ok(peer(1000, 1000), &from_status),
            Ok(Identity::Uid(1000)),
            "supplementary group"
        );
        let e = ok(peer(65534, 65534), &none).expect_err("nobody");
        assert!(
            e.0.starts_with("uid:65534 may not call BeginDrain")
                && e.0.contains("api.unix_socket_group")
                && e.0.contains("api.drain_allowed_identities"),
            "{e}"
        );
        let no_group = DrainPolicy::default();
        assert!(no_group
            .authorize(&Caller::Unix(peer(65534, 992)), "CancelDrain", from_status)
            .is_err());
        assert_eq!(
            no_group.authorize(&Caller::Unix(peer(0, 0)), "CancelDrain", none),
            Ok(Identity::Uid(0)),
            "root needs no list"
        );
    }

    #[test]
    fn tcp_callers_need_a_listed_name_and_an_empty_list_refuses_them_all() {
        let empty = DrainPolicy::default();
        for caller in [
            Caller::Anonymous,
            Caller::Certificate(vec![Identity::Cn("rollout".into())]),
        ] {
            let e = empty
                .authorize(&caller, "BeginDrain", |_| Vec::new())
                .expect_err("empty list over TCP");
            assert!(e.0.contains("api.drain_allowed_identities"), "{e}");
        }
        let policy = DrainPolicy {
            allowed: vec![
                Identity::Uri("spiffe://td/ops/rollout".into()),
                Identity::Dns("ctl.ops".into()),
            ],
            socket_group: None,
        };
        let cert = Caller::Certificate(vec![
            Identity::Cn("rollout".into()),
            Identity::Uri("spiffe://td/ops/rollout".into()),
        ]);
        assert_eq!(
            policy.authorize(&cert, "BeginDrain", |_| Vec::new()),
            Ok(Identity::Uri("spiffe://td/ops/rollout".into())),
            "the listed name is the one recorded"
        );
        let e = policy
            .authorize(&Caller::Anonymous, "CancelDrain", |_| Vec::new())
            .expect_err("anonymous not listed");
        assert!(
            e.0.contains("allowed: uri:spiffe://td/ops/rollout, dns:ctl.ops"),
            "{e}"
        );
        let anyone = DrainPolicy {
            allowed: vec![Identity::Anonymous],
            socket_group: None,
        };
        assert_eq!(
            anyone.authorize(&Caller::Anonymous, "BeginDrain", |_| Vec::new()),
            Ok(Identity::Anonymous),
            "anonymous by name is a choice"
        );
    }
}
