//! The GPU source against a fake NVML library of the tests' own (`tests/fake-nvml`), loaded
//! through `gpu.library`: scripted values, "not supported", errors, XID and ECC events, a GPU
//! that falls off the bus, processes mapped to containers, and the ways NVML can be unusable
//! (no library, missing symbols, driver/library mismatch, no GPU). No GPU and no root needed.

use std::time::Duration;

use nodeward::{
    config::Config,
    sources::gpu::{
        model::{ProcessKind, ProcessSample, RowRemapping},
        Gpu, GpuError, Reading,
    },
};
use nodeward_tests::{
    fake_nvml::{device, every_field_script, fake},
    wait_for,
};

const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn open_error(config: &Config) -> String {
    match Gpu::open(&config.gpu, &config.paths.proc_root) {
        Ok(_) => panic!("NVML opened, but it should have been unavailable"),
        Err(e @ GpuError::Unavailable(_)) => e.to_string(),
        Err(e) => panic!("expected Unavailable, got {e}"),
    }
}

#[test]
fn each_device_reports_the_values_the_driver_gave() {
    let Some(fake) = fake("values", &[]) else {
        return;
    };
    fake.script(
        "devices = 2
         driver_version = 550.54.15
         dev.0.name = NVIDIA L4
         dev.0.uuid = GPU-aaaaaaaa-0000-0000-0000-000000000000
         dev.0.bus_id = 00000000:3B:00.0
         dev.0.util.gpu = 87
         dev.0.util.mem = 23
         dev.0.mem.total = 24152899584
         dev.0.mem.used = 5368709120
         dev.0.temp = 64
         dev.0.power = 61234
         dev.0.power_limit = 72000
         dev.0.clock.graphics = 2040
         dev.0.clock.sm = 2040
         dev.0.clock.mem = 6251
         dev.0.clock.video = 1770
         dev.0.throttle = 0x24
         dev.0.ecc.mode = 1
         dev.0.ecc.corrected.volatile = 11
         dev.0.ecc.uncorrected.volatile = 2
         dev.0.ecc.corrected.aggregate = 110
         dev.0.ecc.uncorrected.aggregate = 20
         dev.0.retired.sbe = 3
         dev.0.retired.dbe = 1
         dev.0.retired.pending = 1
         dev.0.remap = 4,1,1,0
         dev.0.pcie_replay = 9
         dev.0.enc.util = 35
         dev.0.dec.util = 12
         dev.0.enc.stats = 6,59,8123
         dev.1.name = NVIDIA A10
         dev.1.util.gpu = 5
         dev.1.temp = 41
         ",
    );
    let snapshot = fake.open().poll();
    assert_eq!(
        snapshot.driver_version,
        Reading::Supported("550.54.15".to_owned())
    );
    assert_eq!(snapshot.devices.len(), 2);

    let d = device(&snapshot, 0);
    assert!(!d.lost);
    assert_eq!(d.name, Reading::Supported("NVIDIA L4".to_owned()));
    assert_eq!(
        d.uuid,
        Reading::Supported("GPU-aaaaaaaa-0000-0000-0000-000000000000".to_owned())
    );
    assert_eq!(
        d.pci_bus_id,
        Reading::Supported("00000000:3B:00.0".to_owned())
    );
    assert_eq!(d.utilization_gpu_percent, Reading::Supported(87));
    assert_eq!(d.utilization_memory_percent, Reading::Supported(23));
    assert_eq!(d.memory_total_bytes, Reading::Supported(24_152_899_584));
    assert_eq!(d.memory_used_bytes, Reading::Supported(5_368_709_120));
    assert_eq!(d.temperature_celsius, Reading::Supported(64));
    assert_eq!(d.power_draw_milliwatts, Reading::Supported(61_234));
    assert_eq!(d.power_limit_milliwatts, Reading::Supported(72_000));
    assert_eq!(d.clocks_mhz.graphics, Reading::Supported(2040));
    assert_eq!(d.clocks_mhz.memory, Reading::Supported(6251));
    assert_eq!(d.clocks_mhz.video, Reading::Supported(1770));
    let throttle = d.throttle_reasons.value().expect("throttle reasons");
    assert_eq!(throttle.mask, 0x24);
    assert_eq!(throttle.names, vec!["sw_power_cap", "sw_thermal_slowdown"]);
    assert_eq!(d.ecc.enabled, Reading::Supported(true));
    assert_eq!(d.ecc.corrected_volatile, Reading::Supported(11));
    assert_eq!(d.ecc.uncorrected_volatile, Reading::Supported(2));
    assert_eq!(d.ecc.corrected_aggregate, Reading::Supported(110));
    assert_eq!(d.ecc.uncorrected_aggregate, Reading::Supported(20));
    assert_eq!(d.retired_pages.single_bit, Reading::Supported(3));
    assert_eq!(d.retired_pages.double_bit, Reading::Supported(1));
    assert_eq!(d.retired_pages.pending, Reading::Supported(true));
    assert_eq!(
        d.row_remapping,
        Reading::Supported(RowRemapping {
            corrected_rows: 4,
            uncorrected_rows: 1,
            pending: true,
            failed: false
        })
    );
    assert_eq!(d.pcie_replay_count, Reading::Supported(9));
    assert_eq!(d.media.encoder_utilization_percent, Reading::Supported(35));
    assert_eq!(d.media.decoder_utilization_percent, Reading::Supported(12));
    let enc = d.media.encoder_sessions.value().expect("encoder stats");
    assert_eq!(
        (
            enc.session_count,
            enc.average_fps,
            enc.average_latency_micros
        ),
        (6, 59, 8123)
    );

    // The second device is told apart and has its own values; what it was not given is
    // "not supported", never 0.
    let d1 = device(&snapshot, 1);
    assert_eq!(d1.name, Reading::Supported("NVIDIA A10".to_owned()));
    assert_eq!(d1.utilization_gpu_percent, Reading::Supported(5));
    assert_eq!(d1.temperature_celsius, Reading::Supported(41));
    assert_eq!(d1.power_draw_milliwatts, Reading::NotSupported);
    assert_eq!(d1.ecc.uncorrected_volatile, Reading::NotSupported);
    assert_eq!(d1.nvlink, Reading::NotSupported);

    // The health input carries the memory-health facts of each device.
    let h = &snapshot.health.devices[&0];
    assert_eq!(h.uncorrected_ecc_volatile, Some(2));
    assert_eq!(h.retired_pages_pending, Some(true));
    assert_eq!(
        (h.row_remap_pending, h.row_remap_failed),
        (Some(true), Some(false))
    );
    assert_eq!(snapshot.health.devices[&1].row_remap_pending, None);
}

#[test]
fn not_supported_and_failing_calls_are_kept_per_reading_and_the_poll_goes_on() {
    let Some(fake) = fake("errors", &[]) else {
        return;
    };
    fake.script(
        "all.temp = NS
         all.power = ERR:4
         all.pcie_replay = ERR:999
         all.util.gpu = 0
         all.util.mem = 0
         all.mem.total = 1000
         all.mem.used = 10
         ",
    );
    let snapshot = fake.open().poll();
    let d = device(&snapshot, 0);
    assert_eq!(d.temperature_celsius, Reading::NotSupported);
    assert!(
        matches!(&d.power_draw_milliwatts, Reading::Error(m) if m.contains("permission")),
        "{:?}",
        d.power_draw_milliwatts
    );
    assert!(
        matches!(d.pcie_replay_count, Reading::Error(_)),
        "{:?}",
        d.pcie_replay_count
    );
    // A real 0 stays a 0, distinct from "not supported".
    assert_eq!(d.utilization_gpu_percent, Reading::Supported(0));
    assert_eq!(d.memory_used_bytes, Reading::Supported(10));
    assert!(!d.lost);
    assert!(snapshot.poll_error.is_none());
}

#[test]
fn an_older_driver_without_a_function_reports_it_as_not_supported() {
    let Some(fake) = fake("old-driver", &["-DFAKE_OMIT_ENCODER_STATS"]) else {
        return;
    };
    fake.script("all.enc.util = 20\nall.enc.stats = 1,30,100\n");
    let snapshot = fake.open().poll();
    let d = device(&snapshot, 0);
    assert_eq!(d.media.encoder_sessions, Reading::NotSupported);
    assert_eq!(d.media.encoder_utilization_percent, Reading::Supported(20));
}

#[test]
fn nvlink_errors_are_read_for_active_links_only() {
    let Some(fake) = fake("nvlink", &[]) else {
        return;
    };
    fake.script(
        "dev.0.nvlink.0.state = 1
         dev.0.nvlink.0.replay = 5
         dev.0.nvlink.0.recovery = 1
         dev.0.nvlink.0.crc_flit = 7
         dev.0.nvlink.0.crc_data = 0
         dev.0.nvlink.1.state = 0
         dev.0.nvlink.2.state = 1
         dev.0.nvlink.2.replay = 2
         ",
    );
    let snapshot = fake.open().poll();
    let links = device(&snapshot, 0)
        .nvlink
        .value()
        .expect("NVLink readings")
        .clone();
    assert_eq!(links.iter().map(|l| l.link).collect::<Vec<_>>(), vec![0, 2]);
    assert_eq!(links[0].replay, Reading::Supported(5));
    assert_eq!(links[0].recovery, Reading::Supported(1));
    assert_eq!(links[0].crc_flit, Reading::Supported(7));
    assert_eq!(links[0].crc_data, Reading::Supported(0));
    assert_eq!(links[1].replay, Reading::Supported(2));
    assert_eq!(links[1].recovery, Reading::NotSupported);
}

#[test]
fn xid_and_ecc_events_are_counted_per_device_and_drain_xids_flagged() {
    let Some(fake) = fake("xid", &[]) else { return };
    fake.script("devices = 2\nevents = 0:xid:13 0:xid:79 0:xid:13 1:xid:31 1:dbe 1:sbe 1:sbe\n");
    let mut gpu = fake.open();
    let cancel = tokio_util::sync::CancellationToken::new();
    let thread = gpu.watch_events(cancel.clone()).expect("event thread");
    let snapshot = wait_for(Duration::from_secs(10), || {
        let s = gpu.poll();
        let total: u32 = s
            .health
            .devices
            .values()
            .map(|d| {
                d.window.xids.values().sum::<u32>()
                    + d.window.single_bit_ecc_events
                    + d.window.double_bit_ecc_events
            })
            .sum();
        (total == 7).then_some(s)
    })
    .expect("all 7 events reach the health input within 10 s");
    cancel.cancel();
    thread.join().expect("event thread ends when cancelled");

    assert_eq!(snapshot.health.events_watched, Some(Reading::Supported(())));
    let d0 = &snapshot.health.devices[&0].window;
    assert_eq!(d0.xids.get(&13), Some(&2));
    assert_eq!(d0.xids.get(&79), Some(&1));
    assert_eq!(d0.drain_xids, vec![79]);
    let d1 = &snapshot.health.devices[&1].window;
    assert_eq!(d1.xids.get(&31), Some(&1));
    assert!(
        d1.drain_xids.is_empty(),
        "XID 31 (MMU fault) is not a drain XID"
    );
    assert_eq!((d1.single_bit_ecc_events, d1.double_bit_ecc_events), (2, 1));
}

#[test]
fn xid_counts_clear_by_themselves_after_the_window() {
    let Some(fake) = fake("xid-window", &[]) else {
        return;
    };
    fake.script("events = 0:xid:48\n");
    let mut config = fake.config();
    config.gpu.xid_window = Duration::from_secs(1);
    let mut gpu = Gpu::open(&config.gpu, &config.paths.proc_root).expect("open");
    let cancel = tokio_util::sync::CancellationToken::new();
    let thread = gpu.watch_events(cancel.clone()).expect("event thread");
    let seen = wait_for(Duration::from_secs(10), || {
        let s = gpu.poll();
        (s.health.devices[&0].window.drain_xids == vec![48]).then_some(())
    });
    assert!(seen.is_some(), "XID 48 was never flagged");
    let cleared = wait_for(Duration::from_secs(10), || {
        let s = gpu.poll();
        s.health.devices[&0].window.xids.is_empty().then_some(())
    });
    cancel.cancel();
    let _ = thread.join();
    assert!(
        cleared.is_some(),
        "XID 48 still counted long after its 1 s window"
    );
}

#[test]
fn a_gpu_that_falls_off_the_bus_is_reported_lost_and_the_others_keep_reporting() {
    let Some(fake) = fake("lost", &[]) else {
        return;
    };
    let healthy = "devices = 2\nall.temp = 50\ndev.1.uuid = GPU-bbbb\ndev.1.name = NVIDIA H100\n";
    fake.script(healthy);
    let mut gpu = fake.open();
    let cancel = tokio_util::sync::CancellationToken::new();
    let thread = gpu.watch_events(cancel.clone()).expect("event thread");
    let before = gpu.poll();
    assert!(!device(&before, 1).lost);

    // Device 1 falls off the bus; event waits fail with GPU_IS_LOST too.
    fake.script(&format!("{healthy}dev.1.lost = 1\nevent_wait_rc = 15\n"));
    let after = gpu.poll();
    let d1 = device(&after, 1);
    assert!(d1.lost, "device 1 should be lost: {d1:?}");
    // It is named by the identity it had when last seen.
    assert_eq!(d1.uuid, Reading::Supported("GPU-bbbb".to_owned()));
    assert_eq!(d1.name, Reading::Supported("NVIDIA H100".to_owned()));
    assert!(matches!(d1.temperature_celsius, Reading::Error(_)));
    assert!(after.health.devices[&1].lost);
    let d0 = device(&after, 0);
    assert!(!d0.lost);
    assert_eq!(d0.temperature_celsius, Reading::Supported(50));

    // The event thread survives failing waits and stops when asked.
    std::thread::sleep(Duration::from_millis(300));
    cancel.cancel();
    thread.join().expect("event thread did not panic");

    // Back on the bus (after a reset), it reports again.
    fake.script(healthy);
    let recovered = gpu.poll();
    assert!(!device(&recovered, 1).lost);
    assert_eq!(
        device(&recovered, 1).temperature_celsius,
        Reading::Supported(50)
    );
}

#[test]
fn gpu_processes_are_mapped_to_their_cgroup_and_container() {
    let Some(fake) = fake("procs", &[]) else {
        return;
    };
    let proc_root = fake.dir.join("proc");
    for (pid, cgroup) in [
        (
            4242,
            format!("0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{ID}.scope\n"),
        ),
        (4343, "0::/system.slice/transcoder.service\n".to_owned()),
    ] {
        let dir = proc_root.join(pid.to_string());
        std::fs::create_dir_all(&dir).expect("mkdir proc");
        std::fs::write(dir.join("cgroup"), cgroup).expect("write cgroup");
    }
    fake.script(
        "all.procs.compute = 4242:1073741824 4343:2097152
         all.procs.graphics = 4545:4096
         all.procutil = 4242:61:20:7:3:100 4343:5:1:0:0:100
         ",
    );
    let mut config = fake.config();
    config.paths.proc_root = proc_root;
    let mut gpu = Gpu::open(&config.gpu, &config.paths.proc_root).expect("open");
    let snapshot = gpu.poll();
    let procs = device(&snapshot, 0)
        .processes
        .value()
        .expect("process list")
        .clone();
    assert_eq!(procs.len(), 3, "{procs:?}");

    let p = procs.iter().find(|p| p.pid == 4242).expect("pid 4242");
    assert_eq!(p.kind, ProcessKind::Compute);
    assert_eq!(p.used_memory_bytes, Some(1_073_741_824));
    assert_eq!(p.container_id.as_deref(), Some(ID));
    assert!(p
        .cgroup
        .as_deref()
        .is_some_and(|c| c.ends_with(&format!("cri-containerd-{ID}.scope"))));
    assert_eq!(
        p.sample,
        Some(ProcessSample {
            sm_percent: 61,
            memory_percent: 20,
            encoder_percent: 7,
            decoder_percent: 3
        })
    );

    let host = procs.iter().find(|p| p.pid == 4343).expect("pid 4343");
    assert_eq!(
        host.cgroup.as_deref(),
        Some("/system.slice/transcoder.service")
    );
    assert_eq!(host.container_id, None);

    // A process whose /proc entry is gone (it exited) has no cgroup, and is still listed.
    let gone = procs.iter().find(|p| p.pid == 4545).expect("pid 4545");
    assert_eq!(gone.kind, ProcessKind::Graphics);
    assert_eq!((gone.cgroup.as_deref(), gone.sample.as_ref()), (None, None));

    // The next poll asks only for newer samples: an old sample is not shown as current.
    let again = gpu.poll();
    let p = device(&again, 0)
        .processes
        .value()
        .expect("list")
        .iter()
        .find(|p| p.pid == 4242)
        .cloned();
    assert_eq!(p.and_then(|p| p.sample), None);
}

#[test]
fn presents_as_many_devices_as_scripted() {
    let Some(fake) = fake("eight", &[]) else {
        return;
    };
    fake.script("devices = 8\nall.util.gpu = 10\n");
    let snapshot = fake.open().poll();
    assert_eq!(snapshot.devices.len(), 8);
    let mut uuids: Vec<_> = snapshot
        .devices
        .iter()
        .filter_map(|d| d.uuid.value().cloned())
        .collect();
    uuids.dedup();
    assert_eq!(uuids.len(), 8, "each fake device has its own UUID");
    assert!(snapshot
        .devices
        .iter()
        .all(|d| d.utilization_gpu_percent == Reading::Supported(10)));
}

#[test]
fn no_library_at_all_is_a_clear_unavailable() {
    let mut config = Config::default();
    config.gpu.library = "/nonexistent/libnvidia-ml.so.1".to_owned();
    let message = open_error(&config);
    assert!(
        message.starts_with("GPU source unavailable: cannot load the NVML library"),
        "{message}"
    );
    assert!(
        message.contains("/nonexistent/libnvidia-ml.so.1"),
        "{message}"
    );
}

#[test]
fn a_library_missing_symbols_is_a_clear_unavailable() {
    let Some(fake) = fake("no-init", &["-DFAKE_OMIT_INIT"]) else {
        return;
    };
    let message = open_error(&fake.config());
    assert!(message.starts_with("GPU source unavailable: "), "{message}");
    assert!(
        message.contains("lacks a function") && message.contains("nvmlInit_v2"),
        "{message}"
    );
}

#[test]
fn a_driver_library_version_mismatch_is_a_clear_unavailable() {
    let Some(fake) = fake("mismatch", &[]) else {
        return;
    };
    fake.script("init = 18\n"); // NVML_ERROR_LIB_RM_VERSION_MISMATCH
    let message = open_error(&fake.config());
    assert!(
        message.starts_with("GPU source unavailable: driver/library version mismatch"),
        "{message}"
    );
}

#[test]
fn a_driver_without_gpus_is_a_clear_unavailable() {
    let Some(fake) = fake("zero", &[]) else {
        return;
    };
    fake.script("devices = 0\n");
    let message = open_error(&fake.config());
    assert_eq!(message, "GPU source unavailable: no NVIDIA GPU found");
}

#[test]
fn the_running_source_publishes_snapshots_and_stops_when_cancelled() {
    let Some(fake) = fake("source", &[]) else {
        return;
    };
    fake.script("devices = 2\nall.temp = 71\nevents = 1:xid:95\n");
    let mut config = fake.config();
    config.agent.tick = Duration::from_millis(100);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let source = nodeward::sources::gpu::Source::start(&config.gpu, &config.shared())
            .expect("source starts");
        let mut snapshots = source.subscribe();
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(source.run(cancel.clone()));
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                snapshots.changed().await.expect("the source publishes");
                let s = snapshots.borrow_and_update().clone();
                if s.health
                    .devices
                    .get(&1)
                    .is_some_and(|d| d.window.drain_xids == vec![95])
                {
                    break s;
                }
            }
        })
        .await
        .expect("a snapshot with XID 95 on device 1 within 10 s");
        assert_eq!(seen.devices.len(), 2);
        assert_eq!(device(&seen, 0).temperature_celsius, Reading::Supported(71));
        cancel.cancel();
        let result = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the source stops within 5 s of cancellation")
            .expect("the task did not panic");
        assert_eq!(result, Ok(()));
    });
}

#[test]
fn the_benchmark_script_makes_every_call_answer_on_every_device() {
    let Some(fake) = fake("every-field", &[]) else {
        return;
    };
    fake.script(&every_field_script(8));
    let snapshot = fake.open().poll();
    assert_eq!(snapshot.devices.len(), 8);
    // Every reading, serialised, must be {"supported": ...}: none "not_supported" or an error,
    // so a timed poll makes every NVML call the source makes on a real GPU.
    let json = serde_json::to_value(&snapshot.devices).expect("serialise");
    let text = json.to_string();
    assert!(!text.contains("not_supported"), "{text}");
    assert!(!text.contains("\"error\""), "{text}");
    for d in &snapshot.devices {
        let procs = d.processes.value().expect("processes");
        assert_eq!(procs.len(), 2);
        assert!(procs.iter().all(|p| p.sample.is_some()), "{procs:?}");
        assert_eq!(d.nvlink.value().map(Vec::len), Some(1));
    }
}
