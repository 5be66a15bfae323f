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
    let clock = Arc::new(ManualClock::new(std::time::SystemTime::UNIX_EPOCH));
    Service::new(ServiceParts {
        node: "n".to_owned(),
        store: Store::new(),
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
