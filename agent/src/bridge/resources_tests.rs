use std::time::{Duration, SystemTime};

use super::*;
use crate::{
    containers::{Container, Identity, Runtime},
    sources::{
        cgroup::{
            parse::{DeviceIo, PsiLine},
            scan::WorkloadRates,
            CgroupStats,
        },
        gpu::{
            model::{
                Clocks, Ecc, EncoderStats, GpuHealthDevice, GpuHealthInput,
                GpuProcess as NvmlProcess, Media, NvLinkErrors, ProcessKind, RetiredPages,
                RowRemapping, SourceStatus, ThrottleReasons,
            },
            xid::WindowCounts,
        },
        node::{ClockSync, Filesystem, Load, Memory, Nic},
    },
};

fn psi(some10: f64, full10: Option<f64>) -> Psi {
    Psi {
        some: PsiLine {
            avg10: some10,
            avg60: some10 / 2.0,
            // A distinct total per line, so a mix-up of `some` and `full` shows.
            total_us: (some10 * 1e6) as u64,
            ..PsiLine::default()
        },
        full: full10.map(|f| PsiLine {
            avg10: f,
            avg60: f / 2.0,
            total_us: (f * 1e6) as u64 + 7,
            ..PsiLine::default()
        }),
    }
}

fn workload() -> Workload {
    let mut stats = CgroupStats::default();
    stats.cpu.usage_ns = Some(7_250_000_000);
    stats.cpu.throttled_ns = Some(2_500_000_000);
    stats.io = [(1_000, 20), (300, 4)]
        .into_iter()
        .map(|(read_bytes, write_bytes)| DeviceIo {
            read_bytes,
            write_bytes,
            ..DeviceIo::default()
        })
        .collect();
    stats.memory.current_bytes = Some(1 << 20);
    stats.memory.limit_bytes = None;
    stats.memory.oom_kill_events = Some(2);
    stats.pids.current = Some(12);
    stats.pids.limit = Some(100);
    stats.psi.memory = Some(psi(4.0, Some(1.0)));
    stats.psi.cpu = Some(psi(8.0, None));
    Workload {
        container: Container {
            path: "kubepods.slice/kubepods-podu1.slice/cri-containerd-abc.scope".to_owned(),
            identity: Identity::Container {
                pod_uid: Some("u1".to_owned()),
                qos: None,
                container_id: "abc".to_owned(),
                runtime: Runtime::Containerd,
            },
            cgroup_id: Some(5),
            netns: None,
        },
        stats,
        rates: WorkloadRates {
            cpu: [Some(1.5), Some(0.5), None],
            throttled_periods_ratio: [Some(0.3), None, None],
            io_read_bytes: [Some(100.0), Some(1.0), None],
            io_write_bytes: [None, Some(9.0), None],
            ..WorkloadRates::default()
        },
    }
}

#[test]
fn workload_maps_to_container_stats_over_the_shortest_window() {
    let s = container_stats(&workload());
    assert_eq!(s.cpu_usage_cores, 1.5);
    assert_eq!(s.cpu_throttled_ratio, 0.3);
    assert_eq!(s.cpu_throttled_seconds_total, 2.5);
    assert_eq!((s.memory_bytes, s.memory_limit_bytes), (1 << 20, 0));
    assert_eq!(s.oom_kills_total, 2);
    assert_eq!(
        (s.io_read_bytes_per_second, s.io_write_bytes_per_second),
        (100.0, 0.0),
        "a window without a rate yet is 0, never a longer window's value"
    );
    assert_eq!((s.pids, s.pids_limit), (12, 100));
    assert_eq!(
        (s.memory_pressure.some_avg10, s.memory_pressure.full_avg10),
        (4.0, 1.0)
    );
    assert_eq!(s.cpu_pressure.full_avg60, 0.0, "no `full` line");
    assert_eq!(s.io_pressure, Pressure::default());
}

#[test]
fn workload_counters_are_the_kernels_totals() {
    let s = container_stats(&workload());
    assert_eq!(s.cpu_usage_seconds_total, 7.25);
    assert_eq!((s.io_read_bytes_total, s.io_write_bytes_total), (1_300, 24));
    assert_eq!(
        (
            s.memory_pressure.some_total_us,
            s.memory_pressure.full_total_us
        ),
        (4_000_000, 1_000_007)
    );
    assert_eq!(
        (s.cpu_pressure.some_total_us, s.cpu_pressure.full_total_us),
        (8_000_000, 0),
        "no `full` line: no full total"
    );
}

#[test]
fn cgroup_snapshot_is_keyed_by_container_id() {
    let scan = CgroupScan {
        workloads: vec![workload()],
        ..CgroupScan::default()
    };
    let snap = cgroup_snapshot(&scan);
    assert_eq!(snap.containers.keys().collect::<Vec<_>>(), ["abc"]);
}

#[test]
fn node_maps_psi_memory_disks_drops_and_clock() {
    let n = node::NodeStats {
        load: Some(Load {
            one: 0.7,
            five: 0.0,
            fifteen: 0.0,
        }),
        memory: Some(Memory {
            total_bytes: 1000,
            available_bytes: Some(400),
            free_bytes: 10,
            swap_total_bytes: 0,
            swap_free_bytes: 0,
        }),
        psi: node::NodePsi {
            io: Some(psi(30.0, Some(25.0))),
            ..node::NodePsi::default()
        },
        filesystems: vec![Filesystem {
            device: "/dev/vda1".to_owned(),
            mount_point: "/".to_owned(),
            fs_type: "ext4".to_owned(),
            size_bytes: 100,
            available_bytes: 5,
            used_bytes: 95,
            used_fraction: 0.95,
            inodes: 10,
            inodes_free: 9,
            inodes_used_fraction: 0.1,
        }],
        nics: vec![
            Nic {
                name: "eth0".to_owned(),
                rx_bytes: 0,
                tx_bytes: 0,
                rx_errors: 100,
                rx_dropped: 3,
                tx_errors: 0,
                tx_dropped: 4,
            },
            Nic {
                name: "eth1".to_owned(),
                rx_bytes: 0,
                tx_bytes: 0,
                rx_errors: 0,
                rx_dropped: 5,
                tx_errors: 0,
                tx_dropped: 0,
            },
        ],
        clock: Some(ClockSync {
            synchronized: false,
            sta_unsync: true,
            maxerror_us: 16_000,
            esterror_us: 0,
            reason: "STA_UNSYNC".to_owned(),
        }),
        ..node::NodeStats::default()
    };
    let s = node_stats(&n);
    assert_eq!(
        (s.memory_total_bytes, s.memory_available_bytes),
        (1000, 400)
    );
    assert_eq!(s.load1, 0.7);
    assert_eq!(s.io_pressure.full_avg10, 25.0);
    assert_eq!(s.disks.len(), 1);
    assert_eq!((s.disks[0].used_ratio, s.disks[0].total_bytes), (0.95, 100));
    assert_eq!(s.nic_drops_total, 12, "drops only, not errors");
    assert_eq!(s.clock_synchronized, Some(false));
    assert_eq!(s.clock_max_error_ms, 16.0);
    assert_eq!(
        node_stats(&node::NodeStats::default()).clock_synchronized,
        None
    );
}

fn ns<T>() -> Reading<T> {
    Reading::NotSupported
}

fn device(index: u32) -> DeviceStats {
    DeviceStats {
        index,
        lost: false,
        name: Reading::Supported("NVIDIA H100".to_owned()),
        uuid: Reading::Supported(format!("GPU-{index}")),
        pci_bus_id: ns(),
        utilization_gpu_percent: Reading::Supported(42),
        utilization_memory_percent: Reading::Error("timeout".to_owned()),
        memory_used_bytes: Reading::Supported(1 << 30),
        memory_total_bytes: Reading::Supported(80 << 30),
        temperature_celsius: ns(),
        power_draw_milliwatts: Reading::Supported(123_500),
        power_limit_milliwatts: ns(),
        clocks_mhz: Clocks {
            graphics: ns(),
            sm: ns(),
            memory: ns(),
            video: ns(),
        },
        throttle_reasons: Reading::Supported(ThrottleReasons {
            mask: 8,
            names: vec!["HwSlowdown"],
        }),
        ecc: Ecc {
            enabled: Reading::Supported(true),
            corrected_volatile: Reading::Supported(3),
            uncorrected_volatile: Reading::Supported(1),
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
            pending: true,
            failed: true,
        }),
        pcie_replay_count: ns(),
        nvlink: ns(),
        media: Media {
            encoder_utilization_percent: ns(),
            decoder_utilization_percent: ns(),
            encoder_sessions: ns(),
        },
        processes: Reading::Supported(vec![NvmlProcess {
            pid: 101,
            kind: ProcessKind::Compute,
            used_memory_bytes: Some(1000),
            sample: None,
            cgroup: None,
            container_id: Some("abc".to_owned()),
        }]),
        mig_mode: ns(),
        mig_devices: Vec::new(),
        nvml_errors_total: [("timeout".to_owned(), 1)].into_iter().collect(),
    }
}

fn gpu_snap() -> gpu::GpuSnapshot {
    let mut health = GpuHealthInput {
        events_watched: Some(Reading::Supported(())),
        ..GpuHealthInput::default()
    };
    health.devices.insert(
        1,
        GpuHealthDevice {
            lost: true,
            window: WindowCounts {
                xids: [(13, 2), (79, 100)].into_iter().collect(),
                ..WindowCounts::default()
            },
            ..GpuHealthDevice::default()
        },
    );
    gpu::GpuSnapshot {
        status: SourceStatus::Running,
        driver_version: Reading::Supported("550.54".to_owned()),
        nvml_version: Reading::Supported("12.550".to_owned()),
        devices: vec![device(0), device(1)],
        poll_error: None,
        count_errors_total: Default::default(),
        reinit_attempts_total: 0,
        health,
        taken_at: SystemTime::UNIX_EPOCH + Duration::from_secs(77),
        poll_micros: 10,
    }
}

#[test]
fn gpu_readings_map_to_store_units() {
    let (snap, _) = gpu_snapshot(&gpu_snap());
    let g = &snap.gpus[0];
    assert_eq!((g.uuid.as_str(), g.utilization_percent), ("GPU-0", 42.0));
    assert_eq!(g.power_watts, 123.5);
    assert_eq!(g.throttle_reasons, ["HwSlowdown"]);
    // A failed reading is named unreadable, an unsupported one unsupported: either way its
    // field is a default 0 that /metrics leaves out.
    assert_eq!(g.unreadable, [GpuReading::MemoryUtilization]);
    assert_eq!(
        g.unsupported,
        [GpuReading::PciBusId, GpuReading::Temperature]
    );
    assert!(g.measured(GpuReading::Utilization));
    assert!(!g.measured(GpuReading::MemoryUtilization) && !g.measured(GpuReading::Temperature));
    assert_eq!(g.nvml_errors_total.get("timeout"), Some(&1));
    assert_eq!((g.ecc_corrected_total, g.ecc_uncorrected_total), (3, 1));
    assert_eq!((g.row_remap_pending, g.row_remap_failed), (1, true));
    assert_eq!(g.processes[0].container_id, "abc");
    assert!(g.xids.is_empty() && !g.lost);
}

#[test]
fn gpu_processes_outside_containers_are_keyed_by_cgroup_path_like_every_source() {
    let mut s = gpu_snap();
    let process = |pid, cgroup: Option<&str>| NvmlProcess {
        pid,
        kind: ProcessKind::Compute,
        used_memory_bytes: Some(1),
        sample: None,
        cgroup: cgroup.map(str::to_owned),
        container_id: None,
    };
    s.devices[0].processes = Reading::Supported(vec![
        process(7, Some("system.slice/encoder.service")),
        process(8, None),
    ]);
    let (snap, _) = gpu_snapshot(&s);
    let keys: Vec<&str> = snap.gpus[0]
        .processes
        .iter()
        .map(|p| p.container_id.as_str())
        .collect();
    assert_eq!(keys, ["/system.slice/encoder.service", ""]);
}

#[test]
fn gpu_xids_and_lost_come_from_the_health_input_bounded_per_code() {
    let (snap, _) = gpu_snapshot(&gpu_snap());
    let g = &snap.gpus[1];
    assert!(g.lost);
    let codes: Vec<u32> = g.xids.iter().map(|x| x.code).collect();
    assert_eq!(codes.iter().filter(|c| **c == 13).count(), 2);
    assert_eq!(
        codes.iter().filter(|c| **c == 79).count(),
        MAX_XIDS_PER_CODE as usize
    );
    assert!(g
        .xids
        .iter()
        .all(|x| x.seen_at == Some(SystemTime::UNIX_EPOCH + Duration::from_secs(77))));
}

#[test]
fn unsupported_gpu_readings_become_defaults_named_in_provenance() {
    let (snap, p) = gpu_snapshot(&gpu_snap());
    assert_eq!(snap.gpus[0].temperature_celsius, 0.0);
    assert_eq!(snap.gpus[0].memory_utilization_percent, 0.0);
    assert!(
        p.fidelity.contains("gpu0 temperature: not supported"),
        "{}",
        p.fidelity
    );
    assert!(p.fidelity.contains("gpu0 memory utilization: timeout"));
    assert_eq!(p.hook, "NVML 12.550, driver 550.54");
}

#[test]
fn the_channels_placeholder_is_not_a_poll() {
    assert!(!gpu_polled(&gpu::GpuSnapshot::empty(SourceStatus::Running)));
    assert!(gpu_polled(&gpu_snap()));
}

#[test]
fn readings_only_metrics_export_are_none_unless_the_device_answered() {
    let mut s = gpu_snap();
    let d = &mut s.devices[0];
    d.power_limit_milliwatts = Reading::Supported(700_000);
    d.clocks_mhz.sm = Reading::Supported(1980);
    d.clocks_mhz.memory = Reading::Error("timeout".to_owned());
    d.media.encoder_sessions = Reading::Supported(EncoderStats {
        session_count: 3,
        average_fps: 30,
        average_latency_micros: 900,
    });
    d.ecc.uncorrected_aggregate = Reading::Supported(9);
    d.retired_pages.double_bit = Reading::Supported(2);
    d.pcie_replay_count = Reading::Supported(4);
    d.nvlink = Reading::Supported(vec![NvLinkErrors {
        link: 5,
        replay: Reading::Supported(6),
        recovery: Reading::Error("unknown".to_owned()),
        crc_flit: ns(),
        crc_data: Reading::Supported(0),
    }]);
    let (snap, _) = gpu_snapshot(&s);
    let g = &snap.gpus[0];
    assert_eq!(g.power_limit_watts, Some(700.0));
    assert_eq!(
        g.clocks,
        GpuClocks {
            graphics_mhz: None,
            sm_mhz: Some(1980),
            memory_mhz: None,
            video_mhz: None,
        }
    );
    assert_eq!(g.encoder_sessions, Some(3));
    assert_eq!(g.encoder_utilization_percent, None);
    assert_eq!(g.ecc_enabled, Some(true));
    assert_eq!(
        (
            g.ecc_aggregate_corrected_total,
            g.ecc_aggregate_uncorrected_total
        ),
        (None, Some(9))
    );
    assert_eq!(
        (g.retired_pages_single_bit, g.retired_pages_double_bit),
        (None, Some(2))
    );
    assert_eq!(g.retired_pages_pending, None);
    assert_eq!(
        g.remapped_rows,
        Some(GpuRemappedRows {
            corrected: 1,
            uncorrected: 0
        })
    );
    assert_eq!(g.pcie_replays_total, Some(4));
    assert_eq!(
        g.nvlink,
        [GpuNvLinkErrors {
            link: 5,
            replay: Some(6),
            recovery: None,
            crc_flit: None,
            crc_data: Some(0),
        }]
    );
    // No NVLink at all: no links, not links of zeros.
    assert!(snap.gpus[1].nvlink.is_empty());
}

#[test]
fn a_failed_row_remapping_reading_is_unreadable_not_a_healthy_zero() {
    let mut s = gpu_snap();
    s.devices[0].row_remapping = Reading::Error("unknown".to_owned());
    let (snap, _) = gpu_snapshot(&s);
    let g = &snap.gpus[0];
    assert_eq!((g.row_remap_pending, g.row_remap_failed), (0, false));
    assert!(!g.measured(GpuReading::RowRemapping));
    assert_eq!(g.remapped_rows, None);
}

#[test]
fn the_event_window_is_counted_exactly_with_its_drain_codes() {
    let mut s = gpu_snap();
    if let Some(h) = s.health.devices.get_mut(&1) {
        h.window.drain_xids = vec![79];
        h.window.double_bit_ecc_events = 2;
    }
    let (snap, _) = gpu_snapshot(&s);
    assert_eq!(snap.gpus[0].event_window, None, "no health entry for GPU 0");
    let w = snap.gpus[1].event_window.as_ref().expect("GPU 1 has one");
    // 100 events of XID 79, not the bounded history's 16.
    assert_eq!(w.xids.get(&79), Some(&100));
    assert_eq!(w.xids.get(&13), Some(&2));
    assert_eq!(w.drain_xids, [79]);
    assert_eq!((w.single_bit_ecc_events, w.double_bit_ecc_events), (0, 2));
}

#[test]
fn the_source_state_carries_nvml_failing_as_a_whole() {
    let (snap, _) = gpu_snapshot(&gpu_snap());
    assert_eq!(
        snap.source,
        GpuSourceState {
            poll_failed: false,
            degraded: false,
            reinit_attempts_total: 0,
            count_errors_total: 0,
            poll_duration: Duration::from_micros(10),
            driver_version: Some("550.54".to_owned()),
            nvml_version: Some("12.550".to_owned()),
            events_watched: Some(true),
        }
    );
    let mut s = gpu::GpuSnapshot::empty(SourceStatus::Degraded("count failed".to_owned()));
    s.poll_error = Some("unknown error".to_owned());
    s.count_errors_total = [("unknown".to_owned(), 3), ("timeout".to_owned(), 2)]
        .into_iter()
        .collect();
    s.reinit_attempts_total = 4;
    s.health.events_watched = Some(Reading::Error("cannot register".to_owned()));
    let (snap, _) = gpu_snapshot(&s);
    assert!(snap.gpus.is_empty());
    let src = &snap.source;
    assert!(src.poll_failed && src.degraded);
    assert_eq!((src.count_errors_total, src.reinit_attempts_total), (5, 4));
    assert_eq!(
        (src.driver_version.as_deref(), src.events_watched),
        (None, Some(false))
    );
}
