//! cgroup, node and GPU snapshots → the store's [`CgroupSnapshot`], [`NodeStats`] and
//! [`GpuSnapshot`]. Readings the source could not take become the store's defaults (0 / empty),
//! and the provenance says which ones, so a 0 is never mistaken for a measurement.

use std::time::SystemTime;

use crate::{
    sources::{
        cgroup::{parse::Psi, Snapshot as CgroupScan, Workload},
        gpu::{
            model::{self as gpu, DeviceStats},
            reading::Reading,
        },
        node,
    },
    store::{
        CgroupSnapshot, ContainerStats, Disk, GpuDevice, GpuProcess, GpuSnapshot, NodeStats,
        Pressure, Provenance, XidEvent,
    },
};

use super::key::workload_key;

/// At most this many events per XID code are handed on: the health rules only ask whether a
/// critical code was seen within the window.
const MAX_XIDS_PER_CODE: u32 = 16;

fn pressure(p: Option<&Psi>) -> Pressure {
    p.map(|p| Pressure {
        some_avg10: p.some.avg10,
        some_avg60: p.some.avg60,
        full_avg10: p.full.map_or(0.0, |f| f.avg10),
        full_avg60: p.full.map_or(0.0, |f| f.avg60),
        some_total_us: p.some.total_us,
        full_total_us: p.full.map_or(0, |f| f.total_us),
    })
    .unwrap_or_default()
}

/// One workload's stats; rates over the shortest window (10 s by default).
pub fn container_stats(w: &Workload) -> ContainerStats {
    let s = &w.stats;
    let r = &w.rates;
    ContainerStats {
        cpu_usage_cores: r.cpu[0].unwrap_or(0.0),
        cpu_usage_seconds_total: s.cpu.usage_ns.map_or(0.0, |ns| ns as f64 / 1e9),
        cpu_throttled_ratio: r.throttled_periods_ratio[0].unwrap_or(0.0),
        cpu_throttled_seconds_total: s.cpu.throttled_ns.map_or(0.0, |ns| ns as f64 / 1e9),
        memory_bytes: s.memory.current_bytes.unwrap_or(0),
        memory_limit_bytes: s.memory.limit_bytes.unwrap_or(0),
        oom_kills_total: s.memory.oom_kill_events.unwrap_or(0),
        io_read_bytes_per_second: r.io_read_bytes[0].unwrap_or(0.0),
        io_write_bytes_per_second: r.io_write_bytes[0].unwrap_or(0.0),
        io_read_bytes_total: s.io.iter().fold(0, |t, d| t.saturating_add(d.read_bytes)),
        io_write_bytes_total: s.io.iter().fold(0, |t, d| t.saturating_add(d.write_bytes)),
        pids: s.pids.current.unwrap_or(0),
        pids_limit: s.pids.limit.unwrap_or(0),
        cpu_pressure: pressure(s.psi.cpu.as_ref()),
        memory_pressure: pressure(s.psi.memory.as_ref()),
        io_pressure: pressure(s.psi.io.as_ref()),
    }
}

pub fn cgroup_snapshot(scan: &CgroupScan) -> CgroupSnapshot {
    CgroupSnapshot {
        containers: scan
            .workloads
            .iter()
            .map(|w| (workload_key(&w.container), container_stats(w)))
            .collect(),
    }
}

pub fn cgroup_provenance(scan: &CgroupScan) -> Provenance {
    let hook = match &scan.layout {
        Some(l) => format!("cgroup filesystem ({l})"),
        None => "cgroup filesystem".to_owned(),
    };
    Provenance {
        hook,
        fidelity: format!(
            "rates over the 10 s window; {} unparsable cgroup files since start",
            scan.parse_errors
        ),
    }
}

pub fn node_stats(n: &node::NodeStats) -> NodeStats {
    NodeStats {
        cpu_pressure: pressure(n.psi.cpu.as_ref()),
        memory_pressure: pressure(n.psi.memory.as_ref()),
        io_pressure: pressure(n.psi.io.as_ref()),
        memory_total_bytes: n.memory.as_ref().map_or(0, |m| m.total_bytes),
        memory_available_bytes: n
            .memory
            .as_ref()
            .and_then(|m| m.available_bytes)
            .unwrap_or(0),
        load1: n.load.as_ref().map_or(0.0, |l| l.one),
        disks: n
            .filesystems
            .iter()
            .map(|f| Disk {
                mount_point: f.mount_point.clone(),
                total_bytes: f.size_bytes,
                used_bytes: f.used_bytes,
                used_ratio: f.used_fraction,
                inodes_used_ratio: f.inodes_used_fraction,
            })
            .collect(),
        nic_drops_total: n.nics.iter().map(|i| i.rx_dropped + i.tx_dropped).sum(),
        clock_synchronized: n.clock.as_ref().map(|c| c.synchronized),
        clock_max_error_ms: n.clock.as_ref().map_or(0.0, |c| c.maxerror_us as f64 / 1e3),
    }
}

pub fn node_provenance(n: &node::NodeStats) -> Provenance {
    Provenance {
        hook: "procfs, sysfs, statvfs, adjtimex".to_owned(),
        fidelity: if n.unavailable.is_empty() {
            "full".to_owned()
        } else {
            format!("unavailable: {}", n.unavailable.join("; "))
        },
    }
}

/// Collects the names of readings a device did not give, for the provenance.
struct Missing<'a> {
    device: u32,
    out: &'a mut Vec<String>,
    /// The readings that failed (not those the device does not support).
    failed: Vec<String>,
}

impl Missing<'_> {
    fn take<T: Clone + Default>(&mut self, what: &str, r: &Reading<T>) -> T {
        match r {
            Reading::Supported(v) => v.clone(),
            Reading::NotSupported => {
                self.out
                    .push(format!("gpu{} {what}: not supported", self.device));
                T::default()
            }
            Reading::Error(e) => {
                self.out.push(format!("gpu{} {what}: {e}", self.device));
                self.failed.push(what.to_owned());
                T::default()
            }
        }
    }
}

fn device(
    d: &DeviceStats,
    health: Option<&gpu::GpuHealthDevice>,
    taken_at: SystemTime,
    missing: &mut Vec<String>,
) -> GpuDevice {
    let mut m = Missing {
        device: d.index,
        out: missing,
        failed: Vec::new(),
    };
    let uuid = m.take("uuid", &d.uuid);
    let name = m.take("name", &d.name);
    let pci_bus_id = m.take("pci bus id", &d.pci_bus_id);
    let util = m.take("utilization", &d.utilization_gpu_percent);
    let mem_util = m.take("memory utilization", &d.utilization_memory_percent);
    let memory_used_bytes = m.take("memory used", &d.memory_used_bytes);
    let memory_total_bytes = m.take("memory total", &d.memory_total_bytes);
    let temperature = m.take("temperature", &d.temperature_celsius);
    let power_mw = m.take("power", &d.power_draw_milliwatts);
    let throttle_reasons = d
        .throttle_reasons
        .value()
        .map(|t| t.names.iter().map(|n| (*n).to_owned()).collect())
        .unwrap_or_default();
    let ecc_corrected_total = m.take("ecc corrected", &d.ecc.corrected_volatile);
    let ecc_uncorrected_total = m.take("ecc uncorrected", &d.ecc.uncorrected_volatile);
    let remap = d.row_remapping.value();
    let xids = health
        .map(|h| {
            h.window
                .xids
                .iter()
                .flat_map(|(code, n)| {
                    let code = u32::try_from(*code).unwrap_or(u32::MAX);
                    (0..(*n).min(MAX_XIDS_PER_CODE)).map(move |_| XidEvent {
                        code,
                        // The window keeps counts, not times: the poll that saw them stands in.
                        seen_at: Some(taken_at),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let processes = d
        .processes
        .value()
        .map(|ps| {
            ps.iter()
                .map(|p| GpuProcess {
                    pid: p.pid,
                    // The store's key, as for every other source: the container id, else
                    // the cgroup path (a systemd service, say).
                    container_id: match (&p.container_id, &p.cgroup) {
                        (Some(id), _) => id.clone(),
                        (None, Some(path)) => format!("/{}", path.trim_start_matches('/')),
                        (None, None) => String::new(),
                    },
                    used_memory_bytes: p.used_memory_bytes.unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default();
    GpuDevice {
        index: d.index,
        uuid,
        name,
        pci_bus_id,
        utilization_percent: f64::from(util),
        memory_utilization_percent: f64::from(mem_util),
        memory_used_bytes,
        memory_total_bytes,
        temperature_celsius: f64::from(temperature),
        power_watts: f64::from(power_mw) / 1e3,
        throttle_reasons,
        ecc_corrected_total,
        ecc_uncorrected_total,
        xids,
        row_remap_pending: remap.map_or(0, |r| u32::from(r.pending)),
        row_remap_failed: remap.is_some_and(|r| r.failed),
        lost: d.lost || health.is_some_and(|h| h.lost),
        processes,
        unreadable: m.failed,
        nvml_errors_total: d.nvml_errors_total.clone(),
    }
}

/// The store's GPU snapshot, and the provenance naming every reading that became a default.
pub fn gpu_snapshot(s: &gpu::GpuSnapshot) -> (GpuSnapshot, Provenance) {
    let mut missing = Vec::new();
    let gpus = s
        .devices
        .iter()
        .map(|d| device(d, s.health.devices.get(&d.index), s.taken_at, &mut missing))
        .collect();
    let version = |r: &Reading<String>| r.value().cloned().unwrap_or_else(|| "?".to_owned());
    let mut fidelity = Vec::new();
    if let Some(e) = &s.poll_error {
        fidelity.push(format!("poll failed: {e}"));
    }
    match &s.health.events_watched {
        Some(Reading::Error(e)) => fidelity.push(format!("XID/ECC events not watched: {e}")),
        Some(Reading::NotSupported) => fidelity.push("XID/ECC events not supported".to_owned()),
        _ => {}
    }
    if !missing.is_empty() {
        fidelity.push(format!("reported as 0: {}", missing.join(", ")));
    }
    let provenance = Provenance {
        hook: format!(
            "NVML {}, driver {}",
            version(&s.nvml_version),
            version(&s.driver_version)
        ),
        fidelity: if fidelity.is_empty() {
            "full".to_owned()
        } else {
            fidelity.join("; ")
        },
    };
    (GpuSnapshot { gpus }, provenance)
}

/// Whether a GPU snapshot is a real poll rather than the channel's placeholder.
pub fn gpu_polled(s: &gpu::GpuSnapshot) -> bool {
    s.poll_micros > 0 || !s.devices.is_empty() || s.poll_error.is_some()
}

#[cfg(test)]
#[path = "resources_tests.rs"]
mod tests;
