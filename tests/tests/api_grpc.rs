//! The gRPC API end to end over a real Unix socket with the tonic client: every RPC, Watch
//! (current state at once, each change within a tick, heartbeats), the socket file's life, and
//! an independent Python grpcio client that finds the service through reflection.
//!
//! No source writes into the store yet in this branch, so each test feeds the store directly
//! with recorded values (as a source would on its tick) and watches the API's answers change.

use std::os::unix::fs::PermissionsExt as _;

use nodeward::{
    api::pb,
    store::{GpuDevice, GpuSnapshot, NodeStats, SourceKind, XidEvent},
};
use nodeward_tests::{
    api::{
        api_config, feed_all, health_config, next, now, prov, verdict_becomes, TempDir, TestApi,
        WAIT,
    },
    python_grpcio,
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_over_the_unix_socket() {
    let dir = TempDir::new("api-rpcs");
    let api = TestApi::start(api_config(&dir), health_config()).await;
    let mut client = api.client().await;

    let h = client
        .get_node_health(pb::GetNodeHealthRequest {})
        .await
        .expect("GetNodeHealth")
        .into_inner();
    let h = h.health.expect("health");
    assert_eq!(
        h.verdict,
        pb::Verdict::Unknown as i32,
        "no source has reported: never healthy before a check ran"
    );
    assert_eq!(h.node, "test-node");

    feed_all(&api.store, 2);
    let h = verdict_becomes(&mut client, pb::Verdict::Healthy).await;
    let hooks: Vec<(String, String)> = h
        .sources
        .iter()
        .map(|s| (s.name.clone(), s.hook.clone()))
        .collect();
    assert!(
        hooks.contains(&("network".into(), "tracepoint tcp:tcp_probe".into())),
        "{hooks:?}"
    );
    assert_eq!(
        h.drain.expect("drain info").state,
        pb::DrainState::NotDraining as i32
    );
    let full = client
        .get_node_health(pb::GetNodeHealthRequest {})
        .await
        .expect("GetNodeHealth")
        .into_inner();
    assert_eq!(
        full.node_stats.expect("node stats").memory_total_bytes,
        64 << 30
    );

    let all = client
        .list_containers(pb::ListContainersRequest::default())
        .await
        .expect("ListContainers")
        .into_inner();
    let ids: Vec<&str> = all.containers.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        ids,
        vec!["c-live", "c-batch"],
        "sorted by namespace: edu before ml"
    );
    let live = &all.containers[0];
    assert_eq!(live.stats.as_ref().map(|s| s.memory_bytes), Some(512 << 20));
    assert_eq!(live.network.as_ref().map(|n| n.live_streams), Some(2));

    let by_ns = client
        .list_containers(pb::ListContainersRequest {
            pod_namespace: "ml".into(),
            ..Default::default()
        })
        .await
        .expect("filter by namespace")
        .into_inner();
    assert_eq!(
        by_ns
            .containers
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>(),
        vec!["c-batch"]
    );
    let mut sel = std::collections::HashMap::new();
    sel.insert("app".to_owned(), "live-class".to_owned());
    let by_label = client
        .list_containers(pb::ListContainersRequest {
            label_selector: sel,
            ..Default::default()
        })
        .await
        .expect("filter by label")
        .into_inner();
    assert_eq!(
        by_label
            .containers
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>(),
        vec!["c-live"]
    );
    let by_pod = client
        .list_containers(pb::ListContainersRequest {
            pod_name: "nope".into(),
            ..Default::default()
        })
        .await
        .expect("filter by pod")
        .into_inner();
    assert!(by_pod.containers.is_empty());

    let net = client
        .get_container_network(pb::GetContainerNetworkRequest {
            container_id: "c-live".into(),
        })
        .await
        .expect("GetContainerNetwork")
        .into_inner()
        .network
        .expect("network");
    assert_eq!(
        net.windows
            .iter()
            .map(|w| w.window_seconds)
            .collect::<Vec<_>>(),
        vec![10, 60, 300]
    );
    assert_eq!(net.windows[1].rtt_p99_us, 11_000);
    assert_eq!(net.streams.len(), 2);
    assert!(
        net.streams[0].age_seconds >= 90.0,
        "age {}",
        net.streams[0].age_seconds
    );

    let e = client
        .get_container_network(pb::GetContainerNetworkRequest {
            container_id: "missing".into(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = client
        .get_container_network(pb::GetContainerNetworkRequest::default())
        .await
        .expect_err("empty id");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("container_id"), "{}", e.message());

    let gpus = client
        .list_gpus(pb::ListGpusRequest {})
        .await
        .expect("ListGpus")
        .into_inner();
    assert!(gpus.available);
    assert_eq!(
        gpus.gpus
            .iter()
            .map(|g| g.uuid.as_str())
            .collect::<Vec<_>>(),
        vec!["GPU-aaaa"]
    );

    // grpc.health.v1: the server and the NodeHealth service are SERVING.
    let channel = nodeward::client::channel(
        &nodeward_tests::api::conn(&format!("unix:{}", api.socket.display())),
        &api.socket,
    )
    .await
    .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "nodeward.v1.NodeHealth"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("Health/Check")
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
    api.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_gpu_fault_makes_the_node_unhealthy_with_its_cause() {
    let dir = TempDir::new("api-gpu");
    let api = TestApi::start(api_config(&dir), health_config()).await;
    let mut client = api.client().await;
    feed_all(&api.store, 0);
    verdict_becomes(&mut client, pb::Verdict::Healthy).await;
    let gpu = GpuDevice {
        index: 0,
        uuid: "GPU-aaaa".into(),
        xids: vec![XidEvent {
            code: 79,
            seen_at: Some(now()),
        }],
        ..Default::default()
    };
    let gpus = GpuSnapshot {
        gpus: vec![gpu],
        ..GpuSnapshot::default()
    };
    api.store.publish_gpus(now(), prov("NVML"), gpus);
    let h = verdict_becomes(&mut client, pb::Verdict::Unhealthy).await;
    assert!(h.drain_recommended);
    let cause = h.causes.first().expect("a cause");
    assert_eq!(
        (cause.r#type.as_str(), cause.subject.as_str()),
        ("GpuXidCritical", "GPU-aaaa")
    );
    assert_eq!(cause.severity, pb::Severity::Critical as i32);
    assert!(cause.message.contains("79"), "{}", cause.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sends_the_current_state_at_once_then_each_change_then_heartbeats() {
    let dir = TempDir::new("api-watch");
    let api = TestApi::start(api_config(&dir), health_config()).await;
    let mut client = api.client().await;
    api.store.register(SourceKind::Node);
    let mut stream = client
        .watch_node_health(pb::WatchNodeHealthRequest {
            heartbeat_seconds: 3600,
        })
        .await
        .expect("WatchNodeHealth")
        .into_inner();
    let first = next(&mut stream).await;
    assert!(!first.heartbeat);
    let v = first.health.as_ref().map(|h| h.verdict);
    assert!(
        v == Some(pb::Verdict::Unknown as i32),
        "the current state at once: {v:?}"
    );

    // The source reports: the next tick publishes HEALTHY. The heartbeat is an hour away, so
    // this message can only be the change.
    api.store
        .publish_node(now(), prov("procfs"), NodeStats::default());
    let mut m = next(&mut stream).await;
    while m.health.as_ref().map(|h| h.verdict) == Some(pb::Verdict::Unknown as i32) {
        // The first message may race with the first evaluation ("not evaluated yet" → "waiting
        // for node"): both are UNKNOWN states.
        m = next(&mut stream).await;
    }
    assert_eq!(
        m.health.as_ref().map(|h| h.verdict),
        Some(pb::Verdict::Healthy as i32)
    );
    assert!(!m.heartbeat);
    assert!(m.revision > first.revision);

    // A drain shows at once in the stream.
    client
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "test".into(),
            reason: "rollout".into(),
            deadline_seconds: 60,
        })
        .await
        .expect("BeginDrain");
    let d = next(&mut stream).await;
    assert_eq!(
        d.health.and_then(|h| h.drain).map(|d| d.state),
        Some(pb::DrainState::Draining as i32)
    );
    drop(stream);

    // A heartbeat repeats the unchanged state, flagged.
    let mut hb = client
        .watch_node_health(pb::WatchNodeHealthRequest {
            heartbeat_seconds: 1,
        })
        .await
        .expect("watch")
        .into_inner();
    let first = tokio::time::timeout(WAIT, hb.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("message");
    let beat = tokio::time::timeout(WAIT, hb.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("message");
    assert!(
        !first.heartbeat && beat.heartbeat,
        "second message is a heartbeat"
    );
    assert_eq!(beat.revision, first.revision, "nothing changed");

    let e = client
        .watch_node_health(pb::WatchNodeHealthRequest {
            heartbeat_seconds: 7200,
        })
        .await
        .expect_err("too long");
    assert_eq!(e.code(), Code::InvalidArgument);
}

/// Watch streams past `api.limits.max_watch_streams`, counted across connections, are refused
/// with RESOURCE_EXHAUSTED while the streams already open and unary calls are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_past_the_cap_get_resource_exhausted_and_the_agent_still_answers() {
    let dir = TempDir::new("api-watch-cap");
    let mut config = api_config(&dir);
    config.limits.max_watch_streams = 3;
    let api = TestApi::start(config, health_config()).await;
    // Two connections; clones of a client share its connection.
    let (one, mut other) = (api.client().await, api.client().await);

    let mut open = Vec::new();
    for mut client in [one.clone(), one.clone(), other.clone()] {
        let mut stream = client
            .watch_node_health(pb::WatchNodeHealthRequest::default())
            .await
            .expect("a Watch within the cap")
            .into_inner();
        next(&mut stream).await;
        open.push(stream);
    }
    for mut client in [one, other.clone()] {
        let refused = client
            .watch_node_health(pb::WatchNodeHealthRequest::default())
            .await
            .expect_err("a fourth Watch is past the cap of 3");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(
            refused.message().contains("api.limits.max_watch_streams"),
            "the message names the limit: {}",
            refused.message()
        );
    }
    let h = other
        .get_node_health(pb::GetNodeHealthRequest {})
        .await
        .expect("GetNodeHealth is answered with every Watch slot taken")
        .into_inner();
    assert_eq!(h.health.expect("health").node, "test-node");

    feed_all(&api.store, 2);
    for stream in &mut open {
        let mut healthy = false;
        for _ in 0..20 {
            let m = next(stream).await;
            if m.health.expect("health").verdict == pb::Verdict::Healthy as i32 {
                healthy = true;
                break;
            }
        }
        assert!(healthy, "the open streams still carry changes");
    }
}

/// One HTTP/2 frame as it came off the wire: (type, flags, payload).
async fn read_frame(s: &mut tokio::net::UnixStream) -> std::io::Result<(u8, u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt as _;
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await?;
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await?;
    Ok((head[3], head[4], payload))
}

/// Read off the wire with a bare HTTP/2 connection (no gRPC library to hide what the server
/// sends): the server announces the per-connection stream limit in its SETTINGS, pings a
/// connection after `http2_keepalive_interval`, and closes it when the ping goes unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_announces_its_stream_limit_and_drops_a_peer_that_ignores_pings() {
    use tokio::io::AsyncWriteExt as _;
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const GOAWAY: u8 = 0x7;
    const ACK: u8 = 0x1;
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;

    let dir = TempDir::new("api-h2-limits");
    let mut config = api_config(&dir);
    config.limits.max_concurrent_streams_per_connection = 7;
    config.limits.http2_keepalive_interval = std::time::Duration::from_secs(1);
    config.limits.http2_keepalive_timeout = std::time::Duration::from_secs(1);
    let api = TestApi::start(config, health_config()).await;

    let mut s = tokio::net::UnixStream::connect(&api.socket)
        .await
        .expect("connect");
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    s.write_all(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0])
        .await
        .expect("empty SETTINGS");
    let exchange = async {
        let mut max_streams = None;
        let mut pinged = false;
        loop {
            let (kind, flags, payload) = match read_frame(&mut s).await {
                Ok(f) => f,
                // The server closed the connection.
                Err(_) => return (max_streams, pinged),
            };
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    for entry in payload.chunks_exact(6) {
                        if u16::from_be_bytes([entry[0], entry[1]]) == MAX_CONCURRENT_STREAMS {
                            max_streams =
                                Some(u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]));
                        }
                    }
                    s.write_all(&[0, 0, 0, SETTINGS, ACK, 0, 0, 0, 0])
                        .await
                        .expect("SETTINGS ack");
                }
                // Deliberately left unanswered.
                PING if flags & ACK == 0 => pinged = true,
                // hyper may send a GOAWAY before it closes; either ends the exchange.
                GOAWAY => return (max_streams, pinged),
                _ => {}
            }
        }
    };
    // The bound only keeps a failure from hanging the suite.
    let (max_streams, pinged) = tokio::time::timeout(std::time::Duration::from_secs(30), exchange)
        .await
        .expect("the server closes a connection that ignores its pings");
    assert_eq!(max_streams, Some(7), "SETTINGS_MAX_CONCURRENT_STREAMS");
    assert!(pinged, "a keep-alive PING came before the connection ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_mode_0660_and_removed_when_the_server_stops() {
    let dir = TempDir::new("api-socket");
    let mut cfg = api_config(&dir);
    // Only root may give a file to another group; others keep their own (gid checked below).
    // SAFETY: getgid has no preconditions.
    let want_gid = if nodeward_tests::is_root() {
        1
    } else {
        unsafe { libc::getgid() }
    };
    cfg.unix_socket_group = want_gid.to_string();
    let api = TestApi::start(cfg, health_config()).await;
    let path = api.socket.clone();
    let gid =
        std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&path).expect("socket exists"));
    assert_eq!(gid, want_gid, "socket group set from api.unix_socket_group");
    let mode = std::fs::metadata(&path)
        .expect("socket exists")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "mode {mode:o}");
    // An open Watch must not keep the server from stopping.
    let mut client = api.client().await;
    let _watch = client
        .watch_node_health(pb::WatchNodeHealthRequest::default())
        .await
        .expect("watch");
    tokio::time::timeout(WAIT, api.stop())
        .await
        .expect("stops in time")
        .expect("clean stop");
    assert!(!path.exists(), "socket file removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_discovers_the_service_by_reflection_and_calls_it() {
    const TEST: &str = "python_grpcio_discovers_the_service_by_reflection_and_calls_it";
    if !python_grpcio(TEST) {
        return;
    }
    let dir = TempDir::new("api-python");
    let api = TestApi::start(api_config(&dir), health_config()).await;
    feed_all(&api.store, 1);
    verdict_becomes(&mut api.client().await, pb::Verdict::Healthy).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/reflect_client.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(format!("unix:{}", api.socket.display()))
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("python printed JSON");
    let services: Vec<&str> = v["services"]
        .as_array()
        .expect("services")
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    for want in [
        "nodeward.v1.NodeHealth",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            services.contains(&want),
            "{want} not listed by reflection: {services:?}"
        );
    }
    assert_eq!(v["health"]["health"]["verdict"], "VERDICT_HEALTHY", "{v}");
    assert_eq!(v["health"]["health"]["node"], "test-node");
    assert_eq!(v["check_server"]["status"], "SERVING");
    assert_eq!(v["check_node_health"]["status"], "SERVING");
}

/// A caller could forge log lines through `requested_by` or `reason` in the plain log format:
/// text with newlines or control characters is refused, naming the field, and the refused calls
/// leave no trace in the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_drain_text_with_control_characters_is_invalid_argument() {
    const TEST: &str = "python_grpcio_drain_text_with_control_characters_is_invalid_argument";
    if !python_grpcio(TEST) {
        return;
    }
    let dir = TempDir::new("api-python-text");
    let api = TestApi::start(api_config(&dir), health_config()).await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/drain_text_client.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(format!("unix:{}", api.socket.display()))
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("python printed JSON");
    let refused = v["refused"].as_array().expect("refused");
    assert_eq!(refused.len(), 5, "{v}");
    for r in refused {
        let text = |f: &str| r["fields"][f].as_str().unwrap_or_default().to_owned();
        // The first field (in check order) that holds a control character is the one named.
        let field = if text("requested_by").chars().any(char::is_control) {
            "requested_by"
        } else {
            "reason"
        };
        assert_eq!(r["code"], "INVALID_ARGUMENT", "{r}");
        let details = r["details"].as_str().unwrap_or_default();
        assert!(
            details.starts_with(field) && details.contains("control character"),
            "{field}: {r}"
        );
    }
    assert_eq!(v["accepted"]["code"], "OK", "{v}");
    let requesters = v["accepted"]["reply"]["drain"]["requesters"]
        .as_array()
        .expect("requesters");
    let names: Vec<&str> = requesters
        .iter()
        .filter_map(|r| r["requested_by"].as_str())
        .collect();
    assert_eq!(names, ["python/ok"], "refused calls joined the drain: {v}");
    let status = api
        .client()
        .await
        .get_drain_status(pb::GetDrainStatusRequest {})
        .await
        .expect("GetDrainStatus")
        .into_inner();
    let drain = status.drain.expect("drain");
    assert_eq!(drain.state, pb::DrainState::Draining as i32);
    assert_eq!(drain.requesters.len(), 1, "{drain:?}");
}
