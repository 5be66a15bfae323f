//! The Watch stream's memory bound, driven without a network: a reader that does not read
//! skips to the latest state instead of making the agent queue every intermediate one.

use std::{sync::Arc, time::Duration};

use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::Request;

use super::*;
use crate::{
    health::{drain::DrainController, hub::HealthHub, HealthReport},
    store::{ManualClock, Store},
};

fn service(hub: &HealthHub, cancel: &CancellationToken) -> Service {
    service_on(Store::new(), hub, cancel)
}

fn service_on(store: Arc<Store>, hub: &HealthHub, cancel: &CancellationToken) -> Service {
    let clock = Arc::new(ManualClock::new(std::time::SystemTime::UNIX_EPOCH));
    Service::new(ServiceParts {
        node: "n".to_owned(),
        store,
        health: hub.subscribe(),
        drain: DrainController::new(clock.clone()),
        clock,
        heartbeat: Duration::from_secs(3600),
        default_deadline: Duration::from_secs(60),
        drain_policy: DrainPolicy::default(),
        max_watch_streams: 2,
        cancel: cancel.clone(),
    })
}

fn report(i: u32) -> HealthReport {
    HealthReport {
        unknown_reason: format!("state {i}"),
        ..HealthReport::initial(std::time::SystemTime::UNIX_EPOCH)
    }
}

#[tokio::test]
async fn a_reader_that_falls_behind_skips_to_the_latest_state() {
    let hub = HealthHub::new(report(0));
    let cancel = CancellationToken::new();
    let svc = service(&hub, &cancel);
    let mut stream = svc
        .watch_node_health(Request::new(pb::WatchNodeHealthRequest::default()))
        .await
        .expect("watch")
        .into_inner();
    const CHANGES: u32 = 1_000;
    for i in 1..=CHANGES {
        hub.publish(report(i), None);
        tokio::task::yield_now().await;
    }
    let mut received = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a message")
            .expect("stream open")
            .expect("ok");
        received.push(m.revision);
        if m.revision == u64::from(CHANGES) {
            break;
        }
    }
    assert!(
        received.len() <= 4,
        "{} of {CHANGES} states were queued: {received:?}",
        received.len()
    );
    let last = hub.current();
    assert_eq!(last.revision, u64::from(CHANGES));
    cancel.cancel();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("stream ends at shutdown");
    assert!(end.is_none(), "no message after shutdown");
}

#[tokio::test]
async fn an_unchanged_state_is_not_sent_again_except_as_a_heartbeat() {
    let hub = HealthHub::new(report(0));
    let cancel = CancellationToken::new();
    let svc = service(&hub, &cancel);
    let mut stream = svc
        .watch_node_health(Request::new(pb::WatchNodeHealthRequest {
            heartbeat_seconds: 1,
        }))
        .await
        .expect("watch")
        .into_inner();
    let first = stream.next().await.expect("first").expect("ok");
    // The same state evaluated again (a later tick) wakes nobody.
    for _ in 0..10 {
        hub.publish(report(0), None);
    }
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("heartbeat in time")
        .expect("open")
        .expect("ok");
    assert!(next.heartbeat, "only the heartbeat follows");
    assert_eq!(next.revision, first.revision);
    cancel.cancel();
}

#[tokio::test]
async fn watch_streams_past_the_cap_are_refused_until_one_closes() {
    let hub = HealthHub::new(report(0));
    let cancel = CancellationToken::new();
    let svc = service(&hub, &cancel);
    let watch = || svc.watch_node_health(Request::new(pb::WatchNodeHealthRequest::default()));
    let mut first = watch().await.expect("first of 2").into_inner();
    let _second = watch().await.expect("second of 2").into_inner();
    let refused = watch().await.expect_err("a third is past the cap of 2");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused.message().contains("api.limits.max_watch_streams"),
        "{}",
        refused.message()
    );
    // The slot is held by the stream's task, which ends once the reader is gone.
    first.next().await.expect("first message").expect("ok");
    drop(first);
    let mut again = None;
    for _ in 0..1_000 {
        tokio::task::yield_now().await;
        if let Ok(s) = watch().await {
            again = Some(s);
            break;
        }
    }
    assert!(again.is_some(), "a closed stream gives its slot back");
    cancel.cancel();
}

/// A store that knows container `c` as `packager` in pod `edu/live-0` (burstable, one
/// allow-listed annotation) with one live stream it serves.
fn named_store() -> Arc<Store> {
    use crate::store::{
        ContainerMeta, ContainerNetwork, LiveStream, NetworkSnapshot, Provenance, StreamDirection,
        StreamProtocol,
    };
    let store = Store::new();
    store.publish_container_meta(
        [(
            "c".to_owned(),
            ContainerMeta {
                id: "c".to_owned(),
                name: "packager".to_owned(),
                pod_name: "live-0".to_owned(),
                pod_namespace: "edu".to_owned(),
                pod_uid: "u-1".to_owned(),
                image: "example/packager:3".to_owned(),
                annotations: std::sync::Arc::new([("team".to_owned(), "media".to_owned())].into()),
                qos: Some(crate::containers::Qos::Burstable),
                ..Default::default()
            },
        )]
        .into(),
    );
    let a: std::net::SocketAddr = "10.0.0.1:1935".parse().expect("addr");
    store.publish_network(
        std::time::SystemTime::UNIX_EPOCH,
        Provenance::default(),
        NetworkSnapshot {
            containers: [(
                "c".to_owned(),
                ContainerNetwork {
                    streams: vec![LiveStream {
                        protocol: StreamProtocol::Tcp,
                        kind: crate::store::StreamKind::Tcp,
                        direction: StreamDirection::Served,
                        local: a,
                        remote: a,
                        started_at: std::time::SystemTime::UNIX_EPOCH,
                        viewers: 0,
                        bytes: None,
                        viewer_reports: None,
                    }],
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        },
    );
    store
}

#[tokio::test]
async fn containers_carry_image_annotations_and_qos_class() {
    let hub = HealthHub::new(report(0));
    let cancel = CancellationToken::new();
    let svc = service_on(named_store(), &hub, &cancel);
    let list = svc
        .list_containers(Request::new(pb::ListContainersRequest::default()))
        .await
        .expect("ListContainers")
        .into_inner();
    let c = list
        .containers
        .iter()
        .find(|c| c.id == "c")
        .expect("c listed");
    assert_eq!(c.image, "example/packager:3");
    assert_eq!(c.annotations.get("team").map(String::as_str), Some("media"));
    assert_eq!(c.qos_class(), pb::QosClass::Burstable);
    cancel.cancel();
}

#[tokio::test]
async fn drain_status_names_the_pod_and_container_of_each_stream() {
    let hub = HealthHub::new(report(0));
    let cancel = CancellationToken::new();
    let svc = service_on(named_store(), &hub, &cancel);
    let status = svc
        .get_drain_status(Request::new(pb::GetDrainStatusRequest {}))
        .await
        .expect("GetDrainStatus")
        .into_inner();
    let c = status
        .containers
        .iter()
        .find(|c| c.container_id == "c")
        .expect("c holds a stream");
    assert_eq!(
        (
            c.pod_namespace.as_str(),
            c.pod_name.as_str(),
            c.container_name.as_str(),
            c.pod_uid.as_str(),
            c.streams.len()
        ),
        ("edu", "live-0", "packager", "u-1", 1)
    );
    cancel.cancel();
}
