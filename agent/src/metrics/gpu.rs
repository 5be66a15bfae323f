//! NVIDIA GPUs: utilisation, memory, temperature, power, clocks, ECC, retired pages and
//! remapped rows, NVLink and PCIe errors, the media engines, XID and ECC events within
//! `gpu.xid_window` and lost GPUs. GPU memory per container comes from the store (`store.rs`),
//! with the labels every per-container series carries.
//!
//! Series are labelled by the GPU's index (`gpu`, nvidia-smi's order) and `uuid`. A reading the
//! device does not support, or that failed, is left out: a 0 would claim a measurement.
//! Percentages become ratios (0..1), milliwatts watts and MHz hertz, the base units.

use super::Metrics;
use crate::sources::gpu::{
    model::{DeviceStats, GpuHealthDevice},
    GpuSnapshot, Reading, SourceStatus,
};

/// Writes one GPU snapshot.
pub fn encode(s: &GpuSnapshot, m: &mut Metrics) {
    m.gauge(
        "nodeward_gpu_devices",
        "GPUs NVML reports on this node.",
        &[],
        s.devices.len() as f64,
    );
    m.gauge(
        "nodeward_gpu_poll_error",
        "1 when NVML could not even count the GPUs in the last poll (the per-GPU series are then missing, not healthy).",
        &[],
        if s.poll_error.is_some() { 1.0 } else { 0.0 },
    );
    m.gauge(
        "nodeward_gpu_source_degraded",
        "1 while NVML fails as a whole (it cannot count the GPUs) and the source re-initialises it with back-off.",
        &[],
        if matches!(s.status, SourceStatus::Degraded(_)) {
            1.0
        } else {
            0.0
        },
    );
    m.counter(
        "nodeward_gpu_nvml_reinit_attempts_total",
        "Times the source shut NVML down and initialised it again after it failed as a whole.",
        &[],
        s.reinit_attempts_total as f64,
    );
    m.counter(
        "nodeward_gpu_nvml_count_errors_total",
        "Polls whose nvmlDeviceGetCount failed: NVML failing as a whole (the degraded reason names the error; failed re-initialisations count in nodeward_gpu_nvml_reinit_attempts_total).",
        &[],
        s.count_errors_total.values().sum::<u64>() as f64,
    );
    m.gauge(
        "nodeward_gpu_poll_duration_seconds",
        "How long the last NVML poll of every GPU took, in seconds.",
        &[],
        s.poll_micros as f64 / 1e6,
    );
    if let (Some(driver), Some(nvml)) = (s.driver_version.value(), s.nvml_version.value()) {
        m.gauge(
            "nodeward_gpu_driver_info",
            "The NVIDIA driver and NVML versions, as labels; the value is always 1.",
            &[("driver_version", driver), ("nvml_version", nvml)],
            1.0,
        );
    }
    if let Some(watched) = &s.health.events_watched {
        m.gauge(
            "nodeward_gpu_events_watched",
            "1 when XID and ECC events are being received from the driver; 0 when they cannot be (XID counts are then not measured).",
            &[],
            if watched.is_supported() { 1.0 } else { 0.0 },
        );
    }
    for d in &s.devices {
        encode_device(d, m);
    }
    for (index, h) in &s.health.devices {
        encode_health(*index, h, m);
    }
}

/// `value` when the device answered; `None` (no sample) otherwise.
fn supported<T: Copy>(r: &Reading<T>) -> Option<T> {
    r.value().copied()
}

fn encode_device(d: &DeviceStats, m: &mut Metrics) {
    let index = d.index.to_string();
    let uuid = d.uuid.value().cloned().unwrap_or_default();
    let labels = [("gpu", index.as_str()), ("uuid", uuid.as_str())];
    let mut g = |name: &'static str, help: &'static str, value: Option<f64>| {
        if let Some(v) = value {
            m.gauge(name, help, &labels, v);
        }
    };
    g(
        "nodeward_gpu_lost",
        "1 when the GPU fell off the bus or needs a reset (NVML_ERROR_GPU_IS_LOST).",
        Some(if d.lost { 1.0 } else { 0.0 }),
    );
    let percent = |r: &Reading<u32>| supported(r).map(|p| f64::from(p) / 100.0);
    g(
        "nodeward_gpu_utilization_ratio",
        "Fraction of the last sample period in which a kernel ran on the GPU, 0..1.",
        percent(&d.utilization_gpu_percent),
    );
    g(
        "nodeward_gpu_memory_utilization_ratio",
        "Fraction of the last sample period in which device memory was read or written, 0..1.",
        percent(&d.utilization_memory_percent),
    );
    g(
        "nodeward_gpu_memory_used_bytes",
        "Device memory in use, in bytes.",
        supported(&d.memory_used_bytes).map(|b| b as f64),
    );
    g(
        "nodeward_gpu_memory_total_bytes",
        "Device memory in all, in bytes.",
        supported(&d.memory_total_bytes).map(|b| b as f64),
    );
    g(
        "nodeward_gpu_temperature_celsius",
        "GPU core temperature, in degrees Celsius.",
        supported(&d.temperature_celsius).map(f64::from),
    );
    g(
        "nodeward_gpu_power_watts",
        "Power the GPU draws, in watts.",
        supported(&d.power_draw_milliwatts).map(|mw| f64::from(mw) / 1e3),
    );
    g(
        "nodeward_gpu_power_limit_watts",
        "The GPU's power management limit, in watts.",
        supported(&d.power_limit_milliwatts).map(|mw| f64::from(mw) / 1e3),
    );
    g(
        "nodeward_gpu_encoder_utilization_ratio",
        "Fraction of time the video encoder was busy, 0..1.",
        percent(&d.media.encoder_utilization_percent),
    );
    g(
        "nodeward_gpu_decoder_utilization_ratio",
        "Fraction of time the video decoder was busy, 0..1.",
        percent(&d.media.decoder_utilization_percent),
    );
    g(
        "nodeward_gpu_encoder_sessions",
        "Active video encoder sessions.",
        d.media
            .encoder_sessions
            .value()
            .map(|e| f64::from(e.session_count)),
    );
    g(
        "nodeward_gpu_ecc_enabled",
        "1 when ECC is switched on.",
        supported(&d.ecc.enabled).map(|on| if on { 1.0 } else { 0.0 }),
    );
    g(
        "nodeward_gpu_retired_pages_pending",
        "1 when a page retirement waits for the next driver reload or GPU reset.",
        supported(&d.retired_pages.pending).map(|p| if p { 1.0 } else { 0.0 }),
    );
    if let Some(r) = d.row_remapping.value() {
        g(
            "nodeward_gpu_row_remap_pending",
            "1 when a row remap waits for a GPU reset.",
            Some(if r.pending { 1.0 } else { 0.0 }),
        );
        g(
            "nodeward_gpu_row_remap_failed",
            "1 when a row remap failed: the GPU should be replaced.",
            Some(if r.failed { 1.0 } else { 0.0 }),
        );
    }
    for (error, n) in &d.nvml_errors_total {
        m.counter(
            "nodeward_gpu_nvml_errors_total",
            "Failed NVML calls on the GPU since the agent started, by NVML error (\"not supported\" is an answer, not counted); the reading of a failed call is left out, not shown as 0.",
            &[labels[0], labels[1], ("error", error)],
            *n as f64,
        );
    }
    encode_labelled(d, &labels, m);
}

/// Families with a label beyond the GPU's own: clock, error kind, NVLink link.
fn encode_labelled(d: &DeviceStats, gpu: &[(&str, &str); 2], m: &mut Metrics) {
    let clocks = [
        ("graphics", &d.clocks_mhz.graphics),
        ("sm", &d.clocks_mhz.sm),
        ("memory", &d.clocks_mhz.memory),
        ("video", &d.clocks_mhz.video),
    ];
    for (clock, reading) in clocks {
        if let Some(mhz) = supported(reading) {
            m.gauge(
                "nodeward_gpu_clock_hertz",
                "Current clock of each GPU clock domain, in hertz.",
                &[gpu[0], gpu[1], ("clock", clock)],
                f64::from(mhz) * 1e6,
            );
        }
    }
    let ecc = [
        (
            "nodeward_gpu_ecc_volatile_errors_total",
            "ECC errors since the driver loaded, corrected or uncorrected.",
            "corrected",
            &d.ecc.corrected_volatile,
        ),
        (
            "nodeward_gpu_ecc_volatile_errors_total",
            "ECC errors since the driver loaded, corrected or uncorrected.",
            "uncorrected",
            &d.ecc.uncorrected_volatile,
        ),
        (
            "nodeward_gpu_ecc_aggregate_errors_total",
            "ECC errors over the GPU's lifetime (kept in its infoROM), corrected or uncorrected.",
            "corrected",
            &d.ecc.corrected_aggregate,
        ),
        (
            "nodeward_gpu_ecc_aggregate_errors_total",
            "ECC errors over the GPU's lifetime (kept in its infoROM), corrected or uncorrected.",
            "uncorrected",
            &d.ecc.uncorrected_aggregate,
        ),
    ];
    for (name, help, error, reading) in ecc {
        if let Some(n) = supported(reading) {
            m.counter(name, help, &[gpu[0], gpu[1], ("error", error)], n as f64);
        }
    }
    let retired = [
        ("single_bit", &d.retired_pages.single_bit),
        ("double_bit", &d.retired_pages.double_bit),
    ];
    for (cause, reading) in retired {
        if let Some(n) = supported(reading) {
            m.gauge(
                "nodeward_gpu_retired_pages",
                "Pages retired after ECC errors, by cause (GPUs before Ampere).",
                &[gpu[0], gpu[1], ("cause", cause)],
                f64::from(n),
            );
        }
    }
    if let Some(r) = d.row_remapping.value() {
        for (error, n) in [
            ("corrected", r.corrected_rows),
            ("uncorrected", r.uncorrected_rows),
        ] {
            m.gauge(
                "nodeward_gpu_remapped_rows",
                "Memory rows remapped after ECC errors, by error kind (Ampere and later).",
                &[gpu[0], gpu[1], ("error", error)],
                f64::from(n),
            );
        }
    }
    if let Some(n) = supported(&d.pcie_replay_count) {
        m.counter(
            "nodeward_gpu_pcie_replays_total",
            "PCIe replays (link-level retransmissions) since the driver loaded.",
            gpu,
            f64::from(n),
        );
    }
    for link in d.nvlink.value().into_iter().flatten() {
        let id = link.link.to_string();
        for (error, reading) in [
            ("replay", &link.replay),
            ("recovery", &link.recovery),
            ("crc_flit", &link.crc_flit),
            ("crc_data", &link.crc_data),
        ] {
            if let Some(n) = supported(reading) {
                m.counter(
                    "nodeward_gpu_nvlink_errors_total",
                    "NVLink errors by link and kind since the driver loaded.",
                    &[gpu[0], gpu[1], ("link", &id), ("error", error)],
                    n as f64,
                );
            }
        }
    }
}

fn encode_health(index: u32, h: &GpuHealthDevice, m: &mut Metrics) {
    let index = index.to_string();
    let uuid = h.uuid.clone().unwrap_or_default();
    for (xid, n) in &h.window.xids {
        let xid_text = xid.to_string();
        let drain = if h.window.drain_xids.contains(xid) {
            "true"
        } else {
            "false"
        };
        m.gauge(
            "nodeward_gpu_xid_window_events",
            "XID errors within gpu.xid_window, by XID code; drain=\"true\" for the codes on gpu.drain_xids.",
            &[
                ("gpu", &index),
                ("uuid", &uuid),
                ("xid", &xid_text),
                ("drain", drain),
            ],
            f64::from(*n),
        );
    }
    for (error, n) in [
        ("single_bit", h.window.single_bit_ecc_events),
        ("double_bit", h.window.double_bit_ecc_events),
    ] {
        m.gauge(
            "nodeward_gpu_ecc_window_events",
            "ECC error events within gpu.xid_window, by kind.",
            &[("gpu", &index), ("uuid", &uuid), ("error", error)],
            f64::from(n),
        );
    }
}

#[cfg(test)]
mod tests;
