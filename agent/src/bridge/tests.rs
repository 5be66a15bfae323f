//! The bridge's registration, task publishing and network feed states.

use super::*;
use crate::{store::SourceStatus, task::TaskHealth};

fn feeds(started: &[&'static str], unavailable: &[&'static str]) -> Feeds {
    Feeds {
        started: started.to_vec(),
        unavailable: unavailable
            .iter()
            .map(|n| (*n, format!("{n} cannot run")))
            .collect(),
        ..Feeds::default()
    }
}

fn status(store: &Store, kind: SourceKind) -> Option<SourceStatus> {
    store.snapshot().sources.get(&kind).cloned()
}

#[tokio::test]
async fn each_supervised_tasks_health_reaches_the_store_on_every_change() {
    use crate::supervise::TaskHealth;
    let store = Store::new();
    let (tcp_tx, tcp_rx) = watch::channel(TaskHealth::default());
    let (_gpu_tx, gpu_rx) = watch::channel(TaskHealth::default());
    let cancel = CancellationToken::new();
    let (s, c) = (store.clone(), cancel.clone());
    let task = tokio::spawn(async move {
        publish_tasks(&s, vec![(tcp::NAME, tcp_rx), (gpu::NAME, gpu_rx)], c).await;
    });
    let wait = |f: fn(&crate::store::Snapshot) -> bool| {
        let store = store.clone();
        async move {
            while !f(&store.snapshot()) {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
    };
    // The current values first: both tasks up, never restarted.
    wait(|s| s.tasks.len() == 2 && s.tasks.values().all(|h| h.up && h.restarts == 0)).await;
    tcp_tx.send_modify(|h| {
        h.restarts = 1;
        h.up = false;
        h.last_failure = Some("panicked: boom".to_owned());
    });
    wait(|s| {
        s.tasks
            .get(tcp::NAME)
            .is_some_and(|h| h.restarts == 1 && !h.up)
    })
    .await;
    assert_eq!(store.snapshot().tasks[gpu::NAME], TaskHealth::default());
    cancel.cancel();
    task.await.expect("stops on cancel");
}

/// A bridge over the given channels, without its task: the tests call its methods.
fn bridge(
    tcp: Option<watch::Receiver<Arc<tcp::TcpSnapshot>>>,
    udp: Option<watch::Receiver<udp::model::UdpSnapshot>>,
    tasks: Vec<(&'static str, watch::Receiver<TaskHealth>)>,
    blind: Vec<(&'static str, String)>,
) -> Bridge {
    Bridge {
        store: Store::new(),
        identity: None,
        gpu_assignments: None,
        tcp,
        udp,
        gpu: None,
        cgroup: None,
        publish_cgroups: false,
        publish_node: false,
        udp_min_flow_age: Duration::from_secs(10),
        peer_window: crate::store::Window::from_secs(10),
        own_cgroup_path: None,
        host_cgroups: Vec::new(),
        network_notes: Vec::new(),
        blind_feeds: blind,
        feed_tasks: tasks.into_iter().collect(),
        reported_run: BTreeMap::new(),
    }
}

fn tcp_tick(tick: u64) -> Arc<tcp::TcpSnapshot> {
    Arc::new(tcp::TcpSnapshot {
        tick,
        ..tcp::TcpSnapshot::default()
    })
}

fn udp_hooked() -> udp::model::UdpSnapshot {
    udp::model::UdpSnapshot {
        hook: "cgroup_skb".into(),
        ..Default::default()
    }
}

fn published(b: &Bridge) -> BTreeMap<&'static str, FeedState> {
    b.store
        .snapshot()
        .network
        .map(|n| n.feeds.clone())
        .unwrap_or_default()
}

/// Each network report says what each feed did: a feed counts as reporting only with a real
/// snapshot taken while its task was up, and in the run that sent it.
#[test]
fn each_network_report_says_which_feed_reported_in_which_run() {
    let (tcp_tx, tcp_rx) = watch::channel(Arc::new(tcp::TcpSnapshot::default()));
    let (udp_tx, udp_rx) = watch::channel(udp::model::UdpSnapshot::default());
    let (tcp_health, tcp_health_rx) = watch::channel(TaskHealth::default());
    let (_udp_health, udp_health_rx) = watch::channel(TaskHealth::default());
    let mut b = bridge(
        Some(tcp_rx),
        Some(udp_rx),
        vec![(tcp::NAME, tcp_health_rx), (udp::NAME, udp_health_rx)],
        Vec::new(),
    );
    let both = |tcp, udp| [(tcp::NAME, tcp), (udp::NAME, udp)].into_iter().collect();
    // Placeholders are no reports.
    b.note_report(tcp::NAME);
    b.note_report(udp::NAME);
    assert_eq!(b.feeds(), both(FeedState::Waiting, FeedState::Waiting));
    // UDP reports first: TCP is still waiting.
    udp_tx.send_replace(udp_hooked());
    b.note_report(udp::NAME);
    assert_eq!(
        b.feeds(),
        both(FeedState::Waiting, FeedState::Reporting { run: 0 })
    );
    tcp_tx.send_replace(tcp_tick(1));
    b.note_report(tcp::NAME);
    assert_eq!(
        b.feeds(),
        both(
            FeedState::Reporting { run: 0 },
            FeedState::Reporting { run: 0 }
        )
    );
    // The TCP task fails: a snapshot seen while it is down is no report of the next run.
    tcp_health.send_replace(TaskHealth {
        restarts: 1,
        up: false,
        ..TaskHealth::default()
    });
    tcp_tx.send_replace(tcp_tick(2));
    b.note_report(tcp::NAME);
    assert_eq!(b.feeds()[tcp::NAME], FeedState::Reporting { run: 0 });
    // Its new run reports.
    tcp_health.send_replace(TaskHealth {
        restarts: 1,
        ..TaskHealth::default()
    });
    tcp_tx.send_replace(tcp_tick(1));
    b.note_report(tcp::NAME);
    assert_eq!(b.feeds()[tcp::NAME], FeedState::Reporting { run: 1 });
}

/// Both feeds publish before the bridge wakes: the wake-up for UDP publishes both snapshots
/// (reading TCP's marks it seen, so no wake-up for TCP follows), and TCP's report still counts.
#[test]
fn a_report_that_arrives_with_the_other_feeds_is_not_lost() {
    let (tcp_tx, tcp_rx) = watch::channel(Arc::new(tcp::TcpSnapshot::default()));
    let (udp_tx, udp_rx) = watch::channel(udp::model::UdpSnapshot::default());
    let mut b = bridge(Some(tcp_rx), Some(udp_rx), Vec::new(), Vec::new());
    udp_tx.send_replace(udp_hooked());
    tcp_tx.send_replace(tcp_tick(1));
    b.note_report(udp::NAME);
    b.publish_network();
    assert_eq!(
        published(&b),
        [
            (tcp::NAME, FeedState::Reporting { run: 0 }),
            (udp::NAME, FeedState::Reporting { run: 0 })
        ]
        .into_iter()
        .collect()
    );
}

#[test]
fn a_network_feed_that_could_not_start_is_blind_with_its_reason() {
    let b = bridge(
        None,
        None,
        Vec::new(),
        vec![(tcp::NAME, "sock_diag lacks CAP_SYS_ADMIN".to_owned())],
    );
    assert_eq!(
        b.feeds(),
        [(
            tcp::NAME,
            FeedState::Blind {
                reason: "sock_diag lacks CAP_SYS_ADMIN".to_owned()
            }
        )]
        .into_iter()
        .collect()
    );
}

#[test]
fn network_waits_for_whichever_of_tcp_and_udp_runs() {
    let store = Store::new();
    register(
        &store,
        &crate::config::Config::default().bridge(),
        &feeds(&[tcp::NAME, cgroup::NAME], &[udp::NAME, gpu::NAME]),
    );
    assert_eq!(
        status(&store, SourceKind::Network),
        Some(SourceStatus::Pending)
    );
    assert_eq!(
        status(&store, SourceKind::Cgroup),
        Some(SourceStatus::Pending)
    );
    assert_eq!(
        status(&store, SourceKind::Node),
        Some(SourceStatus::Pending)
    );
    assert!(matches!(
        status(&store, SourceKind::Gpu),
        Some(SourceStatus::Unavailable { reason }) if reason.contains("gpu cannot run")
    ));
}

#[test]
fn network_is_unavailable_only_when_neither_source_runs_with_both_reasons() {
    let store = Store::new();
    register(
        &store,
        &crate::config::Config::default().bridge(),
        &feeds(&[cgroup::NAME], &[tcp::NAME, udp::NAME]),
    );
    match status(&store, SourceKind::Network) {
        Some(SourceStatus::Unavailable { reason }) => {
            assert!(
                reason.contains(tcp::NAME) && reason.contains(udp::NAME),
                "{reason}"
            );
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
}

#[test]
fn disabled_sources_are_not_registered() {
    let store = Store::new();
    let mut config = crate::config::Config::default();
    config.node.enabled = false;
    register(&store, &config.bridge(), &feeds(&[cgroup::NAME], &[]));
    let s = store.snapshot();
    assert!(s.sources.contains_key(&SourceKind::Cgroup));
    assert!(!s.sources.contains_key(&SourceKind::Node), "node disabled");
    assert!(
        !s.sources.contains_key(&SourceKind::Network),
        "no eBPF source asked for"
    );
    assert!(!s.sources.contains_key(&SourceKind::Gpu));
}

#[test]
fn a_cgroup_source_that_cannot_start_marks_cgroup_and_node_unavailable() {
    let store = Store::new();
    register(
        &store,
        &crate::config::Config::default().bridge(),
        &feeds(&[], &[cgroup::NAME]),
    );
    for kind in [SourceKind::Cgroup, SourceKind::Node] {
        assert!(matches!(
            status(&store, kind),
            Some(SourceStatus::Unavailable { .. })
        ));
    }
}
