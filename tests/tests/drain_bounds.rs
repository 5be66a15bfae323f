//! Bounded replies: 5,000 BeginDrain calls with distinct requesters and 3,000 live streams, and
//! GetNodeHealth and GetDrainStatus still answer a Python grpcio client with its default 4 MiB
//! limit: the first 64 requesters are listed and the rest counted; 1,000 streams are listed,
//! the count stays exact and `truncated` says so.

use std::{net::SocketAddr, time::Duration};

use nodeward::store::{ContainerNetwork, FeedState, LiveStream, NetworkSnapshot, StreamProtocol};
use nodeward_tests::{
    api::{api_config, feed_all, health_config, now, prov, TempDir, TestApi},
    python_grpcio,
};

/// One container serving `n` TCP streams, reported by both feeds.
fn many_streams(n: u16) -> NetworkSnapshot {
    let local: SocketAddr = "10.0.0.2:1935".parse().expect("addr");
    let streams = (0..n)
        .map(|i| LiveStream {
            protocol: StreamProtocol::Tcp,
            kind: nodeward::store::StreamKind::Tcp,
            direction: nodeward::store::StreamDirection::Served,
            local,
            remote: SocketAddr::from(([198, 51, 100, (i % 250) as u8], 10_000 + i)),
            started_at: now() - Duration::from_secs(60),
            viewers: 0,
            bytes: None,
            viewer_reports: None,
        })
        .collect();
    NetworkSnapshot {
        containers: [(
            "c-live".to_owned(),
            ContainerNetwork {
                established_connections: u32::from(n),
                streams,
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        feeds: [
            ("ebpf/tcp", FeedState::Reporting { run: 0 }),
            ("ebpf/udp", FeedState::Reporting { run: 0 }),
        ]
        .into_iter()
        .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_requesters_and_many_streams_still_answer_a_default_python_client() {
    const TEST: &str =
        "five_thousand_requesters_and_many_streams_still_answer_a_default_python_client";
    if !python_grpcio(TEST) {
        return;
    }
    let dir = TempDir::new("drain-flood");
    let api = TestApi::start(api_config(&dir), health_config()).await;
    feed_all(&api.store, 0);
    api.store
        .publish_network(now(), prov("tracepoint tcp:tcp_probe"), many_streams(3_000));
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/drain_flood_client.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(format!("unix:{}", api.socket.display()))
        .arg("5000")
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("python printed JSON");
    eprintln!("{TEST}: {v}");
    for method in ["GetNodeHealth", "GetDrainStatus"] {
        let r = &v[method];
        assert_eq!(r["code"], "OK", "{method}: {v}");
        assert_eq!(
            r["requesters"], 64,
            "{method}: the first 64 are listed: {v}"
        );
        assert_eq!(r["first"], "controller-00000", "{method}: first first: {v}");
        assert_eq!(r["requesters_not_kept"], 5_000 - 64, "{method}: {v}");
        assert!(
            r["bytes"].as_u64().is_some_and(|b| b < 1 << 20),
            "{method}: well under 4 MiB: {v}"
        );
    }
    let s = &v["GetDrainStatus"];
    assert_eq!(s["live_streams"], 3_000, "the count is exact: {v}");
    assert_eq!(s["listed"], 1_000, "the list is capped: {v}");
    assert_eq!(s["truncated"], true, "{v}");
}
