//! Domain types to wire types. Conversions out are infallible (`From`); requests coming in are
//! validated into domain values with `TryFrom` in `requests.rs`.

use std::time::SystemTime;

use super::{drain, pb};
use crate::{
    containers::Qos,
    health,
    store::{self, clock::unix_ms},
};

fn ms(t: Option<SystemTime>) -> i64 {
    t.map(unix_ms).unwrap_or(0)
}

impl From<&store::NetworkWindow> for pb::NetworkWindow {
    fn from(w: &store::NetworkWindow) -> Self {
        Self {
            window_seconds: u32::try_from(w.window.as_secs()).unwrap_or(u32::MAX),
            samples: w.samples,
            rtt_min_us: w.rtt_min_us,
            rtt_p50_us: w.rtt_p50_us,
            rtt_p90_us: w.rtt_p90_us,
            rtt_p99_us: w.rtt_p99_us,
            rtt_max_us: w.rtt_max_us,
            jitter_rfc3550_us: w.jitter_rfc3550_us,
            retransmits: w.retransmits,
            retransmits_per_second: w.retransmits_per_second,
            rtp_packets: w.rtp_packets,
            rtp_lost: w.rtp_lost,
            rtp_jitter_us: w.rtp_jitter_us,
        }
    }
}

/// The wire QoS class of a pod's class (or of none).
pub fn qos_class(q: Option<Qos>) -> pb::QosClass {
    match q {
        None => pb::QosClass::Unspecified,
        Some(Qos::Guaranteed) => pb::QosClass::Guaranteed,
        Some(Qos::Burstable) => pb::QosClass::Burstable,
        Some(Qos::BestEffort) => pb::QosClass::BestEffort,
    }
}

fn gpu_attribution(a: store::GpuAttribution) -> pb::GpuAttribution {
    match a {
        store::GpuAttribution::ProcessSamples => pb::GpuAttribution::ProcessSamples,
        store::GpuAttribution::DeviceAssignment => pb::GpuAttribution::DeviceAssignment,
    }
}

/// A live stream, with its age at `now`.
pub fn live_stream(s: &store::LiveStream, now: SystemTime) -> pb::LiveStream {
    pb::LiveStream {
        protocol: match s.protocol {
            store::StreamProtocol::Tcp => pb::StreamProtocol::Tcp,
            store::StreamProtocol::Udp => pb::StreamProtocol::Udp,
        } as i32,
        local_addr: s.local.to_string(),
        remote_addr: s.remote.to_string(),
        started_unix_ms: unix_ms(s.started_at),
        age_seconds: store::clock::elapsed(s.started_at, now).as_secs_f64(),
        viewers: s.viewers,
        direction: match s.direction {
            store::StreamDirection::Served => pb::StreamDirection::Served,
            store::StreamDirection::Outbound => pb::StreamDirection::Outbound,
            store::StreamDirection::Unknown => pb::StreamDirection::Unspecified,
        } as i32,
        kind: stream_kind(s.kind) as i32,
        local_port: u32::from(s.local.port()),
        bytes_known: s.bytes.is_some(),
        sent_bytes: s.bytes.map_or(0, |b| b.sent),
        received_bytes: s.bytes.map_or(0, |b| b.received),
        bytes_seconds: s.bytes.map_or(0.0, |b| b.over.as_secs_f64()),
        viewer_reports: s.viewer_reports.as_ref().map(|v| viewer_reports(v, now)),
        // Only the drain status judges streams (it sets this from the drain's policy).
        holds_drain: false,
    }
}

fn stream_kind(k: store::StreamKind) -> pb::StreamKind {
    match k {
        store::StreamKind::Tcp => pb::StreamKind::Tcp,
        store::StreamKind::Rtmp => pb::StreamKind::Rtmp,
        store::StreamKind::Rtsp => pb::StreamKind::Rtsp,
        store::StreamKind::Http => pb::StreamKind::Http,
        store::StreamKind::Https => pb::StreamKind::Https,
        store::StreamKind::Rtp => pb::StreamKind::Rtp,
        store::StreamKind::Quic => pb::StreamKind::Quic,
        store::StreamKind::Udp => pb::StreamKind::Udp,
    }
}

/// What an RTP stream's viewers report in RTCP, with report ages at `now`.
pub fn viewer_reports(v: &store::ViewerReports, now: SystemTime) -> pb::RtpViewerReports {
    let secs = |d: Option<std::time::Duration>| d.map_or(0.0, |d| d.as_secs_f64());
    pb::RtpViewerReports {
        ssrc: v.ssrc,
        clock_rate_hz: v.clock_rate.unwrap_or(0),
        reporting_viewers: u32::try_from(v.reports.len()).unwrap_or(u32::MAX),
        worst_fraction_lost: v.worst_fraction_lost().unwrap_or(0.0),
        worst_jitter_seconds: secs(v.worst_jitter()),
        reports: v
            .reports
            .iter()
            .map(|r| pb::RtpViewerReport {
                reporter_ssrc: r.reporter_ssrc,
                remote_addr: r.remote.to_string(),
                local_port: u32::from(r.local_port),
                fraction_lost: r.fraction_lost,
                cumulative_lost: r.cumulative_lost,
                extended_highest_seq: r.ext_highest_seq,
                jitter_timestamp_units: r.jitter_units,
                jitter_seconds: secs(r.jitter),
                report_age_seconds: store::clock::elapsed(r.reported_at, now).as_secs_f64(),
                window_seconds: r
                    .window
                    .map_or(0, |w| u32::try_from(w.window.as_secs()).unwrap_or(u32::MAX)),
                window_lost: r.window.map_or(0, |w| w.lost),
                window_expected: r.window.map_or(0, |w| w.expected),
            })
            .collect(),
    }
}

/// A viewer, with how long it has been idle at `now`.
pub fn viewer(v: &store::Viewer, now: SystemTime) -> pb::Viewer {
    pb::Viewer {
        address: v.addr.to_string(),
        idle_seconds: store::clock::elapsed(v.last_seen, now).as_secs_f64(),
        served_port: u32::from(v.port),
    }
}

/// Streams in a reply are capped so one message stays small.
pub const MAX_STREAMS: usize = 1_000;
/// Peers in a reply are capped for the same reason.
pub const MAX_PEERS: usize = 50;

pub fn container_network(
    id: &str,
    c: &store::ContainerNetwork,
    reported: Option<SystemTime>,
    now: SystemTime,
) -> pb::ContainerNetwork {
    let mut peers = c.peers.clone();
    // Slowest peers first (by their mean RTT, the figure the reply carries).
    peers.sort_by_key(|p| std::cmp::Reverse(p.rtt_mean_us));
    pb::ContainerNetwork {
        container_id: id.to_owned(),
        windows: c.windows.iter().map(pb::NetworkWindow::from).collect(),
        established_connections: c.established_connections,
        live_streams: c.streams.len() as u32,
        streams: c
            .streams
            .iter()
            .take(MAX_STREAMS)
            .map(|s| live_stream(s, now))
            .collect(),
        peers: peers
            .iter()
            .take(MAX_PEERS)
            .map(|p| pb::PeerNetwork {
                remote_addr: p.remote.to_string(),
                samples: p.samples,
                rtt_mean_us: p.rtt_mean_us,
                jitter_rfc3550_us: p.jitter_rfc3550_us,
                retransmits: p.retransmits,
            })
            .collect(),
        reported_unix_ms: ms(reported),
    }
}

impl From<&store::Pressure> for pb::Pressure {
    fn from(p: &store::Pressure) -> Self {
        Self {
            some_avg10_percent: p.some_avg10,
            full_avg10_percent: p.full_avg10,
            some_avg60_percent: p.some_avg60,
            full_avg60_percent: p.full_avg60,
        }
    }
}

impl From<&store::ContainerStats> for pb::ContainerStats {
    fn from(s: &store::ContainerStats) -> Self {
        Self {
            cpu_usage_cores: s.cpu_usage_cores,
            cpu_throttled_ratio: s.cpu_throttled_ratio,
            cpu_throttled_seconds_total: s.cpu_throttled_seconds_total,
            memory_bytes: s.memory_bytes,
            memory_limit_bytes: s.memory_limit_bytes,
            oom_kills_total: s.oom_kills_total,
            io_read_bytes_per_second: s.io_read_bytes_per_second,
            io_write_bytes_per_second: s.io_write_bytes_per_second,
            pids: s.pids,
            pids_limit: s.pids_limit,
            cpu_pressure: Some((&s.cpu_pressure).into()),
            memory_pressure: Some((&s.memory_pressure).into()),
            io_pressure: Some((&s.io_pressure).into()),
        }
    }
}

impl From<&store::NodeStats> for pb::NodeStats {
    fn from(n: &store::NodeStats) -> Self {
        Self {
            cpu_pressure: Some((&n.cpu_pressure).into()),
            memory_pressure: Some((&n.memory_pressure).into()),
            io_pressure: Some((&n.io_pressure).into()),
            memory_total_bytes: n.memory_total_bytes,
            memory_available_bytes: n.memory_available_bytes,
            load1: n.load1,
            disks: n
                .disks
                .iter()
                .map(|d| pb::Disk {
                    mount_point: d.mount_point.clone(),
                    total_bytes: d.total_bytes,
                    used_bytes: d.used_bytes,
                    used_ratio: d.used_ratio,
                    inodes_used_ratio: d.inodes_used_ratio,
                })
                .collect(),
            nic_drops_total: n.nic_drops_total,
            clock_synchronized: n.clock_synchronized.unwrap_or(false),
            clock_max_error_ms: n.clock_max_error_ms,
        }
    }
}

impl From<&store::GpuDevice> for pb::Gpu {
    fn from(g: &store::GpuDevice) -> Self {
        Self {
            index: g.index,
            uuid: g.uuid.clone(),
            name: g.name.clone(),
            pci_bus_id: g.pci_bus_id.clone(),
            utilization_percent: g.utilization_percent,
            memory_utilization_percent: g.memory_utilization_percent,
            memory_used_bytes: g.memory_used_bytes,
            memory_total_bytes: g.memory_total_bytes,
            temperature_celsius: g.temperature_celsius,
            power_watts: g.power_watts,
            throttle_reasons: g.throttle_reasons.clone(),
            ecc_corrected_total: g.ecc_corrected_total,
            ecc_uncorrected_total: g.ecc_uncorrected_total,
            xids: g
                .xids
                .iter()
                .rev()
                .take(32)
                .rev()
                .map(|x| pb::XidEvent {
                    code: x.code,
                    seen_unix_ms: ms(x.seen_at),
                })
                .collect(),
            row_remap_pending: g.row_remap_pending,
            row_remap_failed: g.row_remap_failed,
            lost: g.lost,
            processes: g
                .processes
                .iter()
                .map(|p| {
                    let s = p.sample.unwrap_or_default();
                    pb::GpuProcess {
                        pid: p.pid,
                        container_id: p.container_id.clone(),
                        used_memory_bytes: p.used_memory_bytes,
                        sampled: p.sample.is_some(),
                        sm_utilization_percent: s.sm_percent,
                        memory_utilization_percent: s.memory_percent,
                        encoder_utilization_percent: s.encoder_percent,
                        decoder_utilization_percent: s.decoder_percent,
                    }
                })
                .collect(),
            unreadable: g.unreadable.iter().map(ToString::to_string).collect(),
            nvml_errors_total: g
                .nvml_errors_total
                .iter()
                .map(|(k, n)| (k.clone(), *n))
                .collect(),
            encoder_sessions: g.encoder_sessions.unwrap_or(0),
            encoder_utilization_percent: g.encoder_utilization_percent.map_or(0.0, f64::from),
            decoder_utilization_percent: g.decoder_utilization_percent.map_or(0.0, f64::from),
            containers: g
                .by_container()
                .into_iter()
                .map(|(id, u)| {
                    // A device assignment carries the kubelet's names; otherwise `gpus` fills
                    // them from the identity table.
                    let names = g.assigned.as_ref().filter(|a| a.key == id);
                    pb::GpuContainerUsage {
                        container_id: id.to_owned(),
                        processes: u.processes,
                        used_memory_bytes: u.used_memory_bytes,
                        sm_utilization_ratio: store::GpuContainerUsage::ratio(u.sm_percent),
                        encoder_utilization_ratio: store::GpuContainerUsage::ratio(
                            u.encoder_percent,
                        ),
                        decoder_utilization_ratio: store::GpuContainerUsage::ratio(
                            u.decoder_percent,
                        ),
                        attribution: gpu_attribution(u.attribution).into(),
                        pod_namespace: names.map(|a| a.namespace.clone()).unwrap_or_default(),
                        pod_name: names.map(|a| a.pod.clone()).unwrap_or_default(),
                        container_name: names.map(|a| a.container.clone()).unwrap_or_default(),
                    }
                })
                .collect(),
            mig_enabled: g.mig_enabled.unwrap_or(false),
            mig_devices: g.mig_devices.iter().map(pb::GpuMigDevice::from).collect(),
        }
    }
}

impl From<&store::GpuMigDevice> for pb::GpuMigDevice {
    fn from(m: &store::GpuMigDevice) -> Self {
        let holder = m.assigned.as_ref();
        let name = |f: fn(&store::GpuAssignment) -> &String| holder.map(f).cloned();
        Self {
            index: m.index,
            uuid: m.uuid.clone(),
            name: m.name.clone(),
            gpu_instance_id: m.gpu_instance_id,
            compute_instance_id: m.compute_instance_id,
            memory_used_bytes: m.memory_used_bytes,
            memory_total_bytes: m.memory_total_bytes,
            container_id: name(|a| &a.key).unwrap_or_default(),
            pod_namespace: name(|a| &a.namespace).unwrap_or_default(),
            pod_name: name(|a| &a.pod).unwrap_or_default(),
            container_name: name(|a| &a.container).unwrap_or_default(),
        }
    }
}

impl From<health::Verdict> for pb::Verdict {
    fn from(v: health::Verdict) -> Self {
        match v {
            health::Verdict::Unknown => Self::Unknown,
            health::Verdict::Healthy => Self::Healthy,
            health::Verdict::Degraded => Self::Degraded,
            health::Verdict::Unhealthy => Self::Unhealthy,
        }
    }
}

impl From<&health::Condition> for pb::Condition {
    fn from(c: &health::Condition) -> Self {
        Self {
            r#type: c.kind.clone(),
            status: match c.status {
                health::ConditionStatus::Pending => pb::ConditionStatus::Pending,
                health::ConditionStatus::Firing => pb::ConditionStatus::Firing,
                health::ConditionStatus::Recovering => pb::ConditionStatus::Recovering,
            } as i32,
            severity: match c.severity {
                health::Severity::Info => pb::Severity::Info,
                health::Severity::Warning => pb::Severity::Warning,
                health::Severity::Critical => pb::Severity::Critical,
            } as i32,
            reason: c.reason.clone(),
            message: c.message.clone(),
            subject: c.subject.clone(),
            evidence: c
                .evidence
                .iter()
                .map(|e| pb::Evidence {
                    metric: e.metric.clone(),
                    value: e.value,
                    threshold: e.threshold,
                    unit: e.unit.clone(),
                    window_seconds: e.window_seconds,
                })
                .collect(),
            since_unix_ms: unix_ms(c.since),
            last_transition_unix_ms: unix_ms(c.last_transition),
        }
    }
}

impl From<&health::SourceReport> for pb::SourceReport {
    fn from(s: &health::SourceReport) -> Self {
        Self {
            name: s.kind.name().to_owned(),
            state: match s.state {
                health::SourceState::Pending => pb::SourceState::Pending,
                health::SourceState::Reporting => pb::SourceState::Reporting,
                health::SourceState::Unavailable => pb::SourceState::Unavailable,
                health::SourceState::Stale => pb::SourceState::Stale,
            } as i32,
            hook: s.provenance.hook.clone(),
            fidelity: s.provenance.fidelity.clone(),
            last_report_unix_ms: ms(s.last_report),
            reason: s.reason.clone(),
        }
    }
}

impl From<Option<&drain::Drain>> for pb::DrainInfo {
    fn from(d: Option<&drain::Drain>) -> Self {
        match d {
            None => Self {
                state: pb::DrainState::NotDraining as i32,
                ..Default::default()
            },
            Some(d) => Self {
                state: pb::DrainState::Draining as i32,
                requesters: d
                    .requesters
                    .iter()
                    .map(|r| pb::DrainRequester {
                        requested_by: r.requested_by.clone(),
                        identity: r.identity.clone(),
                        reason: r.reason.clone(),
                        requested_unix_ms: unix_ms(r.at),
                    })
                    .collect(),
                started_unix_ms: unix_ms(d.started),
                deadline_unix_ms: d.deadline.map_or(0, unix_ms),
                requesters_not_kept: d.requesters_not_kept,
                state_problem: d.problem.clone().unwrap_or_default(),
            },
        }
    }
}

/// `ListGpus`: the GPUs the store holds, and, when the GPU source is not reporting, why. The
/// store's own reason comes first (it is current); a source the store still holds as pending
/// may have been judged by the health engine ("no first report within ..."), whose last report
/// gives the reason then.
pub fn gpus(snap: &store::Snapshot, report: &health::HealthReport) -> pb::ListGpusResponse {
    let mut gpus: Vec<pb::Gpu> = snap
        .gpus
        .as_ref()
        .map(|g| g.gpus.iter().map(pb::Gpu::from).collect())
        .unwrap_or_default();
    // Names of the containers the runtime knows, where the usage does not carry its own.
    if let Some(meta) = snap.containers.as_deref() {
        for u in gpus.iter_mut().flat_map(|g| g.containers.iter_mut()) {
            if let Some(m) = meta.get(&u.container_id).filter(|_| u.pod_name.is_empty()) {
                u.pod_namespace.clone_from(&m.pod_namespace);
                u.pod_name.clone_from(&m.pod_name);
                u.container_name.clone_from(&m.name);
            }
        }
    }
    let judged = || {
        report
            .sources
            .iter()
            .find(|s| s.kind == store::SourceKind::Gpu && !s.reason.is_empty())
            .map(|s| s.reason.clone())
    };
    let reason = match snap.sources.get(&store::SourceKind::Gpu) {
        Some(store::SourceStatus::Reporting { .. }) => String::new(),
        Some(store::SourceStatus::Unavailable { reason }) => reason.clone(),
        Some(store::SourceStatus::Pending) => {
            judged().unwrap_or_else(|| "the GPU source has not reported yet".to_owned())
        }
        None => "the GPU source is disabled (gpu.enabled = false)".to_owned(),
    };
    pb::ListGpusResponse {
        gpus,
        available: reason.is_empty(),
        reason,
    }
}

/// The wire form of a health report plus the drain state.
pub fn node_health(
    node: &str,
    report: &health::HealthReport,
    drain: Option<&drain::Drain>,
) -> pb::NodeHealthReport {
    pb::NodeHealthReport {
        node: node.to_owned(),
        verdict: pb::Verdict::from(report.verdict) as i32,
        drain_recommended: report.drain_recommended,
        causes: report.causes().map(pb::Condition::from).collect(),
        conditions: report.conditions.iter().map(pb::Condition::from).collect(),
        sources: report.sources.iter().map(pb::SourceReport::from).collect(),
        drain: Some(drain.into()),
        evaluated_unix_ms: unix_ms(report.evaluated_at),
        unknown_reason: report.unknown_reason.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn viewer_reports_keep_each_field_and_age_at_now() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let report = |reporter, fraction_lost, jitter_ms| store::ViewerReport {
            reporter_ssrc: reporter,
            remote: ([10, 0, 0, 2], 6001).into(),
            local_port: 5005,
            fraction_lost,
            cumulative_lost: -1,
            ext_highest_seq: 70_000,
            jitter_units: 80,
            jitter: Some(Duration::from_millis(jitter_ms)),
            reported_at: now - Duration::from_secs(2),
            window: Some(store::WindowLoss {
                window: store::Window::from_secs(300),
                lost: 7,
                expected: 700,
            }),
        };
        let v = store::ViewerReports {
            ssrc: 42,
            clock_rate: Some(8_000),
            reports: vec![report(1, 0.5, 10), report(2, 0.25, 30)],
        };
        let pb = viewer_reports(&v, now);
        assert_eq!(
            (pb.ssrc, pb.clock_rate_hz, pb.reporting_viewers),
            (42, 8_000, 2)
        );
        assert_eq!(pb.worst_fraction_lost, 0.5);
        assert_eq!(pb.worst_jitter_seconds, 0.03);
        let r = &pb.reports[0];
        assert_eq!(r.remote_addr, "10.0.0.2:6001");
        assert_eq!((r.local_port, r.cumulative_lost), (5005, -1));
        assert_eq!(
            (r.extended_highest_seq, r.jitter_timestamp_units),
            (70_000, 80)
        );
        assert_eq!((r.jitter_seconds, r.report_age_seconds), (0.01, 2.0));
        assert_eq!(
            (r.window_seconds, r.window_lost, r.window_expected),
            (300, 7, 700)
        );
    }
}
