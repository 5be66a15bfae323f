//! Faults the agent must survive, each counted rather than fatal: eBPF maps that fill up.
//! (A cgroup deleted mid-read is covered by the cgroup source's unit tests, a panicking task by
//! `agent/src/supervise.rs`'s, and SIGHUP with a bad config by `tests/tests/reload.rs`.)

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use nodeward_tests::{cgroup_v2_root, require_root, rtp::rtp_packet, skip};

/// With room for 4 flows and 4 RTP streams, 20 sockets sending RTP through the cgroup_skb
/// programs overflow both maps: every datagram still arrives, every poll succeeds, no more than
/// 4 entries are tracked, and the overflow shows in the counters (LRU evictions, i.e. created
/// less tracked, plus failed inserts) rather than vanishing.
#[test]
fn udp_maps_full_are_counted_not_fatal() {
    const TEST: &str = "udp_maps_full_are_counted_not_fatal";
    require_root!(TEST);
    let Some(root) = cgroup_v2_root() else {
        return skip(TEST, "no cgroup v2 hierarchy for cgroup_skb programs");
    };
    let config = nodeward::sources::udp::UdpConfig {
        max_flows: 4,
        max_streams: 4,
        ..Default::default()
    };
    let mut source = nodeward::sources::udp::Source::attach(
        &root,
        &config,
        Duration::from_millis(200),
        &nodeward::store::DEFAULT_NETWORK_WINDOWS,
    )
    .expect("attach the UDP source with tiny maps");
    let before = source.poll().expect("poll before").counters;

    let receiver = UdpSocket::bind("127.0.0.1:0").expect("receiver");
    receiver
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let dest = receiver.local_addr().expect("addr");
    let senders: Vec<UdpSocket> = (0..20)
        .map(|_| UdpSocket::bind("127.0.0.1:0").expect("sender"))
        .collect();
    const PER_SOCKET: u16 = 5;
    for seq in 0..PER_SOCKET {
        for (i, s) in senders.iter().enumerate() {
            let ssrc = 0xF00D_0000 + i as u32;
            let p = rtp_packet(0, 1000 + seq, u32::from(seq) * 160, ssrc, 160);
            s.send_to(&p, dest).expect("send");
        }
        // Every poll in between succeeds while the maps are full.
        source.poll().expect("poll while the maps overflow");
    }
    let mut buf = [0u8; 2048];
    let want = 20 * usize::from(PER_SOCKET);
    let started = Instant::now();
    let mut got = 0;
    while got < want && started.elapsed() < Duration::from_secs(10) {
        if receiver.recv_from(&mut buf).is_ok() {
            got += 1;
        }
    }
    assert_eq!(got, want, "the programs let every datagram through");

    let after = source.poll().expect("poll after").counters;
    let created = after.flows_created - before.flows_created;
    let streams = after.streams_created - before.streams_created;
    let not_tracked = after.not_tracked - before.not_tracked;
    assert!(after.flows_tracked <= 4, "{after:?}");
    assert!(after.streams_tracked <= 4, "{after:?}");
    // 20 sender flows and 20 streams at least (both directions on loopback add more).
    assert!(created + not_tracked >= 20, "{after:?}");
    assert!(streams + not_tracked >= 20, "{after:?}");
    let lost_track = (created - after.flows_tracked.min(created))
        + (streams - after.streams_tracked.min(streams))
        + not_tracked;
    assert!(
        lost_track >= 32,
        "at least 16 flows and 16 streams did not fit and were counted: {after:?}"
    );
    assert!(
        after.rtp_packets - before.rtp_packets >= want as u64,
        "{after:?}"
    );
}
