//! The GPU source's poll loop and what it survives: NVML failing as a whole. When
//! `nvmlDeviceGetCount` fails, nothing NVML says can be trusted, so the loop reports the source
//! degraded, stops the event thread, shuts NVML down (`nvmlShutdown`, when its last handle
//! goes) and initialises it again (`nvmlInit`) with back-off until it answers. Failures of
//! single calls and lost GPUs are the poller's business ([`super::poll`]): they never end a
//! poll.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{events, model, poll, Gpu, GpuConfig, GpuError, GpuSnapshot, SourceStatus};

/// Back-off between attempts to re-initialise NVML after it failed as a whole: doubling from
/// the first to the last.
const REINIT_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

/// How long stopping the event thread and shutting NVML down may take before the loop goes on.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// Polls every `interval` and publishes each snapshot on `tx` until `cancel` fires.
pub(super) async fn poll_loop(
    gpu: Gpu,
    config: &GpuConfig,
    proc_root: &Path,
    interval: Duration,
    tx: &watch::Sender<GpuSnapshot>,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let mut open = Some(Opened::start(gpu, cancel)?);
    let mut reinit = Reinit::new();
    let mut kept = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Some(mut opened) = open.take() else {
            if Instant::now() < reinit.next_at {
                continue;
            }
            reinit.attempts += 1;
            reinit.total += 1;
            let (library, root) = (config.clone(), proc_root.to_path_buf());
            let attempt = tokio::task::spawn_blocking(move || Gpu::open(&library, &root))
                .await
                .map_err(|e| GpuError::Join(e.to_string()).to_string())?;
            match attempt {
                Ok(mut gpu) => {
                    if let Some(k) = kept.take() {
                        gpu.restore(k);
                    }
                    tracing::info!(
                        attempts = reinit.attempts,
                        "GPU source recovered: NVML answers again"
                    );
                    open = Some(Opened::start(gpu, cancel)?);
                    reinit.succeeded();
                    // Poll at once rather than a tick later.
                    tick.reset_immediately();
                }
                Err(e) => {
                    let reason = reinit.failed(&e.to_string());
                    tracing::warn!(%reason, "GPU source still degraded");
                    publish_degraded(tx, reason, &reinit);
                }
            }
            continue;
        };
        let gpu = opened.gpu;
        let (gpu, mut snapshot) = tokio::task::spawn_blocking(move || {
            let mut gpu = gpu;
            let snapshot = gpu.poll();
            (gpu, snapshot)
        })
        .await
        .map_err(|e| GpuError::Join(e.to_string()).to_string())?;
        opened.gpu = gpu;
        snapshot.reinit_attempts_total = reinit.total;
        match snapshot.poll_error.clone() {
            None => {
                log_changes(tx.borrow().devices.as_slice(), &snapshot);
                tx.send_replace(snapshot);
                open = Some(opened);
            }
            Some(error) => {
                // NVML failed as a whole: shut it down (stopping the event thread first,
                // which holds it too) and initialise it again after a back-off.
                let reason = reinit.failed(&format!("cannot count the GPUs: {error}"));
                tracing::error!(
                    %reason,
                    "GPU source degraded: NVML failed; shutting it down to initialise it again"
                );
                let counts = snapshot.count_errors_total.clone();
                let mut snapshot = degraded(reason, &reinit);
                snapshot.count_errors_total = counts;
                // Said before the shutdown, which a hung driver can make slow.
                tx.send_replace(snapshot);
                kept = Some(opened.stop().await);
            }
        }
    }
    if let Some(opened) = open {
        opened.stop().await;
    }
    Ok(())
}

/// An initialised NVML and the thread watching its events.
struct Opened {
    gpu: Gpu,
    events: std::thread::JoinHandle<()>,
    stop_events: CancellationToken,
}

impl Opened {
    fn start(gpu: Gpu, cancel: &CancellationToken) -> Result<Self, String> {
        let stop_events = cancel.child_token();
        let events = gpu
            .watch_events(stop_events.clone())
            .map_err(|e| e.to_string())?;
        Ok(Self {
            gpu,
            events,
            stop_events,
        })
    }

    /// Stops the event thread and shuts NVML down (`nvmlShutdown`, when the last handle
    /// goes); returns what the next instance takes over.
    async fn stop(self) -> (poll::Kept, Arc<events::EventState>) {
        let Self {
            mut gpu,
            events,
            stop_events,
        } = self;
        stop_events.cancel();
        let kept = gpu.keep();
        // The event thread sees the cancelled token within one wait; NVML calls block, and a
        // hung driver can block them for good: that thread is then left behind.
        let stopped = tokio::task::spawn_blocking(move || {
            let _ = events.join();
            drop(gpu);
        });
        if tokio::time::timeout(SHUTDOWN_WAIT, stopped).await.is_err() {
            tracing::warn!(
                "NVML did not shut down within {}; going on without it",
                humantime::format_duration(SHUTDOWN_WAIT)
            );
        }
        kept
    }
}

/// When to try to initialise NVML again, and how often it was tried.
#[derive(Debug)]
struct Reinit {
    /// Attempts since NVML last worked.
    attempts: u32,
    /// Attempts since the source started.
    total: u64,
    delay: Duration,
    next_at: Instant,
}

impl Reinit {
    fn new() -> Self {
        Self {
            attempts: 0,
            total: 0,
            delay: REINIT_BACKOFF.0,
            next_at: Instant::now(),
        }
    }

    /// Schedules the next attempt after a failure; returns the reason to report.
    fn failed(&mut self, error: &str) -> String {
        let wait = self.delay;
        self.next_at = Instant::now() + wait;
        self.delay = (self.delay * 2).min(REINIT_BACKOFF.1);
        format!(
            "{error}; re-initialising NVML ({} failed attempt(s) so far, next in {})",
            self.attempts,
            humantime::format_duration(wait)
        )
    }

    fn succeeded(&mut self) {
        self.attempts = 0;
        self.delay = REINIT_BACKOFF.0;
    }
}

/// The snapshot of a degraded source: no devices, because nothing can be read.
fn degraded(reason: String, reinit: &Reinit) -> GpuSnapshot {
    let mut snapshot = GpuSnapshot::empty(SourceStatus::Degraded(reason.clone()));
    snapshot.poll_error = Some(reason);
    snapshot.reinit_attempts_total = reinit.total;
    snapshot
}

fn publish_degraded(tx: &watch::Sender<GpuSnapshot>, reason: String, reinit: &Reinit) {
    let counts = tx.borrow().count_errors_total.clone();
    let mut snapshot = degraded(reason, reinit);
    snapshot.count_errors_total = counts;
    tx.send_replace(snapshot);
}

/// Logs a GPU that fell off the bus once, when it happens, not on every poll.
fn log_changes(before: &[model::DeviceStats], now: &GpuSnapshot) {
    for d in &now.devices {
        let was_lost = before.iter().any(|b| b.index == d.index && b.lost);
        if d.lost && !was_lost {
            tracing::error!(
                device = d.index,
                uuid = d.uuid.value().map(String::as_str).unwrap_or("?"),
                "GPU has fallen off the bus (lost); it needs a reset"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reinitialisation_backs_off_doubling_to_a_minute_and_resets_on_success() {
        let mut r = Reinit::new();
        let mut waits = Vec::new();
        for _ in 0..9 {
            let before = Instant::now();
            let reason = r.failed("cannot count the GPUs: Unknown Error");
            assert!(reason.starts_with("cannot count the GPUs"), "{reason}");
            waits.push((r.next_at - before).as_secs());
            r.attempts += 1;
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        let reason = r.failed("x");
        assert!(
            reason.contains("9 failed attempt(s) so far, next in 1m"),
            "{reason}"
        );
        r.succeeded();
        assert_eq!((r.attempts, r.delay), (0, REINIT_BACKOFF.0));
    }
}
