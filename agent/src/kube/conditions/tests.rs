use std::{sync::Arc, time::SystemTime};

use super::*;
use crate::health::{ConditionStatus, HealthReport, Severity};

fn cond(kind: &str, subject: &str, status: ConditionStatus, severity: Severity) -> Condition {
    Condition {
        kind: kind.to_owned(),
        status,
        severity,
        reason: "AboveThreshold".to_owned(),
        message: format!("{kind} on {subject}"),
        subject: subject.to_owned(),
        evidence: Vec::new(),
        since: SystemTime::UNIX_EPOCH,
        last_transition: SystemTime::UNIX_EPOCH,
    }
}

fn published(verdict: Verdict, conditions: Vec<Condition>) -> Published {
    let mut report = HealthReport::initial(SystemTime::UNIX_EPOCH);
    report.verdict = verdict;
    report.unknown_reason = if verdict == Verdict::Unknown {
        "waiting for gpu".to_owned()
    } else {
        String::new()
    };
    report.conditions = conditions;
    Published {
        report: Arc::new(report),
        drain: None,
        revision: 1,
    }
}

fn view(d: &[Desired]) -> Vec<(&str, Status, &str)> {
    d.iter()
        .map(|d| (d.type_.as_str(), d.status, d.reason.as_str()))
        .collect()
}

#[test]
fn each_counting_condition_sets_its_group_and_the_verdict_sets_its_own() {
    let names = ConditionNames::default();
    let p = published(
        Verdict::Unhealthy,
        vec![
            cond(
                "ContainerRttHigh",
                "live/a",
                ConditionStatus::Firing,
                Severity::Warning,
            ),
            cond(
                "GpuXidCritical",
                "gpu0",
                ConditionStatus::Recovering,
                Severity::Critical,
            ),
            // Pending does not count yet, and an info condition never does.
            cond(
                "DiskNearlyFull",
                "/",
                ConditionStatus::Pending,
                Severity::Critical,
            ),
            cond(
                "NodeMemoryPressure",
                "node",
                ConditionStatus::Firing,
                Severity::Info,
            ),
        ],
    );
    let d = desired(&p, &names);
    assert_eq!(
        view(&d),
        vec![
            ("NodewardUnhealthy", Status::True, "Unhealthy"),
            ("LiveNetworkDegraded", Status::True, "ContainerRttHigh"),
            ("GpuUnhealthy", Status::True, "GpuXidCritical"),
            ("NodewardNodeProblem", Status::False, "NoProblem"),
            ("NodewardDraining", Status::False, "NotDraining"),
        ]
    );
    assert!(
        d[1].message.contains("ContainerRttHigh (live/a)"),
        "{}",
        d[1].message
    );
    assert_eq!(
        d[2].causes,
        vec![("GpuXidCritical".to_owned(), "gpu0".to_owned())]
    );
}

#[test]
fn an_unknown_verdict_makes_every_health_condition_unknown() {
    let d = desired(
        &published(Verdict::Unknown, vec![]),
        &ConditionNames::default(),
    );
    assert!(d[..4].iter().all(|c| c.status == Status::Unknown), "{d:?}");
    assert!(d[0].message.contains("waiting for gpu"), "{}", d[0].message);
    assert_eq!(d[4].status, Status::False);
}

#[test]
fn a_new_message_alone_is_no_change_but_a_new_cause_is() {
    let names = ConditionNames::default();
    let one = |value: &str| {
        let mut c = cond(
            "ContainerJitterHigh",
            "live/a",
            ConditionStatus::Firing,
            Severity::Warning,
        );
        c.message = format!("jitter {value}");
        c
    };
    let a = desired(&published(Verdict::Degraded, vec![one("31 ms")]), &names);
    let b = desired(&published(Verdict::Degraded, vec![one("35 ms")]), &names);
    assert!(a.iter().zip(&b).all(|(x, y)| !y.changed_from(x)));
    let mut other = one("35 ms");
    other.subject = "live/b".to_owned();
    let c = desired(
        &published(Verdict::Degraded, vec![one("31 ms"), other]),
        &names,
    );
    assert!(
        c[1].changed_from(&a[1]),
        "a second container's jitter is a change"
    );
}

#[test]
fn a_drain_sets_the_draining_condition_with_who_asked() {
    let mut p = published(Verdict::Healthy, vec![]);
    p.drain = Some(crate::health::drain::Drain {
        requesters: vec![crate::health::drain::Requester {
            requested_by: "rollout-42".to_owned(),
            identity: "uid:0".to_owned(),
            reason: "upgrade".to_owned(),
            at: SystemTime::UNIX_EPOCH,
        }],
        requesters_not_kept: 0,
        started: SystemTime::UNIX_EPOCH,
        deadline: None,
        problem: None,
    });
    let d = desired(&p, &ConditionNames::default());
    assert_eq!(
        view(&d)[4],
        ("NodewardDraining", Status::True, "DrainRequested")
    );
    assert!(
        d[4].message.contains("rollout-42 (upgrade)"),
        "{}",
        d[4].message
    );
}
