//! sock_diag parsing and polling, on replies laid out as the kernel writes them.

use super::*;

/// One `SOCK_DIAG_BY_FAMILY` message for an IPv4 socket to 10.0.0.2:5001, with `tcp_info`
/// and the cgroup id attribute, as `inet_diag_dump` lays it out.
fn message(cookie: u64, srtt_us: u32, total_retrans: u32, segs_out: u32, cgroup: u64) -> Vec<u8> {
    let mut body = vec![0u8; INET_DIAG_MSG_LEN];
    body[0] = libc::AF_INET as u8;
    body[1] = 1; // ESTABLISHED
    body[4..6].copy_from_slice(&40000u16.to_be_bytes());
    body[6..8].copy_from_slice(&5001u16.to_be_bytes());
    body[24..28].copy_from_slice(&[10, 0, 0, 2]);
    body[44..48].copy_from_slice(&(cookie as u32).to_ne_bytes());
    body[48..52].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    let mut info = vec![0u8; 232];
    info[68..72].copy_from_slice(&srtt_us.to_ne_bytes());
    info[100..104].copy_from_slice(&total_retrans.to_ne_bytes());
    info[120..128].copy_from_slice(&(u64::from(segs_out) * 1000).to_ne_bytes());
    info[128..136].copy_from_slice(&7_000u64.to_ne_bytes());
    info[136..140].copy_from_slice(&segs_out.to_ne_bytes());
    for (kind, data) in [
        (INET_DIAG_INFO, info),
        (INET_DIAG_CGROUP_ID, cgroup.to_ne_bytes().to_vec()),
    ] {
        let len = 4 + data.len();
        body.extend_from_slice(&(len as u16).to_ne_bytes());
        body.extend_from_slice(&kind.to_ne_bytes());
        body.extend_from_slice(&data);
        body.resize(body.len().next_multiple_of(4), 0);
    }
    let mut msg = Vec::new();
    msg.extend_from_slice(&(16 + body.len() as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&[0u8; 10]);
    msg.extend_from_slice(&body);
    msg
}

fn done() -> Vec<u8> {
    let mut msg = Vec::new();
    msg.extend_from_slice(&20u32.to_ne_bytes());
    msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    msg.extend_from_slice(&[0u8; 14]);
    msg
}

#[test]
fn a_reply_yields_each_socket_with_its_rtt_counters_and_cgroup() {
    let mut buf = message(0x1_0000_0002, 20_500, 3, 120, 77);
    buf.extend(message(9, 1_000, 0, 5, 78));
    buf.extend(done());
    let (sockets, finished) = parse_reply(&buf).expect("parses");
    assert!(finished);
    assert_eq!(sockets.len(), 2);
    let s = &sockets[0];
    assert_eq!(
        (s.cookie, s.local_port, s.remote_port, s.cgroup_id),
        (0x1_0000_0002, 40000, 5001, Some(77))
    );
    assert_eq!((s.srtt_us, s.total_retrans, s.segs_out), (20_500, 3, 120));
    assert_eq!((s.bytes_acked, s.bytes_received), (120_000, 7_000));
    assert_eq!(s.remote[0].to_ne_bytes(), [10, 0, 0, 2]);
}

#[test]
fn a_kernel_error_reply_is_an_error() {
    let mut msg = Vec::new();
    msg.extend_from_slice(&36u32.to_ne_bytes());
    msg.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
    msg.extend_from_slice(&[0u8; 10]);
    msg.extend_from_slice(&(-22i32).to_ne_bytes());
    msg.extend_from_slice(&[0u8; 16]);
    assert!(matches!(parse_reply(&msg), Err(DiagError::Kernel(-22))));
}

#[test]
fn the_request_asks_for_established_tcp_with_tcp_info() {
    let r = request(libc::AF_INET6 as u8, 7);
    assert_eq!(r.len(), 72);
    assert_eq!(u32_at(&r, 0), Some(72));
    assert_eq!((r[16], r[17], r[18]), (libc::AF_INET6 as u8, 6, 0b10));
    assert_eq!(u32_at(&r, 20), Some(1 << 1));
}

fn socket(cookie: u64, srtt_us: u32, total_retrans: u32, segs_out: u32) -> DiagSocket {
    let (sockets, _) =
        parse_reply(&message(cookie, srtt_us, total_retrans, segs_out, 5)).expect("parses");
    sockets.into_iter().next().expect("one socket")
}

#[test]
fn polls_accumulate_samples_jitter_retransmits_and_closes() {
    let mut p = Poller::new(Path::new("/proc"), &TcpConfig::default());
    p.apply(&[socket(1, 20_000, 0, 10)], 1);
    let raw = p.apply(&[socket(1, 22_000, 2, 30)], 2);
    let s = raw.stats.iter().find(|s| s.0 == 5).expect("cgroup 5").1;
    // RFC 3550 after one |Δ| of 2 ms: J = 2000 / 16 µs, kept as 16·J.
    assert_eq!((s.samples, s.diffs, s.sum_jitter16_us), (2, 1, 2_000));
    assert_eq!(
        (s.retrans, s.segs_out, s.opened_active, s.closed),
        (2, 20, 1, 0)
    );
    let raw = p.apply(&[], 3);
    let s = raw.stats.iter().find(|s| s.0 == 5).expect("cgroup 5").1;
    assert_eq!(s.closed, 1, "a socket gone from the dump closed");
    assert!(raw.flows.iter().all(|f| f.1.closed_ns == 3));
}

#[test]
fn the_poller_keeps_to_max_flows_and_counts_the_rest() {
    let config = TcpConfig {
        max_flows: 2,
        ..TcpConfig::default()
    };
    let mut p = Poller::new(Path::new("/proc"), &config);
    let raw = p.apply(
        &[
            socket(1, 10, 0, 0),
            socket(2, 10, 0, 0),
            socket(3, 10, 0, 0),
        ],
        1,
    );
    assert_eq!(raw.flows.len(), 2);
    assert_eq!(raw.drops[drop_reason::FLOW_INSERT as usize], 1);
}
