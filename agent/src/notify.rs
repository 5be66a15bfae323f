//! systemd integration: `READY=1` once serving, `STOPPING=1` on shutdown, and watchdog pings
//! at half the interval systemd asks for (`WatchdogSec=`). Without systemd these do nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

pub fn ready(status: &str) {
    if let Err(e) = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]) {
        tracing::warn!(error = %e, "sd_notify READY failed");
    }
}

pub fn stopping() {
    if let Err(e) = sd_notify::notify(false, &[NotifyState::Stopping]) {
        tracing::warn!(error = %e, "sd_notify STOPPING failed");
    }
}

/// The interval at which to ping the watchdog, if systemd enabled it for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog until cancelled. The pings come from the runtime's own timer, so a wedged
/// runtime stops them and systemd restarts the agent.
pub async fn watchdog(interval: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = sd_notify::notify(false, &[NotifyState::Watchdog]) {
                    tracing::warn!(error = %e, "sd_notify WATCHDOG failed");
                }
            }
        }
    }
}
