//! Supervised tasks as conditions: a restart is an event, like an OOM kill. The tasks are the
//! sources and the health evaluator itself (`health`), supervised alike.
//!
//! - `SourceRestarted` (warning), subject the task (`ebpf/tcp`, `gpu`, `health`, ...): reason
//!   `RestartPending` while the failed task waits out its back-off, `Restarted` at the
//!   evaluation that first sees its restart count go up. It fires at once and, once the task
//!   runs again, stays `Recovering` (and counted) for `health.recovery`, so a restart is visible
//!   for that long after it happened. The message names the restart count and the last failure
//!   (the error, or `panicked: <message>`).
//! - `SourceFailed` (warning): the supervisor gave up on the task. The daemon then stops (and
//!   systemd restarts it), so this is seen only in the last report before shutdown.
//!
//! Warnings, not critical: a source that is down means missing data, not a node that must be
//! drained (its own data's staleness is `SourceStale`'s job).

use std::collections::BTreeMap;

use super::{rules::Observation, Evidence, Severity};
use crate::{store::Snapshot, task::TaskHealth};

/// Restart counts seen at the previous evaluation, by task.
pub type Memory = BTreeMap<&'static str, u32>;

fn restarts(h: &TaskHealth) -> Evidence {
    Evidence {
        metric: "restarts".to_owned(),
        value: f64::from(h.restarts),
        threshold: 0.0,
        unit: "count".to_owned(),
        window_seconds: 0,
    }
}

/// Adds the conditions of every supervised task.
pub fn evaluate(snapshot: &Snapshot, memory: &mut Memory, out: &mut Vec<Observation>) {
    for (&name, h) in &snapshot.tasks {
        let before = memory.insert(name, h.restarts).unwrap_or(0);
        let failure = h.last_failure.as_deref().unwrap_or("no failure recorded");
        let (kind, reason, message) = if h.gave_up {
            (
                "SourceFailed",
                "GaveUp",
                format!(
                    "source task {name} failed again after {} restart(s) and is not restarted; \
                     last failure: {failure}",
                    h.restarts
                ),
            )
        } else if !h.up {
            (
                "SourceRestarted",
                "RestartPending",
                format!(
                    "source task {name} failed and restarts after a back-off (restart {} since \
                     the agent started); last failure: {failure}",
                    h.restarts
                ),
            )
        } else if h.restarts > before {
            (
                "SourceRestarted",
                "Restarted",
                format!(
                    "source task {name} was restarted ({} restart(s) since the agent started); \
                     last failure: {failure}",
                    h.restarts
                ),
            )
        } else {
            continue;
        };
        out.push(Observation {
            kind,
            reason,
            subject: name.to_owned(),
            severity: Severity::Warning,
            message,
            evidence: vec![restarts(h)],
            immediate: true,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use crate::{
        health::{ConditionStatus, Engine, HealthConfig, HealthReport, Verdict},
        store::{NodeStats, Provenance, SourceKind, Store},
        task::TaskHealth,
    };

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn cfg() -> HealthConfig {
        HealthConfig {
            hold: Duration::from_secs(30),
            recovery: Duration::from_secs(120),
            ..HealthConfig::default()
        }
    }

    /// Evaluates at `secs` with the node reporting (so the verdict is not UNKNOWN) and the task
    /// `ebpf/tcp` in state `h`.
    fn eval(e: &mut Engine, store: &Store, secs: u64, h: &TaskHealth) -> HealthReport {
        store.publish_node(at(secs), Provenance::default(), NodeStats::default());
        store.publish_task("ebpf/tcp", h.clone());
        e.evaluate(&store.snapshot(), at(secs))
    }

    fn conditions(r: &HealthReport) -> Vec<(&str, &str, ConditionStatus, &str)> {
        r.conditions
            .iter()
            .map(|c| {
                (
                    c.kind.as_str(),
                    c.reason.as_str(),
                    c.status,
                    c.subject.as_str(),
                )
            })
            .collect()
    }

    fn failed(restarts: u32, up: bool) -> TaskHealth {
        TaskHealth {
            restarts,
            last_failure: Some("panicked: fault injected into ebpf/tcp".to_owned()),
            gave_up: false,
            up,
        }
    }

    #[test]
    fn a_restart_warns_at_once_naming_task_count_and_failure_and_clears_after_recovery() {
        let store = Store::new();
        store.register(SourceKind::Node);
        let mut e = Engine::new(cfg());
        let r = eval(&mut e, &store, 0, &TaskHealth::default());
        assert_eq!((r.verdict, r.conditions.len()), (Verdict::Healthy, 0));

        // Failed, waiting out the back-off: fires without waiting for the hold time.
        let r = eval(&mut e, &store, 1, &failed(1, false));
        assert_eq!(
            conditions(&r),
            [(
                "SourceRestarted",
                "RestartPending",
                ConditionStatus::Firing,
                "ebpf/tcp"
            )]
        );
        assert_eq!(r.verdict, Verdict::Degraded);
        assert!(
            !r.drain_recommended,
            "a restarted source is no reason to drain"
        );
        let c = &r.conditions[0];
        assert!(
            c.message.contains("ebpf/tcp")
                && c.message.contains("restart 1 ")
                && c.message.contains("panicked: fault injected into ebpf/tcp"),
            "{}",
            c.message
        );
        assert_eq!(c.evidence[0].value, 1.0);

        // Running again: recovering, still counted, until `recovery` has passed.
        let r = eval(&mut e, &store, 2, &failed(1, true));
        assert_eq!(r.conditions[0].status, ConditionStatus::Recovering);
        assert_eq!(r.verdict, Verdict::Degraded);
        let r = eval(&mut e, &store, 100, &failed(1, true));
        assert_eq!(r.conditions[0].status, ConditionStatus::Recovering);
        let r = eval(&mut e, &store, 123, &failed(1, true));
        assert_eq!((r.verdict, r.conditions.len()), (Verdict::Healthy, 0));

        // A second failure fires again, with the new count.
        let r = eval(&mut e, &store, 130, &failed(2, false));
        assert_eq!(r.conditions[0].status, ConditionStatus::Firing);
        assert!(r.conditions[0].message.contains("restart 2 "));
    }

    #[test]
    fn a_restart_that_happened_between_two_evaluations_still_fires() {
        let store = Store::new();
        store.register(SourceKind::Node);
        let mut e = Engine::new(cfg());
        eval(&mut e, &store, 0, &TaskHealth::default());
        // Failed and back up before the next evaluation: only the count moved.
        let r = eval(&mut e, &store, 1, &failed(1, true));
        assert_eq!(
            conditions(&r),
            [(
                "SourceRestarted",
                "Restarted",
                ConditionStatus::Firing,
                "ebpf/tcp"
            )]
        );
        assert!(r.conditions[0].message.contains("1 restart(s)"));
        let r = eval(&mut e, &store, 2, &failed(1, true));
        assert_eq!(r.conditions[0].status, ConditionStatus::Recovering);
    }

    #[test]
    fn a_task_given_up_on_is_source_failed_with_its_last_failure() {
        let store = Store::new();
        store.register(SourceKind::Node);
        let mut e = Engine::new(cfg());
        let h = TaskHealth {
            restarts: 5,
            last_failure: Some("no such map".to_owned()),
            gave_up: true,
            up: false,
        };
        let r = eval(&mut e, &store, 0, &h);
        assert_eq!(
            conditions(&r),
            [(
                "SourceFailed",
                "GaveUp",
                ConditionStatus::Firing,
                "ebpf/tcp"
            )]
        );
        assert!(
            r.conditions[0].message.contains("after 5 restart(s)")
                && r.conditions[0].message.contains("no such map"),
            "{}",
            r.conditions[0].message
        );
    }
}
