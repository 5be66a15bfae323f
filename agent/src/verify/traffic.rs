//! What `--verify` does to the node: a throw-away child cgroup it moves itself into, and the
//! loopback TCP and RTP traffic it makes there.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::containers::proc_cgroup::ProcCgroup;

/// TCP connections made, and request/response exchanges on each.
pub(super) const TCP_CONNECTIONS: u64 = 3;
pub(super) const TCP_EXCHANGES: u64 = 40;
/// RTP packets sent from one UDP socket to another.
pub(super) const RTP_PACKETS: u64 = 50;

/// A child cgroup this process moves into; it moves back and removes the directory on drop.
pub(super) struct ChildCgroup {
    pub(super) path: PathBuf,
    home: PathBuf,
}

impl ChildCgroup {
    pub(super) fn enter(root: &Path) -> Result<Self, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        let rel = ProcCgroup::parse(&own)
            .unified
            .ok_or("no cgroup v2 line in /proc/self/cgroup")?;
        let home = root.join(rel);
        let path = root.join(format!("nodeward-verify-{}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
        let me = Self { path, home };
        std::fs::write(
            me.path.join("cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .map_err(|e| format!("move into {}: {e}", me.path.display()))?;
        Ok(me)
    }

    pub(super) fn id(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.ino())
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        let pid = format!("{}\n", std::process::id());
        if std::fs::write(self.home.join("cgroup.procs"), &pid).is_err() {
            let _ = std::fs::write(
                self.path
                    .parent()
                    .unwrap_or(Path::new("/"))
                    .join("cgroup.procs"),
                &pid,
            );
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What [`tcp_traffic`] made: the open client streams (kept open until the read, so a polling
/// path sees them), the server thread, and each connection's exchanges as the client timed them
/// (write of the request to the end of the read of the reply): the ground truth the agent's RTT
/// figures are compared with.
pub(super) struct TcpTraffic {
    pub(super) clients: Vec<TcpStream>,
    pub(super) server: std::thread::JoinHandle<()>,
    pub(super) timed: Vec<Vec<Duration>>,
}

/// Connects `TCP_CONNECTIONS` times to a loopback echo server in this process and makes
/// `TCP_EXCHANGES` request/response exchanges on each, timing each one.
pub(super) fn tcp_traffic() -> std::io::Result<TcpTraffic> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || {
        let mut peers = Vec::new();
        for _ in 0..TCP_CONNECTIONS {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            peers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }));
        }
        for p in peers {
            let _ = p.join();
        }
    });
    let mut clients = Vec::new();
    let mut timed = Vec::new();
    for _ in 0..TCP_CONNECTIONS {
        let mut c = TcpStream::connect(addr)?;
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = [0u8; 32];
        let mut rtts = Vec::new();
        for i in 0..TCP_EXCHANGES {
            let msg = format!("ping {i:08}\n");
            let sent = Instant::now();
            c.write_all(msg.as_bytes())?;
            c.read_exact(&mut buf[..msg.len()])?;
            rtts.push(sent.elapsed());
            std::thread::sleep(Duration::from_millis(2));
        }
        clients.push(c);
        timed.push(rtts);
    }
    Ok(TcpTraffic {
        clients,
        server,
        timed,
    })
}

/// Sends `RTP_PACKETS` RTP packets (PCMU, one SSRC) between two loopback UDP sockets and
/// returns (sender port, receiver port, packets received).
pub(super) fn rtp_traffic() -> std::io::Result<(u16, u16, u64)> {
    let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    rx.set_read_timeout(Some(Duration::from_secs(2)))?;
    let to = rx.local_addr()?;
    let mut received = 0;
    let mut buf = [0u8; 512];
    for i in 0..RTP_PACKETS {
        let mut pkt = vec![0x80, 0x00];
        pkt.extend_from_slice(&(1000 + i as u16).to_be_bytes());
        pkt.extend_from_slice(&(160 * i as u32).to_be_bytes());
        pkt.extend_from_slice(&0x5eed_cafe_u32.to_be_bytes());
        pkt.extend_from_slice(&[0xff; 160]);
        tx.send_to(&pkt, to)?;
        if rx.recv(&mut buf).is_ok() {
            received += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok((tx.local_addr()?.port(), to.port(), received))
}
