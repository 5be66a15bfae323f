//! The `[health]` config section: thresholds, hold and recovery times of the health rules.
//! Every default is documented here and in `packaging/nodeward.toml`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::Window;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How often the verdict is evaluated (and Watch streams can see a change).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long a cause must last before its condition fires (level rules; event rules such as
    /// OOM kills, XIDs and lost GPUs fire at once).
    #[serde(with = "humantime_serde")]
    pub hold: Duration,
    /// How long a cause must stay away before a fired condition clears. Longer than `hold`, so
    /// the verdict does not flap.
    #[serde(with = "humantime_serde")]
    pub recovery: Duration,
    /// A source that has not reported for this long is stale: its data is ignored and a
    /// `SourceStale` warning fires.
    #[serde(with = "humantime_serde")]
    pub source_stale_after: Duration,
    /// A source that has not reported once this long after the agent started (a hung
    /// `nvmlInit`, a stuck cgroup read) is shown unavailable with that reason, a
    /// `SourceNoFirstReport` warning fires, and the verdict stops waiting for it. One bound for
    /// every source: they all report within a few ticks when they work.
    #[serde(with = "humantime_serde")]
    pub source_first_report_timeout: Duration,

    /// The network window the RTT, jitter, retransmit and RTP loss rules read; one of
    /// `network.windows`.
    pub network_window: Window,
    /// Windows with fewer RTT samples than this are ignored (too few to trust a p99).
    pub network_min_samples: u64,
    /// p99 RTT of a container above this (milliseconds) is a warning.
    pub rtt_p99_warning_ms: f64,
    /// Jitter of a container above this (milliseconds) is a warning.
    pub jitter_warning_ms: f64,
    /// Retransmitted segments per second of a container above this is a warning.
    pub retransmits_per_second_warning: f64,
    /// Share of RTP packets lost over the window above this (0-1) is a warning.
    pub rtp_loss_warning_ratio: f64,
    /// Windows with fewer RTP packets (received + lost) than this are ignored by the loss rule.
    pub rtp_min_packets: u64,

    /// Node PSI memory "full" avg10 above this (percent) is a warning.
    pub psi_memory_full_warning_percent: f64,
    /// ... and above this is critical.
    pub psi_memory_full_critical_percent: f64,
    /// Node PSI io "full" avg10 above this (percent) is a warning.
    pub psi_io_full_warning_percent: f64,
    /// ... and above this is critical.
    pub psi_io_full_critical_percent: f64,
    /// A container whose share of throttled CFS periods exceeds this (0-1) is a warning.
    pub cpu_throttled_ratio_warning: f64,
    /// A container OOM kill is a warning (it fires at once and clears after `recovery`).
    pub oom_kill_warning: bool,
    /// A filesystem fuller than this (0-1) is a warning.
    pub disk_used_warning_ratio: f64,
    /// ... and fuller than this is critical.
    pub disk_used_critical_ratio: f64,
    /// An unsynchronised kernel clock is a warning.
    pub clock_unsynchronized_warning: bool,

    /// XID codes that make a GPU critical (NVIDIA's "reset or service needed" codes).
    pub gpu_critical_xids: Vec<u32>,
    /// A critical XID counts for this long after it was seen.
    #[serde(with = "humantime_serde")]
    pub gpu_xid_window: Duration,
    /// An active "HwSlowdown"/"HwThermalSlowdown"/"HwPowerBrakeSlowdown" throttle is a warning.
    pub gpu_hw_slowdown_warning: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            hold: Duration::from_secs(30),
            recovery: Duration::from_secs(120),
            source_stale_after: Duration::from_secs(30),
            source_first_report_timeout: Duration::from_secs(30),
            network_window: Window::from_secs(60),
            network_min_samples: 20,
            rtt_p99_warning_ms: 150.0,
            jitter_warning_ms: 30.0,
            retransmits_per_second_warning: 50.0,
            rtp_loss_warning_ratio: 0.02,
            rtp_min_packets: 200,
            psi_memory_full_warning_percent: 10.0,
            psi_memory_full_critical_percent: 40.0,
            psi_io_full_warning_percent: 20.0,
            psi_io_full_critical_percent: 60.0,
            cpu_throttled_ratio_warning: 0.25,
            oom_kill_warning: true,
            disk_used_warning_ratio: 0.90,
            disk_used_critical_ratio: 0.97,
            clock_unsynchronized_warning: true,
            gpu_critical_xids: vec![48, 63, 64, 74, 79, 92, 94, 95, 119, 120],
            gpu_xid_window: Duration::from_secs(600),
            gpu_hw_slowdown_warning: true,
        }
    }
}

/// A `[health]` value out of range: (key, value, what is allowed).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("health.{key} = {value}: {allowed}")]
pub struct HealthConfigError {
    pub key: &'static str,
    pub value: String,
    pub allowed: String,
}

impl HealthConfig {
    /// Every key of this section that names a network window, with its value: the config
    /// loader checks each against `network.windows`.
    pub fn window_keys(&self) -> [(&'static str, Window); 1] {
        [("health.network_window", self.network_window)]
    }

    /// Range checks beyond what the types express.
    pub fn validate(&self) -> Result<(), HealthConfigError> {
        let err = |key, value: String, allowed: &str| {
            Err(HealthConfigError {
                key,
                value,
                allowed: allowed.to_owned(),
            })
        };
        if self.interval < Duration::from_millis(100) || self.interval > Duration::from_secs(60) {
            return err(
                "interval",
                format!("{:?}", self.interval),
                "must be between 100ms and 60s",
            );
        }
        let t = self.source_first_report_timeout;
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&t) {
            return err(
                "source_first_report_timeout",
                format!("{t:?}"),
                "must be between 1s and 1h",
            );
        }
        if self.recovery < self.hold {
            return err(
                "recovery",
                format!("{:?}", self.recovery),
                "must not be shorter than health.hold",
            );
        }
        for (key, v) in [
            (
                "cpu_throttled_ratio_warning",
                self.cpu_throttled_ratio_warning,
            ),
            ("disk_used_warning_ratio", self.disk_used_warning_ratio),
            ("disk_used_critical_ratio", self.disk_used_critical_ratio),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return err(key, v.to_string(), "must be a ratio between 0 and 1");
            }
        }
        for (key, v) in [
            ("rtt_p99_warning_ms", self.rtt_p99_warning_ms),
            ("jitter_warning_ms", self.jitter_warning_ms),
            (
                "retransmits_per_second_warning",
                self.retransmits_per_second_warning,
            ),
            (
                "psi_memory_full_warning_percent",
                self.psi_memory_full_warning_percent,
            ),
            (
                "psi_memory_full_critical_percent",
                self.psi_memory_full_critical_percent,
            ),
            (
                "psi_io_full_warning_percent",
                self.psi_io_full_warning_percent,
            ),
            (
                "psi_io_full_critical_percent",
                self.psi_io_full_critical_percent,
            ),
        ] {
            if !v.is_finite() || v < 0.0 {
                return err(key, v.to_string(), "must be a non-negative number");
            }
        }
        Ok(())
    }
}
