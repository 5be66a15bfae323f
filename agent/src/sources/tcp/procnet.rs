//! `/proc/<pid>/net/tcp` and `tcp6`: the established TCP sockets of a network namespace the
//! agent may not enter.
//!
//! The start-up seed dumps every namespace with sock_diag from inside it (`setns`), which needs
//! `CAP_SYS_ADMIN`; the DaemonSet does not grant it. Without this, connections into pods that
//! are older than the agent would be invisible there, and a drain could read ready while their
//! viewers are still connected. A namespace's `/proc/<pid>/net/tcp` lists its sockets to
//! whoever may read that process's `/proc` entry (the DaemonSet's `SYS_PTRACE` and
//! `DAC_READ_SEARCH`), no `setns` needed: no cookie and no cgroup, but the local port, the peer
//! and the socket inode, which is enough to count a connection until it closes.

use std::path::Path;

use super::diag::DiagSocket;

/// `st` of an established socket (`TCP_ESTABLISHED`).
const ESTABLISHED: u8 = 0x01;

/// One established socket from a `/proc/net/tcp{,6}` listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSocket {
    pub family: u8,
    pub local_port: u16,
    /// As the eBPF flow stores it: network-order words, IPv4 in `[0]`.
    pub remote: [u32; 4],
    pub remote_port: u16,
    /// The socket's inode: unique while it exists.
    pub inode: u64,
}

impl ProcSocket {
    /// As the seed takes sockets: with a key standing in for the cookie, no cgroup yet.
    pub fn to_diag(self, key: u64, cgroup_id: u64) -> DiagSocket {
        DiagSocket {
            family: self.family,
            cookie: key,
            remote: self.remote,
            remote_port: self.remote_port,
            local_port: self.local_port,
            cgroup_id: Some(cgroup_id),
            srtt_us: 0,
            total_retrans: 0,
            segs_out: 0,
            bytes_acked: 0,
            bytes_received: 0,
        }
    }
}

/// `AAAAAAAA:PPPP` (IPv4) or 32 hex digits and a port (IPv6): the kernel prints each 32-bit
/// word of the address as the number it holds in memory (`%08X`), so parsing a word back and
/// keeping it native gives the bytes in network order, as the flow map holds them.
fn endpoint(text: &str) -> Option<([u32; 4], u16)> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut words = [0u32; 4];
    if addr.len() != 8 && addr.len() != 32 {
        return None;
    }
    for (i, w) in words.iter_mut().enumerate().take(addr.len() / 8) {
        *w = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
    }
    Some((words, port))
}

/// The established sockets of one listing (`family` is `AF_INET` for `tcp`, `AF_INET6` for
/// `tcp6`); the header and lines it cannot read are skipped.
pub fn parse(text: &str, family: u8) -> Vec<ProcSocket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            if state != ESTABLISHED {
                return None;
            }
            let (_, local_port) = endpoint(f.get(1)?)?;
            let (remote, remote_port) = endpoint(f.get(2)?)?;
            let inode = f.get(9)?.parse().ok()?;
            Some(ProcSocket {
                family,
                local_port,
                remote,
                remote_port,
                inode,
            })
        })
        .collect()
}

/// The established sockets of the namespace `pid_dir` (`<proc>/<pid>`) is in; `None` when
/// neither listing can be read (the process is gone, or its `/proc` entry is closed to us).
pub fn established(pid_dir: &Path) -> Option<Vec<ProcSocket>> {
    let mut out = Vec::new();
    let mut read_any = false;
    for (file, family) in [("tcp", libc::AF_INET), ("tcp6", libc::AF_INET6)] {
        if let Ok(text) = std::fs::read_to_string(pid_dir.join("net").join(file)) {
            read_any = true;
            #[expect(
                clippy::cast_possible_truncation,
                reason = "AF_INET/AF_INET6 fit in u8"
            )]
            out.extend(parse(&text, family as u8));
        }
    }
    read_any.then_some(out)
}

/// The cgroup v2 id of the process at `pid_dir`: the inode of its directory under
/// `cgroup_root`; `None` where its `/proc/<pid>/cgroup` names no path there.
pub fn cgroup_id_of(pid_dir: &Path, cgroup_root: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let text = std::fs::read_to_string(pid_dir.join("cgroup")).ok()?;
    let unified = crate::containers::proc_cgroup::ProcCgroup::parse(&text).unified?;
    if unified.is_empty() || unified.starts_with("..") {
        return None;
    }
    std::fs::metadata(cgroup_root.join(unified))
        .ok()
        .map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/net/tcp` as 6.x prints it: a listener on 1935, a viewer's connection to it from
    /// 10.0.0.7:50123, and one in TIME_WAIT.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:078F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41012 1 0000000000000000 100 0 0 10 0
   1: 0500000A:078F 0700000A:C3CB 01 00000000:00000000 02:000A7D6A 00000000     0        0 41377 1 0000000000000000 20 4 30 10 -1
   2: 0500000A:078F 0700000A:C3CC 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
";

    /// `/proc/net/tcp6`: one established connection from [::1]:40000 to [::1]:8080.
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:9C40 01 00000000:00000000 00:00000000 00000000     0        0 52001 1 0000000000000000 20 4 0 10 -1
";

    #[test]
    fn only_established_sockets_are_read_with_ports_peer_and_inode() {
        let s = parse(TCP, 2);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!((s[0].local_port, s[0].remote_port), (1935, 50123));
        assert_eq!(s[0].remote[0].to_ne_bytes(), [10, 0, 0, 7]);
        assert_eq!(s[0].inode, 41377);
        let v6 = parse(TCP6, 10);
        assert_eq!(v6.len(), 1);
        assert_eq!((v6[0].local_port, v6[0].remote_port), (8080, 40000));
        let addr = std::net::Ipv6Addr::from(
            <[u8; 16]>::try_from(
                v6[0]
                    .remote
                    .iter()
                    .flat_map(|w| w.to_ne_bytes())
                    .collect::<Vec<u8>>(),
            )
            .expect("16 bytes"),
        );
        assert_eq!(addr, std::net::Ipv6Addr::LOCALHOST);
        assert!(parse("header only\n", 2).is_empty());
        assert!(parse("h\n 0: zz:1 00:0 01 x x x x x 5\n", 2).is_empty());
    }
}
