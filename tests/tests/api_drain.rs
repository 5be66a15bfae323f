//! The drain handshake over a real Unix socket: BeginDrain → DRAINING in every health message
//! → live streams counted per container → ready when they end or the deadline passes →
//! CancelDrain; idempotent calls, INVALID_ARGUMENT for bad requests, refused identities.
//!
//! The live streams come from the store, fed directly by the test (the eBPF source that will
//! count them is built in another branch).

use nodeward::api::pb;
use nodeward_tests::api::{
    api_config, eventually, feed_all, health_config, network, now, prov, uid, TempDir, TestApi,
    WAIT,
};
use tonic::Code;

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
        format!("uid:{}", uid()),
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
    let begin = client
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "ctl".into(),
            reason: String::new(),
            deadline_seconds: 0,
        })
        .await;
    if nodeward_tests::is_root() {
        // Root on the Unix socket may always drain (docs/api.md, "Authorization"); other uids'
        // refusal is checked as uid 65534 in api_authz.rs.
        let drain = begin
            .expect("root may drain whatever the list says")
            .into_inner()
            .drain
            .expect("drain");
        assert_eq!(drain.requesters[0].identity, "uid:0");
        return;
    }
    let e = begin.expect_err("refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains(&format!("uid:{}", uid())),
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
    cfg.drain_allowed_identities = vec![format!("uid:{}", uid())];
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
