//! Human-readable tables for the client subcommands (`--json` is in `json`).

use std::{fmt::Write as _, time::Duration};

use crate::api::pb;

fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".to_owned();
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs());
    humantime::format_rfc3339_seconds(t).to_string()
}

fn name<E: TryFrom<i32>>(v: i32, f: impl Fn(&E) -> &'static str) -> String {
    E::try_from(v)
        .map(|e| f(&e).to_owned())
        .unwrap_or_else(|_| v.to_string())
}

/// Strips the enum's type prefix: `VERDICT_HEALTHY` → `HEALTHY`.
fn short(full: String, prefix: &str) -> String {
    full.strip_prefix(prefix).map(str::to_owned).unwrap_or(full)
}

fn verdict(v: i32) -> String {
    short(name(v, pb::Verdict::as_str_name), "VERDICT_")
}
fn severity(v: i32) -> String {
    short(name(v, pb::Severity::as_str_name), "SEVERITY_")
}
fn cond_status(v: i32) -> String {
    short(
        name(v, pb::ConditionStatus::as_str_name),
        "CONDITION_STATUS_",
    )
}
fn source_state(v: i32) -> String {
    short(name(v, pb::SourceState::as_str_name), "SOURCE_STATE_")
}
fn drain_state(v: i32) -> String {
    short(name(v, pb::DrainState::as_str_name), "DRAIN_STATE_")
}

pub fn drain_info(d: Option<&pb::DrainInfo>) -> String {
    let mut out = String::new();
    let Some(d) = d else { return out };
    let _ = writeln!(out, "drain:     {}", drain_state(d.state));
    if d.state == pb::DrainState::Draining as i32 {
        let _ = writeln!(out, "  started:  {}", time(d.started_unix_ms));
        if d.deadline_unix_ms == 0 {
            let _ = writeln!(
                out,
                "  deadline: none (not ready until cancelled or begun anew)"
            );
        } else {
            let _ = writeln!(out, "  deadline: {}", time(d.deadline_unix_ms));
        }
        if !d.state_problem.is_empty() {
            let _ = writeln!(out, "  problem:  {}", d.state_problem);
        }
        for r in &d.requesters {
            let _ = writeln!(
                out,
                "  by:       {} ({}) at {}: {}",
                r.requested_by,
                r.identity,
                time(r.requested_unix_ms),
                r.reason
            );
        }
        if d.requesters_not_kept > 0 {
            let _ = writeln!(
                out,
                "  by:       {} more join(s), not listed",
                d.requesters_not_kept
            );
        }
    }
    out
}

pub fn health(r: &pb::GetNodeHealthResponse) -> String {
    let mut out = String::new();
    let Some(h) = &r.health else {
        return "no health report\n".to_owned();
    };
    let _ = writeln!(out, "node:      {}", h.node);
    let recommended = if h.drain_recommended {
        " (drain recommended)"
    } else {
        ""
    };
    let _ = writeln!(out, "verdict:   {}{recommended}", verdict(h.verdict));
    if !h.unknown_reason.is_empty() {
        let _ = writeln!(out, "  why:     {}", h.unknown_reason);
    }
    let _ = writeln!(out, "evaluated: {}", time(h.evaluated_unix_ms));
    out.push_str(&drain_info(h.drain.as_ref()));
    let _ = writeln!(out, "sources:");
    if h.sources.is_empty() {
        let _ = writeln!(out, "  (none enabled)");
    }
    for s in &h.sources {
        let detail = if s.reason.is_empty() {
            format!("{} [{}]", s.hook, s.fidelity)
        } else {
            s.reason.clone()
        };
        let _ = writeln!(
            out,
            "  {:<8} {:<11} last {}  {}",
            s.name,
            source_state(s.state),
            time(s.last_report_unix_ms),
            detail
        );
    }
    let _ = writeln!(out, "conditions:");
    if h.conditions.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for c in &h.conditions {
        let _ = writeln!(
            out,
            "  {:<10} {:<8} {:<24} {}  since {}",
            cond_status(c.status),
            severity(c.severity),
            c.r#type,
            c.message,
            time(c.since_unix_ms)
        );
    }
    out
}

pub fn watch_line(m: &pb::WatchNodeHealthResponse) -> String {
    let Some(h) = &m.health else {
        return "(empty message)".to_owned();
    };
    let causes: Vec<&str> = h.causes.iter().map(|c| c.r#type.as_str()).collect();
    format!(
        "{} rev={} verdict={} drain={}{} causes=[{}]{}",
        time(h.evaluated_unix_ms),
        m.revision,
        verdict(h.verdict),
        h.drain
            .as_ref()
            .map(|d| drain_state(d.state))
            .unwrap_or_default(),
        if h.drain_recommended {
            " drain_recommended"
        } else {
            ""
        },
        causes.join(","),
        if m.heartbeat { " (heartbeat)" } else { "" }
    )
}

fn ms(us: u64) -> String {
    format!("{:.1}ms", us as f64 / 1000.0)
}

pub fn containers(r: &pb::ListContainersResponse) -> String {
    let mut out = format!(
        "{:<16} {:<28} {:<16} {:<10} {:<20} {:>6} {:>10} {:>9} {:>9} {:>8} {:>7}\n",
        "NAMESPACE",
        "POD",
        "CONTAINER",
        "QOS",
        "ID",
        "CPU",
        "MEMORY",
        "P99(1m)",
        "JITTER",
        "RETX/s",
        "STREAMS"
    );
    for c in &r.containers {
        let stats = c.stats.as_ref();
        let w = c
            .network
            .as_ref()
            .and_then(|n| n.windows.iter().find(|w| w.window_seconds == 60));
        let _ = writeln!(
            out,
            "{:<16} {:<28} {:<16} {:<10} {:<20} {:>6} {:>10} {:>9} {:>9} {:>8} {:>7}",
            or_dash(&c.pod_namespace),
            or_dash(&c.pod_name),
            or_dash(&c.name),
            qos(c.qos_class()),
            c.id.chars().take(20).collect::<String>(),
            stats
                .map(|s| format!("{:.2}", s.cpu_usage_cores))
                .unwrap_or_else(|| "-".into()),
            stats
                .map(|s| format!("{}Mi", s.memory_bytes / (1 << 20)))
                .unwrap_or_else(|| "-".into()),
            w.map(|w| ms(w.rtt_p99_us)).unwrap_or_else(|| "-".into()),
            w.map(|w| ms(w.jitter_rfc3550_us))
                .unwrap_or_else(|| "-".into()),
            w.map(|w| format!("{:.1}", w.retransmits_per_second))
                .unwrap_or_else(|| "-".into()),
            c.network
                .as_ref()
                .map(|n| n.live_streams.to_string())
                .unwrap_or_else(|| "-".into()),
        );
    }
    if r.containers.is_empty() {
        out.push_str("(no containers)\n");
    }
    out
}

fn qos(q: pb::QosClass) -> &'static str {
    match q {
        pb::QosClass::Unspecified => "-",
        pb::QosClass::Guaranteed => "Guaranteed",
        pb::QosClass::Burstable => "Burstable",
        pb::QosClass::BestEffort => "BestEffort",
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

pub fn gpus(r: &pb::ListGpusResponse) -> String {
    if !r.available {
        return format!("no GPU source on this node: {}\n", r.reason);
    }
    let mut out = format!(
        "{:<5} {:<24} {:<22} {:>5} {:>16} {:>6} {:>7}  {}\n",
        "INDEX", "UUID", "NAME", "UTIL", "MEMORY", "TEMP", "POWER", "HEALTH"
    );
    for g in &r.gpus {
        let mut health = Vec::new();
        if g.lost {
            health.push("LOST".to_owned());
        }
        if g.ecc_uncorrected_total > 0 {
            health.push(format!("ecc_uncorrected={}", g.ecc_uncorrected_total));
        }
        if let Some(x) = g.xids.last() {
            health.push(format!("last_xid={}", x.code));
        }
        if g.row_remap_pending > 0 || g.row_remap_failed {
            health.push(format!(
                "row_remap pending={} failed={}",
                g.row_remap_pending, g.row_remap_failed
            ));
        }
        health.extend(g.throttle_reasons.iter().cloned());
        if !g.unreadable.is_empty() {
            health.push(format!("unreadable={}", g.unreadable.join(",")));
        }
        let _ = writeln!(
            out,
            "{:<5} {:<24} {:<22} {:>4.0}% {:>16} {:>5.0}C {:>6.0}W  {}",
            g.index,
            g.uuid.chars().take(24).collect::<String>(),
            g.name.chars().take(22).collect::<String>(),
            g.utilization_percent,
            format!(
                "{}/{}Mi",
                g.memory_used_bytes >> 20,
                g.memory_total_bytes >> 20
            ),
            g.temperature_celsius,
            g.power_watts,
            if health.is_empty() {
                "ok".to_owned()
            } else {
                health.join(" ")
            }
        );
        for m in &g.mig_devices {
            let _ = writeln!(out, "  {}", mig_device(m));
        }
    }
    out
}

/// One MIG device under its GPU: identity, instances, memory and the pod holding it.
fn mig_device(m: &pb::GpuMigDevice) -> String {
    let id = |v: Option<u32>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let memory = match (m.memory_used_bytes, m.memory_total_bytes) {
        (Some(used), Some(total)) => format!("{}/{}Mi", used >> 20, total >> 20),
        _ => "-".to_owned(),
    };
    let holder = if m.pod_name.is_empty() {
        "unassigned".to_owned()
    } else {
        format!("{}/{} ({})", m.pod_namespace, m.pod_name, m.container_name)
    };
    format!(
        "mig {} {} gi={} ci={} {memory} {holder}",
        m.index,
        or_dash(&m.uuid),
        id(m.gpu_instance_id),
        id(m.compute_instance_id),
    )
}

pub fn drain_status(r: &pb::GetDrainStatusResponse) -> String {
    let mut out = drain_info(r.drain.as_ref());
    let _ = writeln!(out, "ready:     {} ({})", r.ready_to_drain, r.ready_reason);
    // `ready_reason` says which network feed is missing.
    let known = if r.streams_known {
        ""
    } else {
        " (unknown: not every network feed has reported; see ready)"
    };
    let listed = if r.truncated {
        format!(
            " ({} listed)",
            r.containers.iter().map(|c| c.streams.len()).sum::<usize>()
        )
    } else {
        String::new()
    };
    let _ = writeln!(out, "streams:   {}{known}{listed}", r.live_streams);
    for c in &r.containers {
        // What a controller evicts: the pod, and which of its containers holds the drain.
        let pod = match (c.pod_name.is_empty(), c.container_name.is_empty()) {
            (false, false) => format!(" {}/{} ({})", c.pod_namespace, c.pod_name, c.container_name),
            (false, true) => format!(" {}/{}", c.pod_namespace, c.pod_name),
            (true, false) => format!(" ({})", c.container_name),
            (true, true) => String::new(),
        };
        let _ = writeln!(
            out,
            "  {}{pod}: {} stream(s), {} established connection(s)",
            c.container_id, c.live_streams, c.established_connections
        );
        for s in &c.streams {
            // Which streams the drain waits for, and which are only listed (a dependency, an
            // excluded port).
            let holds = if s.holds_drain {
                "holds drain"
            } else {
                "does not hold"
            };
            let _ = writeln!(
                out,
                "    {} {} port {} {} <- {} age {:.0}s, {holds}",
                short(
                    name(s.protocol, pb::StreamProtocol::as_str_name),
                    "STREAM_PROTOCOL_"
                ),
                short(name(s.kind, pb::StreamKind::as_str_name), "STREAM_KIND_"),
                s.local_port,
                s.local_addr,
                s.remote_addr,
                s.age_seconds
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_containers_table_shows_the_qos_class() {
        let r = pb::ListContainersResponse {
            containers: vec![pb::Container {
                id: "abc".to_owned(),
                name: "app".to_owned(),
                pod_name: "web-0".to_owned(),
                pod_namespace: "prod".to_owned(),
                qos_class: pb::QosClass::Burstable.into(),
                ..Default::default()
            }],
        };
        let table = containers(&r);
        let row: Vec<&str> = table
            .lines()
            .nth(1)
            .expect("a row")
            .split_whitespace()
            .collect();
        assert_eq!(
            row[..5],
            ["prod", "web-0", "app", "Burstable", "abc"],
            "{table}"
        );
    }

    #[test]
    fn each_mig_device_is_a_line_under_its_gpu_with_its_pod() {
        let r = pb::ListGpusResponse {
            available: true,
            gpus: vec![pb::Gpu {
                uuid: "GPU-p".to_owned(),
                mig_enabled: true,
                mig_devices: vec![
                    pb::GpuMigDevice {
                        index: 0,
                        uuid: "MIG-a".to_owned(),
                        gpu_instance_id: Some(1),
                        compute_instance_id: Some(0),
                        memory_used_bytes: Some(1 << 30),
                        memory_total_bytes: Some(10 << 30),
                        pod_namespace: "media".to_owned(),
                        pod_name: "t-0".to_owned(),
                        container_name: "ffmpeg".to_owned(),
                        ..Default::default()
                    },
                    pb::GpuMigDevice {
                        index: 1,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = gpus(&r);
        let lines: Vec<&str> = text.lines().skip(2).collect();
        assert_eq!(
            lines,
            [
                "  mig 0 MIG-a gi=1 ci=0 1024/10240Mi media/t-0 (ffmpeg)",
                "  mig 1 - gi=- ci=- - unassigned"
            ],
            "{text}"
        );
    }

    #[test]
    fn drain_status_names_the_pod_and_container_holding_it() {
        let r = pb::GetDrainStatusResponse {
            containers: vec![
                pb::ContainerStreams {
                    container_id: "abc".to_owned(),
                    pod_name: "live-0".to_owned(),
                    pod_namespace: "edu".to_owned(),
                    container_name: "packager".to_owned(),
                    live_streams: 1,
                    streams: vec![
                        pb::LiveStream {
                            protocol: pb::StreamProtocol::Tcp.into(),
                            kind: pb::StreamKind::Rtmp.into(),
                            local_port: 1935,
                            local_addr: "0.0.0.0:1935".to_owned(),
                            remote_addr: "10.0.0.9:50000".to_owned(),
                            age_seconds: 3.0,
                            holds_drain: true,
                            ..Default::default()
                        },
                        // Its database connection: listed, not waited for.
                        pb::LiveStream {
                            protocol: pb::StreamProtocol::Tcp.into(),
                            kind: pb::StreamKind::Tcp.into(),
                            local_port: 41000,
                            local_addr: "0.0.0.0:41000".to_owned(),
                            remote_addr: "10.0.0.7:5432".to_owned(),
                            age_seconds: 2.0,
                            holds_drain: false,
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
                pb::ContainerStreams {
                    container_id: "/system.slice/relay.service".to_owned(),
                    container_name: "relay.service".to_owned(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let text = drain_status(&r);
        assert!(
            text.contains("abc edu/live-0 (packager): 1 stream(s)"),
            "{text}"
        );
        assert!(
            text.contains("TCP RTMP port 1935 0.0.0.0:1935 <- 10.0.0.9:50000 age 3s, holds drain"),
            "{text}"
        );
        assert!(
            text.contains(
                "TCP TCP port 41000 0.0.0.0:41000 <- 10.0.0.7:5432 age 2s, does not hold"
            ),
            "{text}"
        );
        assert!(
            text.contains("/system.slice/relay.service (relay.service): 0 stream(s)"),
            "{text}"
        );
    }
}
