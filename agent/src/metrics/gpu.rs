//! NVIDIA GPUs: utilisation, memory, temperature, power, clocks, ECC, retired pages and
//! remapped rows, NVLink and PCIe errors, the media engines, XID and ECC events within
//! `gpu.xid_window` and lost GPUs. GPU memory per container comes from the store (`store.rs`),
//! with the labels every per-container series carries.
//!
//! Everything is read from the store's GPU snapshot, which the bridge fills from the source.
//! Series are labelled by the GPU's index (`gpu`, nvidia-smi's order) and `uuid`. A reading the
//! device does not support, or that failed, is left out: a 0 would claim a measurement (the
//! store names such readings in `unreadable` / `unsupported`, or holds `None`).
//! Percentages become ratios (0..1), milliwatts watts and MHz hertz, the base units.

use super::Metrics;
use crate::store::{GpuDevice, GpuEventWindow, GpuReading, GpuSnapshot};

fn flag(on: bool) -> f64 {
    if on {
        1.0
    } else {
        0.0
    }
}

/// Writes the store's GPU snapshot.
pub fn encode(s: &GpuSnapshot, m: &mut Metrics) {
    let src = &s.source;
    m.gauge(
        "nodeward_gpu_devices",
        "GPUs NVML reports on this node.",
        &[],
        s.gpus.len() as f64,
    );
    m.gauge(
        "nodeward_gpu_poll_error",
        "1 when NVML could not even count the GPUs in the last poll (the per-GPU series are then missing, not healthy).",
        &[],
        flag(src.poll_failed),
    );
    m.gauge(
        "nodeward_gpu_source_degraded",
        "1 while NVML fails as a whole (it cannot count the GPUs) and the source re-initialises it with back-off.",
        &[],
        flag(src.degraded),
    );
    m.counter(
        "nodeward_gpu_nvml_reinit_attempts_total",
        "Times the source shut NVML down and initialised it again after it failed as a whole.",
        &[],
        src.reinit_attempts_total as f64,
    );
    m.counter(
        "nodeward_gpu_nvml_count_errors_total",
        "Polls whose nvmlDeviceGetCount failed: NVML failing as a whole (the degraded reason names the error; failed re-initialisations count in nodeward_gpu_nvml_reinit_attempts_total).",
        &[],
        src.count_errors_total as f64,
    );
    m.gauge(
        "nodeward_gpu_poll_duration_seconds",
        "How long the last NVML poll of every GPU took, in seconds.",
        &[],
        src.poll_duration.as_secs_f64(),
    );
    if let (Some(driver), Some(nvml)) = (&src.driver_version, &src.nvml_version) {
        m.gauge(
            "nodeward_gpu_driver_info",
            "The NVIDIA driver and NVML versions, as labels; the value is always 1.",
            &[("driver_version", driver), ("nvml_version", nvml)],
            1.0,
        );
    }
    if let Some(watched) = src.events_watched {
        m.gauge(
            "nodeward_gpu_events_watched",
            "1 when XID and ECC events are being received from the driver; 0 when they cannot be (XID counts are then not measured).",
            &[],
            flag(watched),
        );
    }
    for d in &s.gpus {
        encode_device(d, m);
        mig::encode(d, m);
    }
    for d in &s.gpus {
        if let Some(w) = &d.event_window {
            encode_events(d, w, m);
        }
    }
}

fn encode_device(d: &GpuDevice, m: &mut Metrics) {
    let index = d.index.to_string();
    let labels = [("gpu", index.as_str()), ("uuid", d.uuid.as_str())];
    // A plain field is a sample only when NVML measured it in the last poll.
    let measured = |r: GpuReading, v: f64| d.measured(r).then_some(v);
    let mut g = |name: &'static str, help: &'static str, value: Option<f64>| {
        if let Some(v) = value {
            m.gauge(name, help, &labels, v);
        }
    };
    g(
        "nodeward_gpu_lost",
        "1 when the GPU fell off the bus or needs a reset (NVML_ERROR_GPU_IS_LOST).",
        Some(flag(d.lost)),
    );
    let ratio = |p: u32| f64::from(p) / 100.0;
    g(
        "nodeward_gpu_utilization_ratio",
        "Fraction of the last sample period in which a kernel ran on the GPU, 0..1.",
        measured(GpuReading::Utilization, d.utilization_percent / 100.0),
    );
    g(
        "nodeward_gpu_memory_utilization_ratio",
        "Fraction of the last sample period in which device memory was read or written, 0..1.",
        measured(
            GpuReading::MemoryUtilization,
            d.memory_utilization_percent / 100.0,
        ),
    );
    g(
        "nodeward_gpu_memory_used_bytes",
        "Device memory in use, in bytes.",
        measured(GpuReading::MemoryUsed, d.memory_used_bytes as f64),
    );
    g(
        "nodeward_gpu_memory_total_bytes",
        "Device memory in all, in bytes.",
        measured(GpuReading::MemoryTotal, d.memory_total_bytes as f64),
    );
    g(
        "nodeward_gpu_temperature_celsius",
        "GPU core temperature, in degrees Celsius.",
        measured(GpuReading::Temperature, d.temperature_celsius),
    );
    g(
        "nodeward_gpu_power_watts",
        "Power the GPU draws, in watts.",
        measured(GpuReading::Power, d.power_watts),
    );
    g(
        "nodeward_gpu_power_limit_watts",
        "The GPU's power management limit, in watts.",
        d.power_limit_watts,
    );
    g(
        "nodeward_gpu_encoder_utilization_ratio",
        "Fraction of time the video encoder was busy, 0..1.",
        d.encoder_utilization_percent.map(ratio),
    );
    g(
        "nodeward_gpu_decoder_utilization_ratio",
        "Fraction of time the video decoder was busy, 0..1.",
        d.decoder_utilization_percent.map(ratio),
    );
    g(
        "nodeward_gpu_encoder_sessions",
        "Active video encoder sessions.",
        d.encoder_sessions.map(f64::from),
    );
    g(
        "nodeward_gpu_ecc_enabled",
        "1 when ECC is switched on.",
        d.ecc_enabled.map(flag),
    );
    g(
        "nodeward_gpu_retired_pages_pending",
        "1 when a page retirement waits for the next driver reload or GPU reset.",
        d.retired_pages_pending.map(flag),
    );
    if d.measured(GpuReading::RowRemapping) {
        g(
            "nodeward_gpu_row_remap_pending",
            "1 when a row remap waits for a GPU reset.",
            Some(flag(d.row_remap_pending > 0)),
        );
        g(
            "nodeward_gpu_row_remap_failed",
            "1 when a row remap failed: the GPU should be replaced.",
            Some(flag(d.row_remap_failed)),
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
fn encode_labelled(d: &GpuDevice, gpu: &[(&str, &str); 2], m: &mut Metrics) {
    let c = &d.clocks;
    let clocks = [
        ("graphics", c.graphics_mhz),
        ("sm", c.sm_mhz),
        ("memory", c.memory_mhz),
        ("video", c.video_mhz),
    ];
    for (clock, reading) in clocks {
        if let Some(mhz) = reading {
            m.gauge(
                "nodeward_gpu_clock_hertz",
                "Current clock of each GPU clock domain, in hertz.",
                &[gpu[0], gpu[1], ("clock", clock)],
                f64::from(mhz) * 1e6,
            );
        }
    }
    const VOLATILE: &str = "nodeward_gpu_ecc_volatile_errors_total";
    const VOLATILE_HELP: &str = "ECC errors since the driver loaded, corrected or uncorrected.";
    const AGGREGATE: &str = "nodeward_gpu_ecc_aggregate_errors_total";
    const AGGREGATE_HELP: &str =
        "ECC errors over the GPU's lifetime (kept in its infoROM), corrected or uncorrected.";
    let ecc = [
        (
            VOLATILE,
            VOLATILE_HELP,
            "corrected",
            d.measured(GpuReading::EccCorrected)
                .then_some(d.ecc_corrected_total),
        ),
        (
            VOLATILE,
            VOLATILE_HELP,
            "uncorrected",
            d.measured(GpuReading::EccUncorrected)
                .then_some(d.ecc_uncorrected_total),
        ),
        (
            AGGREGATE,
            AGGREGATE_HELP,
            "corrected",
            d.ecc_aggregate_corrected_total,
        ),
        (
            AGGREGATE,
            AGGREGATE_HELP,
            "uncorrected",
            d.ecc_aggregate_uncorrected_total,
        ),
    ];
    for (name, help, error, reading) in ecc {
        if let Some(n) = reading {
            m.counter(name, help, &[gpu[0], gpu[1], ("error", error)], n as f64);
        }
    }
    let retired = [
        ("single_bit", d.retired_pages_single_bit),
        ("double_bit", d.retired_pages_double_bit),
    ];
    for (cause, reading) in retired {
        if let Some(n) = reading {
            m.gauge(
                "nodeward_gpu_retired_pages",
                "Pages retired after ECC errors, by cause (GPUs before Ampere).",
                &[gpu[0], gpu[1], ("cause", cause)],
                f64::from(n),
            );
        }
    }
    if let Some(r) = d.remapped_rows {
        for (error, n) in [("corrected", r.corrected), ("uncorrected", r.uncorrected)] {
            m.gauge(
                "nodeward_gpu_remapped_rows",
                "Memory rows remapped after ECC errors, by error kind (Ampere and later).",
                &[gpu[0], gpu[1], ("error", error)],
                f64::from(n),
            );
        }
    }
    if let Some(n) = d.pcie_replays_total {
        m.counter(
            "nodeward_gpu_pcie_replays_total",
            "PCIe replays (link-level retransmissions) since the driver loaded.",
            gpu,
            f64::from(n),
        );
    }
    for link in &d.nvlink {
        let id = link.link.to_string();
        for (error, reading) in [
            ("replay", link.replay),
            ("recovery", link.recovery),
            ("crc_flit", link.crc_flit),
            ("crc_data", link.crc_data),
        ] {
            if let Some(n) = reading {
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

fn encode_events(d: &GpuDevice, w: &GpuEventWindow, m: &mut Metrics) {
    let index = d.index.to_string();
    let uuid = d.uuid.as_str();
    for (xid, n) in &w.xids {
        let xid_text = xid.to_string();
        let drain = if w.drain_xids.contains(xid) {
            "true"
        } else {
            "false"
        };
        m.gauge(
            "nodeward_gpu_xid_window_events",
            "XID errors within gpu.xid_window, by XID code; drain=\"true\" for the codes on gpu.drain_xids.",
            &[
                ("gpu", &index),
                ("uuid", uuid),
                ("xid", &xid_text),
                ("drain", drain),
            ],
            f64::from(*n),
        );
    }
    for (error, n) in [
        ("single_bit", w.single_bit_ecc_events),
        ("double_bit", w.double_bit_ecc_events),
    ] {
        m.gauge(
            "nodeward_gpu_ecc_window_events",
            "ECC error events within gpu.xid_window, by kind.",
            &[("gpu", &index), ("uuid", uuid), ("error", error)],
            f64::from(n),
        );
    }
}

mod mig;
#[cfg(test)]
mod tests;
