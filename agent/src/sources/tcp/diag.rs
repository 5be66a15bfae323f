//! The last fallback, for nodes where no eBPF hook is usable: poll every network namespace's
//! TCP sockets through netlink `sock_diag` (what `ss -ti` does) on each tick.
//!
//! Each established socket gives one sample per tick: the kernel's smoothed RTT (`tcpi_rtt`),
//! so the distribution is that of srtt, and jitter is the change of srtt between ticks
//! (damped). Retransmits and segments come from `tcpi_total_retrans`/`tcpi_segs_out` deltas,
//! exact for connections that live across ticks; a connection that opens and closes between
//! two ticks is not seen. The socket's cgroup is the kernel's own (`INET_DIAG_CGROUP_ID`,
//! 5.7+), so attribution is as good as the eBPF paths'. The poller keeps the same cumulative
//! counters the kernel maps would hold and hands them to the same window tracker.
//!
//! Entering another network namespace (`setns`) needs `CAP_SYS_ADMIN`, which neither the
//! systemd unit nor the DaemonSet grants. Without it the poller would see only the agent's own
//! namespace and report the pods' connections as none at all, so [`Poller::open`] tries it
//! first and refuses to start without it: the TCP source is then unavailable, logged at WARN
//! with the capability it lacks, and the drain waits for its deadline instead of reading
//! "no streams". A namespace that refuses entry later is logged at WARN too, once per poller.

use std::{collections::HashMap, os::fd::AsFd as _, path::Path};

use agent_ebpf::{
    tcp::{bucket_of, direction, drop_reason},
    CgroupTcpStats, FlowState, HistKey,
};

use super::{
    config::TcpConfig,
    window::{Cleanup, RawRead},
};

#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("sock_diag netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("sock_diag request: {0}")]
    Send(std::io::Error),
    #[error("sock_diag reply: {0}")]
    Recv(std::io::Error),
    #[error("sock_diag reported error {0}")]
    Kernel(i32),
    #[error("entering network namespace {0}: {1}")]
    Setns(String, std::io::Error),
    #[error("sock_diag polling needs CAP_SYS_ADMIN to enter the pods' network namespaces (setns), and this process lacks it ({0}); grant CAP_SYS_ADMIN or use an eBPF attribution path")]
    NoCapability(std::io::Error),
}

impl DiagError {
    /// Whether entering a namespace was refused for want of a privilege.
    fn denied(&self) -> bool {
        matches!(self, Self::Setns(_, e) | Self::NoCapability(e)
            if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)))
    }
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_CGROUP_ID: u16 = 21;
const TCP_ESTABLISHED: u32 = 1;
const INET_DIAG_MSG_LEN: usize = 72;

/// One established TCP socket as sock_diag reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagSocket {
    pub family: u8,
    pub cookie: u64,
    /// Remote address as the eBPF flow stores it (network order words; IPv4 in `[0]`).
    pub remote: [u32; 4],
    pub remote_port: u16,
    /// Local port, host order (for an accepted socket, the port the container serves on).
    pub local_port: u16,
    pub cgroup_id: Option<u64>,
    pub srtt_us: u32,
    pub total_retrans: u32,
    pub segs_out: u32,
    /// `tcpi_bytes_acked` and `tcpi_bytes_received` (cumulative).
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses one netlink reply buffer: the sockets in it, and whether the dump is done.
pub fn parse_reply(buf: &[u8]) -> Result<(Vec<DiagSocket>, bool), DiagError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32_at(buf, at).unwrap_or(0) as usize;
        let kind = u16_at(buf, at + 4).unwrap_or(0);
        if len < 16 || at + len > buf.len() {
            break;
        }
        let msg = &buf[at + 16..at + len];
        match kind {
            NLMSG_DONE => return Ok((out, true)),
            NLMSG_ERROR => {
                let errno = u32_at(msg, 0).map_or(0, |e| e as i32);
                if errno != 0 {
                    return Err(DiagError::Kernel(errno));
                }
            }
            SOCK_DIAG_BY_FAMILY => {
                if let Some(s) = parse_socket(msg) {
                    out.push(s);
                }
            }
            _ => {}
        }
        at += (len + 3) & !3;
    }
    Ok((out, false))
}

fn parse_socket(msg: &[u8]) -> Option<DiagSocket> {
    let family = *msg.first()?;
    // inet_diag_sockid at 4: sport(2) dport(2) src(16) dst(16) if(4) cookie(8).
    let local_port = u16::from_be(u16_at(msg, 4)?);
    let remote_port = u16::from_be(u16_at(msg, 6)?);
    let mut remote = [0u32; 4];
    for (i, w) in remote.iter_mut().enumerate() {
        *w = u32_at(msg, 24 + i * 4)?;
    }
    let cookie = u64::from(u32_at(msg, 44)?) | (u64::from(u32_at(msg, 48)?) << 32);
    let mut s = DiagSocket {
        family,
        cookie,
        remote,
        remote_port,
        local_port,
        cgroup_id: None,
        srtt_us: 0,
        total_retrans: 0,
        segs_out: 0,
        bytes_acked: 0,
        bytes_received: 0,
    };
    let mut at = INET_DIAG_MSG_LEN;
    while at + 4 <= msg.len() {
        let len = usize::from(u16_at(msg, at)?);
        let kind = u16_at(msg, at + 2)?;
        if len < 4 || at + len > msg.len() {
            break;
        }
        let data = &msg[at + 4..at + len];
        match kind {
            // struct tcp_info (UAPI, append-only): rtt at 68, total_retrans at 100,
            // bytes_acked at 120, bytes_received at 128, segs_out at 136.
            INET_DIAG_INFO => {
                s.srtt_us = u32_at(data, 68).unwrap_or(0);
                s.total_retrans = u32_at(data, 100).unwrap_or(0);
                s.bytes_acked = u64_at(data, 120).unwrap_or(0);
                s.bytes_received = u64_at(data, 128).unwrap_or(0);
                s.segs_out = u32_at(data, 136).unwrap_or(0);
            }
            INET_DIAG_CGROUP_ID => s.cgroup_id = u64_at(data, 0),
            _ => {}
        }
        at += (len + 3) & !3;
    }
    Some(s)
}

/// A `SOCK_DIAG_BY_FAMILY` dump request for established TCP sockets of `family`, with
/// `tcp_info`.
pub fn request(family: u8, seq: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + 56);
    b.extend_from_slice(&(16u32 + 56).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext (1 << (INET_DIAG_INFO - 1)), pad, states, id.
    b.extend_from_slice(&[
        family,
        libc::IPPROTO_TCP as u8,
        1 << (INET_DIAG_INFO - 1),
        0,
    ]);
    b.extend_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
    b.extend_from_slice(&[0u8; 48]);
    b
}

/// Dumps the established TCP sockets of the calling thread's network namespace.
pub fn dump() -> Result<Vec<DiagSocket>, DiagError> {
    let mut out = Vec::new();
    dump_each(&mut |s| out.push(s))?;
    Ok(out)
}

/// [`dump`], handing each socket to `each` as its reply is read instead of collecting them:
/// one netlink buffer's worth is held at a time, however many sockets the node has.
pub fn dump_each(each: &mut dyn FnMut(DiagSocket)) -> Result<(), DiagError> {
    let fd = rustix::net::socket_with(
        rustix::net::AddressFamily::NETLINK,
        rustix::net::SocketType::RAW,
        rustix::net::SocketFlags::CLOEXEC,
        Some(rustix::net::netlink::SOCK_DIAG),
    )
    .map_err(|e| DiagError::Socket(e.into()))?;
    let mut buf = vec![0u8; 64 * 1024];
    for (seq, family) in [(1, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        let req = request(family, seq);
        // The kernel's netlink address is the default destination of an unbound socket.
        rustix::net::send(&fd, &req, rustix::net::SendFlags::empty())
            .map_err(|e| DiagError::Send(e.into()))?;
        loop {
            let n = rustix::net::recv(&fd, &mut buf, rustix::net::RecvFlags::empty())
                .map_err(|e| DiagError::Recv(e.into()))?;
            let (sockets, done) = parse_reply(&buf[..n.min(buf.len())])?;
            sockets.into_iter().for_each(&mut *each);
            if done || n == 0 {
                break;
            }
        }
    }
    Ok(())
}

/// Distinct network namespaces of the node's processes (by inode), with a `/proc` path to
/// enter each.
fn namespaces(proc_root: &Path) -> Vec<std::path::PathBuf> {
    let mut seen = HashMap::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    for e in entries.flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        let ns = e.path().join("ns").join("net");
        if let Ok(link) = std::fs::read_link(&ns) {
            seen.entry(link).or_insert(ns);
        }
    }
    seen.into_values().collect()
}

/// What one poll of every namespace found.
#[derive(Debug, Default)]
pub struct Dump {
    pub sockets: Vec<DiagSocket>,
    /// Namespaces that refused entry for want of a privilege, with the error.
    pub denied: Vec<String>,
    /// The same namespaces, each as the `<proc>/<pid>/ns/net` path it was tried through.
    pub denied_paths: Vec<std::path::PathBuf>,
}

/// Dumps every network namespace from one short-lived thread that enters each in turn
/// (`setns` changes only the calling thread, so the agent's own threads stay put).
pub fn dump_all(proc_root: &Path) -> Dump {
    let mut sockets = Vec::new();
    let mut out = dump_all_each(proc_root, &mut |s| sockets.push(s));
    out.sockets = sockets;
    out
}

/// [`dump_all`], handing each socket to `each` as it is read (from the worker thread); the
/// returned [`Dump`] holds only the namespaces refused.
pub fn dump_all_each(proc_root: &Path, each: &mut (dyn FnMut(DiagSocket) + Send)) -> Dump {
    let namespaces = namespaces(proc_root);
    let worker = std::thread::scope(|s| {
        s.spawn(|| {
            let mut out = Dump::default();
            for ns in &namespaces {
                match enter(ns).and_then(|()| dump_each(&mut *each)) {
                    Ok(()) => {}
                    Err(e) if e.denied() => {
                        out.denied.push(e.to_string());
                        out.denied_paths.push(ns.clone());
                    }
                    // A process that exited meanwhile took its namespace with it.
                    Err(e) => tracing::trace!(error = %e, "sock_diag dump skipped a namespace"),
                }
            }
            out
        })
        .join()
    });
    worker.unwrap_or_else(|_| {
        tracing::warn!("sock_diag worker panicked");
        Dump::default()
    })
}

/// Whether this process may enter network namespaces: `setns` into its own one, from a
/// short-lived thread, needs the same `CAP_SYS_ADMIN` as entering a pod's.
pub fn check_setns(proc_root: &Path) -> Result<(), DiagError> {
    let own = [
        proc_root.join("thread-self/ns/net"),
        "/proc/thread-self/ns/net".into(),
    ];
    std::thread::scope(|s| {
        s.spawn(|| {
            // The spawned thread's own namespace (thread-self: this very thread).
            let f = own
                .iter()
                .find_map(|p| std::fs::File::open(p).ok())
                .ok_or_else(|| {
                    DiagError::Setns(
                        own[0].display().to_string(),
                        std::io::ErrorKind::NotFound.into(),
                    )
                })?;
            rustix::thread::move_into_link_name_space(
                f.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| {
                let e = std::io::Error::from(e);
                if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
                    DiagError::NoCapability(e)
                } else {
                    DiagError::Setns(own[0].display().to_string(), e)
                }
            })
        })
        .join()
        .unwrap_or_else(|_| {
            Err(DiagError::Setns(
                "the setns check".to_owned(),
                std::io::Error::other("its thread panicked"),
            ))
        })
    })
}

fn enter(ns: &Path) -> Result<(), DiagError> {
    let f = std::fs::File::open(ns).map_err(|e| DiagError::Setns(ns.display().to_string(), e))?;
    // Affects only the calling thread.
    rustix::thread::move_into_link_name_space(
        f.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| DiagError::Setns(ns.display().to_string(), e.into()))
}

/// Keeps the cumulative counters that the kernel maps hold on the eBPF paths.
#[derive(Debug)]
pub struct Poller {
    proc_root: std::path::PathBuf,
    limits: TcpConfig,
    stats: HashMap<u64, CgroupTcpStats>,
    hist: HashMap<HistKey, u64>,
    flows: HashMap<u64, FlowState>,
    drops: [u64; drop_reason::COUNT as usize],
    /// Whether the first refused namespace was logged.
    warned_denied: bool,
}

impl Poller {
    pub fn new(proc_root: &Path, config: &TcpConfig) -> Self {
        Self {
            proc_root: proc_root.to_path_buf(),
            limits: config.clone(),
            stats: HashMap::new(),
            hist: HashMap::new(),
            flows: HashMap::new(),
            drops: [0; drop_reason::COUNT as usize],
            warned_denied: false,
        }
    }

    /// A poller, once [`check_setns`] shows it can enter the pods' namespaces.
    pub fn open(proc_root: &Path, config: &TcpConfig) -> Result<Self, DiagError> {
        check_setns(proc_root)?;
        Ok(Self::new(proc_root, config))
    }

    /// Polls every namespace and returns what the maps would hold.
    pub fn read(&mut self, now_ns: u64) -> RawRead {
        let dump = dump_all(&self.proc_root);
        if !dump.denied.is_empty() && !self.warned_denied {
            self.warned_denied = true;
            tracing::warn!(
                namespaces = dump.denied.len(),
                first = %dump.denied[0],
                "sock_diag could not enter some network namespaces (CAP_SYS_ADMIN is needed); \
                 their connections are not counted"
            );
        }
        self.apply(&dump.sockets, now_ns)
    }

    /// Folds one poll into the cumulative counters (separate from `read` for the tests).
    pub fn apply(&mut self, sockets: &[DiagSocket], now_ns: u64) -> RawRead {
        let mut live = std::collections::HashSet::new();
        for s in sockets {
            let Some(cgroup_id) = s.cgroup_id.filter(|id| *id != 0) else {
                self.drops[drop_reason::NO_CGROUP as usize] += 1;
                continue;
            };
            live.insert(s.cookie);
            let new = !self.flows.contains_key(&s.cookie);
            if new && self.flows.len() >= self.limits.max_flows as usize {
                self.drops[drop_reason::FLOW_INSERT as usize] += 1;
                continue;
            }
            if !self.stats.contains_key(&cgroup_id)
                && self.stats.len() >= self.limits.max_cgroups as usize
            {
                self.drops[drop_reason::STATS_FULL as usize] += 1;
                continue;
            }
            let stats = self.stats.entry(cgroup_id).or_default();
            let flow = self.flows.entry(s.cookie).or_insert_with(|| FlowState {
                cgroup_id,
                start_ns: now_ns,
                remote: s.remote,
                remote_port: u32::from(s.remote_port),
                local_port: u32::from(s.local_port),
                family: u32::from(s.family),
                seen_total_retrans: s.total_retrans,
                seen_segs_out: s.segs_out,
                // A dump shows an established socket, not whether it was accepted: waited
                // for by the drain, as a served one.
                passive: direction::UNKNOWN,
                ..FlowState::default()
            });
            if new {
                stats.opened_active += 1;
            }
            let rtt = s.srtt_us;
            if flow.samples > 0 {
                let d = rtt.abs_diff(flow.last_rtt_us);
                flow.jitter16_us = flow.jitter16_us - (flow.jitter16_us >> 4) + d;
                flow.diffs += 1;
                flow.sum_jitter16_us += u64::from(flow.jitter16_us);
                stats.diffs += 1;
                stats.sum_jitter16_us += u64::from(flow.jitter16_us);
            }
            // Every polled srtt is a path sample here: a dump cannot tell think time apart.
            flow.last_rtt_us = rtt;
            flow.samples += 1;
            flow.path_samples += 1;
            flow.sum_rtt_us += u64::from(rtt);
            stats.samples += 1;
            stats.path_samples += 1;
            stats.sum_rtt_us += u64::from(rtt);
            stats.sum_measured_rtt_us += u64::from(rtt);
            let d_retrans = u64::from(s.total_retrans.wrapping_sub(flow.seen_total_retrans));
            let d_segs = u64::from(s.segs_out.wrapping_sub(flow.seen_segs_out));
            (flow.seen_total_retrans, flow.seen_segs_out) = (s.total_retrans, s.segs_out);
            flow.retrans += d_retrans;
            flow.segs_out += d_segs;
            (flow.bytes_acked, flow.bytes_received) = (s.bytes_acked, s.bytes_received);
            stats.retrans += d_retrans;
            stats.segs_out += d_segs;
            let key = HistKey {
                cgroup_id,
                bucket: bucket_of(u64::from(rtt)),
                _pad: 0,
            };
            if self.hist.contains_key(&key)
                || self.hist.len() < self.limits.max_hist_entries as usize
            {
                *self.hist.entry(key).or_insert(0) += 1;
            } else {
                self.drops[drop_reason::HIST_FULL as usize] += 1;
            }
        }
        // Gone since the last poll: closed (the tracker deletes them after this read).
        for (cookie, flow) in &mut self.flows {
            if !live.contains(cookie) && flow.closed_ns == 0 {
                flow.closed_ns = now_ns;
                self.stats.entry(flow.cgroup_id).or_default().closed += 1;
            }
        }
        RawRead {
            stats: self.stats.iter().map(|(k, v)| (*k, *v)).collect(),
            hist: self.hist.iter().map(|(k, v)| (*k, *v)).collect(),
            flows: self.flows.iter().map(|(k, v)| (*k, *v)).collect(),
            drops: self.drops,
            now_ns,
        }
    }

    /// Entries held, in the same terms as the kernel maps.
    pub fn usage(&self) -> crate::ebpf::tcp::MapUsage {
        crate::ebpf::tcp::MapUsage {
            flows: self.flows.len(),
            cgroups: self.stats.len(),
            hist: self.hist.len(),
        }
    }

    /// Forgets what the tracker is done with.
    pub fn clean(&mut self, cleanup: &Cleanup) {
        for c in &cleanup.flows {
            self.flows.remove(c);
        }
        for id in &cleanup.cgroups {
            self.stats.remove(id);
        }
        for k in &cleanup.hist {
            self.hist.remove(k);
        }
    }
}

#[cfg(test)]
#[path = "diag_tests.rs"]
mod tests;
