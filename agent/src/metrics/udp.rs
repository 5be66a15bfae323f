//! UDP and RTP: live streams per container (what a drain waits for), RTP loss and jitter per
//! container over the source's windows (10 s, 1 min, 5 min), and the eBPF programs' counters.
//!
//! Per-stream numbers stay out: a stream is a connection-like thing whose label set would grow
//! without bound. Windowed totals are gauges (they go down as old packets leave the window);
//! the kernel counters are counters (they only grow while the programs stay loaded).

use super::{container_labels, Kind, Metrics};
use crate::sources::udp::model::{ContainerUdp, UdpCounters, UdpSnapshot, WindowStats};

/// Every family this module can write, declared on each scrape so that dashboards find the
/// names even before the first stream.
const FAMILIES: &[(&str, Kind, &str)] = &[
    (
        "nodeward_container_live_streams",
        Kind::Gauge,
        "Live RTP streams plus long-lived UDP flows (SRT, QUIC) of the container: what a drain waits for.",
    ),
    (
        "nodeward_container_rtp_streams",
        Kind::Gauge,
        "RTP streams of the container the agent tracks, live or idle.",
    ),
    (
        "nodeward_container_udp_flows",
        Kind::Gauge,
        "UDP flows of the container the agent tracks, live or idle.",
    ),
    (
        "nodeward_container_rtp_jitter_seconds",
        Kind::Gauge,
        "Highest current RFC 3550 interarrival jitter among the container's live RTP streams of known clock rate, in seconds.",
    ),
    (
        "nodeward_container_udp_window_packets",
        Kind::Gauge,
        "UDP packets of the container within the window.",
    ),
    (
        "nodeward_container_udp_window_bytes",
        Kind::Gauge,
        "UDP bytes of the container within the window.",
    ),
    (
        "nodeward_container_rtp_window_received_packets",
        Kind::Gauge,
        "RTP packets the container received within the window.",
    ),
    (
        "nodeward_container_rtp_window_expected_packets",
        Kind::Gauge,
        "RTP packets the container's streams should have received within the window (from sequence numbers).",
    ),
    (
        "nodeward_container_rtp_window_lost_packets",
        Kind::Gauge,
        "RTP packets lost within the window (expected minus received).",
    ),
    (
        "nodeward_container_rtp_window_reordered_packets",
        Kind::Gauge,
        "RTP packets that arrived out of order within the window.",
    ),
    (
        "nodeward_container_rtp_window_loss_ratio",
        Kind::Gauge,
        "RTP packets lost over packets expected within the window, 0..1; absent when nothing was expected.",
    ),
    (
        "nodeward_container_rtp_window_jitter_mean_seconds",
        Kind::Gauge,
        "Mean RFC 3550 jitter of the container's RTP packets within the window, in seconds.",
    ),
    (
        "nodeward_container_rtp_window_jitter_max_seconds",
        Kind::Gauge,
        "Highest RFC 3550 jitter any live stream of the container had within the window, in seconds.",
    ),
    (
        "nodeward_container_udp_window_ipdv_mean_seconds",
        Kind::Gauge,
        "Mean packet delay variation (|difference of inter-arrival times|, RFC 3393 style) of the container's UDP flows within the window, in seconds.",
    ),
];

fn help(name: &str) -> &'static str {
    FAMILIES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map_or("", |(_, _, h)| h)
}

/// Writes one UDP snapshot.
pub fn encode(snapshot: &UdpSnapshot, m: &mut Metrics) {
    for (name, kind, help) in FAMILIES {
        m.declare(name, *kind, help);
    }
    m.gauge(
        "nodeward_udp_hook_info",
        "The kernel hook the UDP/RTP source runs on, as a label; the value is always 1.",
        &[("hook", &snapshot.hook)],
        1.0,
    );
    encode_counters(&snapshot.counters, m);
    for container in &snapshot.containers {
        encode_container(container, m);
    }
}

fn encode_container(c: &ContainerUdp, m: &mut Metrics) {
    let (cgroup, container_id) = container_labels(c.cgroup_id, c.cgroup_path.as_deref());
    let labels = [
        ("cgroup", cgroup.as_str()),
        ("container_id", container_id.as_str()),
    ];
    let gauge =
        |m: &mut Metrics, name: &'static str, value: f64| m.gauge(name, help(name), &labels, value);
    gauge(
        m,
        "nodeward_container_live_streams",
        f64::from(c.live_streams),
    );
    gauge(m, "nodeward_container_rtp_streams", c.streams.len() as f64);
    gauge(m, "nodeward_container_udp_flows", c.flows.len() as f64);
    let jitter = c
        .streams
        .iter()
        .filter(|s| s.live)
        .filter_map(|s| s.jitter_seconds)
        .fold(None, |max: Option<f64>, j| {
            Some(max.map_or(j, |m| m.max(j)))
        });
    if let Some(j) = jitter {
        gauge(m, "nodeward_container_rtp_jitter_seconds", j);
    }
    for w in &c.windows {
        encode_window(&labels, w, m);
    }
}

fn encode_window(container: &[(&str, &str); 2], w: &WindowStats, m: &mut Metrics) {
    let window = format!("{}s", w.window.as_secs());
    let labels = [container[0], container[1], ("window", window.as_str())];
    let mut gauge = |name: &'static str, value: f64| m.gauge(name, help(name), &labels, value);
    gauge(
        "nodeward_container_udp_window_packets",
        w.udp_packets as f64,
    );
    gauge("nodeward_container_udp_window_bytes", w.udp_bytes as f64);
    gauge(
        "nodeward_container_rtp_window_received_packets",
        w.rtp_received as f64,
    );
    gauge(
        "nodeward_container_rtp_window_expected_packets",
        w.rtp_expected as f64,
    );
    gauge(
        "nodeward_container_rtp_window_lost_packets",
        w.rtp_lost as f64,
    );
    gauge(
        "nodeward_container_rtp_window_reordered_packets",
        w.rtp_reordered as f64,
    );
    // Absent rather than 0 where there was nothing to measure: 0 would read as "perfect".
    let optional = [
        ("nodeward_container_rtp_window_loss_ratio", w.rtp_loss_ratio),
        (
            "nodeward_container_rtp_window_jitter_mean_seconds",
            w.mean_jitter_seconds,
        ),
        (
            "nodeward_container_rtp_window_jitter_max_seconds",
            w.max_jitter_seconds,
        ),
        (
            "nodeward_container_udp_window_ipdv_mean_seconds",
            w.mean_ipdv_seconds,
        ),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            gauge(name, v);
        }
    }
}

fn encode_counters(c: &UdpCounters, m: &mut Metrics) {
    let counters: [(&'static str, &'static str, u64); 9] = [
        (
            "nodeward_udp_packets_total",
            "UDP packets the agent's eBPF programs saw, both directions, since they were loaded.",
            c.udp_packets,
        ),
        (
            "nodeward_rtp_packets_total",
            "Of those, packets recognised as RTP.",
            c.rtp_packets,
        ),
        (
            "nodeward_rtcp_packets_total",
            "Of those, packets recognised as RTCP.",
            c.rtcp_packets,
        ),
        (
            "nodeward_stun_packets_total",
            "Of those, packets recognised as STUN.",
            c.stun_packets,
        ),
        (
            "nodeward_udp_truncated_packets_total",
            "UDP packets too short to hold the header they claimed (not parsed further).",
            c.truncated,
        ),
        (
            "nodeward_udp_fragmented_packets_total",
            "IP fragments seen (not parsed: only the first fragment carries the UDP header).",
            c.fragments,
        ),
        (
            "nodeward_udp_flows_created_total",
            "UDP flows the agent started tracking.",
            c.flows_created,
        ),
        (
            "nodeward_rtp_streams_created_total",
            "RTP streams (flow and SSRC) the agent started tracking.",
            c.streams_created,
        ),
        (
            "nodeward_udp_not_tracked_total",
            "Flows or streams the kernel maps could not take (insert failed): samples the agent dropped.",
            c.not_tracked,
        ),
    ];
    for (name, help, value) in counters {
        m.counter(name, help, &[], value as f64);
    }
    m.gauge(
        "nodeward_udp_flows_tracked",
        "UDP flows in the kernel map now.",
        &[],
        c.flows_tracked as f64,
    );
    m.gauge(
        "nodeward_rtp_streams_tracked",
        "RTP streams in the kernel map now.",
        &[],
        c.streams_tracked as f64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::udp::model::{Endpoint, StreamQuality};

    fn stream(live: bool, jitter: Option<f64>) -> StreamQuality {
        StreamQuality {
            endpoint: Endpoint {
                local: [10, 0, 0, 1].into(),
                local_port: 5004,
                remote: [10, 0, 0, 2].into(),
                remote_port: 40000,
                direction: "ingress",
            },
            ssrc: 1,
            payload_type: 96,
            clock_rate: Some(90_000),
            packets: 100,
            bytes: 120_000,
            expected: 102,
            lost: 2,
            reordered: 0,
            jitter_seconds: jitter,
            mean_jitter_seconds: jitter,
            max_jitter_seconds: jitter,
            timestamp_step: None,
            payload_type_changes: 0,
            sequence_wraps: 0,
            age_seconds: 10.0,
            idle_seconds: 0.0,
            live,
        }
    }

    fn snapshot() -> UdpSnapshot {
        let id = "4f1c3ba5e8a5a1b6f3d6a0c2c8f9e7d6b5a4c3b2a1f0e9d8c7b6a5f4e3d2c1b0";
        UdpSnapshot {
            hook: "cgroup_skb".to_owned(),
            containers: vec![
                ContainerUdp {
                    cgroup_id: 7,
                    cgroup_path: Some(format!("/kubepods.slice/cri-containerd-{id}.scope")),
                    live_streams: 2,
                    // The idle stream's higher jitter must not count: it is not live.
                    streams: vec![stream(true, Some(0.004)), stream(false, Some(0.5))],
                    flows: vec![],
                    windows: vec![WindowStats {
                        window: crate::store::Window::from_secs(10),
                        udp_packets: 500,
                        udp_bytes: 600_000,
                        rtp_received: 490,
                        rtp_expected: 500,
                        rtp_lost: 10,
                        rtp_loss_ratio: Some(0.02),
                        rtp_reordered: 1,
                        mean_jitter_seconds: Some(0.003),
                        max_jitter_seconds: Some(0.006),
                        mean_ipdv_seconds: None,
                    }],
                    totals: crate::store::NetworkTotals::default(),
                },
                ContainerUdp {
                    cgroup_id: 9,
                    cgroup_path: None,
                    live_streams: 0,
                    streams: vec![],
                    flows: vec![],
                    windows: vec![WindowStats::new(crate::store::Window::from_secs(60))],
                    totals: crate::store::NetworkTotals::default(),
                },
            ],
            counters: UdpCounters {
                udp_packets: 1000,
                not_tracked: 3,
                ..UdpCounters::default()
            },
        }
    }

    #[test]
    fn containers_are_labelled_by_cgroup_and_container_id_and_windows_by_length() {
        let mut m = Metrics::new();
        encode(&snapshot(), &mut m);
        let text = m.render();
        let id = "4f1c3ba5e8a5a1b6f3d6a0c2c8f9e7d6b5a4c3b2a1f0e9d8c7b6a5f4e3d2c1b0";
        let labels =
            format!("cgroup=\"/kubepods.slice/cri-containerd-{id}.scope\",container_id=\"{id}\"");
        for line in [
            format!("nodeward_container_live_streams{{{labels}}} 2"),
            format!("nodeward_container_rtp_jitter_seconds{{{labels}}} 0.004"),
            format!("nodeward_container_rtp_window_lost_packets{{{labels},window=\"10s\"}} 10"),
            format!("nodeward_container_rtp_window_loss_ratio{{{labels},window=\"10s\"}} 0.02"),
            format!(
                "nodeward_container_rtp_window_jitter_max_seconds{{{labels},window=\"10s\"}} 0.006"
            ),
            "nodeward_container_live_streams{cgroup=\"id:9\",container_id=\"\"} 0".to_owned(),
            "nodeward_udp_not_tracked_total 3".to_owned(),
            "nodeward_udp_packets_total 1000".to_owned(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in:\n{text}"
            );
        }
    }

    #[test]
    fn unmeasured_quantities_are_absent_not_zero() {
        let mut m = Metrics::new();
        encode(&snapshot(), &mut m);
        let text = m.render();
        // Container 9 expected nothing in its window: no loss ratio, no jitter for it.
        assert!(
            !text
                .lines()
                .any(|l| l.contains("id:9") && (l.contains("loss_ratio") || l.contains("jitter"))),
            "{text}"
        );
        // No flow had an IPDV: the family is declared but has no sample.
        assert!(text.contains("# TYPE nodeward_container_udp_window_ipdv_mean_seconds gauge"));
        assert!(!text.contains("nodeward_container_udp_window_ipdv_mean_seconds{"));
    }

    #[test]
    fn every_family_has_help() {
        let mut m = Metrics::new();
        encode(&snapshot(), &mut m);
        let text = m.render();
        for name in m.names() {
            let help = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("# HELP {name} ")))
                .unwrap_or_default();
            assert!(help.len() > 10, "{name} has no real help: {help:?}");
        }
    }
}
