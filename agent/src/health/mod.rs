//! The health engine: rules over the store's latest snapshot, with hysteresis, turned into a
//! node verdict. It only decides: it reads a [`Snapshot`] and a time, never a file.
//!
//! The verdict is `Unknown` until every enabled source has reported once (or declared itself
//! unavailable), so a node is never called healthy before any check ran. A source that stays
//! silent past `health.source_first_report_timeout` (a hung `nvmlInit`) is shown unavailable
//! with that reason and fires `SourceNoFirstReport`, so it cannot hold the verdict at
//! `Unknown` for ever. Then the worst firing (or still recovering) condition decides: a
//! warning makes the node `Degraded`, a critical one `Unhealthy`, which recommends a drain.

use std::time::SystemTime;

use crate::store::{clock::elapsed, Provenance, Snapshot, SourceKind, SourceStatus};

pub mod config;
pub mod drain;
pub mod evaluator;
pub mod hub;
mod hysteresis;
pub mod rules;
pub mod streams;
pub mod tasks;

pub use config::HealthConfig;

#[cfg(test)]
mod tests;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ConditionStatus {
    /// Cause present, hold time not yet over: not counted.
    Pending,
    /// Counted.
    Firing,
    /// Cause gone, recovery time not yet over: still counted.
    Recovering,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Verdict {
    Unknown,
    Healthy,
    Degraded,
    Unhealthy,
}

/// A number behind a condition.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Evidence {
    pub metric: String,
    pub value: f64,
    pub threshold: f64,
    pub unit: String,
    /// 0 = instantaneous.
    pub window_seconds: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub kind: String,
    pub status: ConditionStatus,
    pub severity: Severity,
    pub reason: String,
    pub message: String,
    pub subject: String,
    pub evidence: Vec<Evidence>,
    pub since: SystemTime,
    pub last_transition: SystemTime,
}

impl Condition {
    /// Whether it counts towards the verdict.
    pub fn counts(&self) -> bool {
        self.status != ConditionStatus::Pending && self.severity >= Severity::Warning
    }
}

/// State of one source in a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    Pending,
    Reporting,
    Unavailable,
    Stale,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SourceReport {
    pub kind: SourceKind,
    pub state: SourceState,
    pub provenance: Provenance,
    pub last_report: Option<SystemTime>,
    pub reason: String,
}

/// One evaluation's result.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthReport {
    pub verdict: Verdict,
    pub drain_recommended: bool,
    /// Every live condition, sorted by (kind, subject).
    pub conditions: Vec<Condition>,
    pub sources: Vec<SourceReport>,
    pub evaluated_at: SystemTime,
    /// Why the verdict is `Unknown`; empty otherwise.
    pub unknown_reason: String,
}

impl HealthReport {
    /// A report made before the first evaluation.
    pub fn initial(now: SystemTime) -> Self {
        Self {
            verdict: Verdict::Unknown,
            drain_recommended: false,
            conditions: Vec::new(),
            sources: Vec::new(),
            evaluated_at: now,
            unknown_reason: "not evaluated yet".to_owned(),
        }
    }

    /// The conditions that cause the verdict.
    pub fn causes(&self) -> impl Iterator<Item = &Condition> {
        self.conditions.iter().filter(|c| c.counts())
    }

    /// Whether two reports describe the same state: same verdict, same conditions in the same
    /// status, same source states. Numbers that move every tick (evidence values, report times)
    /// do not count, so watchers get a message per change rather than per tick.
    pub fn same_state(&self, other: &Self) -> bool {
        let key = |r: &Self| {
            (
                r.verdict,
                r.unknown_reason.clone(),
                r.conditions
                    .iter()
                    .map(|c| (c.kind.clone(), c.subject.clone(), c.status, c.severity))
                    .collect::<Vec<_>>(),
                r.sources
                    .iter()
                    .map(|s| (s.kind, s.state, s.provenance.clone(), s.reason.clone()))
                    .collect::<Vec<_>>(),
            )
        };
        key(self) == key(other)
    }
}

/// The engine: config plus the memory hysteresis and the rules need between evaluations.
#[derive(Debug)]
pub struct Engine {
    config: HealthConfig,
    memory: rules::RuleMemory,
    tracker: hysteresis::Tracker,
    /// Since when the sources' first reports are awaited: the agent's start, or the first
    /// evaluation when not told.
    waiting_since: Option<SystemTime>,
}

impl Engine {
    pub fn new(config: HealthConfig) -> Self {
        Self {
            config,
            memory: rules::RuleMemory::default(),
            tracker: hysteresis::Tracker::default(),
            waiting_since: None,
        }
    }

    /// Measures `health.source_first_report_timeout` from `since` (the agent's start) rather
    /// than from the first evaluation, so that an engine restarted after a panic does not grant
    /// silent sources a fresh bound.
    #[must_use]
    pub fn waiting_since(mut self, since: SystemTime) -> Self {
        self.waiting_since = Some(since);
        self
    }

    pub fn config(&self) -> &HealthConfig {
        &self.config
    }

    /// Evaluates the rules on `snapshot` at time `now`. Call it once per tick with a
    /// non-decreasing `now`: hold and recovery times are measured between calls.
    pub fn evaluate(&mut self, snapshot: &Snapshot, now: SystemTime) -> HealthReport {
        let since = *self.waiting_since.get_or_insert(now);
        let overdue = elapsed(since, now) > self.config.source_first_report_timeout;
        let sources = self.source_reports(snapshot, now, overdue);
        let mut observations = rules::evaluate(snapshot, &self.config, &mut self.memory, now);
        if overdue {
            observations.extend(self.silent_sources(snapshot, elapsed(since, now)));
        }
        let conditions =
            self.tracker
                .update(observations, now, self.config.hold, self.config.recovery);

        let pending: Vec<&str> = sources
            .iter()
            .filter(|s| s.state == SourceState::Pending)
            .map(|s| s.kind.name())
            .collect();
        let (verdict, unknown_reason) = if sources.is_empty() {
            (Verdict::Unknown, "no source is enabled".to_owned())
        } else if !pending.is_empty() {
            (
                Verdict::Unknown,
                format!("waiting for the first report of: {}", pending.join(", ")),
            )
        } else if sources.iter().all(|s| s.state == SourceState::Unavailable) {
            (
                Verdict::Unknown,
                "no enabled source can run on this node".to_owned(),
            )
        } else {
            let worst = conditions
                .iter()
                .filter(|c| c.counts())
                .map(|c| c.severity)
                .max();
            let v = match worst {
                Some(Severity::Critical) => Verdict::Unhealthy,
                Some(Severity::Warning) => Verdict::Degraded,
                _ => Verdict::Healthy,
            };
            (v, String::new())
        };
        HealthReport {
            verdict,
            drain_recommended: verdict == Verdict::Unhealthy,
            conditions,
            sources,
            evaluated_at: now,
            unknown_reason,
        }
    }

    /// Why a source that never reported is no longer waited for.
    fn no_first_report(&self) -> String {
        format!(
            "no first report within {}",
            humantime::format_duration(self.config.source_first_report_timeout)
        )
    }

    /// A `SourceNoFirstReport` warning for each source still waiting for its first report
    /// `waited` after the agent started (call it once the bound is over).
    fn silent_sources(
        &self,
        snapshot: &Snapshot,
        waited: std::time::Duration,
    ) -> Vec<rules::Observation> {
        snapshot
            .sources
            .iter()
            .filter(|(_, status)| matches!(status, SourceStatus::Pending))
            .map(|(kind, _)| rules::Observation {
                kind: "SourceNoFirstReport",
                reason: "NoFirstReport",
                subject: kind.name().to_owned(),
                severity: Severity::Warning,
                message: format!(
                    "source {kind} has not reported once since the agent started ({}); the \
                     verdict no longer waits for it",
                    self.no_first_report()
                ),
                evidence: vec![Evidence {
                    metric: "seconds_since_start".to_owned(),
                    value: waited.as_secs_f64(),
                    threshold: self.config.source_first_report_timeout.as_secs_f64(),
                    unit: "seconds".to_owned(),
                    window_seconds: 0,
                }],
                immediate: true,
            })
            .collect()
    }

    fn source_reports(
        &self,
        snapshot: &Snapshot,
        now: SystemTime,
        overdue: bool,
    ) -> Vec<SourceReport> {
        snapshot
            .sources
            .iter()
            .map(|(kind, status)| match status {
                SourceStatus::Pending if overdue => SourceReport {
                    kind: *kind,
                    state: SourceState::Unavailable,
                    provenance: Provenance::default(),
                    last_report: None,
                    reason: self.no_first_report(),
                },
                SourceStatus::Pending => SourceReport {
                    kind: *kind,
                    state: SourceState::Pending,
                    provenance: Provenance::default(),
                    last_report: None,
                    reason: String::new(),
                },
                SourceStatus::Unavailable { reason } => SourceReport {
                    kind: *kind,
                    state: SourceState::Unavailable,
                    provenance: Provenance::default(),
                    last_report: None,
                    reason: reason.clone(),
                },
                SourceStatus::Reporting { at, provenance } => {
                    let stale = elapsed(*at, now) > self.config.source_stale_after;
                    SourceReport {
                        kind: *kind,
                        state: if stale {
                            SourceState::Stale
                        } else {
                            SourceState::Reporting
                        },
                        provenance: provenance.clone(),
                        last_report: Some(*at),
                        reason: if stale {
                            format!(
                                "no report for more than {}",
                                humantime::format_duration(self.config.source_stale_after)
                            )
                        } else {
                            String::new()
                        },
                    }
                }
            })
            .collect()
    }
}
