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
    streams: super::streams::StreamPolicy,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<TaskResult>,
) -> Health {
    let drain = DrainController::new(clock.clone()).with_policy(streams);
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

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicU32, Ordering},
        time::SystemTime,
    };

    use super::*;
    use crate::{
        health::{streams::StreamPolicy, ConditionStatus, Verdict},
        store::{NodeStats, Provenance, SourceKind},
    };

    /// The wall clock, except that reading it for the `panic_at`-th time panics: the engine's
    /// loop reads the clock on every evaluation, so this panics inside the real evaluator task.
    #[derive(Debug)]
    struct FailingClock {
        reads: AtomicU32,
        panic_at: u32,
    }

    impl Clock for FailingClock {
        fn now(&self) -> SystemTime {
            let n = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
            assert!(n != self.panic_at, "clock failed on read {n}");
            SystemTime::now()
        }
    }

    #[tokio::test]
    async fn a_panic_in_the_evaluator_is_restarted_and_reported_like_a_sources() {
        let store = Store::new();
        store.register(SourceKind::Node);
        store.publish_node(
            SystemTime::now(),
            Provenance::default(),
            NodeStats::default(),
        );
        // Read 1: the first start's evaluation; 2: the first tick; 3: the second tick panics.
        let clock = Arc::new(FailingClock {
            reads: AtomicU32::new(0),
            panic_at: 3,
        });
        let config = HealthConfig {
            interval: Duration::from_millis(100),
            ..HealthConfig::default()
        };
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let health = spawn(
            &config,
            store.clone(),
            clock.clone(),
            StreamPolicy::default(),
            &cancel,
            &mut tasks,
        );
        let mut published = health.subscribe();
        assert_eq!(published.borrow().report.verdict, Verdict::Healthy);

        // The supervisor saw the panic and restarted the evaluator (after the default back-off).
        let mut task = health.task.clone();
        let h = task
            .wait_for(|h| h.restarts == 1 && h.up)
            .await
            .expect("supervisor alive")
            .clone();
        assert_eq!(
            h.last_failure.as_deref(),
            Some("panicked: clock failed on read 3")
        );
        assert!(
            tasks.try_join_next().is_none(),
            "a restarted evaluator does not end the daemon's task set"
        );

        // What the bridge does with every supervised task's health in the daemon: the restarted
        // engine then reports its own restart as a condition, in the same channel.
        store.publish_task(NAME, h);
        let report = published
            .wait_for(|p| {
                p.report
                    .conditions
                    .iter()
                    .any(|c| c.kind == "SourceRestarted" && c.subject == NAME)
            })
            .await
            .expect("the channel outlives the failed run")
            .report
            .clone();
        let c = report
            .conditions
            .iter()
            .find(|c| c.subject == NAME)
            .expect("the condition");
        assert_eq!(c.status, ConditionStatus::Firing);
        assert!(
            c.message.contains("clock failed on read 3"),
            "{}",
            c.message
        );
        assert_eq!(report.verdict, Verdict::Degraded);
        assert!(
            clock.reads.load(Ordering::SeqCst) > 3,
            "a fresh run reads on"
        );

        cancel.cancel();
        let (name, result) = tasks.join_next().await.expect("one task").expect("joined");
        assert_eq!(name, NAME);
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn a_drain_begun_between_ticks_is_published_at_once() {
        let store = Store::new();
        let clock = Arc::new(crate::store::SystemClock);
        let config = HealthConfig {
            interval: Duration::from_secs(60),
            ..HealthConfig::default()
        };
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let health = spawn(
            &config,
            store,
            clock,
            StreamPolicy::default(),
            &cancel,
            &mut tasks,
        );
        let mut published = health.subscribe();
        assert!(published.borrow_and_update().drain.is_none());
        let requester = crate::health::drain::Requester {
            requested_by: "test".to_owned(),
            identity: String::new(),
            reason: "maintenance".to_owned(),
            at: SystemTime::UNIX_EPOCH,
        };
        health.drain.begin(requester, Duration::from_secs(30));
        let p = published
            .wait_for(|p| p.drain.is_some())
            .await
            .expect("published");
        assert_eq!(p.drain.as_ref().map(|d| d.requesters.len()), Some(1));
        drop(p);
        cancel.cancel();
        assert!(tasks.join_next().await.is_some());
    }
}
