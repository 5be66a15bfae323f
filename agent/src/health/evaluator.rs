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
//! the engine, in the [`DrainController`], so a restart does not forget a drain; a problem with
//! its state file (unreadable at start, a failed save) is added to every report as a
//! `DrainState` warning.

use std::{
    convert::Infallible,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use super::{
    drain::DrainController,
    hub::{HealthHub, Published},
    Condition, ConditionStatus, Engine, HealthConfig, HealthReport, Severity, Verdict,
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
    /// When the first run started: `health.source_first_report_timeout` counts from there
    /// across the engine's restarts.
    pub started: Arc<OnceLock<SystemTime>>,
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
        let now = parts.clock.now();
        let started = *parts.started.get_or_init(|| now);
        let mut engine = Engine::new(parts.config.clone()).waiting_since(started);
        let first =
            with_drain_problems(engine.evaluate(&parts.store.snapshot(), now), &parts.drain);
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
        let report = with_drain_problems(
            engine.evaluate(&parts.store.snapshot(), parts.clock.now()),
            &parts.drain,
        );
        hub.publish(report, parts.drain.current());
    }
}

/// Adds a `DrainState` warning per problem of the drain's state file; a report that was
/// `Healthy` becomes `Degraded` (the operator has to look at the file that was moved aside).
fn with_drain_problems(mut report: HealthReport, drain: &DrainController) -> HealthReport {
    let problems = drain.problems();
    if problems.is_empty() {
        return report;
    }
    for p in problems {
        report.conditions.push(Condition {
            kind: "DrainState".to_owned(),
            status: ConditionStatus::Firing,
            severity: Severity::Warning,
            reason: p.reason.to_owned(),
            message: p.message,
            subject: String::new(),
            evidence: Vec::new(),
            since: p.since,
            last_transition: p.since,
        });
    }
    report
        .conditions
        .sort_by(|a, b| (&a.kind, &a.subject).cmp(&(&b.kind, &b.subject)));
    if report.verdict == Verdict::Healthy {
        report.verdict = Verdict::Degraded;
    }
    report
}

/// Spawns the evaluator into the daemon's task set under supervision, with a drain kept in
/// memory only (tests). Call it once the sources are registered in the store.
pub fn spawn(
    config: &HealthConfig,
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    streams: super::streams::StreamPolicy,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<TaskResult>,
) -> Health {
    let drain = DrainController::with_settings(
        clock.clone(),
        super::drain::DrainSettings {
            stale_after: config.source_stale_after,
            policy: streams,
            ..super::drain::DrainSettings::default()
        },
    );
    spawn_with(config, drain, store, clock, cancel, tasks)
}

/// [`spawn`] with a given drain controller (the daemon's restores its state file).
pub fn spawn_with(
    config: &HealthConfig,
    drain: DrainController,
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<TaskResult>,
) -> Health {
    let parts = Parts {
        config: config.clone(),
        store,
        clock: clock.clone(),
        drain: drain.clone(),
        started: Arc::default(),
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

    /// A node source that reports at `at` and a GPU source that never does (a hung
    /// `nvmlInit`).
    fn node_reports_gpu_never(at: SystemTime) -> Arc<Store> {
        let store = Store::new();
        store.register(SourceKind::Node);
        store.register(SourceKind::Gpu);
        store.publish_node(at, Provenance::default(), NodeStats::default());
        store
    }

    #[test]
    fn a_source_silent_past_the_first_report_bound_is_unavailable_and_the_verdict_goes_on() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let config = HealthConfig {
            source_first_report_timeout: Duration::from_secs(30),
            ..HealthConfig::default()
        };
        let mut engine = Engine::new(config).waiting_since(t0);

        // Within the bound the verdict waits for the GPU.
        let at = t0 + Duration::from_secs(29);
        let report = engine.evaluate(&node_reports_gpu_never(at).snapshot(), at);
        assert_eq!(report.verdict, Verdict::Unknown);
        assert_eq!(
            report.unknown_reason,
            "waiting for the first report of: gpu"
        );

        // Past it: the GPU is unavailable with the reason, the verdict is computed from the
        // node source, and the silence is a condition that counts.
        let at = t0 + Duration::from_secs(31);
        let report = engine.evaluate(&node_reports_gpu_never(at).snapshot(), at);
        let gpu = report
            .sources
            .iter()
            .find(|s| s.kind == SourceKind::Gpu)
            .expect("the GPU source is listed");
        assert_eq!(gpu.state, crate::health::SourceState::Unavailable);
        assert_eq!(gpu.reason, "no first report within 30s");
        let c = report
            .conditions
            .iter()
            .find(|c| c.kind == "SourceNoFirstReport")
            .expect("the silence is a condition");
        assert_eq!(
            (c.subject.as_str(), c.status),
            ("gpu", ConditionStatus::Firing)
        );
        assert_eq!(report.verdict, Verdict::Degraded);
        assert!(
            report.unknown_reason.is_empty(),
            "{}",
            report.unknown_reason
        );
    }

    #[test]
    fn a_source_that_reports_late_is_waited_for_no_more_and_clears_the_condition() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let config = HealthConfig {
            source_first_report_timeout: Duration::from_secs(30),
            recovery: Duration::from_secs(30),
            hold: Duration::from_secs(30),
            ..HealthConfig::default()
        };
        let mut engine = Engine::new(config).waiting_since(t0);
        let at = t0 + Duration::from_secs(31);
        let report = engine.evaluate(&node_reports_gpu_never(at).snapshot(), at);
        assert_eq!(report.verdict, Verdict::Degraded);

        // NVML answers at last: the GPU reports and its state is the usual one.
        let at = t0 + Duration::from_secs(40);
        let store = node_reports_gpu_never(at);
        store.publish_gpus(
            at,
            Provenance::default(),
            crate::store::GpuSnapshot::default(),
        );
        let report = engine.evaluate(&store.snapshot(), at);
        let gpu = report
            .sources
            .iter()
            .find(|s| s.kind == SourceKind::Gpu)
            .expect("listed");
        assert_eq!(gpu.state, crate::health::SourceState::Reporting);
        // The condition recovers like any other: gone once `recovery` has passed.
        let at = t0 + Duration::from_secs(80);
        let store = node_reports_gpu_never(at);
        store.publish_gpus(
            at,
            Provenance::default(),
            crate::store::GpuSnapshot::default(),
        );
        let report = engine.evaluate(&store.snapshot(), at);
        assert!(
            report
                .conditions
                .iter()
                .all(|c| c.kind != "SourceNoFirstReport"),
            "{:?}",
            report.conditions
        );
        assert_eq!(report.verdict, Verdict::Healthy);
    }

    #[test]
    fn a_restarted_engine_keeps_counting_the_bound_from_the_first_start() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = Arc::new(crate::store::ManualClock::new(t0));
        let later = t0 + Duration::from_secs(31);
        let parts = Parts {
            config: HealthConfig {
                source_first_report_timeout: Duration::from_secs(30),
                ..HealthConfig::default()
            },
            store: node_reports_gpu_never(later),
            clock: clock.clone(),
            drain: DrainController::new(clock.clone()),
            started: Arc::default(),
        };
        let Ok(first) = Evaluator::start(&parts);
        assert_eq!(first.first.verdict, Verdict::Unknown);
        // The engine panicked and is started again 31 s after the first start.
        clock.set(later);
        let Ok(restarted) = Evaluator::start(&parts);
        assert_eq!(restarted.first.verdict, Verdict::Degraded);
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
