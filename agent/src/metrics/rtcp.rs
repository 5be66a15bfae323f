//! What viewers report in RTCP about the RTP streams containers serve: per container and SSRC,
//! the worst viewer's latest fraction lost and jitter, and how many viewers report.
//!
//! Cardinality: one series per family for each (container, SSRC) a container sends with fresh
//! viewer reports (never per viewer: viewers come and go by the thousand), at most
//! [`MAX_STREAMS`] per scrape, the worst loss first. Streams whose reports went stale
//! (`udp.viewer_report_stale`) drop out.

use std::collections::BTreeMap;

use super::{container_labels, Kind, Metrics};
use crate::store::Snapshot;

const LOSS: &str = "nodeward_rtp_viewer_fraction_lost_ratio";
const LOSS_HELP: &str = "Fraction of the RTP stream's packets lost, as the worst of its viewers reported in its latest RTCP receiver report (0..1).";
const JITTER: &str = "nodeward_rtp_viewer_jitter_seconds";
const JITTER_HELP: &str = "RFC 3550 interarrival jitter of the RTP stream as the worst of its viewers reported in RTCP, in seconds (with the payload type's clock rate); absent when the rate is unknown.";
const VIEWERS: &str = "nodeward_rtp_viewers_reporting";
const VIEWERS_HELP: &str = "Viewers whose RTCP receiver reports about the RTP stream are fresh.";

/// Streams exported per scrape.
pub const MAX_STREAMS: usize = 1_000;

#[derive(Default)]
struct Worst {
    loss: f64,
    jitter: Option<f64>,
    viewers: usize,
}

pub fn encode(s: &Snapshot, m: &mut Metrics) {
    m.declare(LOSS, Kind::Gauge, LOSS_HELP);
    m.declare(JITTER, Kind::Gauge, JITTER_HELP);
    m.declare(VIEWERS, Kind::Gauge, VIEWERS_HELP);
    let Some(net) = &s.network else {
        return;
    };
    // One entry per (container, SSRC): an SSRC sent to several viewers is one stream here.
    let mut streams: BTreeMap<(&str, u32), Worst> = BTreeMap::new();
    for (id, c) in &net.containers {
        for v in c.streams.iter().filter_map(|s| s.viewer_reports.as_ref()) {
            let w = streams.entry((id.as_str(), v.ssrc)).or_default();
            w.loss = w.loss.max(v.worst_fraction_lost().unwrap_or(0.0));
            if let Some(j) = v.worst_jitter() {
                w.jitter = Some(w.jitter.unwrap_or(0.0).max(j.as_secs_f64()));
            }
            w.viewers += v.reports.len();
        }
    }
    let mut worst_first: Vec<_> = streams.into_iter().collect();
    worst_first.sort_by(|a, b| b.1.loss.total_cmp(&a.1.loss));
    for ((id, ssrc), w) in worst_first.into_iter().take(MAX_STREAMS) {
        let meta = s.containers.as_ref().and_then(|all| all.get(id));
        let ssrc = ssrc.to_string();
        let mut labels = container_labels(id, meta).to_vec();
        labels.push(("ssrc", &ssrc));
        m.gauge(LOSS, LOSS_HELP, &labels, w.loss);
        if let Some(j) = w.jitter {
            m.gauge(JITTER, JITTER_HELP, &labels, j);
        }
        #[expect(clippy::cast_precision_loss, reason = "a count of viewers")]
        m.gauge(VIEWERS, VIEWERS_HELP, &labels, w.viewers as f64);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::Arc,
        time::{Duration, SystemTime},
    };

    use super::*;
    use crate::store::{
        ContainerNetwork, LiveStream, NetworkSnapshot, StreamDirection, StreamKind, StreamProtocol,
        ViewerReport, ViewerReports,
    };

    fn report(fraction_lost: f64, jitter_ms: u64) -> ViewerReport {
        ViewerReport {
            reporter_ssrc: 9,
            remote: ([10, 0, 0, 2], 6001).into(),
            local_port: 5005,
            fraction_lost,
            cumulative_lost: 4,
            ext_highest_seq: 100,
            jitter_units: 0,
            jitter: Some(Duration::from_millis(jitter_ms)),
            reported_at: SystemTime::UNIX_EPOCH,
            window: None,
        }
    }

    fn stream(reports: Option<ViewerReports>) -> LiveStream {
        LiveStream {
            protocol: StreamProtocol::Udp,
            kind: StreamKind::Rtp,
            direction: StreamDirection::Served,
            local: ([10, 0, 0, 1], 5004).into(),
            remote: ([10, 0, 0, 2], 6000).into(),
            started_at: SystemTime::UNIX_EPOCH,
            viewers: 0,
            bytes: None,
            viewer_reports: reports,
        }
    }

    #[test]
    fn the_worst_viewer_per_container_and_ssrc_is_exported() {
        let mut net = NetworkSnapshot::default();
        net.containers.insert(
            "abc".to_owned(),
            ContainerNetwork {
                streams: vec![
                    stream(Some(ViewerReports {
                        ssrc: 42,
                        clock_rate: Some(8000),
                        reports: vec![report(0.25, 4), report(0.5, 2)],
                    })),
                    stream(None),
                ],
                ..ContainerNetwork::default()
            },
        );
        let s = Snapshot {
            network: Some(Arc::new(net)),
            ..Snapshot::default()
        };
        let mut m = Metrics::new();
        encode(&s, &mut m);
        let text = m.render();
        let series: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(series.len(), 3, "{text}");
        for (name, value) in [
            ("nodeward_rtp_viewer_fraction_lost_ratio", "0.5"),
            ("nodeward_rtp_viewer_jitter_seconds", "0.004"),
            ("nodeward_rtp_viewers_reporting", "2"),
        ] {
            assert!(
                series.iter().any(|l| l.starts_with(name)
                    && l.contains("ssrc=\"42\"")
                    && l.ends_with(&format!(" {value}"))),
                "{name} {value} in\n{text}"
            );
        }
    }
}
