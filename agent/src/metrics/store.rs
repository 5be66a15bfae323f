//! Per-container TCP and cgroup numbers and the node's pressure and disks, read from the store
//! (the same data the gRPC API and the health rules read), so a dashboard and `ListContainers`
//! agree.
//!
//! Series carry `container` (the id the API uses: the runtime's container id, else the cgroup
//! path), `pod` and `namespace` (empty until the agent resolves pods). Window gauges carry a
//! `window` length (`10s`, `60s`, `300s`); they are statistics over the sliding window, not counters.

use super::{Kind, Metrics};
use crate::store::{ContainerMeta, Pressure, Snapshot};

const FAMILIES: &[(&str, Kind, &str)] = &[
    (RTT, Kind::Gauge, RTT_HELP),
    (SAMPLES, Kind::Gauge, SAMPLES_HELP),
    (JITTER, Kind::Gauge, JITTER_HELP),
    (RETRANS, Kind::Gauge, RETRANS_HELP),
    (ESTABLISHED, Kind::Gauge, ESTABLISHED_HELP),
    (CPU, Kind::Gauge, CPU_HELP),
    (THROTTLED_RATIO, Kind::Gauge, THROTTLED_RATIO_HELP),
    (THROTTLED_SECONDS, Kind::Counter, THROTTLED_SECONDS_HELP),
    (MEMORY, Kind::Gauge, MEMORY_HELP),
    (MEMORY_LIMIT, Kind::Gauge, MEMORY_LIMIT_HELP),
    (OOM, Kind::Counter, OOM_HELP),
    (PSI, Kind::Gauge, PSI_HELP),
    (NODE_PSI, Kind::Gauge, NODE_PSI_HELP),
    (DISK_USED, Kind::Gauge, DISK_USED_HELP),
];

const RTT: &str = "nodeward_container_tcp_rtt_seconds";
const RTT_HELP: &str = "TCP round-trip time of the container's connections over the window, by `stat` (min, p50, p90, p99, max), in seconds.";
const SAMPLES: &str = "nodeward_container_tcp_rtt_samples";
const SAMPLES_HELP: &str = "TCP RTT samples of the container within the window.";
const JITTER: &str = "nodeward_container_tcp_jitter_seconds";
const JITTER_HELP: &str =
    "Mean |difference| between consecutive RTT samples of a connection within the window, in seconds.";
const RETRANS: &str = "nodeward_container_tcp_window_retransmits";
const RETRANS_HELP: &str = "TCP segments the container retransmitted within the window.";
const ESTABLISHED: &str = "nodeward_container_tcp_established_connections";
const ESTABLISHED_HELP: &str = "Established TCP connections of the container now.";
const CPU: &str = "nodeward_container_cpu_usage_cores";
const CPU_HELP: &str = "CPU seconds per second the container used over the shortest window.";
const THROTTLED_RATIO: &str = "nodeward_container_cpu_throttled_ratio";
const THROTTLED_RATIO_HELP: &str =
    "Share of CFS periods in which the container was throttled over the shortest window, 0..1.";
const THROTTLED_SECONDS: &str = "nodeward_container_cpu_throttled_seconds_total";
const THROTTLED_SECONDS_HELP: &str =
    "Time the container was throttled since its cgroup was created.";
const MEMORY: &str = "nodeward_container_memory_bytes";
const MEMORY_HELP: &str = "Memory the container's cgroup uses now.";
const MEMORY_LIMIT: &str = "nodeward_container_memory_limit_bytes";
const MEMORY_LIMIT_HELP: &str = "Memory limit of the container's cgroup; absent when unlimited.";
const OOM: &str = "nodeward_container_oom_kills_total";
const OOM_HELP: &str = "Processes the OOM killer ended in the container's cgroup.";
const PSI: &str = "nodeward_container_pressure_ratio";
const PSI_HELP: &str = "PSI of the container's cgroup over 10 s: share of time `some` or `full` tasks stalled on `resource`, 0..1.";
const NODE_PSI: &str = "nodeward_node_pressure_ratio";
const NODE_PSI_HELP: &str =
    "Node-wide PSI over 10 s: share of time `some` or `full` tasks stalled on `resource`, 0..1.";
const DISK_USED: &str = "nodeward_node_filesystem_used_ratio";
const DISK_USED_HELP: &str = "Share of the filesystem's space in use, 0..1.";

fn pressure(
    m: &mut Metrics,
    name: &'static str,
    help: &'static str,
    base: &[(&str, &str)],
    resources: [(&str, &Pressure); 3],
) {
    for (resource, p) in resources {
        for (kind, value) in [("some", p.some_avg10), ("full", p.full_avg10)] {
            let mut labels = base.to_vec();
            labels.extend([("resource", resource), ("kind", kind)]);
            m.gauge(name, help, &labels, value / 100.0);
        }
    }
}

fn labels<'a>(id: &'a str, meta: Option<&'a ContainerMeta>) -> [(&'static str, &'a str); 3] {
    [
        ("container", id),
        ("pod", meta.map_or("", |m| m.pod_name.as_str())),
        ("namespace", meta.map_or("", |m| m.pod_namespace.as_str())),
    ]
}

pub fn encode(s: &Snapshot, m: &mut Metrics) {
    for (name, kind, help) in FAMILIES {
        m.declare(name, *kind, help);
    }
    let meta = |id: &str| s.containers.as_ref().and_then(|c| c.get(id));
    if let Some(net) = &s.network {
        for (id, c) in &net.containers {
            let base = labels(id, meta(id));
            m.gauge(
                ESTABLISHED,
                ESTABLISHED_HELP,
                &base,
                f64::from(c.established_connections),
            );
            for w in c
                .windows
                .iter()
                .filter(|w| w.samples > 0 || w.retransmits > 0)
            {
                // `10s`, `60s`, `300s`: the same values the UDP window gauges carry.
                let window = format!("{}s", w.window.as_secs());
                let mut l = base.to_vec();
                l.push(("window", &window));
                m.gauge(SAMPLES, SAMPLES_HELP, &l, w.samples as f64);
                m.gauge(RETRANS, RETRANS_HELP, &l, w.retransmits as f64);
                if w.samples == 0 {
                    // No RTT was measured: no RTT sample, rather than a 0 that claims one.
                    continue;
                }
                m.gauge(JITTER, JITTER_HELP, &l, w.jitter_rfc3550_us as f64 / 1e6);
                // A `stat` label, not `quantile`: Prometheus reserves that for summaries, and
                // these are a histogram's percentiles over a sliding window, read as gauges.
                for (stat, us) in [
                    ("min", w.rtt_min_us),
                    ("p50", w.rtt_p50_us),
                    ("p90", w.rtt_p90_us),
                    ("p99", w.rtt_p99_us),
                    ("max", w.rtt_max_us),
                ] {
                    let mut lq = l.clone();
                    lq.push(("stat", stat));
                    m.gauge(RTT, RTT_HELP, &lq, us as f64 / 1e6);
                }
            }
        }
    }
    if let Some(cg) = &s.cgroups {
        for (id, c) in &cg.containers {
            let base = labels(id, meta(id));
            m.gauge(CPU, CPU_HELP, &base, c.cpu_usage_cores);
            m.gauge(
                THROTTLED_RATIO,
                THROTTLED_RATIO_HELP,
                &base,
                c.cpu_throttled_ratio,
            );
            m.counter(
                THROTTLED_SECONDS,
                THROTTLED_SECONDS_HELP,
                &base,
                c.cpu_throttled_seconds_total,
            );
            m.gauge(MEMORY, MEMORY_HELP, &base, c.memory_bytes as f64);
            if c.memory_limit_bytes > 0 {
                m.gauge(
                    MEMORY_LIMIT,
                    MEMORY_LIMIT_HELP,
                    &base,
                    c.memory_limit_bytes as f64,
                );
            }
            m.counter(OOM, OOM_HELP, &base, c.oom_kills_total as f64);
            pressure(
                m,
                PSI,
                PSI_HELP,
                &base,
                [
                    ("cpu", &c.cpu_pressure),
                    ("memory", &c.memory_pressure),
                    ("io", &c.io_pressure),
                ],
            );
        }
    }
    if let Some(n) = &s.node {
        pressure(
            m,
            NODE_PSI,
            NODE_PSI_HELP,
            &[],
            [
                ("cpu", &n.cpu_pressure),
                ("memory", &n.memory_pressure),
                ("io", &n.io_pressure),
            ],
        );
        for d in &n.disks {
            m.gauge(
                DISK_USED,
                DISK_USED_HELP,
                &[("mount_point", &d.mount_point)],
                d.used_ratio,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use super::*;
    use crate::store::{
        CgroupSnapshot, ContainerNetwork, ContainerStats, Disk, NetworkSnapshot, NetworkWindow,
        NodeStats,
    };

    fn snapshot() -> Snapshot {
        let mut net = NetworkSnapshot::default();
        net.containers.insert(
            "abc".to_owned(),
            ContainerNetwork {
                windows: vec![
                    NetworkWindow {
                        samples: 20,
                        rtt_p99_us: 150_000,
                        jitter_rfc3550_us: 2_000,
                        retransmits: 4,
                        ..NetworkWindow::new(crate::store::Window::from_secs(10))
                    },
                    NetworkWindow {
                        rtp_packets: 10,
                        ..NetworkWindow::new(crate::store::Window::from_secs(60))
                    },
                ],
                established_connections: 3,
                ..ContainerNetwork::default()
            },
        );
        let mut cg = CgroupSnapshot::default();
        cg.containers.insert(
            "abc".to_owned(),
            ContainerStats {
                cpu_usage_cores: 1.25,
                memory_bytes: 1024,
                memory_pressure: Pressure {
                    full_avg10: 12.5,
                    ..Pressure::default()
                },
                ..ContainerStats::default()
            },
        );
        let mut meta = BTreeMap::new();
        meta.insert(
            "abc".to_owned(),
            ContainerMeta {
                pod_name: "live-0".to_owned(),
                pod_namespace: "edu".to_owned(),
                ..ContainerMeta::default()
            },
        );
        Snapshot {
            network: Some(Arc::new(net)),
            cgroups: Some(Arc::new(cg)),
            node: Some(Arc::new(NodeStats {
                disks: vec![Disk {
                    mount_point: "/".to_owned(),
                    used_ratio: 0.5,
                    ..Disk::default()
                }],
                ..NodeStats::default()
            })),
            containers: Some(Arc::new(meta)),
            ..Snapshot::default()
        }
    }

    fn render(s: &Snapshot) -> String {
        let mut m = Metrics::new();
        encode(s, &mut m);
        m.render()
    }

    #[test]
    fn tcp_windows_become_percentile_gauges_in_seconds_with_pod_labels() {
        let text = render(&snapshot());
        let l = r#"container="abc",pod="live-0",namespace="edu""#;
        assert!(
            text.contains(&format!(
                "nodeward_container_tcp_rtt_seconds{{{l},window=\"10s\",stat=\"p99\"}} 0.15\n"
            )),
            "{text}"
        );
        assert!(text.contains(&format!(
            "nodeward_container_tcp_window_retransmits{{{l},window=\"10s\"}} 4\n"
        )));
        assert!(text.contains(&format!(
            "nodeward_container_tcp_established_connections{{{l}}} 3\n"
        )));
    }

    #[test]
    fn a_window_without_tcp_samples_has_no_rtt_series() {
        let text = render(&snapshot());
        assert!(!text.contains("window=\"60s\""), "{text}");
    }

    #[test]
    fn cgroup_and_node_numbers_are_in_base_units() {
        let text = render(&snapshot());
        assert!(text.contains("nodeward_container_cpu_usage_cores{container=\"abc\""));
        assert!(text.contains(
            "nodeward_container_pressure_ratio{container=\"abc\",pod=\"live-0\",namespace=\"edu\",resource=\"memory\",kind=\"full\"} 0.125\n"
        ), "{text}");
        assert!(
            !text.contains("nodeward_container_memory_limit_bytes{"),
            "unlimited has no sample"
        );
        assert!(text.contains("nodeward_node_filesystem_used_ratio{mount_point=\"/\"} 0.5\n"));
    }

    #[test]
    fn an_empty_store_still_declares_every_family() {
        let text = render(&Snapshot::default());
        for (name, _, _) in FAMILIES {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        }
    }
}
