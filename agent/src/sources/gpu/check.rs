//! `nodeward gpu-check`: opens NVML with the agent's own config, reads every GPU, watches
//! events for a moment, reads again and prints what it saw. It is the way to see, on a real
//! node, what the GPU source reads, without starting the agent (`cargo xtask gpu-check`).

use std::{fmt::Write as _, process::ExitCode, time::Duration};

use tokio_util::sync::CancellationToken;

use super::GpuConfig;
use super::{model::DeviceStats, Gpu, GpuError, GpuSnapshot, Reading};
use crate::paths::PathsConfig;

/// `EX_UNAVAILABLE` from sysexits.h: no usable NVML on this node.
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Reads the GPUs twice, `events_for` apart, watching events in between. `gpu.enabled` is
/// ignored: asking for the check is asking for NVML.
pub fn read_once(
    config: &GpuConfig,
    paths: &PathsConfig,
    events_for: Duration,
) -> Result<GpuSnapshot, GpuError> {
    let mut gpu = Gpu::open(config, &paths.proc_root)?;
    let cancel = CancellationToken::new();
    let events = gpu.watch_events(cancel.clone())?;
    // The first poll sets the per-process sample baseline; the second reads after it.
    let _ = gpu.poll();
    std::thread::sleep(events_for);
    let snapshot = gpu.poll();
    cancel.cancel();
    let _ = events.join();
    Ok(snapshot)
}

/// The subcommand: prints the snapshot (text or JSON); exit 69 when NVML is unavailable.
pub fn main(config: &GpuConfig, paths: &PathsConfig, json: bool, events_for: Duration) -> ExitCode {
    match read_once(config, paths, events_for) {
        Ok(snapshot) => {
            if json {
                match serde_json::to_string_pretty(&snapshot) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("nodeward: {e}");
                        return ExitCode::from(crate::EXIT_SOFTWARE);
                    }
                }
            } else {
                print!("{}", render(&snapshot));
            }
            ExitCode::SUCCESS
        }
        Err(e @ GpuError::Unavailable(_)) => {
            eprintln!("nodeward: {e}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(e) => {
            eprintln!("nodeward: {e}");
            ExitCode::from(crate::EXIT_SOFTWARE)
        }
    }
}

fn yes_no(r: &Reading<bool>) -> String {
    r.clone().map(|b| if b { "yes" } else { "no" }).show("")
}

/// The snapshot as text, one block per GPU.
pub fn render(s: &GpuSnapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "NVML: driver {}, NVML {}; {} GPU(s); poll took {} us",
        s.driver_version.show(""),
        s.nvml_version.show(""),
        s.devices.len(),
        s.poll_micros
    );
    if let Some(e) = &s.poll_error {
        let _ = writeln!(out, "poll error: {e}");
    }
    let events = match &s.health.events_watched {
        Some(r) => r.clone().map(|()| "yes").show(""),
        None => "not yet".to_owned(),
    };
    let _ = writeln!(out, "XID/ECC events watched: {events}");
    for d in &s.devices {
        render_device(&mut out, d);
        if let Some(h) = s.health.devices.get(&d.index) {
            let _ = writeln!(
                out,
                "  health: lost {}, XIDs in window {:?}, drain XIDs {:?}, ECC events sbe {} dbe {}",
                if h.lost { "YES" } else { "no" },
                h.window.xids,
                h.window.drain_xids,
                h.window.single_bit_ecc_events,
                h.window.double_bit_ecc_events
            );
        }
    }
    out
}

fn render_device(out: &mut String, d: &DeviceStats) {
    let _ = writeln!(
        out,
        "GPU {}: {}  {}  {}{}",
        d.index,
        d.name.show(""),
        d.uuid.show(""),
        d.pci_bus_id.show(""),
        if d.lost {
            "  ** LOST (fell off the bus) **"
        } else {
            ""
        }
    );
    if !d.nvml_errors_total.is_empty() {
        let counts: Vec<String> = d
            .nvml_errors_total
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        let _ = writeln!(out, "  failed NVML calls: {}", counts.join(", "));
    }
    if d.lost {
        // Every reading is the same "GPU is lost" error; one line says it.
        return;
    }
    let _ = writeln!(
        out,
        "  utilisation: sm {}, memory {}",
        d.utilization_gpu_percent.show("%"),
        d.utilization_memory_percent.show("%")
    );
    let _ = writeln!(
        out,
        "  memory: used {}, total {}",
        d.memory_used_bytes.show("bytes"),
        d.memory_total_bytes.show("bytes")
    );
    let _ = writeln!(
        out,
        "  temperature {}; power {} of {} limit",
        d.temperature_celsius.show("C"),
        d.power_draw_milliwatts.show("mW"),
        d.power_limit_milliwatts.show("mW")
    );
    let c = &d.clocks_mhz;
    let _ = writeln!(
        out,
        "  clocks: graphics {}, sm {}, memory {}, video {}",
        c.graphics.show("MHz"),
        c.sm.show("MHz"),
        c.memory.show("MHz"),
        c.video.show("MHz")
    );
    let throttle = d
        .throttle_reasons
        .clone()
        .map(|t| format!("{:#x} [{}]", t.mask, t.names.join(", ")));
    let _ = writeln!(
        out,
        "  clock event (throttle) reasons: {}",
        throttle.show("")
    );
    let e = &d.ecc;
    let _ = writeln!(
        out,
        "  ECC: enabled {}; volatile corrected {}, uncorrected {}; aggregate corrected {}, uncorrected {}",
        yes_no(&e.enabled),
        e.corrected_volatile.show(""),
        e.uncorrected_volatile.show(""),
        e.corrected_aggregate.show(""),
        e.uncorrected_aggregate.show("")
    );
    let r = &d.retired_pages;
    let _ = writeln!(
        out,
        "  retired pages: single-bit {}, double-bit {}, pending {}",
        r.single_bit.show(""),
        r.double_bit.show(""),
        yes_no(&r.pending)
    );
    let remap = d.row_remapping.clone().map(|r| {
        format!(
            "corrected {}, uncorrected {}, pending {}, failed {}",
            r.corrected_rows, r.uncorrected_rows, r.pending, r.failed
        )
    });
    let _ = writeln!(out, "  row remapping: {}", remap.show(""));
    let _ = writeln!(out, "  PCIe replays: {}", d.pcie_replay_count.show(""));
    let nvlink = d.nvlink.clone().map(|links| {
        let mut s = format!("{} active link(s)", links.len());
        for l in links {
            let _ = write!(
                s,
                "; link {} replay {} recovery {} crc_flit {} crc_data {}",
                l.link,
                l.replay.show(""),
                l.recovery.show(""),
                l.crc_flit.show(""),
                l.crc_data.show("")
            );
        }
        s
    });
    let _ = writeln!(out, "  NVLink: {}", nvlink.show(""));
    let m = &d.media;
    let sessions = m.encoder_sessions.clone().map(|s| {
        format!(
            "{} session(s), avg {} fps, avg latency {} us",
            s.session_count, s.average_fps, s.average_latency_micros
        )
    });
    let _ = writeln!(
        out,
        "  encoder: {}, {}; decoder: {}",
        m.encoder_utilization_percent.show("%"),
        sessions.show(""),
        m.decoder_utilization_percent.show("%")
    );
    match &d.processes {
        Reading::Supported(procs) if procs.is_empty() => {
            let _ = writeln!(out, "  processes: none");
        }
        Reading::Supported(procs) => {
            for p in procs {
                let _ = writeln!(
                    out,
                    "  process {} ({:?}): memory {}, sample {:?}, cgroup {}, container {}",
                    p.pid,
                    p.kind,
                    p.used_memory_bytes
                        .map_or("n/a".to_owned(), |b| format!("{b} bytes")),
                    p.sample,
                    p.cgroup.as_deref().unwrap_or("?"),
                    p.container_id.as_deref().unwrap_or("-")
                );
            }
        }
        other => {
            let _ = writeln!(out, "  processes: {}", other.clone().map(|_| "").show(""));
        }
    }
    let _ = writeln!(out, "  MIG mode: {}", yes_no(&d.mig_mode));
    for m in &d.mig_devices {
        let _ = writeln!(
            out,
            "  MIG device {}: {} ({}), GPU instance {}, compute instance {}, memory {} of {}",
            m.index,
            m.uuid.show(""),
            m.name.show(""),
            m.gpu_instance_id.show(""),
            m.compute_instance_id.show(""),
            m.memory_used_bytes.show("bytes"),
            m.memory_total_bytes.show("bytes"),
        );
    }
}
