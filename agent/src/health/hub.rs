//! The latest published health state.
//!
//! The evaluator ([`super::evaluator`]) runs the engine once per `health.interval` (and at once
//! when the drain state changes); the result goes into a `watch` channel that holds only the
//! latest state, read by the API and `/metrics`. `GetNodeHealth` reads it;
//! each `WatchNodeHealth` stream is woken only when the state changed (verdict, conditions'
//! status, sources, drain), never queues old states, and so a slow client skips to the latest.

use std::sync::Arc;

use tokio::sync::watch;

use super::{drain::Drain, HealthReport, Verdict};

/// One published state.
#[derive(Debug, Clone)]
pub struct Published {
    pub report: Arc<HealthReport>,
    pub drain: Option<Drain>,
    /// Bumped on every change of state (not on every evaluation).
    pub revision: u64,
}

impl Published {
    /// The first state of a run of the agent; logs its verdict.
    pub fn first(report: HealthReport, drain: Option<Drain>) -> Self {
        log_verdict(None, &report);
        Self {
            report: Arc::new(report),
            drain,
            revision: 0,
        }
    }
}

/// The latest health state, shared by every RPC.
#[derive(Debug, Clone)]
pub struct HealthHub {
    tx: watch::Sender<Published>,
}

impl HealthHub {
    pub fn new(initial: HealthReport) -> Self {
        Self::from_sender(watch::Sender::new(Published::first(initial, None)))
    }

    /// A hub that publishes into `tx` (the channel that outlives the evaluator's restarts).
    pub fn from_sender(tx: watch::Sender<Published>) -> Self {
        Self { tx }
    }

    pub fn current(&self) -> Published {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Published> {
        self.tx.subscribe()
    }

    /// Stores a new evaluation. Watchers are woken only when the state changed; readers of
    /// `current` always get the newest numbers.
    pub fn publish(&self, report: HealthReport, drain: Option<Drain>) {
        self.tx.send_if_modified(|cur| {
            let changed = !cur.report.same_state(&report) || cur.drain != drain;
            if cur.report.verdict != report.verdict {
                log_verdict(Some(cur.report.verdict), &report);
            }
            cur.report = Arc::new(report);
            cur.drain = drain;
            if changed {
                cur.revision += 1;
            }
            changed
        });
    }
}

/// Logs the first verdict and every change of verdict, with what causes it: the line an operator
/// reads to see when and why a node changed (the initial one is `Unknown` until every enabled
/// source has reported; nothing is carried over from an earlier run).
fn log_verdict(previous: Option<Verdict>, report: &HealthReport) {
    let causes: Vec<String> = report
        .causes()
        .map(|c| {
            if c.subject.is_empty() {
                c.kind.clone()
            } else {
                format!("{}({})", c.kind, c.subject)
            }
        })
        .collect();
    let previous = previous
        .map(|v| format!("{v:?}"))
        .unwrap_or_else(|| "none".to_owned());
    tracing::info!(
        verdict = ?report.verdict,
        previous,
        ?causes,
        unknown_reason = report.unknown_reason.as_str(),
        "health verdict"
    );
}
