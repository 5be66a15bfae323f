//! The eBPF network sources' own counters → the store's [`NetworkDiagnostics`].

use crate::{
    sources::{tcp::TcpSnapshot, udp::model::UdpSnapshot},
    store::{NetworkDiagnostics, TcpDrops, UdpCounters, UdpDiagnostics},
};

/// What each source that has reported says about itself; `None` for one that has not.
pub fn network_diagnostics(
    tcp: Option<&TcpSnapshot>,
    udp: Option<&UdpSnapshot>,
) -> NetworkDiagnostics {
    NetworkDiagnostics {
        tcp: tcp.map(|t| {
            let d = &t.drops;
            TcpDrops {
                no_cgroup: d.no_cgroup,
                stats_full: d.stats_full,
                flow_insert_failed: d.flow_insert_failed,
                hist_full: d.hist_full,
                flow_evicted: d.flow_evicted,
            }
        }),
        udp: udp.map(|u| {
            let c = &u.counters;
            UdpDiagnostics {
                hook: u.hook.clone(),
                counters: UdpCounters {
                    udp_packets: c.udp_packets,
                    rtp_packets: c.rtp_packets,
                    rtcp_packets: c.rtcp_packets,
                    stun_packets: c.stun_packets,
                    truncated: c.truncated,
                    fragments: c.fragments,
                    flows_created: c.flows_created,
                    streams_created: c.streams_created,
                    not_tracked: c.not_tracked,
                    flows_on_probation: c.flows_on_probation,
                    streams_on_probation: c.streams_on_probation,
                    rtcp_with_reports: c.rtcp_with_reports,
                    viewer_reports_tracked: c.viewer_reports_tracked,
                    flows_tracked: c.flows_tracked,
                    streams_tracked: c.streams_tracked,
                },
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::{tcp::snapshot::Drops, udp::model};

    #[test]
    fn each_drop_reason_and_program_counter_keeps_its_own_value() {
        let tcp = TcpSnapshot {
            drops: Drops {
                hist_full: 1,
                stats_full: 2,
                flow_insert_failed: 3,
                no_cgroup: 4,
                flow_evicted: 5,
            },
            ..TcpSnapshot::default()
        };
        let udp = UdpSnapshot {
            hook: "cgroup_skb".to_owned(),
            counters: model::UdpCounters {
                udp_packets: 11,
                rtp_packets: 12,
                rtcp_packets: 13,
                stun_packets: 14,
                truncated: 15,
                fragments: 16,
                flows_created: 17,
                streams_created: 18,
                not_tracked: 19,
                flows_on_probation: 22,
                streams_on_probation: 23,
                rtcp_with_reports: 24,
                viewer_reports_tracked: 25,
                flows_tracked: 20,
                streams_tracked: 21,
            },
            ..UdpSnapshot::default()
        };
        let d = network_diagnostics(Some(&tcp), Some(&udp));
        assert_eq!(
            d.tcp,
            Some(TcpDrops {
                no_cgroup: 4,
                stats_full: 2,
                flow_insert_failed: 3,
                hist_full: 1,
                flow_evicted: 5,
            })
        );
        let u = d.udp.expect("udp reported");
        assert_eq!(u.hook, "cgroup_skb");
        assert_eq!(
            u.counters,
            UdpCounters {
                udp_packets: 11,
                rtp_packets: 12,
                rtcp_packets: 13,
                stun_packets: 14,
                truncated: 15,
                fragments: 16,
                flows_created: 17,
                streams_created: 18,
                not_tracked: 19,
                flows_on_probation: 22,
                streams_on_probation: 23,
                rtcp_with_reports: 24,
                viewer_reports_tracked: 25,
                flows_tracked: 20,
                streams_tracked: 21,
            }
        );
    }

    #[test]
    fn a_source_that_has_not_reported_has_no_diagnostics() {
        let d = network_diagnostics(None, Some(&UdpSnapshot::default()));
        assert_eq!(d.tcp, None);
        assert!(d.udp.is_some());
    }
}
