//! The health engine as a task of its own: the daemon spawns it next to the sources, under the
//! same supervision ([`crate::sources::supervised`]), whether or not the API is served. It
//! evaluates the store every `health.interval` (and at once when the drain state changes) and
//! publishes the verdict into one channel that the API and `/metrics` read.
//!
//! A panic in the engine (a rule meeting data it did not expect) is a failure like a source's:
//! the supervisor restarts it with back-off as a fresh [`Engine`] (its hysteresis memory may be
//! half-updated), reports it in its [`crate::task::TaskHealth`] (so the next verdict carries a
//! `SourceRestarted` condition for [`NAME`], and `/metrics` counts it), and the channel keeps
//! the last verdict until the restarted engine publishes again. The drain state lives outside
//! the engine, in the [`DrainController`], so a restart does not forget a drain.

use std::{convert::Infallible, sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use super::{
    drain::DrainController,
    hub::{HealthHub, Published},
    Engine, HealthConfig, HealthReport,
};
use crate::{
    sources::{supervised, Source},
    store::{Clock, Store},
    supervise::{TaskError, TaskHealth, TaskResult},
};

/// The supervised task's name.
pub const NAME: &str = "health";

/// What the evaluator reads.
#[derive(Debug, Clone)]
pub struct Parts {
    pub config: HealthConfig,
    pub store: Arc<Store>,
    pub clock: Arc<dyn Clock>,
    pub drain: DrainController,
}

/// The running evaluator's outputs.
#[derive(Debug, Clone)]
pub struct Health {
    /// The latest verdict, conditions and drain.
    pub published: watch::Receiver<Published>,
    /// The drain state, which the API changes on request.
    pub drain: DrainController,
    /// The clock the engine and the drain read.
    pub clock: Arc<dyn Clock>,
    /// The evaluator task's restarts and last failure.
    pub task: watch::Receiver<TaskHealth>,
}

impl Health {
    /// The published state, for outputs such as the Prometheus exporter.
    pub fn subscribe(&self) -> watch::Receiver<Published> {
        self.published.clone()
    }
}

/// One run of the engine.
#[derive(Debug)]
pub struct Evaluator {
    engine: Engine,
    first: HealthReport,
    parts: Parts,
}

impl Source for Evaluator {
    const NAME: &'static str = NAME;
    type Settings = Parts;
    type Snapshot = Published;
    type StartError = Infallible;

    /// A fresh engine, with a first evaluation of the store so that even a call that beats the
    /// first tick names the sources the verdict waits for.
    fn start(parts: &Parts) -> Result<Self, Infallible> {
        let mut engine = Engine::new(parts.config.clone());
        let first = engine.evaluate(&parts.store.snapshot(), parts.clock.now());
        Ok(Self {
            engine,
            first,
            parts: parts.clone(),
        })
    }

    fn initial(&self) -> Published {
        Published::first(self.first.clone(), self.parts.drain.current())
    }

    async fn run(
        self,
        out: watch::Sender<Published>,
        cancel: CancellationToken,
    ) -> Result<(), TaskError> {
        let Self {
            mut engine, parts, ..
        } = self;
        let hub = HealthHub::from_sender(out);
        evaluate_until(&mut engine, &parts, &hub, parts.config.interval, &cancel).await;
        Ok(())
    }
}

async fn evaluate_until(
    engine: &mut Engine,
    parts: &Parts,
    hub: &HealthHub,
    interval: Duration,
    cancel: &CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_changes = parts.drain.subscribe();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
            changed = drain_changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let report = engine.evaluate(&parts.store.snapshot(), parts.clock.now());
        hub.publish(report, parts.drain.current());
    }
}

/// Spawns the evaluator into the daemon's task set under supervision. Call it once the sources
/// are registered in the store.
pub fn spawn(
    config: &HealthConfig,
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<TaskResult>,
) -> Health {
    let drain = DrainController::new(clock.clone());
    let parts = Parts {
        config: config.clone(),
        store,
        clock: clock.clone(),
        drain: drain.clone(),
    };
    let running = match supervised::<Evaluator>(parts, cancel, tasks) {
        Ok(running) => running,
        Err(never) => match never {},
    };
    Health {
        published: running.snapshots,
        drain,
        clock,
        task: running.health,
    }
}
