//! UDP and RTP: the eBPF programs' own counters and the hook they run on. The per-container
//! figures (streams, RTP packets, loss, jitter) come from the store (`network.rs`), with the
//! labels every per-container series carries; these from the store's network diagnostics.

use super::Metrics;
use crate::store::{UdpCounters, UdpDiagnostics};

/// Writes the UDP programs' hook and counters.
pub fn encode(snapshot: &UdpDiagnostics, m: &mut Metrics) {
    m.gauge(
        "nodeward_udp_hook_info",
        "The kernel hook the UDP/RTP source runs on, as a label; the value is always 1.",
        &[("hook", &snapshot.hook)],
        1.0,
    );
    encode_counters(&snapshot.counters, m);
}

fn encode_counters(c: &UdpCounters, m: &mut Metrics) {
    let counters: [(&'static str, &'static str, u64); 12] = [
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
        (
            "nodeward_udp_flows_probation_total",
            "New UDP flows put on probation; those that never sent a second packet were not admitted to the flow map.",
            c.flows_on_probation,
        ),
        (
            "nodeward_rtp_streams_probation_total",
            "New RTP streams put on probation; those never confirmed by two packets in sequence were not admitted.",
            c.streams_on_probation,
        ),
        (
            "nodeward_rtcp_report_packets_total",
            "Inbound RTCP packets with at least one sender/receiver report block the agent read.",
            c.rtcp_with_reports,
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
    m.gauge(
        "nodeward_rtp_viewer_reports_tracked",
        "Viewers' RTCP reports (container, SSRC, viewer) in the kernel map now.",
        &[],
        c.viewer_reports_tracked as f64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_counters_are_counters_and_map_sizes_gauges() {
        let snapshot = UdpDiagnostics {
            hook: "cgroup_skb".to_owned(),
            counters: UdpCounters {
                udp_packets: 1000,
                not_tracked: 3,
                flows_on_probation: 40,
                streams_on_probation: 41,
                flows_tracked: 7,
                ..UdpCounters::default()
            },
        };
        let mut m = Metrics::new();
        encode(&snapshot, &mut m);
        let text = m.render();
        for line in [
            "nodeward_udp_hook_info{hook=\"cgroup_skb\"} 1",
            "nodeward_udp_not_tracked_total 3",
            "nodeward_udp_packets_total 1000",
            "nodeward_udp_flows_tracked 7",
            "nodeward_udp_flows_probation_total 40",
            "nodeward_rtp_streams_probation_total 41",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in:\n{text}"
            );
        }
        assert!(text.contains("# TYPE nodeward_udp_packets_total counter\n"));
    }
}
