//! The evaluation loop and the latest published health state.
//!
//! The engine runs once per `health.interval` (and at once when the drain state changes); the
//! result goes into a `watch` channel that holds only the latest state. `GetNodeHealth` reads it;
//! each `WatchNodeHealth` stream is woken only when the state changed (verdict, conditions'
//! status, sources, drain), never queues old states, and so a slow client skips to the latest.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::drain::{Drain, DrainController};
use crate::{
    health::{Engine, HealthReport, Verdict},
    store::{Clock, Store},
};

/// One published state.
#[derive(Debug, Clone)]
pub struct Published {
    pub report: Arc<HealthReport>,
    pub drain: Option<Drain>,
    /// Bumped on every change of state (not on every evaluation).
    pub revision: u64,
}

/// The latest health state, shared by every RPC.
#[derive(Debug, Clone)]
pub struct HealthHub {
    tx: watch::Sender<Published>,
}

impl HealthHub {
    pub fn new(initial: HealthReport) -> Self {
        log_verdict(None, &initial);
        let (tx, _) = watch::channel(Published {
            report: Arc::new(initial),
            drain: None,
            revision: 0,
        });
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

/// Evaluates the store every `interval` (and on drain changes) until cancelled.
pub async fn run(
    mut engine: Engine,
    store: Arc<Store>,
    drain: DrainController,
    hub: HealthHub,
    clock: Arc<dyn Clock>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_changes = drain.subscribe();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
            changed = drain_changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let report = engine.evaluate(&store.snapshot(), clock.now());
        hub.publish(report, drain.current());
    }
}
