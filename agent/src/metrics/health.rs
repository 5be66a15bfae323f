//! The node verdict, the drain and the active conditions, read from the health state the health
//! evaluator publishes (the one the gRPC API serves), so that a dashboard and a controller never
//! see two different verdicts.
//!
//! Conditions are labelled by `type` and `severity` only: their subjects (containers, GPUs,
//! mount points) are in the API's report, and one series per subject would grow with churn.

use super::{Kind, Metrics};
use crate::{
    health::hub::Published,
    health::{Severity, SourceState, Verdict},
};

const VERDICT: &str = "nodeward_health_verdict_state";
const VERDICT_HELP: &str =
    "The node verdict as a state set: one series per `state`, 1 for the current verdict, 0 for the others.";
const DRAIN: &str = "nodeward_drain_active";
const DRAIN_HELP: &str = "1 while a drain is in progress (BeginDrain called, not cancelled).";
const DEADLINE: &str = "nodeward_drain_deadline_timestamp_seconds";
const DEADLINE_HELP: &str =
    "The wall-clock deadline of the drain in progress, in seconds since the Unix epoch; \
     absent when no drain is in progress or its deadline is unknown (an unreadable drain state).";
const CONDITION: &str = "nodeward_health_condition";
const CONDITION_HELP: &str =
    "1 while a condition of this type and severity is firing or recovering (it counts towards the verdict).";

const SOURCE: &str = "nodeward_health_source_state";
const SOURCE_HELP: &str =
    "Each source of the verdict (`source`: network, cgroup, node, gpu) as a state set: \
     1 for its current `state` (pending, reporting, unavailable, stale), 0 for the others. \
     The reason of an unavailable one (\"no first report within 30s\") is in the API's report.";

/// Every state of a source and its `state` label.
const SOURCE_STATES: [(SourceState, &str); 4] = [
    (SourceState::Pending, "pending"),
    (SourceState::Reporting, "reporting"),
    (SourceState::Unavailable, "unavailable"),
    (SourceState::Stale, "stale"),
];

/// Every verdict and its `state` label, so that each scrape has all four series: a query for
/// `state="unhealthy"` then reads 0 on a healthy node instead of finding nothing.
const STATES: [(Verdict, &str); 4] = [
    (Verdict::Unknown, "unknown"),
    (Verdict::Healthy, "healthy"),
    (Verdict::Degraded, "degraded"),
    (Verdict::Unhealthy, "unhealthy"),
];

fn severity(s: Severity) -> &'static str {
    match s {
        Severity::Info => "info",
        Severity::Warning => "warning",
        Severity::Critical => "critical",
    }
}

pub fn encode(p: &Published, m: &mut Metrics) {
    for (verdict, state) in STATES {
        let current = f64::from(u8::from(p.report.verdict == verdict));
        m.gauge(VERDICT, VERDICT_HELP, &[("state", state)], current);
    }
    m.gauge(
        DRAIN,
        DRAIN_HELP,
        &[],
        f64::from(u8::from(p.drain.is_some())),
    );
    m.declare(DEADLINE, Kind::Gauge, DEADLINE_HELP);
    if let Some(deadline) = p.drain.as_ref().and_then(|d| d.deadline) {
        let secs = deadline
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        m.gauge(DEADLINE, DEADLINE_HELP, &[], secs);
    }
    for source in &p.report.sources {
        for (state, label) in SOURCE_STATES {
            m.gauge(
                SOURCE,
                SOURCE_HELP,
                &[("source", source.kind.name()), ("state", label)],
                f64::from(u8::from(source.state == state)),
            );
        }
    }
    m.declare(CONDITION, Kind::Gauge, CONDITION_HELP);
    let active: std::collections::BTreeSet<(&str, &str)> = p
        .report
        .causes()
        .map(|c| (c.kind.as_str(), severity(c.severity)))
        .collect();
    for (kind, sev) in active {
        m.gauge(
            CONDITION,
            CONDITION_HELP,
            &[("type", kind), ("severity", sev)],
            1.0,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::SystemTime};

    use super::*;
    use crate::health::{Condition, ConditionStatus, HealthReport};

    fn condition(kind: &str, subject: &str, status: ConditionStatus) -> Condition {
        Condition {
            kind: kind.to_owned(),
            status,
            severity: Severity::Warning,
            reason: String::new(),
            message: String::new(),
            subject: subject.to_owned(),
            evidence: Vec::new(),
            since: SystemTime::UNIX_EPOCH,
            last_transition: SystemTime::UNIX_EPOCH,
        }
    }

    fn published(verdict: Verdict, conditions: Vec<Condition>) -> Published {
        let mut report = HealthReport::initial(SystemTime::UNIX_EPOCH);
        report.verdict = verdict;
        report.conditions = conditions;
        Published {
            report: Arc::new(report),
            drain: None,
            revision: 1,
        }
    }

    #[test]
    fn verdict_is_a_state_set_with_one_series_at_1() {
        let mut m = Metrics::new();
        encode(&published(Verdict::Degraded, vec![]), &mut m);
        let text = m.render();
        let states: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("nodeward_health_verdict_state{"))
            .collect();
        assert_eq!(
            states,
            [
                "nodeward_health_verdict_state{state=\"unknown\"} 0",
                "nodeward_health_verdict_state{state=\"healthy\"} 0",
                "nodeward_health_verdict_state{state=\"degraded\"} 1",
                "nodeward_health_verdict_state{state=\"unhealthy\"} 0",
            ]
        );
        assert!(text.contains("nodeward_drain_active 0\n"), "{text}");
        assert!(
            text.contains("# TYPE nodeward_health_condition gauge"),
            "{text}"
        );
    }

    #[test]
    fn the_drain_deadline_is_a_timestamp_only_while_a_drain_with_a_deadline_is_in_progress() {
        let deadline = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_003_600);
        let drain = |deadline| crate::health::drain::Drain {
            requesters: Vec::new(),
            requesters_not_kept: 0,
            started: SystemTime::UNIX_EPOCH,
            deadline,
            problem: None,
        };
        let mut p = published(Verdict::Healthy, vec![]);
        let sample = |text: &str| {
            text.lines()
                .any(|l| l.starts_with("nodeward_drain_deadline_timestamp_seconds "))
        };
        let render = |p: &Published| {
            let mut m = Metrics::new();
            encode(p, &mut m);
            m.render()
        };
        let idle = render(&p);
        assert!(
            idle.contains("# TYPE nodeward_drain_deadline_timestamp_seconds gauge"),
            "{idle}"
        );
        assert!(!sample(&idle), "{idle}");
        p.drain = Some(drain(Some(deadline)));
        let draining = render(&p);
        assert!(
            draining.contains("nodeward_drain_deadline_timestamp_seconds 1700003600\n"),
            "{draining}"
        );
        p.drain = Some(drain(None));
        let unknown = render(&p);
        assert!(!sample(&unknown), "{unknown}");
        assert!(unknown.contains("nodeward_drain_active 1\n"), "{unknown}");
    }

    #[test]
    fn each_source_is_a_state_set_with_its_current_state_at_1() {
        let mut p = published(Verdict::Degraded, vec![]);
        let mut report = (*p.report).clone();
        report.sources = vec![crate::health::SourceReport {
            kind: crate::store::SourceKind::Gpu,
            state: SourceState::Unavailable,
            provenance: crate::store::Provenance::default(),
            last_report: None,
            reason: "no first report within 30s".to_owned(),
        }];
        p.report = Arc::new(report);
        let mut m = Metrics::new();
        encode(&p, &mut m);
        let text = m.render();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("nodeward_health_source_state{"))
            .collect();
        assert_eq!(
            lines,
            [
                "nodeward_health_source_state{source=\"gpu\",state=\"pending\"} 0",
                "nodeward_health_source_state{source=\"gpu\",state=\"reporting\"} 0",
                "nodeward_health_source_state{source=\"gpu\",state=\"unavailable\"} 1",
                "nodeward_health_source_state{source=\"gpu\",state=\"stale\"} 0",
            ]
        );
    }

    #[test]
    fn conditions_are_one_series_per_type_and_severity_and_pending_ones_are_left_out() {
        let mut m = Metrics::new();
        let p = published(
            Verdict::Degraded,
            vec![
                condition("ContainerRttHigh", "a", ConditionStatus::Firing),
                condition("ContainerRttHigh", "b", ConditionStatus::Recovering),
                condition("DiskNearlyFull", "/", ConditionStatus::Pending),
            ],
        );
        encode(&p, &mut m);
        let text = m.render();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("nodeward_health_condition{"))
            .collect();
        assert_eq!(
            lines,
            ["nodeward_health_condition{type=\"ContainerRttHigh\",severity=\"warning\"} 1"]
        );
    }
}
