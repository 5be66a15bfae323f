//! The node verdict, the drain and the active conditions, read from the health state the health
//! evaluator publishes (the one the gRPC API serves), so that a dashboard and a controller never
//! see two different verdicts.
//!
//! Conditions are labelled by `type` and `severity` only: their subjects (containers, GPUs,
//! mount points) are in the API's report, and one series per subject would grow with churn.

use super::{Kind, Metrics};
use crate::{
    health::hub::Published,
    health::{Severity, Verdict},
};

const VERDICT: &str = "nodeward_health_verdict";
const VERDICT_HELP: &str = "The node verdict: 0 unknown, 1 healthy, 2 degraded, 3 unhealthy.";
const DRAIN: &str = "nodeward_drain_active";
const DRAIN_HELP: &str = "1 while a drain is in progress (BeginDrain called, not cancelled).";
const CONDITION: &str = "nodeward_health_condition";
const CONDITION_HELP: &str =
    "1 while a condition of this type and severity is firing or recovering (it counts towards the verdict).";

pub fn verdict_value(v: Verdict) -> f64 {
    match v {
        Verdict::Unknown => 0.0,
        Verdict::Healthy => 1.0,
        Verdict::Degraded => 2.0,
        Verdict::Unhealthy => 3.0,
    }
}

fn severity(s: Severity) -> &'static str {
    match s {
        Severity::Info => "info",
        Severity::Warning => "warning",
        Severity::Critical => "critical",
    }
}

pub fn encode(p: &Published, m: &mut Metrics) {
    m.gauge(VERDICT, VERDICT_HELP, &[], verdict_value(p.report.verdict));
    m.gauge(
        DRAIN,
        DRAIN_HELP,
        &[],
        f64::from(u8::from(p.drain.is_some())),
    );
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
    fn verdict_is_exported_as_the_dashboards_number() {
        let mut m = Metrics::new();
        encode(&published(Verdict::Degraded, vec![]), &mut m);
        let text = m.render();
        assert!(text.contains("nodeward_health_verdict 2\n"), "{text}");
        assert!(text.contains("nodeward_drain_active 0\n"), "{text}");
        assert!(
            text.contains("# TYPE nodeward_health_condition gauge"),
            "{text}"
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
