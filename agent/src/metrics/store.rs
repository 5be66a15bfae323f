//! Per-container cgroup numbers and GPU memory, and the node's pressure and disks, read from
//! the store (the same data the gRPC API and the health rules read), so a dashboard and
//! `ListContainers` agree. Per-container series carry the labels of
//! [`container_labels`](super::container_labels).
//!
//! Pressure (PSI) is exported as the kernel's stall-time counters (`total=`), the way
//! node_exporter and cAdvisor do: `rate()` over any range gives the share of time stalled,
//! where the kernel's own averages are fixed at 10, 60 and 300 s.

use super::{container_labels, Kind, Metrics};
use crate::store::{GpuContainerUsage, Pressure, Snapshot};

const FAMILIES: &[(&str, Kind, &str)] = &[
    (CPU, Kind::Counter, CPU_HELP),
    (THROTTLED_SECONDS, Kind::Counter, THROTTLED_SECONDS_HELP),
    (MEMORY, Kind::Gauge, MEMORY_HELP),
    (MEMORY_LIMIT, Kind::Gauge, MEMORY_LIMIT_HELP),
    (OOM, Kind::Counter, OOM_HELP),
    (IO_READ, Kind::Counter, IO_READ_HELP),
    (IO_WRITE, Kind::Counter, IO_WRITE_HELP),
    (PSI, Kind::Counter, PSI_HELP),
    (GPU_MEMORY, Kind::Gauge, GPU_MEMORY_HELP),
    (GPU_SM, Kind::Gauge, GPU_SM_HELP),
    (GPU_ENCODER, Kind::Gauge, GPU_ENCODER_HELP),
    (GPU_DECODER, Kind::Gauge, GPU_DECODER_HELP),
    (NODE_PSI, Kind::Counter, NODE_PSI_HELP),
    (DISK_USED, Kind::Gauge, DISK_USED_HELP),
];

const CPU: &str = "nodeward_container_cpu_usage_seconds_total";
const CPU_HELP: &str = "CPU time the container's cgroup used, user and system, in seconds.";
const THROTTLED_SECONDS: &str = "nodeward_container_cpu_throttled_seconds_total";
const THROTTLED_SECONDS_HELP: &str =
    "Time the container was throttled by its CPU limit, in seconds.";
const MEMORY: &str = "nodeward_container_memory_bytes";
const MEMORY_HELP: &str = "Memory the container's cgroup uses now, in bytes.";
const MEMORY_LIMIT: &str = "nodeward_container_memory_limit_bytes";
const MEMORY_LIMIT_HELP: &str =
    "Memory limit of the container's cgroup, in bytes; absent when unlimited.";
const OOM: &str = "nodeward_container_oom_kills_total";
const OOM_HELP: &str = "Processes the OOM killer ended in the container's cgroup.";
const IO_READ: &str = "nodeward_container_io_read_bytes_total";
const IO_READ_HELP: &str = "Bytes the container's cgroup read from block devices.";
const IO_WRITE: &str = "nodeward_container_io_write_bytes_total";
const IO_WRITE_HELP: &str = "Bytes the container's cgroup wrote to block devices.";
const PSI: &str = "nodeward_container_pressure_seconds_total";
const PSI_HELP: &str = "PSI of the container's cgroup: time in which some (`kind=\"some\"`) or all non-idle (`kind=\"full\"`) tasks stalled on `resource`, in seconds.";
const GPU_MEMORY: &str = "nodeward_container_gpu_memory_used_bytes";
const GPU_MEMORY_HELP: &str = "GPU memory used by the container's processes on the GPU, in bytes.";
const GPU_SM: &str = "nodeward_container_gpu_sm_utilization_ratio";
const GPU_SM_HELP: &str = "Share of the GPU's SMs the container's processes kept busy in NVML's last sample period, 0..1; absent when none of them was sampled.";
const GPU_ENCODER: &str = "nodeward_container_gpu_encoder_utilization_ratio";
const GPU_ENCODER_HELP: &str = "Share of the GPU's video encoder the container's processes kept busy in NVML's last sample period, 0..1; absent when none of them was sampled.";
const GPU_DECODER: &str = "nodeward_container_gpu_decoder_utilization_ratio";
const GPU_DECODER_HELP: &str = "Share of the GPU's video decoder the container's processes kept busy in NVML's last sample period, 0..1; absent when none of them was sampled.";
const NODE_PSI: &str = "nodeward_node_pressure_seconds_total";
const NODE_PSI_HELP: &str = "Node-wide PSI: time in which some (`kind=\"some\"`) or all non-idle (`kind=\"full\"`) tasks stalled on `resource`, in seconds.";
const DISK_USED: &str = "nodeward_node_filesystem_used_ratio";
const DISK_USED_HELP: &str = "Share of the filesystem's space in use, 0..1.";

/// One counter per resource and kind. `full` is left out where the kernel defines none (the
/// node's CPU).
#[expect(clippy::cast_precision_loss, reason = "microseconds far below 2^52")]
fn pressure(
    m: &mut Metrics,
    name: &'static str,
    help: &'static str,
    base: &[(&str, &str)],
    resources: [(&str, &Pressure, bool); 3],
) {
    for (resource, p, has_full) in resources {
        let kinds = [("some", p.some_total_us), ("full", p.full_total_us)];
        for (kind, us) in kinds.into_iter().take(if has_full { 2 } else { 1 }) {
            let mut labels = base.to_vec();
            labels.extend([("resource", resource), ("kind", kind)]);
            m.counter(name, help, &labels, us as f64 / 1e6);
        }
    }
}

#[expect(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
pub fn encode(s: &Snapshot, m: &mut Metrics) {
    for (name, kind, help) in FAMILIES {
        m.declare(name, *kind, help);
    }
    let meta = |id: &str| s.containers.as_ref().and_then(|c| c.get(id));
    if let Some(cg) = &s.cgroups {
        for (id, c) in &cg.containers {
            let base = container_labels(id, meta(id));
            m.counter(CPU, CPU_HELP, &base, c.cpu_usage_seconds_total);
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
            m.counter(IO_READ, IO_READ_HELP, &base, c.io_read_bytes_total as f64);
            m.counter(
                IO_WRITE,
                IO_WRITE_HELP,
                &base,
                c.io_write_bytes_total as f64,
            );
            pressure(
                m,
                PSI,
                PSI_HELP,
                &base,
                [
                    ("cpu", &c.cpu_pressure, true),
                    ("memory", &c.memory_pressure, true),
                    ("io", &c.io_pressure, true),
                ],
            );
        }
    }
    if let Some(gpus) = &s.gpus {
        for gpu in &gpus.gpus {
            let index = gpu.index.to_string();
            // A container's processes on one GPU are one series.
            for (id, u) in gpu.by_container() {
                let mut labels = container_labels(id, meta(id)).to_vec();
                // A GPU held by device assignment is named by the kubelet even where the
                // runtime does not name the container.
                if let Some(a) = gpu.assigned.as_ref().filter(|a| a.key == id) {
                    if meta(id).is_none_or(|m| m.pod_name.is_empty()) {
                        labels = vec![
                            ("container_id", id),
                            ("container", a.container.as_str()),
                            ("pod", a.pod.as_str()),
                            ("namespace", a.namespace.as_str()),
                        ];
                    }
                }
                labels.extend([("gpu", index.as_str()), ("uuid", gpu.uuid.as_str())]);
                m.gauge(
                    GPU_MEMORY,
                    GPU_MEMORY_HELP,
                    &labels,
                    u.used_memory_bytes as f64,
                );
                if u.sampled {
                    for (name, help, percent) in [
                        (GPU_SM, GPU_SM_HELP, u.sm_percent),
                        (GPU_ENCODER, GPU_ENCODER_HELP, u.encoder_percent),
                        (GPU_DECODER, GPU_DECODER_HELP, u.decoder_percent),
                    ] {
                        m.gauge(name, help, &labels, GpuContainerUsage::ratio(percent));
                    }
                }
            }
        }
    }
    if let Some(n) = &s.node {
        pressure(
            m,
            NODE_PSI,
            NODE_PSI_HELP,
            &[],
            [
                ("cpu", &n.cpu_pressure, false),
                ("memory", &n.memory_pressure, true),
                ("io", &n.io_pressure, true),
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
        CgroupSnapshot, ContainerMeta, ContainerStats, Disk, GpuDevice, GpuProcess, GpuSnapshot,
        NodeStats,
    };

    fn snapshot() -> Snapshot {
        let mut cg = CgroupSnapshot::default();
        cg.containers.insert(
            "abc".to_owned(),
            ContainerStats {
                cpu_usage_cores: 1.25,
                cpu_usage_seconds_total: 812.5,
                memory_bytes: 1024,
                io_read_bytes_total: 4096,
                memory_pressure: Pressure {
                    full_avg10: 12.5,
                    some_total_us: 3_000_000,
                    full_total_us: 1_500_000,
                    ..Pressure::default()
                },
                ..ContainerStats::default()
            },
        );
        let mut meta = BTreeMap::new();
        meta.insert(
            "abc".to_owned(),
            ContainerMeta {
                id: "abc".to_owned(),
                pod_name: "live-0".to_owned(),
                pod_namespace: "edu".to_owned(),
                ..ContainerMeta::default()
            },
        );
        let process = |pid, container_id: &str, used_memory_bytes| GpuProcess {
            pid,
            container_id: container_id.to_owned(),
            used_memory_bytes,
            sample: None,
        };
        Snapshot {
            cgroups: Some(Arc::new(cg)),
            gpus: Some(Arc::new(GpuSnapshot {
                gpus: vec![GpuDevice {
                    index: 1,
                    uuid: "GPU-1".to_owned(),
                    processes: vec![
                        process(10, "abc", 1 << 20),
                        process(11, "abc", 2 << 20),
                        process(12, "", 4 << 20),
                    ],
                    ..GpuDevice::default()
                }],
                ..GpuSnapshot::default()
            })),
            node: Some(Arc::new(NodeStats {
                cpu_pressure: Pressure {
                    some_total_us: 48_214_377,
                    ..Pressure::default()
                },
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

    const ABC: &str = r#"container_id="abc",container="",pod="live-0",namespace="edu""#;

    fn has(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }

    #[test]
    fn cgroup_counters_are_totals_in_base_units_with_the_container_labels() {
        let text = render(&snapshot());
        has(
            &text,
            &format!("nodeward_container_cpu_usage_seconds_total{{{ABC}}} 812.5"),
        );
        has(
            &text,
            &format!("nodeward_container_io_read_bytes_total{{{ABC}}} 4096"),
        );
        has(
            &text,
            &format!("nodeward_container_memory_bytes{{{ABC}}} 1024"),
        );
        assert!(
            !text.contains("nodeward_container_memory_limit_bytes{"),
            "unlimited has no sample"
        );
    }

    #[test]
    fn pressure_is_the_kernels_stall_time_in_seconds() {
        let text = render(&snapshot());
        has(
            &text,
            &format!(
                "nodeward_container_pressure_seconds_total{{{ABC},resource=\"memory\",kind=\"some\"}} 3"
            ),
        );
        has(
            &text,
            &format!(
                "nodeward_container_pressure_seconds_total{{{ABC},resource=\"memory\",kind=\"full\"}} 1.5"
            ),
        );
        has(
            &text,
            "nodeward_node_pressure_seconds_total{resource=\"cpu\",kind=\"some\"} 48.214377",
        );
        assert!(
            !text.contains("nodeward_node_pressure_seconds_total{resource=\"cpu\",kind=\"full\"}"),
            "the node's CPU has no `full`: {text}"
        );
        assert!(text.contains("# TYPE nodeward_node_pressure_seconds_total counter\n"));
    }

    #[test]
    fn gpu_memory_is_summed_per_container_and_gpu_and_unattributed_processes_are_left_out() {
        let text = render(&snapshot());
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("nodeward_container_gpu_memory_used_bytes{"))
            .collect();
        assert_eq!(
            lines,
            [format!(
                "nodeward_container_gpu_memory_used_bytes{{{ABC},gpu=\"1\",uuid=\"GPU-1\"}} 3145728"
            )]
        );
    }

    #[test]
    fn node_disks_keep_their_mount_point() {
        let text = render(&snapshot());
        has(
            &text,
            "nodeward_node_filesystem_used_ratio{mount_point=\"/\"} 0.5",
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
