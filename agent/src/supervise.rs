//! Restarting a failed task with exponential back-off, so that one source that panics or
//! returns an error does not take the agent down with it.
//!
//! [`supervise`] runs a task made by a factory (a fresh source each time: a panicked one may have
//! left its state half-updated), and when it fails — an error, a panic, or returning before
//! shutdown — logs it, publishes the failure in a [`TaskHealth`] (for the health engine and the
//! API to report as a condition), waits, and starts a new one. The wait doubles from
//! [`Policy::initial_backoff`] up to [`Policy::max_backoff`]; a run that lasted longer than
//! [`Policy::healthy_after`] resets it. After [`Policy::max_restarts`] consecutive failures it
//! gives up, and its error reaches the daemon like any task failure (systemd then restarts the
//! whole agent).

use std::{future::Future, time::Duration};

use tokio::{sync::watch, task::JoinSet, time::Instant};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

pub use crate::task::{TaskError, TaskHealth};

/// What a task in the daemon's set returns: its name, and why it stopped if it failed.
pub type TaskResult = (&'static str, Result<(), TaskError>);

/// How a supervised task is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Wait before the first restart; doubled for each consecutive failure.
    pub initial_backoff: Duration,
    /// The longest wait between restarts.
    pub max_backoff: Duration,
    /// Consecutive failures tolerated; the next one is final.
    pub max_restarts: u32,
    /// A run this long counts as healthy: the back-off and the failure count start over.
    pub healthy_after: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_restarts: 5,
            healthy_after: Duration::from_secs(300),
        }
    }
}

impl Policy {
    /// The wait before restart number `restart` (1-based) of a run of consecutive failures.
    pub fn backoff(&self, restart: u32) -> Duration {
        let doublings = restart.saturating_sub(1).min(31);
        self.initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }
}

/// Runs `make()` until `cancel` fires, restarting it per `policy` when it fails. Returns
/// `Ok(())` on cancellation, or the final failure once `max_restarts` is exhausted.
pub async fn supervise<F, Fut>(
    name: &'static str,
    policy: Policy,
    cancel: CancellationToken,
    health: watch::Sender<TaskHealth>,
    mut make: F,
) -> Result<(), TaskError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
{
    let mut failures: u32 = 0;
    loop {
        let started = Instant::now();
        // A task of its own, so that a panic is caught as a `JoinError` instead of unwinding here;
        // aborted if the supervisor itself is dropped (the daemon's shutdown deadline).
        let mut run = AbortOnDropHandle::new(tokio::spawn(make()));
        // Up once the factory has made the source (for the eBPF sources: attached it), so that
        // `up` after a restart means the new run is in place.
        health.send_if_modified(|h| !std::mem::replace(&mut h.up, true));
        let outcome = tokio::select! {
            joined = &mut run => joined,
            _ = cancel.cancelled() => {
                // The task watches the same token; give it its own chance to stop cleanly.
                run.await
            }
        };
        let failure = match outcome {
            Ok(Ok(())) if cancel.is_cancelled() => return Ok(()),
            Ok(Ok(())) => TaskError::Ended,
            Ok(Err(e)) => e,
            Err(e) if e.is_panic() => TaskError::Panicked(panic_message(e.into_panic())),
            Err(e) => TaskError::Aborted(e.to_string()),
        };
        if cancel.is_cancelled() {
            tracing::warn!(task = name, %failure, "task failed while stopping");
            return Ok(());
        }
        if started.elapsed() >= policy.healthy_after {
            failures = 0;
        }
        failures += 1;
        let gave_up = failures > policy.max_restarts;
        health.send_modify(|h| {
            h.last_failure = Some(failure.to_string());
            h.gave_up = gave_up;
            h.up = false;
            if !gave_up {
                h.restarts += 1;
            }
        });
        if gave_up {
            tracing::error!(task = name, %failure, restarts = policy.max_restarts, "task failed again; not restarting it");
            return Err(TaskError::GaveUp {
                last: Box::new(failure),
                restarts: policy.max_restarts,
            });
        }
        let wait = policy.backoff(failures);
        tracing::warn!(task = name, %failure, restart = failures, of = policy.max_restarts, ?wait, "task failed; restarting it");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return Ok(()),
        }
    }
}

/// Spawns `make`'s task under [`supervise`] with the default [`Policy`] into the daemon's task
/// set, where giving up ends as a [`TaskResult`] error like any task failure. Returns the
/// receiver of the task's [`TaskHealth`].
///
/// With the `fault-injection` feature, the back-off is the one a fault armed for `name` asks
/// for (see `crate::fault`); without it there is no such code in the binary.
pub fn spawn<F, Fut>(
    name: &'static str,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<TaskResult>,
    make: F,
) -> watch::Receiver<TaskHealth>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
{
    let (tx, rx) = watch::channel(TaskHealth::default());
    let cancel = cancel.clone();
    #[cfg_attr(
        not(feature = "fault-injection"),
        expect(unused_mut, reason = "only fault injection changes the policy")
    )]
    let mut policy = Policy::default();
    #[cfg(feature = "fault-injection")]
    if let Some(backoff) = crate::fault::backoff(name) {
        policy.initial_backoff = backoff;
        policy.max_backoff = policy.max_backoff.max(backoff);
    }
    tasks.spawn(async move { (name, supervise(name, policy, cancel, tx, make).await) });
    rx
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload.downcast_ref::<&str>().map_or_else(
            || "(a non-text panic payload)".to_owned(),
            |s| (*s).to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    };

    use super::*;

    fn quick(max_restarts: u32) -> Policy {
        Policy {
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
            max_restarts,
            healthy_after: Duration::from_secs(3600),
        }
    }

    #[test]
    fn backoff_doubles_from_the_initial_wait_and_stops_at_the_cap() {
        let p = Policy {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            ..Policy::default()
        };
        let waits: Vec<u64> = (1..=6).map(|n| p.backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(10), "no overflow");
    }

    #[tokio::test]
    async fn a_task_that_panics_is_restarted_and_reported_and_the_next_run_keeps_serving() {
        let runs = Arc::new(AtomicU32::new(0));
        let cancel = CancellationToken::new();
        let (tx, mut rx) = watch::channel(TaskHealth::default());
        let (r, c) = (runs.clone(), cancel.clone());
        let sup = tokio::spawn(supervise(
            "flaky",
            quick(5),
            cancel.clone(),
            tx,
            move || {
                let (n, c) = (r.fetch_add(1, Ordering::SeqCst), c.clone());
                async move {
                    if n < 2 {
                        panic!("source {n} fell over");
                    }
                    c.cancelled().await;
                    Ok(())
                }
            },
        ));
        let h = rx
            .wait_for(|h| h.restarts == 2)
            .await
            .expect("supervisor alive")
            .clone();
        assert_eq!(
            h.last_failure.as_deref(),
            Some("panicked: source 1 fell over")
        );
        assert!(!h.gave_up);
        // The third run starts after the back-off and serves until shutdown.
        while runs.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(rx.borrow().up, "up again once the next run started");
        cancel.cancel();
        assert!(sup.await.expect("supervisor task").is_ok());
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "two failed runs and a good one"
        );
    }

    #[tokio::test]
    async fn a_task_that_keeps_failing_is_given_up_after_the_limit_naming_the_error() {
        let runs = Arc::new(AtomicU32::new(0));
        let (tx, rx) = watch::channel(TaskHealth::default());
        let r = runs.clone();
        let result = supervise(
            "broken",
            quick(3),
            CancellationToken::new(),
            tx,
            move || {
                r.fetch_add(1, Ordering::SeqCst);
                async { Err(TaskError::failed("no such map")) }
            },
        )
        .await;
        let e = result.expect_err("gives up").to_string();
        assert!(e.contains("no such map") && e.contains("3 restarts"), "{e}");
        assert_eq!(runs.load(Ordering::SeqCst), 4, "first run and 3 restarts");
        let h = rx.borrow().clone();
        assert_eq!((h.restarts, h.gave_up, h.up), (3, true, false));
    }

    #[tokio::test]
    async fn a_supervised_task_in_the_daemon_set_serves_after_a_panic_and_stops_on_cancel() {
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let c = cancel.clone();
        let mut health = spawn("src", &cancel, &mut tasks, move || {
            let (n, c) = (r.fetch_add(1, Ordering::SeqCst), c.clone());
            async move {
                assert!(n > 0, "first run panics");
                c.cancelled().await;
                Ok(())
            }
        });
        // Default policy: the first restart follows a one-second back-off.
        let h = health
            .wait_for(|h| h.restarts == 1)
            .await
            .expect("alive")
            .clone();
        assert!(h
            .last_failure
            .is_some_and(|f| f.contains("first run panics")));
        while runs.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            tasks.try_join_next().is_none(),
            "the set still runs the task"
        );
        cancel.cancel();
        let (name, result) = tasks.join_next().await.expect("one task").expect("joined");
        assert_eq!(name, "src");
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn a_task_that_returns_early_is_a_failure_and_cancel_during_backoff_stops_promptly() {
        let cancel = CancellationToken::new();
        let (tx, mut rx) = watch::channel(TaskHealth::default());
        let policy = Policy {
            initial_backoff: Duration::from_secs(3600),
            ..quick(5)
        };
        let sup = tokio::spawn(supervise("early", policy, cancel.clone(), tx, || async {
            Ok(())
        }));
        let h = rx
            .wait_for(|h| h.restarts == 1)
            .await
            .expect("supervisor alive")
            .clone();
        assert!(
            h.last_failure
                .as_deref()
                .is_some_and(|f| f.contains("stopped before shutdown")),
            "{h:?}"
        );
        assert!(!h.up, "down while waiting to restart");
        // The supervisor now waits an hour; cancelling must end it at once.
        cancel.cancel();
        assert!(sup.await.expect("supervisor task").is_ok());
    }
}
