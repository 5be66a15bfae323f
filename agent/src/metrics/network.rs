//! Per-container network figures from the store (the same numbers the gRPC API and the health
//! rules read): TCP RTT as a histogram, TCP and RTP counters, the live streams a drain waits
//! for, and the current jitter estimates.
//!
//! Counters are totals since the agent started, so `rate()` and `increase()` work and a scrape
//! missed is no figure lost; only what is a level now (established connections, streams,
//! jitter) is a gauge.

use super::{container_labels, rtt, Kind, Metrics};
use crate::store::{ContainerNetwork, NetworkTotals, Snapshot, StreamDirection, StreamProtocol};

const RTT: &str = "nodeward_tcp_rtt_seconds";
const RTT_HELP: &str =
    "TCP round-trip times the kernel measured on the container's connections, in seconds.";
const RETRANSMITS: &str = "nodeward_tcp_retransmits_total";
const RETRANSMITS_HELP: &str = "TCP segments the container retransmitted.";
const SEGMENTS: &str = "nodeward_tcp_segments_sent_total";
const SEGMENTS_HELP: &str = "TCP segments the container sent, retransmissions included.";
const OPENED: &str = "nodeward_tcp_connections_opened_total";
const OPENED_HELP: &str =
    "TCP connections of the container that reached ESTABLISHED (connected or accepted).";
const CLOSED: &str = "nodeward_tcp_connections_closed_total";
const CLOSED_HELP: &str = "Established TCP connections of the container that closed.";
const ESTABLISHED: &str = "nodeward_tcp_established_connections";
const ESTABLISHED_HELP: &str = "Established TCP connections of the container now.";
const TCP_JITTER: &str = "nodeward_tcp_jitter_seconds";
const TCP_JITTER_HELP: &str = "Jitter of the container's TCP round-trip times over the shortest network window, in seconds; absent without RTT samples in it.";
const STREAMS: &str = "nodeward_container_live_streams";
const STREAMS_HELP: &str = "Live streams of the container now, by protocol: established TCP connections it serves (accepted, or of unknown direction; not its outbound ones) and live RTP or long-lived UDP flows; their sum is what a drain waits for by default.";
const RTP_PACKETS: &str = "nodeward_container_rtp_received_packets_total";
const RTP_PACKETS_HELP: &str = "RTP packets the container received.";
const RTP_LOST: &str = "nodeward_container_rtp_lost_packets_total";
const RTP_LOST_HELP: &str = "RTP packets the container's streams lost (sequence-number gaps).";
const RTP_JITTER: &str = "nodeward_container_rtp_jitter_seconds";
const RTP_JITTER_HELP: &str = "RFC 3550 interarrival jitter of the container's RTP streams over the shortest network window, in seconds; absent without RTP packets in it.";

/// Every family, declared on each scrape so that dashboards find the names before the first
/// connection.
const FAMILIES: &[(&str, Kind, &str)] = &[
    (RTT, Kind::Histogram, RTT_HELP),
    (RETRANSMITS, Kind::Counter, RETRANSMITS_HELP),
    (SEGMENTS, Kind::Counter, SEGMENTS_HELP),
    (OPENED, Kind::Counter, OPENED_HELP),
    (CLOSED, Kind::Counter, CLOSED_HELP),
    (ESTABLISHED, Kind::Gauge, ESTABLISHED_HELP),
    (TCP_JITTER, Kind::Gauge, TCP_JITTER_HELP),
    (STREAMS, Kind::Gauge, STREAMS_HELP),
    (RTP_PACKETS, Kind::Counter, RTP_PACKETS_HELP),
    (RTP_LOST, Kind::Counter, RTP_LOST_HELP),
    (RTP_JITTER, Kind::Gauge, RTP_JITTER_HELP),
];

/// A container the TCP source has seen: it gets the TCP families. Counters only grow, so a
/// container that qualified once keeps its series while the agent runs.
fn has_tcp(c: &ContainerNetwork) -> bool {
    let t = &c.totals;
    t.rtt.count > 0 || t.tcp_segments_out > 0 || t.tcp_connections_opened > 0
}

/// The current jitter estimates, TCP and RTP, in microseconds: the shortest window's, where it
/// had samples.
fn jitter_us(c: &ContainerNetwork) -> (Option<u64>, Option<u64>) {
    let Some(w) = c.windows.first() else {
        return (None, None);
    };
    (
        (w.samples > 0).then_some(w.jitter_rfc3550_us),
        (w.rtp_packets > 0).then_some(w.rtp_jitter_us),
    )
}

#[expect(
    clippy::cast_precision_loss,
    reason = "counters far below 2^52; microseconds to seconds"
)]
fn encode_tcp(labels: &[(&str, &str)], c: &ContainerNetwork, m: &mut Metrics) {
    let t: &NetworkTotals = &c.totals;
    m.histogram(
        RTT,
        RTT_HELP,
        labels,
        &rtt::fold(&t.rtt),
        t.rtt.count,
        t.rtt.sum_us as f64 / 1e6,
    );
    m.counter(
        RETRANSMITS,
        RETRANSMITS_HELP,
        labels,
        t.tcp_retransmits as f64,
    );
    m.counter(SEGMENTS, SEGMENTS_HELP, labels, t.tcp_segments_out as f64);
    m.counter(OPENED, OPENED_HELP, labels, t.tcp_connections_opened as f64);
    m.counter(CLOSED, CLOSED_HELP, labels, t.tcp_connections_closed as f64);
    m.gauge(
        ESTABLISHED,
        ESTABLISHED_HELP,
        labels,
        f64::from(c.established_connections),
    );
    if let (Some(us), _) = jitter_us(c) {
        m.gauge(TCP_JITTER, TCP_JITTER_HELP, labels, us as f64 / 1e6);
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "counters far below 2^52; microseconds to seconds"
)]
fn encode_rtp(labels: &[(&str, &str)], c: &ContainerNetwork, m: &mut Metrics) {
    let t = &c.totals;
    m.counter(RTP_PACKETS, RTP_PACKETS_HELP, labels, t.rtp_packets as f64);
    m.counter(RTP_LOST, RTP_LOST_HELP, labels, t.rtp_lost as f64);
    if let (_, Some(us)) = jitter_us(c) {
        m.gauge(RTP_JITTER, RTP_JITTER_HELP, labels, us as f64 / 1e6);
    }
}

pub fn encode(s: &Snapshot, m: &mut Metrics) {
    for (name, kind, help) in FAMILIES {
        m.declare(name, *kind, help);
    }
    let Some(net) = &s.network else {
        return;
    };
    for (id, c) in &net.containers {
        let meta = s.containers.as_ref().and_then(|all| all.get(id));
        let labels = container_labels(id, meta);
        if has_tcp(c) {
            encode_tcp(&labels, c, m);
        }
        if c.totals.rtp_packets > 0 {
            encode_rtp(&labels, c, m);
        }
        // Both protocols always, so that a sum over `protocol` is the drain's count and a
        // stream that ends reads 0 rather than vanishing.
        for (protocol, label) in [(StreamProtocol::Tcp, "tcp"), (StreamProtocol::Udp, "udp")] {
            // Outbound connections (dependencies) are left out, as the drain leaves them out
            // by default (`drain.wait_for_outbound`).
            let n = c
                .streams
                .iter()
                .filter(|s| s.protocol == protocol && s.direction != StreamDirection::Outbound)
                .count();
            let mut l = labels.to_vec();
            l.push(("protocol", label));
            #[expect(clippy::cast_precision_loss, reason = "a count of streams")]
            m.gauge(STREAMS, STREAMS_HELP, &l, n as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

    use super::*;
    use crate::store::{
        ContainerMeta, LiveStream, NetworkSnapshot, NetworkWindow, RttHistogram, Window,
    };

    fn stream(protocol: StreamProtocol) -> LiveStream {
        LiveStream {
            protocol,
            kind: crate::store::StreamKind::Tcp,
            direction: crate::store::StreamDirection::Served,
            local: ([10, 0, 0, 1], 443).into(),
            remote: ([10, 0, 0, 2], 50_000).into(),
            started_at: SystemTime::UNIX_EPOCH,
            viewers: 0,
            bytes: None,
            viewer_reports: None,
        }
    }

    /// Container `abc` (a pod's, with TCP and RTP) and `/system.slice/x.service` (RTP only).
    fn snapshot() -> Snapshot {
        let mut net = NetworkSnapshot::default();
        net.containers.insert(
            "abc".to_owned(),
            ContainerNetwork {
                windows: vec![NetworkWindow {
                    window: Window::from_secs(10),
                    samples: 4,
                    jitter_rfc3550_us: 2_500,
                    rtp_packets: 100,
                    rtp_jitter_us: 4_000,
                    ..NetworkWindow::new(Window::from_secs(10))
                }],
                established_connections: 2,
                streams: vec![
                    stream(StreamProtocol::Tcp),
                    stream(StreamProtocol::Tcp),
                    stream(StreamProtocol::Udp),
                ],
                totals: NetworkTotals {
                    // 40 µs, 1000 µs, 1000 µs and 20 ms: kernel buckets [40, 42), [992, 1024)
                    // twice, [19_456, 20_480).
                    rtt: RttHistogram {
                        buckets: vec![(42, 1), (1_024, 2), (20_480, 1)],
                        count: 4,
                        sum_us: 22_040,
                    },
                    tcp_retransmits: 3,
                    tcp_segments_out: 500,
                    tcp_connections_opened: 7,
                    tcp_connections_closed: 5,
                    rtp_packets: 1_000,
                    rtp_lost: 12,
                },
                ..ContainerNetwork::default()
            },
        );
        net.containers.insert(
            "/system.slice/x.service".to_owned(),
            ContainerNetwork {
                streams: vec![stream(StreamProtocol::Udp)],
                totals: NetworkTotals {
                    rtp_packets: 10,
                    ..NetworkTotals::default()
                },
                ..ContainerNetwork::default()
            },
        );
        let mut meta = BTreeMap::new();
        meta.insert(
            "abc".to_owned(),
            ContainerMeta {
                id: "abc".to_owned(),
                name: "web".to_owned(),
                pod_name: "live-0".to_owned(),
                pod_namespace: "edu".to_owned(),
                ..ContainerMeta::default()
            },
        );
        Snapshot {
            network: Some(Arc::new(net)),
            containers: Some(Arc::new(meta)),
            ..Snapshot::default()
        }
    }

    fn render(s: &Snapshot) -> String {
        let mut m = Metrics::new();
        encode(s, &mut m);
        m.render()
    }

    const ABC: &str = r#"container_id="abc",container="web",pod="live-0",namespace="edu""#;

    fn has(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }

    #[test]
    fn rtt_is_a_cumulative_histogram_in_seconds_with_the_container_labels() {
        let text = render(&snapshot());
        for (le, n) in [
            ("0.000032", 0),
            ("0.000064", 1),
            ("0.001024", 3),
            ("0.016384", 3),
            ("0.032768", 4),
            ("8.388608", 4),
            ("+Inf", 4),
        ] {
            has(
                &text,
                &format!("nodeward_tcp_rtt_seconds_bucket{{{ABC},le=\"{le}\"}} {n}"),
            );
        }
        has(
            &text,
            &format!("nodeward_tcp_rtt_seconds_sum{{{ABC}}} 0.02204"),
        );
        has(&text, &format!("nodeward_tcp_rtt_seconds_count{{{ABC}}} 4"));
        let buckets = text
            .lines()
            .filter(|l| l.starts_with("nodeward_tcp_rtt_seconds_bucket{container_id=\"abc\""))
            .count();
        assert_eq!(buckets, rtt::LE_US.len() + 1);
    }

    #[test]
    fn tcp_and_rtp_figures_are_counters_and_levels_are_gauges() {
        let text = render(&snapshot());
        for line in [
            format!("nodeward_tcp_retransmits_total{{{ABC}}} 3"),
            format!("nodeward_tcp_segments_sent_total{{{ABC}}} 500"),
            format!("nodeward_tcp_connections_opened_total{{{ABC}}} 7"),
            format!("nodeward_tcp_connections_closed_total{{{ABC}}} 5"),
            format!("nodeward_tcp_established_connections{{{ABC}}} 2"),
            format!("nodeward_tcp_jitter_seconds{{{ABC}}} 0.0025"),
            format!("nodeward_container_rtp_received_packets_total{{{ABC}}} 1000"),
            format!("nodeward_container_rtp_lost_packets_total{{{ABC}}} 12"),
            format!("nodeward_container_rtp_jitter_seconds{{{ABC}}} 0.004"),
        ] {
            has(&text, &line);
        }
        assert!(text.contains("# TYPE nodeward_tcp_rtt_seconds histogram\n"));
        assert!(text.contains("# TYPE nodeward_tcp_retransmits_total counter\n"));
    }

    #[test]
    fn live_streams_count_tcp_and_udp_like_the_drain() {
        let text = render(&snapshot());
        has(
            &text,
            &format!("nodeward_container_live_streams{{{ABC},protocol=\"tcp\"}} 2"),
        );
        has(
            &text,
            &format!("nodeward_container_live_streams{{{ABC},protocol=\"udp\"}} 1"),
        );
        let svc = r#"container_id="/system.slice/x.service",container="",pod="",namespace="""#;
        has(
            &text,
            &format!("nodeward_container_live_streams{{{svc},protocol=\"tcp\"}} 0"),
        );
        has(
            &text,
            &format!("nodeward_container_live_streams{{{svc},protocol=\"udp\"}} 1"),
        );
    }

    #[test]
    fn a_container_without_tcp_has_no_tcp_series_and_no_unmeasured_jitter() {
        let text = render(&snapshot());
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("nodeward_tcp") && l.contains("x.service")),
            "{text}"
        );
        // RTP counted, but no window with RTP packets: no jitter claimed.
        assert!(
            !text.contains("nodeward_container_rtp_jitter_seconds{container_id=\"/system"),
            "{text}"
        );
    }

    #[test]
    fn an_empty_store_still_declares_every_family() {
        let text = render(&Snapshot::default());
        for (name, _, _) in FAMILIES {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        }
    }
}
