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
        CgroupSnapshot, ContainerStats, Disk, GpuClocks, GpuDevice, GpuEventWindow, GpuMigDevice,
        GpuNvLinkErrors, GpuProcess, GpuProcessSample, GpuReading, GpuRemappedRows, GpuSnapshot,
        GpuSourceState, NodeStats, Pressure, Provenance, XidEvent,
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

/// Collects the readings a device did not give: typed on the device, named for the
/// provenance.
struct Missing<'a> {
    device: u32,
    out: &'a mut Vec<String>,
    /// The readings that failed.
    failed: Vec<GpuReading>,
    /// The readings the device does not support.
    unsupported: Vec<GpuReading>,
}

impl Missing<'_> {
    fn take<T: Clone + Default>(&mut self, what: GpuReading, r: &Reading<T>) -> T {
        self.take_option(what, r).unwrap_or_default()
    }

    fn take_option<T: Clone>(&mut self, what: GpuReading, r: &Reading<T>) -> Option<T> {
        match r {
            Reading::Supported(v) => Some(v.clone()),
            Reading::NotSupported => {
                self.out
                    .push(format!("gpu{} {what}: not supported", self.device));
                self.unsupported.push(what);
                None
            }
            Reading::Error(e) => {
                self.out.push(format!("gpu{} {what}: {e}", self.device));
                self.failed.push(what);
                None
            }
        }
    }
}

/// The value of a reading the store keeps as an `Option`: `None` unless the device answered.
fn option<T: Copy>(r: &Reading<T>) -> Option<T> {
    r.value().copied()
}

fn event_window(h: &gpu::GpuHealthDevice) -> GpuEventWindow {
    let w = &h.window;
    GpuEventWindow {
        xids: w.xids.clone(),
        drain_xids: w.drain_xids.clone(),
        single_bit_ecc_events: w.single_bit_ecc_events,
        double_bit_ecc_events: w.double_bit_ecc_events,
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
        unsupported: Vec::new(),
    };
    let uuid = m.take(GpuReading::Uuid, &d.uuid);
    let name = m.take(GpuReading::Name, &d.name);
    let pci_bus_id = m.take(GpuReading::PciBusId, &d.pci_bus_id);
    let util = m.take(GpuReading::Utilization, &d.utilization_gpu_percent);
    let mem_util = m.take(GpuReading::MemoryUtilization, &d.utilization_memory_percent);
    let memory_used_bytes = m.take(GpuReading::MemoryUsed, &d.memory_used_bytes);
    let memory_total_bytes = m.take(GpuReading::MemoryTotal, &d.memory_total_bytes);
    let temperature = m.take(GpuReading::Temperature, &d.temperature_celsius);
    let power_mw = m.take(GpuReading::Power, &d.power_draw_milliwatts);
    let throttle_reasons = d
        .throttle_reasons
        .value()
        .map(|t| t.names.iter().map(|n| (*n).to_owned()).collect())
        .unwrap_or_default();
    let ecc_corrected_total = m.take(GpuReading::EccCorrected, &d.ecc.corrected_volatile);
    let ecc_uncorrected_total = m.take(GpuReading::EccUncorrected, &d.ecc.uncorrected_volatile);
    let remap = m.take_option(GpuReading::RowRemapping, &d.row_remapping);
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
                    sample: p.sample.as_ref().map(|s| GpuProcessSample {
                        sm_percent: s.sm_percent,
                        memory_percent: s.memory_percent,
                        encoder_percent: s.encoder_percent,
                        decoder_percent: s.decoder_percent,
                    }),
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
        row_remap_pending: remap.as_ref().map_or(0, |r| u32::from(r.pending)),
        row_remap_failed: remap.as_ref().is_some_and(|r| r.failed),
        lost: d.lost || health.is_some_and(|h| h.lost),
        processes,
        unreadable: m.failed,
        unsupported: m.unsupported,
        nvml_errors_total: d.nvml_errors_total.clone(),
        power_limit_watts: option(&d.power_limit_milliwatts).map(|mw| f64::from(mw) / 1e3),
        clocks: GpuClocks {
            graphics_mhz: option(&d.clocks_mhz.graphics),
            sm_mhz: option(&d.clocks_mhz.sm),
            memory_mhz: option(&d.clocks_mhz.memory),
            video_mhz: option(&d.clocks_mhz.video),
        },
        encoder_utilization_percent: option(&d.media.encoder_utilization_percent),
        decoder_utilization_percent: option(&d.media.decoder_utilization_percent),
        encoder_sessions: d.media.encoder_sessions.value().map(|e| e.session_count),
        ecc_enabled: option(&d.ecc.enabled),
        ecc_aggregate_corrected_total: option(&d.ecc.corrected_aggregate),
        ecc_aggregate_uncorrected_total: option(&d.ecc.uncorrected_aggregate),
        retired_pages_single_bit: option(&d.retired_pages.single_bit),
        retired_pages_double_bit: option(&d.retired_pages.double_bit),
        retired_pages_pending: option(&d.retired_pages.pending),
        remapped_rows: remap.map(|r| GpuRemappedRows {
            corrected: r.corrected_rows,
            uncorrected: r.uncorrected_rows,
        }),
        pcie_replays_total: option(&d.pcie_replay_count),
        nvlink: d
            .nvlink
            .value()
            .into_iter()
            .flatten()
            .map(|l| GpuNvLinkErrors {
                link: l.link,
                replay: option(&l.replay),
                recovery: option(&l.recovery),
                crc_flit: option(&l.crc_flit),
                crc_data: option(&l.crc_data),
            })
            .collect(),
        event_window: health.map(event_window),
        assigned: None,
        mig_enabled: option(&d.mig_mode),
        mig_devices: d.mig_devices.iter().map(mig_device).collect(),
    }
}

fn mig_device(m: &gpu::MigDeviceStats) -> GpuMigDevice {
    GpuMigDevice {
        index: m.index,
        uuid: m.uuid.value().cloned().unwrap_or_default(),
        name: m.name.value().cloned().unwrap_or_default(),
        gpu_instance_id: option(&m.gpu_instance_id),
        compute_instance_id: option(&m.compute_instance_id),
        memory_used_bytes: option(&m.memory_used_bytes),
        memory_total_bytes: option(&m.memory_total_bytes),
        assigned: None,
    }
}

/// The source's own state: whether NVML answers, its versions, its counters.
fn source_state(s: &gpu::GpuSnapshot) -> GpuSourceState {
    GpuSourceState {
        poll_failed: s.poll_error.is_some(),
        degraded: matches!(s.status, gpu::SourceStatus::Degraded(_)),
        reinit_attempts_total: s.reinit_attempts_total,
        count_errors_total: s.count_errors_total.values().sum(),
        poll_duration: std::time::Duration::from_micros(s.poll_micros),
        driver_version: s.driver_version.value().cloned(),
        nvml_version: s.nvml_version.value().cloned(),
        events_watched: s.health.events_watched.as_ref().map(Reading::is_supported),
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
    let data = GpuSnapshot {
        gpus,
        source: source_state(s),
    };
    (data, provenance)
}

/// Whether a GPU snapshot is a real poll rather than the channel's placeholder.
pub fn gpu_polled(s: &gpu::GpuSnapshot) -> bool {
    s.poll_micros > 0 || !s.devices.is_empty() || s.poll_error.is_some()
}

#[cfg(test)]
#[path = "resources_tests.rs"]
mod tests;
