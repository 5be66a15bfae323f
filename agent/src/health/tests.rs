//! Rule evaluation, hysteresis, recovery and the UNKNOWN start, on recorded inputs with a
//! hand-driven clock.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use super::*;
use crate::store::{
    CgroupSnapshot, ContainerNetwork, ContainerStats, Disk, GpuDevice, GpuSnapshot,
    NetworkSnapshot, NetworkWindow, NodeStats, Pressure, Store, Window, XidEvent,
};

const T0: Duration = Duration::from_secs(1_700_000_000);

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
}

fn prov(hook: &str) -> Provenance {
    Provenance {
        hook: hook.to_owned(),
        fidelity: "full".to_owned(),
    }
}

fn cfg() -> HealthConfig {
    HealthConfig {
        hold: Duration::from_secs(30),
        recovery: Duration::from_secs(120),
        source_stale_after: Duration::from_secs(30),
        ..HealthConfig::default()
    }
}

/// A 1-minute window as the network source recorded it for a streaming container.
fn window(p99_us: u64, jitter_us: u64, retrans_per_s: f64) -> NetworkWindow {
    window_of(Window::from_secs(60), p99_us, jitter_us, retrans_per_s)
}

fn window_of(w: Window, p99_us: u64, jitter_us: u64, retrans_per_s: f64) -> NetworkWindow {
    NetworkWindow {
        samples: 1_200,
        rtt_min_us: 800,
        rtt_p50_us: 2_100,
        rtt_p90_us: 9_000,
        rtt_p99_us: p99_us,
        rtt_max_us: p99_us + 5_000,
        jitter_rfc3550_us: jitter_us,
        retransmits: (retrans_per_s * w.duration().as_secs_f64()) as u64,
        retransmits_per_second: retrans_per_s,
        ..NetworkWindow::new(w)
    }
}

fn net(p99_us: u64) -> NetworkSnapshot {
    let mut containers = BTreeMap::new();
    containers.insert(
        "c-stream".to_owned(),
        ContainerNetwork {
            windows: vec![window(p99_us, 1_000, 0.5)],
            ..Default::default()
        },
    );
    NetworkSnapshot {
        containers,
        ..Default::default()
    }
}

fn kinds(r: &HealthReport) -> Vec<(String, ConditionStatus)> {
    r.conditions
        .iter()
        .map(|c| (c.kind.clone(), c.status))
        .collect()
}

#[test]
fn no_enabled_source_is_unknown_not_healthy() {
    let mut e = Engine::new(cfg());
    let r = e.evaluate(&Store::new().snapshot(), at(0));
    assert_eq!(r.verdict, Verdict::Unknown);
    assert!(
        r.unknown_reason.contains("no source"),
        "{}",
        r.unknown_reason
    );
}

#[test]
fn verdict_is_unknown_until_every_enabled_source_reported_once() {
    let store = Store::new();
    store.register(SourceKind::Network);
    store.register(SourceKind::Node);
    let mut e = Engine::new(cfg());
    let r = e.evaluate(&store.snapshot(), at(0));
    assert_eq!(r.verdict, Verdict::Unknown);
    assert!(
        r.unknown_reason.contains("network") && r.unknown_reason.contains("node"),
        "{}",
        r.unknown_reason
    );

    store.publish_network(at(1), prov("tracepoint tcp:tcp_probe"), net(5_000));
    let r = e.evaluate(&store.snapshot(), at(1));
    assert_eq!(r.verdict, Verdict::Unknown, "node has not reported yet");
    assert!(
        !r.unknown_reason.contains("network"),
        "{}",
        r.unknown_reason
    );

    store.publish_node(at(2), prov("procfs"), NodeStats::default());
    let r = e.evaluate(&store.snapshot(), at(2));
    assert_eq!(r.verdict, Verdict::Healthy);
    assert!(!r.drain_recommended);
    let hooks: Vec<_> = r
        .sources
        .iter()
        .map(|s| (s.kind, s.state, s.provenance.hook.as_str()))
        .collect();
    assert_eq!(
        hooks,
        vec![
            (
                SourceKind::Network,
                SourceState::Reporting,
                "tracepoint tcp:tcp_probe"
            ),
            (SourceKind::Node, SourceState::Reporting, "procfs"),
        ]
    );
}

#[test]
fn unavailable_source_does_not_hold_the_verdict_back() {
    let store = Store::new();
    store.register(SourceKind::Node);
    store.register(SourceKind::Gpu);
    store.mark_unavailable(
        SourceKind::Gpu,
        "no NVIDIA driver (libnvidia-ml.so.1 not found)",
    );
    store.publish_node(at(0), prov("procfs"), NodeStats::default());
    let r = Engine::new(cfg()).evaluate(&store.snapshot(), at(0));
    assert_eq!(r.verdict, Verdict::Healthy);
    let gpu = r
        .sources
        .iter()
        .find(|s| s.kind == SourceKind::Gpu)
        .expect("gpu listed");
    assert_eq!(gpu.state, SourceState::Unavailable);
    assert!(gpu.reason.contains("libnvidia-ml"));
}

#[test]
fn a_source_that_reported_and_became_unavailable_is_a_warning() {
    let store = Store::new();
    store.register(SourceKind::Node);
    store.register(SourceKind::Gpu);
    store.publish_node(at(0), prov("procfs"), NodeStats::default());
    store.publish_gpus(at(0), prov("nvml"), GpuSnapshot::default());
    let mut engine = Engine::new(cfg());
    assert_eq!(
        engine.evaluate(&store.snapshot(), at(0)).verdict,
        Verdict::Healthy
    );
    store.mark_unavailable(
        SourceKind::Gpu,
        "GPU source degraded: cannot count the GPUs",
    );
    store.publish_node(at(1), prov("procfs"), NodeStats::default());
    let r = engine.evaluate(&store.snapshot(), at(1));
    assert_eq!(r.verdict, Verdict::Degraded);
    let lost = r
        .conditions
        .iter()
        .find(|c| c.kind == "SourceLost")
        .expect("SourceLost");
    assert_eq!(lost.subject, "gpu");
    assert!(
        lost.message.contains("cannot count the GPUs"),
        "{}",
        lost.message
    );
    // A source unavailable from the start is not news (no GPU on this node).
    let fresh = Store::new();
    fresh.register(SourceKind::Node);
    fresh.register(SourceKind::Gpu);
    fresh.mark_unavailable(SourceKind::Gpu, "no NVIDIA driver");
    fresh.publish_node(at(0), prov("procfs"), NodeStats::default());
    let r = Engine::new(cfg()).evaluate(&fresh.snapshot(), at(0));
    assert_eq!(r.verdict, Verdict::Healthy);
}

#[test]
fn a_source_lost_before_the_engine_saw_it_report_is_still_a_warning() {
    // The report and the failure both fall between two evaluations.
    let store = Store::new();
    store.register(SourceKind::Node);
    store.register(SourceKind::Gpu);
    store.publish_node(at(0), prov("procfs"), NodeStats::default());
    let mut engine = Engine::new(cfg());
    engine.evaluate(&store.snapshot(), at(0));
    store.publish_gpus(at(1), prov("nvml"), GpuSnapshot::default());
    store.mark_unavailable(SourceKind::Gpu, "GPU source degraded: NVML gone");
    store.publish_node(at(1), prov("procfs"), NodeStats::default());
    let r = engine.evaluate(&store.snapshot(), at(1));
    assert_eq!(r.verdict, Verdict::Degraded);
    let lost = r
        .conditions
        .iter()
        .find(|c| c.kind == "SourceLost")
        .expect("SourceLost");
    assert_eq!(lost.subject, "gpu");
}

#[test]
fn high_p99_rtt_fires_only_after_the_hold_time_then_recovers_after_the_recovery_time() {
    let store = Store::new();
    store.register(SourceKind::Network);
    let mut e = Engine::new(cfg());
    let mut eval = |secs: u64, p99_us: u64| {
        store.publish_network(at(secs), prov("tp"), net(p99_us));
        e.evaluate(&store.snapshot(), at(secs))
    };
    assert_eq!(eval(0, 5_000).verdict, Verdict::Healthy);

    // 200 ms p99 > 150 ms threshold: pending during the 30 s hold.
    let r = eval(10, 200_000);
    assert_eq!(
        kinds(&r),
        vec![("ContainerRttHigh".to_owned(), ConditionStatus::Pending)]
    );
    assert_eq!(
        r.verdict,
        Verdict::Healthy,
        "a pending condition does not count"
    );
    assert_eq!(eval(39, 200_000).verdict, Verdict::Healthy, "29 s < hold");

    let r = eval(40, 200_000);
    assert_eq!(r.verdict, Verdict::Degraded, "30 s = hold: fires");
    let c = r.causes().next().expect("one cause");
    assert_eq!(c.kind, "ContainerRttHigh");
    assert_eq!(c.subject, "c-stream");
    assert_eq!(c.since, at(10), "since the cause was first seen");
    assert_eq!(c.last_transition, at(40));
    assert_eq!(c.evidence[0].metric, "rtt_p99_ms");
    assert!((c.evidence[0].value - 200.0).abs() < 1e-9);
    assert_eq!(c.evidence[0].window_seconds, 60);
    assert!(!r.drain_recommended, "a warning does not recommend a drain");

    // The cause goes away: recovering, still counted, for 120 s.
    let r = eval(50, 5_000);
    assert_eq!(
        kinds(&r),
        vec![("ContainerRttHigh".to_owned(), ConditionStatus::Recovering)]
    );
    assert_eq!(r.verdict, Verdict::Degraded);
    assert_eq!(
        eval(169, 5_000).verdict,
        Verdict::Degraded,
        "119 s < recovery"
    );
    let r = eval(170, 5_000);
    assert_eq!(
        r.verdict,
        Verdict::Healthy,
        "cleared by itself after the recovery time"
    );
    assert!(r.conditions.is_empty());
}

#[test]
fn a_cause_that_returns_while_recovering_fires_again_without_a_new_hold() {
    let store = Store::new();
    store.register(SourceKind::Network);
    let mut e = Engine::new(cfg());
    let mut eval = |secs: u64, p99_us: u64| {
        store.publish_network(at(secs), prov("tp"), net(p99_us));
        e.evaluate(&store.snapshot(), at(secs))
    };
    eval(0, 200_000);
    assert_eq!(eval(30, 200_000).verdict, Verdict::Degraded);
    assert_eq!(
        kinds(&eval(40, 5_000)),
        vec![("ContainerRttHigh".to_owned(), ConditionStatus::Recovering)]
    );
    let r = eval(50, 200_000);
    assert_eq!(
        kinds(&r),
        vec![("ContainerRttHigh".to_owned(), ConditionStatus::Firing)],
        "no flap back to pending"
    );
    assert_eq!(r.conditions[0].since, at(0), "same episode");
}

#[test]
fn a_blip_shorter_than_the_hold_time_never_counts() {
    let store = Store::new();
    store.register(SourceKind::Network);
    let mut e = Engine::new(cfg());
    store.publish_network(at(0), prov("tp"), net(200_000));
    assert_eq!(
        e.evaluate(&store.snapshot(), at(0)).verdict,
        Verdict::Healthy
    );
    store.publish_network(at(5), prov("tp"), net(5_000));
    let r = e.evaluate(&store.snapshot(), at(5));
    assert!(r.conditions.is_empty(), "{:?}", r.conditions);
    assert_eq!(r.verdict, Verdict::Healthy);
}

#[test]
fn windows_with_too_few_samples_are_ignored() {
    let store = Store::new();
    store.register(SourceKind::Network);
    let mut n = net(900_000);
    if let Some(c) = n.containers.get_mut("c-stream") {
        c.windows[0].samples = 3;
    }
    store.publish_network(at(0), prov("tp"), n);
    let r = Engine::new(cfg()).evaluate(&store.snapshot(), at(0));
    assert!(r.conditions.is_empty(), "{:?}", r.conditions);
}

#[test]
fn jitter_and_retransmit_rate_rules_fire() {
    let store = Store::new();
    store.register(SourceKind::Network);
    let mut n = NetworkSnapshot::default();
    n.containers.insert(
        "c".to_owned(),
        ContainerNetwork {
            windows: vec![window(5_000, 45_000, 80.0)],
            ..Default::default()
        },
    );
    store.publish_network(at(0), prov("tp"), n);
    let mut c = cfg();
    c.hold = Duration::ZERO;
    let r = Engine::new(c).evaluate(&store.snapshot(), at(0));
    let mut k: Vec<_> = r.conditions.iter().map(|c| c.kind.as_str()).collect();
    k.sort_unstable();
    assert_eq!(k, vec!["ContainerJitterHigh", "ContainerRetransmitsHigh"]);
    assert_eq!(r.verdict, Verdict::Degraded);
}

#[test]
fn oom_kill_fires_at_once_on_an_increase_and_clears_after_recovery() {
    let store = Store::new();
    store.register(SourceKind::Cgroup);
    let mut e = Engine::new(cfg());
    let mut eval = |secs: u64, ooms: u64| {
        let mut s = CgroupSnapshot::default();
        s.containers.insert(
            "c-enc".to_owned(),
            ContainerStats {
                oom_kills_total: ooms,
                ..Default::default()
            },
        );
        store.publish_cgroups(at(secs), prov("cgroup v2"), s);
        e.evaluate(&store.snapshot(), at(secs))
    };
    assert_eq!(
        eval(0, 2).verdict,
        Verdict::Healthy,
        "old kills from before the agent started do not count"
    );
    let r = eval(1, 3);
    assert_eq!(
        kinds(&r),
        vec![("ContainerOomKilled".to_owned(), ConditionStatus::Firing)]
    );
    assert_eq!(r.verdict, Verdict::Degraded);
    assert_eq!(
        kinds(&eval(2, 3)),
        vec![("ContainerOomKilled".to_owned(), ConditionStatus::Recovering)]
    );
    assert_eq!(eval(122, 3).verdict, Verdict::Healthy);
}

#[test]
fn throttling_psi_disk_and_clock_rules_use_their_thresholds() {
    let store = Store::new();
    store.register(SourceKind::Cgroup);
    store.register(SourceKind::Node);
    let mut s = CgroupSnapshot::default();
    s.containers.insert(
        "c1".to_owned(),
        ContainerStats {
            cpu_throttled_ratio: 0.40,
            ..Default::default()
        },
    );
    s.containers.insert(
        "c2".to_owned(),
        ContainerStats {
            cpu_throttled_ratio: 0.10,
            ..Default::default()
        },
    );
    store.publish_cgroups(at(0), prov("cgroup v2"), s);
    let node = NodeStats {
        memory_pressure: Pressure {
            full_avg10: 12.0,
            ..Default::default()
        },
        io_pressure: Pressure {
            full_avg10: 75.0,
            ..Default::default()
        },
        disks: vec![
            Disk {
                mount_point: "/".to_owned(),
                used_ratio: 0.5,
                ..Default::default()
            },
            Disk {
                mount_point: "/var/lib/containerd".to_owned(),
                used_ratio: 0.93,
                ..Default::default()
            },
        ],
        clock_synchronized: Some(false),
        clock_max_error_ms: 16_000.0,
        ..Default::default()
    };
    store.publish_node(at(0), prov("procfs"), node);
    let mut c = cfg();
    c.hold = Duration::ZERO;
    let r = Engine::new(c).evaluate(&store.snapshot(), at(0));
    let got: Vec<_> = r
        .conditions
        .iter()
        .map(|c| (c.kind.as_str(), c.subject.as_str(), c.severity))
        .collect();
    assert_eq!(
        got,
        vec![
            ("ClockUnsynchronized", "node", Severity::Warning),
            ("ContainerCpuThrottled", "c1", Severity::Warning),
            ("DiskNearlyFull", "/var/lib/containerd", Severity::Warning),
            ("NodeIoPressure", "node", Severity::Critical),
            ("NodeMemoryPressure", "node", Severity::Warning),
        ]
    );
    assert_eq!(r.verdict, Verdict::Unhealthy);
    assert!(r.drain_recommended);
}

#[test]
fn gpu_health_rules_are_critical_and_immediate() {
    let store = Store::new();
    store.register(SourceKind::Gpu);
    let gpus = GpuSnapshot {
        gpus: vec![
            GpuDevice {
                index: 0,
                uuid: "GPU-ok".to_owned(),
                xids: vec![XidEvent {
                    code: 13,
                    seen_at: Some(at(0)),
                }],
                ..Default::default()
            },
            GpuDevice {
                index: 1,
                uuid: "GPU-xid".to_owned(),
                xids: vec![XidEvent {
                    code: 79,
                    seen_at: Some(at(0)),
                }],
                ..Default::default()
            },
            GpuDevice {
                index: 2,
                uuid: "GPU-ecc".to_owned(),
                ecc_uncorrected_total: 2,
                row_remap_pending: 1,
                ..Default::default()
            },
            GpuDevice {
                index: 3,
                uuid: "GPU-lost".to_owned(),
                lost: true,
                ..Default::default()
            },
            GpuDevice {
                index: 4,
                uuid: "GPU-slow".to_owned(),
                throttle_reasons: vec!["HwThermalSlowdown".to_owned()],
                ..Default::default()
            },
        ],
        ..GpuSnapshot::default()
    };
    store.publish_gpus(at(0), prov("NVML"), gpus);
    let mut e = Engine::new(cfg());
    let r = e.evaluate(&store.snapshot(), at(0));
    let got: Vec<_> = r
        .conditions
        .iter()
        .map(|c| (c.kind.as_str(), c.subject.as_str(), c.status))
        .collect();
    assert_eq!(
        got,
        vec![
            ("GpuEccUncorrectable", "GPU-ecc", ConditionStatus::Firing),
            ("GpuHwSlowdown", "GPU-slow", ConditionStatus::Pending),
            ("GpuLost", "GPU-lost", ConditionStatus::Firing),
            ("GpuRowRemapPending", "GPU-ecc", ConditionStatus::Firing),
            ("GpuXidCritical", "GPU-xid", ConditionStatus::Firing),
        ],
        "XID 13 is not critical; hardware slowdown waits for the hold time"
    );
    assert_eq!(r.verdict, Verdict::Unhealthy);
    assert!(r.drain_recommended);
}

#[test]
fn an_old_critical_xid_stops_counting_after_the_xid_window() {
    let store = Store::new();
    store.register(SourceKind::Gpu);
    let gpus = GpuSnapshot {
        gpus: vec![GpuDevice {
            uuid: "GPU-a".to_owned(),
            xids: vec![XidEvent {
                code: 48,
                seen_at: Some(at(0)),
            }],
            ..Default::default()
        }],
        ..GpuSnapshot::default()
    };
    let mut c = cfg();
    c.gpu_xid_window = Duration::from_secs(600);
    c.source_stale_after = Duration::from_secs(10_000);
    let mut e = Engine::new(c);
    store.publish_gpus(at(0), prov("NVML"), gpus.clone());
    assert_eq!(
        e.evaluate(&store.snapshot(), at(0)).verdict,
        Verdict::Unhealthy
    );
    store.publish_gpus(at(601), prov("NVML"), gpus.clone());
    let r = e.evaluate(&store.snapshot(), at(601));
    assert_eq!(
        kinds(&r),
        vec![("GpuXidCritical".to_owned(), ConditionStatus::Recovering)]
    );
    store.publish_gpus(at(721), prov("NVML"), gpus);
    assert_eq!(
        e.evaluate(&store.snapshot(), at(721)).verdict,
        Verdict::Healthy
    );
}

#[test]
fn a_source_that_stops_reporting_is_stale_and_its_data_is_ignored() {
    let store = Store::new();
    store.register(SourceKind::Network);
    let mut c = cfg();
    c.hold = Duration::ZERO;
    let mut e = Engine::new(c);
    store.publish_network(at(0), prov("tp"), net(900_000));
    assert_eq!(
        kinds(&e.evaluate(&store.snapshot(), at(0))),
        vec![("ContainerRttHigh".to_owned(), ConditionStatus::Firing)]
    );
    let r = e.evaluate(&store.snapshot(), at(31));
    let got: Vec<_> = r
        .conditions
        .iter()
        .map(|c| (c.kind.as_str(), c.status))
        .collect();
    assert_eq!(
        got,
        vec![
            ("ContainerRttHigh", ConditionStatus::Recovering),
            ("SourceStale", ConditionStatus::Firing)
        ],
        "stale data no longer feeds the RTT rule"
    );
    assert_eq!(r.sources[0].state, SourceState::Stale);
    assert_eq!(r.verdict, Verdict::Degraded);
}

#[test]
fn same_state_ignores_moving_numbers_but_not_status_changes() {
    let store = Store::new();
    store.register(SourceKind::Network);
    let mut e = Engine::new(cfg());
    store.publish_network(at(0), prov("tp"), net(200_000));
    let a = e.evaluate(&store.snapshot(), at(0));
    store.publish_network(at(1), prov("tp"), net(250_000));
    let b = e.evaluate(&store.snapshot(), at(1));
    assert!(a.same_state(&b), "only the evidence and times moved");
    store.publish_network(at(30), prov("tp"), net(250_000));
    let c = e.evaluate(&store.snapshot(), at(30));
    assert!(!b.same_state(&c), "pending -> firing is a change");
}

#[test]
fn the_network_rules_fire_on_a_non_default_window_and_read_no_other() {
    // `network.windows = ["30s", "2m"]`, `health.network_window = "2m"`: the old bug was a
    // window the rules looked up by a hard-coded length and never found.
    let two_min = Window::from_secs(120);
    let store = Store::new();
    store.register(SourceKind::Network);
    let mut n = NetworkSnapshot::default();
    n.containers.insert(
        "bad-on-2m".to_owned(),
        ContainerNetwork {
            windows: vec![
                window_of(Window::from_secs(30), 5_000, 1_000, 0.0),
                window_of(two_min, 200_000, 45_000, 80.0),
            ],
            ..Default::default()
        },
    );
    n.containers.insert(
        "bad-on-30s-only".to_owned(),
        ContainerNetwork {
            windows: vec![
                window_of(Window::from_secs(30), 200_000, 45_000, 80.0),
                window_of(two_min, 5_000, 1_000, 0.0),
            ],
            ..Default::default()
        },
    );
    store.publish_network(at(0), prov("tp"), n);
    let mut c = cfg();
    c.hold = Duration::ZERO;
    c.network_window = two_min;
    let r = Engine::new(c).evaluate(&store.snapshot(), at(0));
    let mut k: Vec<_> = r
        .conditions
        .iter()
        .map(|c| (c.kind.as_str(), c.subject.as_str()))
        .collect();
    k.sort_unstable();
    assert_eq!(
        k,
        vec![
            ("ContainerJitterHigh", "bad-on-2m"),
            ("ContainerRetransmitsHigh", "bad-on-2m"),
            ("ContainerRttHigh", "bad-on-2m"),
        ]
    );
    let rtt = r
        .conditions
        .iter()
        .find(|c| c.kind == "ContainerRttHigh")
        .expect("rtt condition");
    assert_eq!(rtt.evidence[0].window_seconds, 120);
    assert!(rtt.message.contains("over 2m"), "{}", rtt.message);
}

#[test]
fn config_validation_names_the_key() {
    let c = HealthConfig {
        recovery: Duration::from_secs(1),
        ..HealthConfig::default()
    };
    assert_eq!(c.validate().expect_err("recovery < hold").key, "recovery");
    assert!(HealthConfig::default().validate().is_ok());
}

#[test]
fn rtp_loss_rule_fires_above_its_ratio_and_ignores_small_windows() {
    let store = Store::new();
    store.register(SourceKind::Network);
    let mut c = cfg();
    c.hold = Duration::ZERO;
    let mut e = Engine::new(c);
    let mut eval = |secs: u64, packets: u64, lost: u64| {
        let mut n = NetworkSnapshot::default();
        let w = NetworkWindow {
            rtp_packets: packets,
            rtp_lost: lost,
            ..NetworkWindow::new(Window::from_secs(60))
        };
        n.containers.insert(
            "c-rtp".to_owned(),
            ContainerNetwork {
                windows: vec![w],
                ..Default::default()
            },
        );
        store.publish_network(at(secs), prov("tc"), n);
        e.evaluate(&store.snapshot(), at(secs))
    };
    assert!(
        eval(0, 90, 10).conditions.is_empty(),
        "100 packets < rtp_min_packets"
    );
    assert!(eval(1, 9_900, 100).conditions.is_empty(), "1% loss < 2%");
    let r = eval(2, 9_500, 500);
    assert_eq!(
        kinds(&r),
        vec![("ContainerRtpLossHigh".to_owned(), ConditionStatus::Firing)]
    );
    assert!((r.conditions[0].evidence[0].value - 0.05).abs() < 1e-9);
}
