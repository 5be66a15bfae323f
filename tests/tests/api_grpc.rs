//! The gRPC API end to end over a real Unix socket with the tonic client: every RPC, Watch,
//! the drain handshake, request validation, identities, the socket file's life, the CLI, and an
//! independent Python grpcio client that finds the service through reflection.
//!
//! No source writes into the store yet in this branch, so each test feeds the store directly
//! with recorded values (as a source would on its tick) and watches the API's answers change.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    time::{Duration, SystemTime},
};

use nodeward::{
    api::pb,
    store::{
        CgroupSnapshot, ContainerMeta, ContainerNetwork, ContainerStats, GpuDevice, GpuSnapshot,
        LiveStream, NetworkSnapshot, NetworkWindow, NodeStats, Provenance, SourceKind, Store,
        StreamProtocol, XidEvent,
    },
};
use nodeward_tests::{
    agent_binary,
    api::{api_config, eventually, health_config, now, TempDir, TestApi},
    skip,
};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);

fn prov(hook: &str) -> Provenance {
    Provenance {
        hook: hook.to_owned(),
        fidelity: "full".to_owned(),
    }
}

fn stream(remote: &str, age: Duration) -> LiveStream {
    LiveStream {
        protocol: StreamProtocol::Tcp,
        local: "10.1.0.5:1935".parse::<SocketAddr>().expect("addr"),
        remote: remote.parse().expect("addr"),
        started_at: SystemTime::now() - age,
        viewers: 0,
    }
}

/// What a network source would report: one streaming container with `streams` live streams.
fn network(streams: usize) -> NetworkSnapshot {
    let mut containers = BTreeMap::new();
    containers.insert(
        "c-live".to_owned(),
        ContainerNetwork {
            windows: vec![
                NetworkWindow {
                    window_seconds: 10,
                    samples: 200,
                    rtt_p50_us: 1_800,
                    rtt_p99_us: 9_000,
                    ..Default::default()
                },
                NetworkWindow {
                    window_seconds: 60,
                    samples: 1_200,
                    rtt_p50_us: 2_000,
                    rtt_p99_us: 11_000,
                    jitter_us: 700,
                    ..Default::default()
                },
                NetworkWindow {
                    window_seconds: 300,
                    samples: 6_000,
                    rtt_p50_us: 2_100,
                    rtt_p99_us: 12_000,
                    ..Default::default()
                },
            ],
            established_connections: streams as u32 + 1,
            streams: (0..streams)
                .map(|i| {
                    stream(
                        &format!("203.0.113.{}:5{i}000", i + 1),
                        Duration::from_secs(90),
                    )
                })
                .collect(),
            peers: Vec::new(),
        },
    );
    NetworkSnapshot { containers }
}

/// Every source reports once: the verdict can leave UNKNOWN.
fn feed_all(store: &Store, streams: usize) {
    for k in SourceKind::ALL {
        store.register(k);
    }
    let mut meta = BTreeMap::new();
    let mut labels = BTreeMap::new();
    labels.insert("app".to_owned(), "live-class".to_owned());
    meta.insert(
        "c-live".to_owned(),
        ContainerMeta {
            id: "c-live".into(),
            name: "srs".into(),
            pod_name: "live-0".into(),
            pod_namespace: "edu".into(),
            labels,
            ..Default::default()
        },
    );
    meta.insert(
        "c-batch".to_owned(),
        ContainerMeta {
            id: "c-batch".into(),
            name: "job".into(),
            pod_name: "train-0".into(),
            pod_namespace: "ml".into(),
            ..Default::default()
        },
    );
    store.publish_container_meta(meta);
    store.publish_network(now(), prov("tracepoint tcp:tcp_probe"), network(streams));
    let mut cg = CgroupSnapshot::default();
    cg.containers.insert(
        "c-live".into(),
        ContainerStats {
            cpu_usage_cores: 1.5,
            memory_bytes: 512 << 20,
            ..Default::default()
        },
    );
    cg.containers.insert(
        "c-batch".into(),
        ContainerStats {
            cpu_usage_cores: 3.0,
            ..Default::default()
        },
    );
    store.publish_cgroups(now(), prov("cgroup v2"), cg);
    store.publish_node(
        now(),
        prov("procfs"),
        NodeStats {
            memory_total_bytes: 64 << 30,
            clock_synchronized: Some(true),
            ..Default::default()
        },
    );
    store.publish_gpus(
        now(),
        prov("NVML"),
        GpuSnapshot {
            gpus: vec![GpuDevice {
                index: 0,
                uuid: "GPU-aaaa".into(),
                name: "Test GPU".into(),
                ..Default::default()
            }],
        },
    );
}

async fn verdict_becomes(
    client: &mut pb::node_health_client::NodeHealthClient<tonic::transport::Channel>,
    want: pb::Verdict,
) -> pb::NodeHealthReport {
    eventually(WAIT, || {
        let mut c = client.clone();
        async move {
            let h = c
                .get_node_health(pb::GetNodeHealthRequest {})
                .await
                .ok()?
                .into_inner()
                .health?;
            (h.verdict == want as i32).then_some(h)
        }
    })
    .await
    .unwrap_or_else(|| panic!("verdict never became {want:?}"))
}

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
    api.store
        .publish_gpus(now(), prov("NVML"), GpuSnapshot { gpus: vec![gpu] });
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

async fn next(
    s: &mut tonic::Streaming<pb::WatchNodeHealthResponse>,
) -> pb::WatchNodeHealthResponse {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("a message in time")
        .expect("stream ok")
        .expect("stream not ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_counts_live_streams_and_is_ready_when_they_end() {
    let dir = TempDir::new("api-drain");
    let api = TestApi::start(api_config(&dir), health_config()).await;
    let mut client = api.client().await;
    feed_all(&api.store, 2);

    let s = client
        .get_drain_status(pb::GetDrainStatusRequest {})
        .await
        .expect("GetDrainStatus")
        .into_inner();
    assert!(!s.ready_to_drain, "not draining yet");
    assert_eq!(
        s.drain.expect("drain").state,
        pb::DrainState::NotDraining as i32
    );

    let begun = client
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "rollout-controller/a".into(),
            reason: "v2 rollout".into(),
            deadline_seconds: 600,
        })
        .await
        .expect("BeginDrain")
        .into_inner();
    assert!(!begun.already_draining);
    let info = begun.drain.expect("drain");
    assert_eq!(info.state, pb::DrainState::Draining as i32);
    assert_eq!(info.deadline_unix_ms - info.started_unix_ms, 600_000);
    let requester = &info.requesters[0];
    assert_eq!(
        requester.identity,
        format!("uid:{}", unsafe_uid()),
        "the socket peer's uid is the identity"
    );

    // A second controller joins the same drain; the deadline stays.
    let again = client
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "rollout-controller/b".into(),
            reason: String::new(),
            deadline_seconds: 5,
        })
        .await
        .expect("BeginDrain again")
        .into_inner();
    assert!(again.already_draining);
    let info2 = again.drain.expect("drain");
    assert_eq!(info2.deadline_unix_ms, info.deadline_unix_ms);
    assert_eq!(info2.requesters.len(), 2);

    // Every health message says DRAINING.
    let h = client
        .get_node_health(pb::GetNodeHealthRequest {})
        .await
        .expect("health")
        .into_inner()
        .health
        .expect("health");
    assert_eq!(
        h.drain.expect("drain").state,
        pb::DrainState::Draining as i32
    );

    let s = client
        .get_drain_status(pb::GetDrainStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(s.streams_known);
    assert_eq!(s.live_streams, 2);
    assert!(!s.ready_to_drain, "{}", s.ready_reason);
    let c = &s.containers[0];
    assert_eq!(
        (
            c.container_id.as_str(),
            c.pod_name.as_str(),
            c.pod_namespace.as_str()
        ),
        ("c-live", "live-0", "edu")
    );
    assert_eq!(c.streams.len(), 2);
    assert!(c.streams.iter().all(|s| s.age_seconds >= 90.0));

    // One stream ends, then the other.
    api.store
        .publish_network(now(), prov("tracepoint tcp:tcp_probe"), network(1));
    let s = client
        .get_drain_status(pb::GetDrainStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!((s.live_streams, s.ready_to_drain), (1, false));
    api.store
        .publish_network(now(), prov("tracepoint tcp:tcp_probe"), network(0));
    let s = client
        .get_drain_status(pb::GetDrainStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(s.live_streams, 0);
    assert!(s.ready_to_drain, "ready once no stream is left");
    assert!(s.containers.is_empty());
    assert!(
        s.ready_reason.contains("no live streams"),
        "{}",
        s.ready_reason
    );

    let c = client
        .cancel_drain(pb::CancelDrainRequest {
            requested_by: "rollout-controller/a".into(),
            reason: "done".into(),
        })
        .await
        .expect("CancelDrain")
        .into_inner();
    assert!(c.was_draining);
    assert_eq!(
        c.drain.expect("drain").state,
        pb::DrainState::NotDraining as i32
    );
    let c = client
        .cancel_drain(pb::CancelDrainRequest {
            requested_by: "rollout-controller/b".into(),
            reason: String::new(),
        })
        .await
        .expect("CancelDrain is idempotent")
        .into_inner();
    assert!(!c.was_draining);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_a_passed_deadline_is_ready_even_with_streams_left() {
    let dir = TempDir::new("api-deadline");
    let api = TestApi::start(api_config(&dir), health_config()).await;
    let mut client = api.client().await;
    feed_all(&api.store, 3);
    client
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "ctl".into(),
            reason: String::new(),
            deadline_seconds: 1,
        })
        .await
        .expect("BeginDrain");
    let s = eventually(WAIT, || {
        let mut c = client.clone();
        async move {
            let s = c
                .get_drain_status(pb::GetDrainStatusRequest {})
                .await
                .ok()?
                .into_inner();
            s.ready_to_drain.then_some(s)
        }
    })
    .await
    .expect("ready after the 1 s deadline");
    assert_eq!(s.live_streams, 3);
    assert!(s.ready_reason.contains("deadline"), "{}", s.ready_reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_invalid_argument_with_a_message() {
    let dir = TempDir::new("api-invalid");
    let api = TestApi::start(api_config(&dir), health_config()).await;
    let mut client = api.client().await;
    let cases: Vec<(&str, tonic::Status)> = vec![
        (
            "deadline_seconds",
            client
                .begin_drain(pb::BeginDrainRequest {
                    requested_by: "ctl".into(),
                    reason: String::new(),
                    deadline_seconds: -1,
                })
                .await
                .expect_err("negative deadline"),
        ),
        (
            "requested_by",
            client
                .begin_drain(pb::BeginDrainRequest::default())
                .await
                .expect_err("nobody asks"),
        ),
        (
            "requested_by",
            client
                .cancel_drain(pb::CancelDrainRequest::default())
                .await
                .expect_err("nobody asks"),
        ),
        (
            "reason",
            client
                .begin_drain(pb::BeginDrainRequest {
                    requested_by: "ctl".into(),
                    reason: "x".repeat(5000),
                    deadline_seconds: 0,
                })
                .await
                .expect_err("oversized reason"),
        ),
        (
            "label_selector",
            client
                .list_containers(pb::ListContainersRequest {
                    label_selector: (0..100)
                        .map(|i| (format!("k{i}"), "v".to_owned()))
                        .collect(),
                    ..Default::default()
                })
                .await
                .expect_err("oversized selector"),
        ),
        (
            "container_id",
            client
                .get_container_network(pb::GetContainerNetworkRequest {
                    container_id: "c".repeat(1000),
                })
                .await
                .expect_err("oversized id"),
        ),
    ];
    for (field, status) in cases {
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    }
    let s = client
        .get_drain_status(pb::GetDrainStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(
        s.drain.expect("drain").state,
        pb::DrainState::NotDraining as i32,
        "no bad request started a drain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_rpcs_refuse_identities_that_are_not_allowed() {
    let dir = TempDir::new("api-refuse");
    let mut cfg = api_config(&dir);
    // Nobody runs these tests as uid 4242: the caller's uid is refused.
    cfg.drain_allowed_identities = vec!["uid:4242".into()];
    let api = TestApi::start(cfg, health_config()).await;
    let mut client = api.client().await;
    let e = client
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "ctl".into(),
            reason: String::new(),
            deadline_seconds: 0,
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains(&format!("uid:{}", unsafe_uid())),
        "{}",
        e.message()
    );
    let e = client
        .cancel_drain(pb::CancelDrainRequest {
            requested_by: "ctl".into(),
            reason: String::new(),
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::PermissionDenied);
    client
        .get_drain_status(pb::GetDrainStatusRequest {})
        .await
        .expect("reading the drain status stays open");
    drop(api);

    let dir = TempDir::new("api-allow");
    let mut cfg = api_config(&dir);
    cfg.drain_allowed_identities = vec![format!("uid:{}", unsafe_uid())];
    let api = TestApi::start(cfg, health_config()).await;
    api.client()
        .await
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "ctl".into(),
            reason: String::new(),
            deadline_seconds: 0,
        })
        .await
        .expect("the allowed uid may drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_mode_0660_and_removed_when_the_server_stops() {
    let dir = TempDir::new("api-socket");
    let api = TestApi::start(api_config(&dir), health_config()).await;
    let path = api.socket.clone();
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
async fn cli_prints_json_and_tables_from_a_live_agent() {
    let bin = agent_binary();
    let dir = TempDir::new("api-cli");
    let api = TestApi::start(api_config(&dir), health_config()).await;
    feed_all(&api.store, 2);
    verdict_becomes(&mut api.client().await, pb::Verdict::Healthy).await;
    let addr = format!("unix:{}", api.socket.display());
    let run = |args: Vec<String>| {
        let bin = bin.clone();
        async move {
            let out = tokio::process::Command::new(bin)
                .args(&args)
                .env_remove("NODEWARD_LOG")
                .output()
                .await
                .expect("run the CLI");
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let json: serde_json::Value = serde_json::from_str(
        &run(vec![
            "status".into(),
            "--addr".into(),
            addr.clone(),
            "--json".into(),
        ])
        .await,
    )
    .expect("status --json is JSON");
    assert_eq!(json["health"]["verdict"], "VERDICT_HEALTHY", "{json}");
    assert_eq!(json["health"]["drain"]["state"], "DRAIN_STATE_NOT_DRAINING");

    let table = run(vec![
        "containers".into(),
        "--addr".into(),
        addr.clone(),
        "-n".into(),
        "edu".into(),
    ])
    .await;
    assert!(
        table.contains("live-0") && !table.contains("train-0"),
        "{table}"
    );

    let started: serde_json::Value = serde_json::from_str(
        &run(vec![
            "drain".into(),
            "start".into(),
            "--addr".into(),
            addr.clone(),
            "--by".into(),
            "cli-test".into(),
            "--deadline".into(),
            "10m".into(),
            "--json".into(),
        ])
        .await,
    )
    .expect("drain start --json is JSON");
    assert_eq!(
        started["drain"]["state"], "DRAIN_STATE_DRAINING",
        "{started}"
    );
    let status = run(vec![
        "drain".into(),
        "status".into(),
        "--addr".into(),
        addr.clone(),
    ])
    .await;
    assert!(
        status.contains("streams:   2") && status.contains("c-live"),
        "{status}"
    );
    let line = run(vec![
        "watch".into(),
        "--addr".into(),
        addr.clone(),
        "--count".into(),
        "1".into(),
    ])
    .await;
    assert!(
        line.contains("drain=DRAINING") && line.contains("verdict=HEALTHY"),
        "{line}"
    );
    let gpus = run(vec!["gpus".into(), "--addr".into(), addr.clone()]).await;
    assert!(gpus.contains("GPU-aaaa"), "{gpus}");

    let out = tokio::process::Command::new(&bin)
        .args(["drain", "start", "--addr", &addr, "--deadline", "0s"])
        .output()
        .await
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(64),
        "a zero deadline is a usage error"
    );
    let out = tokio::process::Command::new(&bin)
        .args([
            "status",
            "--addr",
            &format!("unix:{}/missing.sock", dir.0.display()),
        ])
        .output()
        .await
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(69),
        "an unreachable agent is EX_UNAVAILABLE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_discovers_the_service_by_reflection_and_calls_it() {
    const TEST: &str = "python_grpcio_discovers_the_service_by_reflection_and_calls_it";
    let probe = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_reflection, google.protobuf"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return skip(
                TEST,
                &format!(
                    "python grpcio/grpcio-reflection not importable (pip install -r tests/requirements.txt): {}",
                    String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or_default()
                ),
            )
        }
        Err(e) => return skip(TEST, &format!("python3 not found: {e}")),
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

fn unsafe_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}
