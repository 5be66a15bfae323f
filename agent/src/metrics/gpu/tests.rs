//! The GPU series as the agent produces them: a source snapshot mapped into the store by the
//! bridge, then rendered from the store.

use std::time::SystemTime;

use super::*;
use crate::sources::gpu::{
    model::{
        Clocks, DeviceStats, Ecc, GpuHealthDevice, GpuHealthInput, GpuProcess, Media, NvLinkErrors,
        ProcessKind, RetiredPages, RowRemapping,
    },
    xid::WindowCounts,
    GpuSnapshot, Reading, SourceStatus,
};

/// Maps a source snapshot into the store's, as the bridge does, and renders that.
fn encode_source(s: &GpuSnapshot, m: &mut Metrics) {
    let (store, _) = crate::bridge::resources::gpu_snapshot(s);
    encode(&store, m);
}

const ID: &str = "4f1c3ba5e8a5a1b6f3d6a0c2c8f9e7d6b5a4c3b2a1f0e9d8c7b6a5f4e3d2c1b0";

fn ns<T>() -> Reading<T> {
    Reading::NotSupported
}

fn process(pid: u32, bytes: u64) -> GpuProcess {
    GpuProcess {
        pid,
        kind: ProcessKind::Compute,
        used_memory_bytes: Some(bytes),
        sample: None,
        cgroup: Some(format!("/kubepods.slice/cri-containerd-{ID}.scope")),
        container_id: Some(ID.to_owned()),
    }
}

fn device() -> DeviceStats {
    DeviceStats {
        index: 0,
        lost: false,
        name: Reading::Supported("NVIDIA H100".to_owned()),
        uuid: Reading::Supported("GPU-abc".to_owned()),
        pci_bus_id: ns(),
        utilization_gpu_percent: Reading::Supported(42),
        utilization_memory_percent: Reading::Error("timeout".to_owned()),
        memory_used_bytes: Reading::Supported(1 << 30),
        memory_total_bytes: Reading::Supported(80 << 30),
        temperature_celsius: Reading::Supported(55),
        power_draw_milliwatts: Reading::Supported(123_500),
        power_limit_milliwatts: ns(),
        clocks_mhz: Clocks {
            graphics: Reading::Supported(1980),
            sm: ns(),
            memory: ns(),
            video: ns(),
        },
        throttle_reasons: ns(),
        ecc: Ecc {
            enabled: Reading::Supported(true),
            corrected_volatile: Reading::Supported(3),
            uncorrected_volatile: Reading::Supported(0),
            corrected_aggregate: ns(),
            uncorrected_aggregate: ns(),
        },
        retired_pages: RetiredPages {
            single_bit: ns(),
            double_bit: ns(),
            pending: ns(),
        },
        row_remapping: Reading::Supported(RowRemapping {
            corrected_rows: 1,
            uncorrected_rows: 0,
            pending: false,
            failed: true,
        }),
        pcie_replay_count: Reading::Supported(7),
        nvlink: Reading::Supported(vec![NvLinkErrors {
            link: 2,
            replay: Reading::Supported(5),
            recovery: ns(),
            crc_flit: ns(),
            crc_data: ns(),
        }]),
        media: Media {
            encoder_utilization_percent: Reading::Supported(10),
            decoder_utilization_percent: ns(),
            encoder_sessions: ns(),
        },
        processes: Reading::Supported(vec![process(101, 1000), process(102, 24)]),
        mig_mode: ns(),
        mig_devices: Vec::new(),
        nvml_errors_total: [("timeout".to_owned(), 3)].into_iter().collect(),
    }
}

fn snapshot() -> GpuSnapshot {
    let mut health = GpuHealthInput {
        events_watched: Some(Reading::Supported(())),
        ..GpuHealthInput::default()
    };
    health.devices.insert(
        0,
        GpuHealthDevice {
            uuid: Some("GPU-abc".to_owned()),
            window: WindowCounts {
                xids: [(13, 2), (79, 1)].into_iter().collect(),
                drain_xids: vec![79],
                single_bit_ecc_events: 4,
                double_bit_ecc_events: 0,
            },
            ..GpuHealthDevice::default()
        },
    );
    GpuSnapshot {
        status: SourceStatus::Running,
        driver_version: Reading::Supported("550.54".to_owned()),
        nvml_version: Reading::Supported("12.550".to_owned()),
        devices: vec![device()],
        poll_error: None,
        count_errors_total: [("unknown".to_owned(), 2)].into_iter().collect(),
        reinit_attempts_total: 1,
        health,
        taken_at: SystemTime::now(),
        poll_micros: 2500,
    }
}

fn render() -> String {
    let mut m = Metrics::new();
    encode_source(&snapshot(), &mut m);
    m.render()
}

fn has(text: &str, line: &str) {
    assert!(
        text.lines().any(|l| l == line),
        "missing `{line}` in:\n{text}"
    );
}

#[test]
fn readings_are_exported_in_base_units() {
    let text = render();
    let g = "gpu=\"0\",uuid=\"GPU-abc\"";
    has(
        &text,
        &format!("nodeward_gpu_utilization_ratio{{{g}}} 0.42"),
    );
    has(&text, &format!("nodeward_gpu_power_watts{{{g}}} 123.5"));
    has(
        &text,
        &format!("nodeward_gpu_temperature_celsius{{{g}}} 55"),
    );
    has(
        &text,
        &format!("nodeward_gpu_memory_total_bytes{{{g}}} 85899345920"),
    );
    has(
        &text,
        &format!("nodeward_gpu_clock_hertz{{{g},clock=\"graphics\"}} 1980000000"),
    );
    has(
        &text,
        &format!("nodeward_gpu_ecc_volatile_errors_total{{{g},error=\"corrected\"}} 3"),
    );
    has(&text, &format!("nodeward_gpu_row_remap_failed{{{g}}} 1"));
    has(
        &text,
        &format!("nodeward_gpu_nvlink_errors_total{{{g},link=\"2\",error=\"replay\"}} 5"),
    );
    has(&text, "nodeward_gpu_poll_duration_seconds 0.0025");
}

#[test]
fn unsupported_and_failed_readings_have_no_sample() {
    let text = render();
    for name in [
        "nodeward_gpu_memory_utilization_ratio{",
        "nodeward_gpu_power_limit_watts{",
        "nodeward_gpu_decoder_utilization_ratio{",
        "nodeward_gpu_encoder_sessions{",
        "nodeward_gpu_ecc_aggregate_errors_total{",
        "clock=\"sm\"",
    ] {
        assert!(!text.contains(name), "{name} should be absent:\n{text}");
    }
}

#[test]
fn xids_in_the_window_are_marked_drain_or_not() {
    let text = render();
    let g = "gpu=\"0\",uuid=\"GPU-abc\"";
    has(
        &text,
        &format!("nodeward_gpu_xid_window_events{{{g},xid=\"13\",drain=\"false\"}} 2"),
    );
    has(
        &text,
        &format!("nodeward_gpu_xid_window_events{{{g},xid=\"79\",drain=\"true\"}} 1"),
    );
    has(
        &text,
        &format!("nodeward_gpu_ecc_window_events{{{g},error=\"single_bit\"}} 4"),
    );
    assert!(
        !text.contains("nodeward_container_gpu_memory_used_bytes"),
        "per-container GPU memory comes from the store, not from the feed:\n{text}"
    );
}

#[test]
fn a_lost_gpu_is_one_with_its_last_uuid() {
    let mut s = snapshot();
    s.devices[0].lost = true;
    s.devices[0].temperature_celsius = Reading::Error("GPU is lost".to_owned());
    let mut m = Metrics::new();
    encode_source(&s, &mut m);
    let text = m.render();
    has(&text, "nodeward_gpu_lost{gpu=\"0\",uuid=\"GPU-abc\"} 1");
    assert!(
        !text.contains("nodeward_gpu_temperature_celsius{"),
        "{text}"
    );
}

#[test]
fn failed_nvml_calls_are_counted_by_kind_and_a_degraded_source_says_so() {
    let text = render();
    has(
        &text,
        "nodeward_gpu_nvml_errors_total{gpu=\"0\",uuid=\"GPU-abc\",error=\"timeout\"} 3",
    );
    has(&text, "nodeward_gpu_nvml_count_errors_total 2");
    has(&text, "nodeward_gpu_nvml_reinit_attempts_total 1");
    has(&text, "nodeward_gpu_source_degraded 0");
    let mut s = snapshot();
    s.status = SourceStatus::Degraded("cannot count the GPUs".to_owned());
    s.devices.clear();
    let mut m = Metrics::new();
    encode_source(&s, &mut m);
    has(&m.render(), "nodeward_gpu_source_degraded 1");
}

#[test]
fn a_plain_store_field_named_unreadable_or_unsupported_has_no_sample() {
    let (mut store, _) = crate::bridge::resources::gpu_snapshot(&snapshot());
    let d = &mut store.gpus[0];
    d.unreadable = vec![GpuReading::Temperature];
    d.unsupported = vec![GpuReading::EccCorrected, GpuReading::RowRemapping];
    let mut m = Metrics::new();
    encode(&store, &mut m);
    let text = m.render();
    for absent in [
        "nodeward_gpu_temperature_celsius{",
        "error=\"corrected\"} 3",
        "nodeward_gpu_row_remap_failed{",
        "nodeward_gpu_row_remap_pending{",
    ] {
        assert!(!text.contains(absent), "{absent} should be absent:\n{text}");
    }
    has(
        &text,
        "nodeward_gpu_ecc_volatile_errors_total{gpu=\"0\",uuid=\"GPU-abc\",error=\"uncorrected\"} 0",
    );
}
