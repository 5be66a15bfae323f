use std::{collections::BTreeMap, net::SocketAddr};

use super::*;
use crate::{
    store::{
        ContainerNetwork, LiveStream, ManualClock, NetworkSnapshot, Provenance, Store,
        StreamProtocol, Viewer,
    },
    task::TaskHealth,
};

fn who(name: &str) -> Requester {
    Requester {
        requested_by: name.to_owned(),
        identity: "uid:0".to_owned(),
        reason: "rollout".to_owned(),
        at: SystemTime::UNIX_EPOCH,
    }
}

fn stream() -> LiveStream {
    let a: SocketAddr = "10.0.0.1:1935".parse().expect("addr");
    LiveStream {
        protocol: StreamProtocol::Tcp,
        kind: crate::store::StreamKind::Tcp,
        direction: crate::store::StreamDirection::Served,
        local: a,
        remote: a,
        started_at: SystemTime::UNIX_EPOCH,
        viewers: 0,
        bytes: None,
        viewer_reports: None,
    }
}

fn start() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_765_000_000)
}

/// A network report with `streams` live streams in container `c`, from the given feeds.
fn publish(store: &Store, at: SystemTime, streams: usize, feeds: &[(&'static str, FeedState)]) {
    let mut containers = BTreeMap::new();
    if streams > 0 {
        containers.insert(
            "c".to_owned(),
            ContainerNetwork {
                streams: vec![stream(); streams],
                ..Default::default()
            },
        );
    }
    store.publish_network(
        at,
        Provenance::default(),
        NetworkSnapshot {
            containers,
            feeds: feeds.iter().cloned().collect(),
        },
    );
}

const TCP: &str = "ebpf/tcp";
const UDP: &str = "ebpf/udp";

fn both() -> [(&'static str, FeedState); 2] {
    [
        (TCP, FeedState::Reporting { run: 0 }),
        (UDP, FeedState::Reporting { run: 0 }),
    ]
}

fn temp_state(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nodeward-drainc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d.join("drain.json")
}

fn persisted(clock: &Arc<ManualClock>, path: &std::path::Path) -> DrainController {
    DrainController::open(
        clock.clone(),
        DrainSettings {
            state_file: Some(path.to_owned()),
            ..DrainSettings::default()
        },
    )
}

#[test]
fn begin_is_idempotent_and_keeps_the_first_deadline() {
    let clock = Arc::new(ManualClock::new(start()));
    let d = DrainController::new(clock.clone());
    let (first, already) = d.begin(who("a"), Duration::from_secs(60));
    assert!(!already);
    clock.advance(Duration::from_secs(5));
    let (second, already) = d.begin(who("b"), Duration::from_secs(600));
    assert!(already);
    assert_eq!(second.deadline, first.deadline);
    assert_eq!(second.requesters.len(), 2);
    let (third, _) = d.begin(who("b"), Duration::from_secs(600));
    assert_eq!(
        third.requesters.len(),
        2,
        "the same caller twice is listed once"
    );
    assert!(d.cancel());
    assert!(!d.cancel(), "a second cancel finds no drain");
}

#[test]
fn ready_when_streams_end_or_the_deadline_passes() {
    let clock = Arc::new(ManualClock::new(start()));
    let d = DrainController::new(clock.clone());
    let store = Store::new();
    assert!(!d.progress(&store.snapshot()).ready, "not draining");
    d.begin(who("a"), Duration::from_secs(60));
    let p = d.progress(&store.snapshot());
    assert!(
        !p.ready && !p.streams_known,
        "unknown streams wait for the deadline"
    );
    publish(&store, clock.now(), 2, &both());
    let p = d.progress(&store.snapshot());
    assert_eq!((p.ready, p.live_streams, p.containers.len()), (false, 2, 1));
    publish(&store, clock.now(), 0, &both());
    let p = d.progress(&store.snapshot());
    assert!(p.ready, "{}", p.ready_reason);
    publish(&store, clock.now(), 1, &both());
    assert!(!d.progress(&store.snapshot()).ready);
    clock.advance(Duration::from_secs(60));
    publish(&store, clock.now(), 1, &both());
    let p = d.progress(&store.snapshot());
    assert!(
        p.ready && p.ready_reason.contains("deadline"),
        "{}",
        p.ready_reason
    );
}

#[test]
fn a_wall_clock_step_neither_ends_nor_extends_a_drain() {
    let clock = Arc::new(ManualClock::new(start()));
    let d = DrainController::new(clock.clone());
    let store = Store::new();
    d.begin(who("a"), Duration::from_secs(60));
    // The wall clock jumps a day ahead: the deadline is measured on the monotonic clock.
    clock.set(start() + Duration::from_secs(86_400));
    publish(&store, clock.now(), 1, &both());
    let p = d.progress(&store.snapshot());
    assert!(!p.ready, "{}", p.ready_reason);
    // And back a day: 60 s of real time still end it.
    clock.set(start() - Duration::from_secs(86_400));
    clock.advance(Duration::from_secs(60));
    publish(&store, clock.now(), 1, &both());
    let p = d.progress(&store.snapshot());
    assert!(
        p.ready && p.ready_reason.contains("deadline"),
        "{}",
        p.ready_reason
    );
}

#[test]
fn streams_are_known_only_when_every_feed_reported_in_its_current_run() {
    let clock = Arc::new(ManualClock::new(start()));
    let d = DrainController::new(clock.clone());
    let store = Store::new();
    d.begin(who("a"), Duration::from_secs(600));
    let not_ready = |why: &str| {
        let p = d.progress(&store.snapshot());
        assert!(!p.streams_known && !p.ready, "{why}: {}", p.ready_reason);
        p.ready_reason
    };
    // UDP reported with no streams, TCP has not: no stream seen is not "no stream".
    publish(
        &store,
        clock.now(),
        0,
        &[
            (TCP, FeedState::Waiting),
            (UDP, FeedState::Reporting { run: 0 }),
        ],
    );
    assert!(not_ready("tcp waiting").contains("ebpf/tcp has not reported"));
    // A report that names no feeds is not trusted either.
    publish(&store, clock.now(), 0, &[]);
    not_ready("no feeds");
    // A blind feed.
    publish(
        &store,
        clock.now(),
        0,
        &[(
            TCP,
            FeedState::Blind {
                reason: "sock_diag lacks CAP_SYS_ADMIN".into(),
            },
        )],
    );
    assert!(not_ready("blind").contains("CAP_SYS_ADMIN"));

    publish(&store, clock.now(), 0, &both());
    assert!(d.progress(&store.snapshot()).ready);
    // The TCP task fails: not known while it waits out its back-off ...
    store.publish_task(
        TCP,
        TaskHealth {
            restarts: 1,
            up: false,
            ..TaskHealth::default()
        },
    );
    assert!(not_ready("restarting").contains("restarting"));
    // ... nor once it runs again but has not reported in its new run ...
    store.publish_task(
        TCP,
        TaskHealth {
            restarts: 1,
            ..TaskHealth::default()
        },
    );
    assert!(not_ready("restarted").contains("since its restart"));
    // ... and known again once it has.
    publish(
        &store,
        clock.now(),
        0,
        &[
            (TCP, FeedState::Reporting { run: 1 }),
            (UDP, FeedState::Reporting { run: 0 }),
        ],
    );
    assert!(d.progress(&store.snapshot()).ready);
    // A stale report does not count.
    clock.advance(DrainSettings::default().stale_after + Duration::from_secs(1));
    assert!(not_ready("stale").contains("no network report"));
}

#[test]
fn requesters_are_capped_and_further_joins_counted() {
    let clock = Arc::new(ManualClock::new(start()));
    let d = DrainController::new(clock.clone());
    for i in 0..100 {
        d.begin(who(&format!("c{i}")), Duration::from_secs(60));
    }
    let drain = d.current().expect("draining");
    assert_eq!(drain.requesters.len(), 64);
    assert_eq!(drain.requesters_not_kept, 36);
    assert_eq!(
        drain.requesters[63].requested_by, "c63",
        "the first are kept"
    );
}

#[test]
fn the_stream_list_is_capped_with_exact_totals() {
    let clock = Arc::new(ManualClock::new(start()));
    let d = DrainController::with_settings(
        clock.clone(),
        DrainSettings {
            max_streams_listed: 10,
            ..DrainSettings::default()
        },
    );
    let store = Store::new();
    d.begin(who("a"), Duration::from_secs(60));
    publish(&store, clock.now(), 25, &both());
    let p = d.progress(&store.snapshot());
    assert_eq!(p.live_streams, 25);
    assert_eq!(p.containers[0].live_streams, 25);
    assert_eq!(p.containers[0].streams.len(), 10);
    assert!(p.truncated);
    publish(&store, clock.now(), 10, &both());
    assert!(!d.progress(&store.snapshot()).truncated);
}

#[test]
fn a_drain_is_restored_with_its_deadline_requesters_and_start() {
    let path = temp_state("restore");
    let clock = Arc::new(ManualClock::new(start()));
    let d = persisted(&clock, &path);
    d.begin(who("a"), Duration::from_secs(600));
    clock.advance(Duration::from_secs(10));
    d.begin(who("b"), Duration::from_secs(5));
    let before = d.current().expect("draining");

    // A new agent, 100 s later.
    clock.advance(Duration::from_secs(100));
    let again = persisted(&clock, &path);
    assert_eq!(again.current(), Some(before));
    let store = Store::new();
    publish(&store, clock.now(), 1, &both());
    assert!(!again.progress(&store.snapshot()).ready);
    // 490 s were left: the deadline is the same.
    clock.advance(Duration::from_secs(490));
    publish(&store, clock.now(), 1, &both());
    let p = again.progress(&store.snapshot());
    assert!(
        p.ready && p.ready_reason.contains("deadline"),
        "{}",
        p.ready_reason
    );

    assert!(again.cancel());
    assert_eq!(
        persisted(&clock, &path).current(),
        None,
        "the cancel is kept too"
    );
    let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
}

#[test]
fn a_wall_clock_set_back_before_a_restart_cannot_stretch_the_drain() {
    let path = temp_state("stepback");
    let clock = Arc::new(ManualClock::new(start()));
    persisted(&clock, &path).begin(who("a"), Duration::from_secs(60));
    clock.set(start() - Duration::from_secs(86_400));
    let again = persisted(&clock, &path);
    let store = Store::new();
    clock.advance(Duration::from_secs(60));
    publish(&store, clock.now(), 1, &both());
    assert!(
        again.progress(&store.snapshot()).ready,
        "at most the drain's own length"
    );
    let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
}

#[test]
fn an_unreadable_state_holds_the_node_draining_and_not_ready_until_a_caller_decides() {
    let path = temp_state("unreadable");
    std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
    std::fs::write(&path, b"{\"version\":1,\"dra").expect("write");
    let clock = Arc::new(ManualClock::new(start()));
    let d = persisted(&clock, &path);
    let drain = d.current().expect("held as draining");
    assert!(drain
        .problem
        .as_deref()
        .is_some_and(|p| p.contains("could not be read")));
    assert_eq!(drain.deadline, None);
    assert_eq!(d.problems().len(), 1);
    assert_eq!(d.problems()[0].reason, "Unreadable");
    let store = Store::new();
    publish(&store, clock.now(), 0, &both());
    clock.advance(Duration::from_secs(30 * 86_400));
    publish(&store, clock.now(), 0, &both());
    let p = d.progress(&store.snapshot());
    assert!(
        !p.ready,
        "never ready from an unreadable state: {}",
        p.ready_reason
    );
    assert!(!path.exists(), "moved aside");

    // A caller begins anew: a real drain with its own deadline replaces it.
    let (fresh, already) = d.begin(who("a"), Duration::from_secs(60));
    assert!(already, "the node was held as draining");
    assert_eq!(fresh.problem, None);
    assert!(d.problems().is_empty());
    publish(&store, clock.now(), 0, &both());
    assert!(d.progress(&store.snapshot()).ready, "no streams");
    let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
}

#[test]
fn a_failed_save_is_reported_until_one_works() {
    let dir = temp_state("unsaved");
    // The state file's directory is a file: every save fails.
    let parent = dir.parent().expect("dir").to_owned();
    std::fs::create_dir_all(&parent).expect("mkdir");
    let blocker = parent.join("file");
    std::fs::write(&blocker, b"").expect("write");
    let clock = Arc::new(ManualClock::new(start()));
    let d = persisted(&clock, &blocker.join("drain.json"));
    d.begin(who("a"), Duration::from_secs(60));
    let problems = d.problems();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].reason, "NotSaved");
    let _ = std::fs::remove_dir_all(&parent);
}

/// A network report where container `c` has no connection but served `viewers` (each last
/// seen at `last_seen`).
fn publish_viewers(store: &Store, at: SystemTime, viewers: u8, last_seen: SystemTime) {
    let mut containers = BTreeMap::new();
    containers.insert(
        "c".to_owned(),
        ContainerNetwork {
            viewers: (1..=viewers)
                .map(|i| Viewer {
                    addr: [10, 0, 0, i].into(),
                    port: 8080,
                    last_seen,
                })
                .collect(),
            ..Default::default()
        },
    );
    store.publish_network(
        at,
        Provenance::default(),
        NetworkSnapshot {
            containers,
            feeds: both().into_iter().collect(),
        },
    );
}

#[test]
fn viewers_between_segment_fetches_hold_the_drain_until_viewer_idle_passes() {
    let clock = Arc::new(ManualClock::new(start()));
    let d = DrainController::with_settings(
        clock.clone(),
        DrainSettings {
            max_streams_listed: 2,
            policy: StreamPolicy {
                viewer_idle: Duration::from_secs(4),
                ..StreamPolicy::default()
            },
            ..DrainSettings::default()
        },
    );
    let store = Store::new();
    d.begin(who("a"), Duration::from_secs(600));
    let fetched = clock.now();
    clock.advance(Duration::from_secs(2));
    publish_viewers(&store, clock.now(), 3, fetched);
    let p = d.progress(&store.snapshot());
    assert!(!p.ready, "no connection, yet three hosts are watching");
    assert_eq!((p.live_streams, p.viewers), (0, 3));
    assert_eq!(p.containers.len(), 1);
    assert_eq!(p.containers[0].viewers, 3);
    assert_eq!(
        p.containers[0].viewer_list.len(),
        2,
        "listed up to the bound"
    );
    assert!(p.truncated);
    clock.advance(Duration::from_secs(3));
    publish_viewers(&store, clock.now(), 3, fetched);
    let p = d.progress(&store.snapshot());
    assert!(p.ready, "5 s after the last fetch: {}", p.ready_reason);
    assert_eq!(p.viewers, 0);
    assert!(p.containers.is_empty());
}

#[test]
fn excluded_containers_hold_nothing_by_id_or_by_pod_name() {
    let clock = Arc::new(ManualClock::new(start()));
    let store = Store::new();
    publish(&store, clock.now(), 2, &both());
    let drain = |exclude: &[&str]| {
        let d = DrainController::with_settings(
            clock.clone(),
            DrainSettings {
                exclude_containers: exclude.iter().map(|s| (*s).to_owned()).collect(),
                ..DrainSettings::default()
            },
        );
        d.begin(who("a"), Duration::from_secs(600));
        d.progress(&store.snapshot())
    };
    assert_eq!((drain(&[]).ready, drain(&[]).live_streams), (false, 2));
    assert_eq!(drain(&["other", "c-"]).live_streams, 2, "exact match only");
    let p = drain(&["c"]);
    assert!(p.ready && p.containers.is_empty(), "{}", p.ready_reason);
    store.publish_container_meta(
        [(
            "c".to_owned(),
            crate::store::ContainerMeta {
                id: "c".to_owned(),
                pod_name: "ingest-0".to_owned(),
                ..Default::default()
            },
        )]
        .into(),
    );
    assert!(drain(&["ingest-0"]).ready, "by its pod's name");
    assert!(!drain(&["ingest-1"]).ready);
}

#[test]
fn each_listed_stream_says_whether_it_holds_the_drain() {
    let clock = Arc::new(ManualClock::new(start()));
    let d = DrainController::with_settings(
        clock.clone(),
        DrainSettings {
            policy: StreamPolicy {
                ports: super::super::streams::PortFilter::new(&[], &[9100]),
                ..StreamPolicy::default()
            },
            ..DrainSettings::default()
        },
    );
    let store = Store::new();
    d.begin(who("a"), Duration::from_secs(60));
    let on = |port: u16, direction| LiveStream {
        local: SocketAddr::new([10, 0, 0, 1].into(), port),
        direction,
        ..stream()
    };
    use crate::store::StreamDirection::{Outbound, Served};
    store.publish_network(
        clock.now(),
        Provenance::default(),
        NetworkSnapshot {
            containers: BTreeMap::from([(
                "c".to_owned(),
                ContainerNetwork {
                    // A viewer, a scrape of the excluded metrics port, a database connection.
                    streams: vec![on(1935, Served), on(9100, Served), on(41000, Outbound)],
                    ..Default::default()
                },
            )]),
            feeds: both().into_iter().collect(),
        },
    );
    let p = d.progress(&store.snapshot());
    let listed: Vec<(u16, bool)> = p.containers[0]
        .streams
        .iter()
        .map(|s| (s.stream.local.port(), s.holds_drain))
        .collect();
    assert_eq!(listed, [(1935, true), (9100, false), (41000, false)]);
    assert_eq!(p.live_streams, 1, "only the one that holds it is counted");
}
