//! The health rules: each looks at one part of a [`Snapshot`] and says which causes are present
//! right now, with the numbers behind them. Rules never remember anything except the previous
//! OOM-kill counters (a kill is an increase of a counter) and task restart counts (see
//! [`super::tasks`]); hold and recovery times are applied
//! afterwards by the hysteresis tracker.

use std::{collections::BTreeMap, time::SystemTime};

use super::{config::HealthConfig, Evidence, Severity};
use crate::store::{clock::elapsed, ContainerMeta, Snapshot, SourceKind, SourceStatus};

/// A cause present at this evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Stable rule name, e.g. `ContainerRttHigh`.
    pub kind: &'static str,
    pub reason: &'static str,
    pub subject: String,
    pub severity: Severity,
    pub message: String,
    pub evidence: Vec<Evidence>,
    /// Events (an OOM kill, an XID, a lost GPU) fire without waiting for the hold time.
    pub immediate: bool,
}

/// State the rules carry between evaluations.
#[derive(Debug, Default)]
pub struct RuleMemory {
    oom_totals: BTreeMap<String, u64>,
    task_restarts: super::tasks::Memory,
    /// Sources that have reported at least once in this run.
    reported: std::collections::BTreeSet<SourceKind>,
}

fn ev(metric: &str, value: f64, threshold: f64, unit: &str, window_seconds: u32) -> Evidence {
    Evidence {
        metric: metric.to_owned(),
        value,
        threshold,
        unit: unit.to_owned(),
        window_seconds,
    }
}

fn window_seconds(w: crate::store::Window) -> u32 {
    u32::try_from(w.as_secs()).unwrap_or(u32::MAX)
}

fn describe(id: &str, meta: Option<&BTreeMap<String, ContainerMeta>>) -> String {
    match meta.and_then(|m| m.get(id)) {
        Some(m) if !m.pod_name.is_empty() => {
            format!("container {id} ({}/{})", m.pod_namespace, m.pod_name)
        }
        _ => format!("container {id}"),
    }
}

/// Whether the source's data may be used: it reported, and not too long ago.
pub fn fresh(snapshot: &Snapshot, kind: SourceKind, cfg: &HealthConfig, now: SystemTime) -> bool {
    snapshot
        .reported_at(kind)
        .is_some_and(|at| elapsed(at, now) <= cfg.source_stale_after)
}

/// Runs every rule.
pub fn evaluate(
    snapshot: &Snapshot,
    cfg: &HealthConfig,
    memory: &mut RuleMemory,
    now: SystemTime,
) -> Vec<Observation> {
    let mut out = Vec::new();
    stale_sources(snapshot, cfg, now, &mut out);
    lost_sources(snapshot, &mut memory.reported, &mut out);
    super::tasks::evaluate(snapshot, &mut memory.task_restarts, &mut out);
    if fresh(snapshot, SourceKind::Network, cfg, now) {
        network(snapshot, cfg, &mut out);
    }
    if fresh(snapshot, SourceKind::Cgroup, cfg, now) {
        cgroups(snapshot, cfg, memory, &mut out);
    }
    if fresh(snapshot, SourceKind::Node, cfg, now) {
        node(snapshot, cfg, &mut out);
    }
    if fresh(snapshot, SourceKind::Gpu, cfg, now) {
        gpus(snapshot, cfg, now, &mut out);
    }
    out
}

fn stale_sources(
    snapshot: &Snapshot,
    cfg: &HealthConfig,
    now: SystemTime,
    out: &mut Vec<Observation>,
) {
    for kind in SourceKind::ALL {
        let Some(at) = snapshot.reported_at(kind) else {
            continue;
        };
        let age = elapsed(at, now);
        if age > cfg.source_stale_after {
            out.push(Observation {
                kind: "SourceStale",
                reason: "StoppedReporting",
                subject: kind.name().to_owned(),
                severity: Severity::Warning,
                message: format!(
                    "source {kind} has not reported for {}; its data is ignored",
                    humantime::format_duration(std::time::Duration::from_secs(age.as_secs()))
                ),
                evidence: vec![ev(
                    "seconds_since_report",
                    age.as_secs_f64(),
                    cfg.source_stale_after.as_secs_f64(),
                    "seconds",
                    0,
                )],
                immediate: true,
            });
        }
    }
}

/// A source that reported and then became unavailable (the GPU source when NVML fails as a
/// whole, say) is a warning: its absence is news, unlike a source that never could start here
/// (no GPU on the node), which the verdict simply does not wait for.
fn lost_sources(
    snapshot: &Snapshot,
    reported: &mut std::collections::BTreeSet<SourceKind>,
    out: &mut Vec<Observation>,
) {
    for (kind, status) in &snapshot.sources {
        match status {
            SourceStatus::Reporting { .. } => {
                reported.insert(*kind);
            }
            // The store keeps a source's last data, so a report made and lost between two
            // evaluations still counts as reported.
            SourceStatus::Unavailable { reason }
                if reported.contains(kind) || snapshot.has_published(*kind) =>
            {
                out.push(Observation {
                    kind: "SourceLost",
                    reason: "BecameUnavailable",
                    subject: kind.name().to_owned(),
                    severity: Severity::Warning,
                    message: format!(
                        "source {kind} reported before and is now unavailable: {reason}"
                    ),
                    evidence: Vec::new(),
                    immediate: true,
                });
            }
            _ => {}
        }
    }
}

fn network(snapshot: &Snapshot, cfg: &HealthConfig, out: &mut Vec<Observation>) {
    let Some(net) = &snapshot.network else { return };
    let meta = snapshot.containers.as_deref();
    let window = cfg.network_window;
    // Evidence carries the window as seconds (the reply's unit); the messages name it.
    let w = window_seconds(window);
    for (id, c) in &net.containers {
        let Some(win) = c.window(window) else {
            continue;
        };
        rtp_loss(id, win, cfg, meta, out);
        if win.samples < cfg.network_min_samples {
            continue;
        }
        let samples = ev(
            "samples",
            win.samples as f64,
            cfg.network_min_samples as f64,
            "count",
            w,
        );
        let p99_ms = win.rtt_p99_us as f64 / 1000.0;
        if p99_ms > cfg.rtt_p99_warning_ms {
            out.push(Observation {
                kind: "ContainerRttHigh",
                reason: "P99AboveThreshold",
                subject: id.clone(),
                severity: Severity::Warning,
                message: format!(
                    "{}: p99 TCP RTT {p99_ms:.1} ms over {window} exceeds {} ms",
                    describe(id, meta),
                    cfg.rtt_p99_warning_ms
                ),
                evidence: vec![
                    ev("rtt_p99_ms", p99_ms, cfg.rtt_p99_warning_ms, "ms", w),
                    samples.clone(),
                ],
                immediate: false,
            });
        }
        let jitter_ms = win.jitter_rfc3550_us as f64 / 1000.0;
        if jitter_ms > cfg.jitter_warning_ms {
            out.push(Observation {
                kind: "ContainerJitterHigh",
                reason: "JitterAboveThreshold",
                subject: id.clone(),
                severity: Severity::Warning,
                message: format!(
                    "{}: RTT jitter {jitter_ms:.1} ms over {window} exceeds {} ms",
                    describe(id, meta),
                    cfg.jitter_warning_ms
                ),
                evidence: vec![
                    ev("jitter_ms", jitter_ms, cfg.jitter_warning_ms, "ms", w),
                    samples.clone(),
                ],
                immediate: false,
            });
        }
        if win.retransmits_per_second > cfg.retransmits_per_second_warning {
            out.push(Observation {
                kind: "ContainerRetransmitsHigh",
                reason: "RetransmitRateAboveThreshold",
                subject: id.clone(),
                severity: Severity::Warning,
                message: format!(
                    "{}: {:.1} TCP retransmits/s over {window} exceeds {}",
                    describe(id, meta),
                    win.retransmits_per_second,
                    cfg.retransmits_per_second_warning
                ),
                evidence: vec![ev(
                    "retransmits_per_second",
                    win.retransmits_per_second,
                    cfg.retransmits_per_second_warning,
                    "per_second",
                    w,
                )],
                immediate: false,
            });
        }
    }
}

fn rtp_loss(
    id: &str,
    win: &crate::store::NetworkWindow,
    cfg: &HealthConfig,
    meta: Option<&BTreeMap<String, ContainerMeta>>,
    out: &mut Vec<Observation>,
) {
    let total = win.rtp_packets + win.rtp_lost;
    if total == 0 || total < cfg.rtp_min_packets {
        return;
    }
    let loss = win.rtp_lost as f64 / total as f64;
    if loss > cfg.rtp_loss_warning_ratio {
        let window = win.window;
        let w = window_seconds(window);
        out.push(Observation {
            kind: "ContainerRtpLossHigh",
            reason: "LossAboveThreshold",
            subject: id.to_owned(),
            severity: Severity::Warning,
            message: format!(
                "{}: {:.1}% of RTP packets lost over {window} (threshold {:.1}%)",
                describe(id, meta),
                loss * 100.0,
                cfg.rtp_loss_warning_ratio * 100.0
            ),
            evidence: vec![
                ev(
                    "rtp_loss_ratio",
                    loss,
                    cfg.rtp_loss_warning_ratio,
                    "ratio",
                    w,
                ),
                ev(
                    "rtp_packets",
                    total as f64,
                    cfg.rtp_min_packets as f64,
                    "count",
                    w,
                ),
            ],
            immediate: false,
        });
    }
}

fn cgroups(
    snapshot: &Snapshot,
    cfg: &HealthConfig,
    memory: &mut RuleMemory,
    out: &mut Vec<Observation>,
) {
    let Some(cg) = &snapshot.cgroups else { return };
    let meta = snapshot.containers.as_deref();
    for (id, s) in &cg.containers {
        if s.cpu_throttled_ratio > cfg.cpu_throttled_ratio_warning {
            out.push(Observation {
                kind: "ContainerCpuThrottled",
                reason: "ThrottledAboveThreshold",
                subject: id.clone(),
                severity: Severity::Warning,
                message: format!(
                    "{}: throttled in {:.0}% of CPU periods (limit {:.0}%)",
                    describe(id, meta),
                    s.cpu_throttled_ratio * 100.0,
                    cfg.cpu_throttled_ratio_warning * 100.0
                ),
                evidence: vec![ev(
                    "cpu_throttled_ratio",
                    s.cpu_throttled_ratio,
                    cfg.cpu_throttled_ratio_warning,
                    "ratio",
                    0,
                )],
                immediate: false,
            });
        }
        let previous = memory.oom_totals.insert(id.clone(), s.oom_kills_total);
        if let Some(prev) = previous {
            if cfg.oom_kill_warning && s.oom_kills_total > prev {
                let new = s.oom_kills_total - prev;
                out.push(Observation {
                    kind: "ContainerOomKilled",
                    reason: "OomKill",
                    subject: id.clone(),
                    severity: Severity::Warning,
                    message: format!(
                        "{}: {new} OOM kill(s) ({} in total)",
                        describe(id, meta),
                        s.oom_kills_total
                    ),
                    evidence: vec![ev("oom_kills", new as f64, 0.0, "count", 0)],
                    immediate: true,
                });
            }
        }
    }
    // Forget containers that went away, so the memory does not grow with container churn.
    memory
        .oom_totals
        .retain(|id, _| cg.containers.contains_key(id));
}

fn leveled(value: f64, warning: f64, critical: f64) -> Option<(Severity, f64)> {
    if value > critical {
        Some((Severity::Critical, critical))
    } else if value > warning {
        Some((Severity::Warning, warning))
    } else {
        None
    }
}

fn node(snapshot: &Snapshot, cfg: &HealthConfig, out: &mut Vec<Observation>) {
    let Some(n) = &snapshot.node else { return };
    let psi = [
        (
            "NodeMemoryPressure",
            "memory",
            n.memory_pressure.full_avg10,
            cfg.psi_memory_full_warning_percent,
            cfg.psi_memory_full_critical_percent,
        ),
        (
            "NodeIoPressure",
            "io",
            n.io_pressure.full_avg10,
            cfg.psi_io_full_warning_percent,
            cfg.psi_io_full_critical_percent,
        ),
    ];
    for (kind, resource, value, warning, critical) in psi {
        if let Some((severity, threshold)) = leveled(value, warning, critical) {
            out.push(Observation {
                kind,
                reason: "PsiFullAboveThreshold",
                subject: "node".to_owned(),
                severity,
                message: format!("{resource} pressure: all tasks stalled {value:.1}% of the last 10 s (threshold {threshold}%)"),
                evidence: vec![ev(&format!("psi_{resource}_full_avg10"), value, threshold, "percent", 10)],
                immediate: false,
            });
        }
    }
    for d in &n.disks {
        if let Some((severity, threshold)) = leveled(
            d.used_ratio,
            cfg.disk_used_warning_ratio,
            cfg.disk_used_critical_ratio,
        ) {
            out.push(Observation {
                kind: "DiskNearlyFull",
                reason: "UsedAboveThreshold",
                subject: d.mount_point.clone(),
                severity,
                message: format!(
                    "{} is {:.1}% full (threshold {:.0}%)",
                    d.mount_point,
                    d.used_ratio * 100.0,
                    threshold * 100.0
                ),
                evidence: vec![ev("used_ratio", d.used_ratio, threshold, "ratio", 0)],
                immediate: false,
            });
        }
    }
    if cfg.clock_unsynchronized_warning && n.clock_synchronized == Some(false) {
        out.push(Observation {
            kind: "ClockUnsynchronized",
            reason: "NotSynchronized",
            subject: "node".to_owned(),
            severity: Severity::Warning,
            message: format!(
                "the kernel clock is not synchronised (max error {:.1} ms)",
                n.clock_max_error_ms
            ),
            evidence: vec![ev("clock_max_error_ms", n.clock_max_error_ms, 0.0, "ms", 0)],
            immediate: false,
        });
    }
}

const HW_SLOWDOWNS: [&str; 3] = ["HwSlowdown", "HwThermalSlowdown", "HwPowerBrakeSlowdown"];

fn gpus(snapshot: &Snapshot, cfg: &HealthConfig, now: SystemTime, out: &mut Vec<Observation>) {
    let Some(g) = &snapshot.gpus else { return };
    for gpu in &g.gpus {
        let subject = if gpu.uuid.is_empty() {
            format!("gpu{}", gpu.index)
        } else {
            gpu.uuid.clone()
        };
        let mut push = |kind, reason, severity, message: String, evidence, immediate| {
            out.push(Observation {
                kind,
                reason,
                subject: subject.clone(),
                severity,
                message,
                evidence,
                immediate,
            });
        };
        if gpu.lost {
            push(
                "GpuLost",
                "FellOffTheBus",
                Severity::Critical,
                format!("GPU {} is lost (fell off the bus)", gpu.index),
                vec![],
                true,
            );
            continue;
        }
        let recent: Vec<u32> = gpu
            .xids
            .iter()
            .filter(|x| cfg.gpu_critical_xids.contains(&x.code))
            .filter(|x| {
                x.seen_at
                    .is_none_or(|t| elapsed(t, now) <= cfg.gpu_xid_window)
            })
            .map(|x| x.code)
            .collect();
        if let Some(&code) = recent.last() {
            push(
                "GpuXidCritical",
                "CriticalXid",
                Severity::Critical,
                format!(
                    "GPU {}: critical XID {code} ({} in the last {})",
                    gpu.index,
                    recent.len(),
                    humantime::format_duration(cfg.gpu_xid_window)
                ),
                vec![ev(
                    "xid",
                    f64::from(code),
                    0.0,
                    "code",
                    cfg.gpu_xid_window.as_secs() as u32,
                )],
                true,
            );
        }
        if gpu.ecc_uncorrected_total > 0 {
            push(
                "GpuEccUncorrectable",
                "UncorrectableEcc",
                Severity::Critical,
                format!(
                    "GPU {}: {} uncorrectable ECC error(s) since driver load",
                    gpu.index, gpu.ecc_uncorrected_total
                ),
                vec![ev(
                    "ecc_uncorrected_total",
                    gpu.ecc_uncorrected_total as f64,
                    0.0,
                    "count",
                    0,
                )],
                true,
            );
        }
        if gpu.row_remap_failed {
            push(
                "GpuRowRemapFailed",
                "RowRemapFailure",
                Severity::Critical,
                format!("GPU {}: a row remap failed", gpu.index),
                vec![],
                true,
            );
        } else if gpu.row_remap_pending > 0 {
            push(
                "GpuRowRemapPending",
                "RowRemapPending",
                Severity::Warning,
                format!(
                    "GPU {}: {} row remap(s) pending a GPU reset",
                    gpu.index, gpu.row_remap_pending
                ),
                vec![ev(
                    "row_remap_pending",
                    f64::from(gpu.row_remap_pending),
                    0.0,
                    "count",
                    0,
                )],
                true,
            );
        }
        if cfg.gpu_hw_slowdown_warning {
            let active: Vec<&str> = gpu
                .throttle_reasons
                .iter()
                .map(String::as_str)
                .filter(|r| HW_SLOWDOWNS.contains(r))
                .collect();
            if !active.is_empty() {
                push(
                    "GpuHwSlowdown",
                    "HardwareSlowdown",
                    Severity::Warning,
                    format!(
                        "GPU {}: hardware slowdown active ({})",
                        gpu.index,
                        active.join(", ")
                    ),
                    vec![ev(
                        "temperature_celsius",
                        gpu.temperature_celsius,
                        0.0,
                        "celsius",
                        0,
                    )],
                    false,
                );
            }
        }
    }
}
