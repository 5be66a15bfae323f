//! The node's own numbers: PSI, memory, load, CPU, disk IO, filesystem fullness, NIC errors and
//! drops, uptime, kernel and OS release (Anolis OS recognised), clock synchronisation.
//!
//! Parsing of `/proc` text is the `procfs` crate's (its `procfs-core` parsers read from any
//! reader, so the configured `proc_root` is honoured and samples are testable); reading is
//! ours. Each part that cannot be read is left empty and named in `unavailable`, and the rest
//! is still reported.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use procfs::{FromRead as _, FromReadSI as _};
use serde::{Deserialize, Serialize};

use super::cgroup::parse::{Psi, PsiLine};

pub mod clock;
pub mod fs;
pub mod os_release;

pub use clock::ClockSync;
pub use fs::Filesystem;
pub use os_release::OsRelease;

/// `[node]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Collect the node's own stats on every tick.
    pub enabled: bool,
    /// The OS release file (the host's, when running in a DaemonSet).
    pub os_release: PathBuf,
    /// Where the host's root filesystem is visible, for filesystem fullness (`/` on the host,
    /// e.g. `/host` in a DaemonSet that mounts it there).
    pub host_root: PathBuf,
    /// The clock counts as synchronised while the kernel's maximum error estimate is below
    /// this (16 s is systemd's rule, the kernel's NTP phase limit).
    #[serde(with = "humantime_serde")]
    pub clock_max_error: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            os_release: PathBuf::from("/etc/os-release"),
            host_root: PathBuf::from("/"),
            clock_max_error: Duration::from_secs(16),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NodeStats {
    pub kernel_release: Option<String>,
    pub os: Option<OsRelease>,
    pub uptime_seconds: Option<f64>,
    pub load: Option<Load>,
    pub memory: Option<Memory>,
    pub cpu: Option<Cpu>,
    pub psi: NodePsi,
    pub disks: Vec<DiskIo>,
    pub filesystems: Vec<Filesystem>,
    pub nics: Vec<Nic>,
    pub clock: Option<ClockSync>,
    /// The parts that could not be read, each with why.
    pub unavailable: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Load {
    pub one: f64,
    pub five: f64,
    pub fifteen: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Memory {
    pub total_bytes: u64,
    pub available_bytes: Option<u64>,
    pub free_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
}

/// Time all CPUs spent, summed, in nanoseconds since boot.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cpu {
    pub cores: usize,
    pub user_ns: u64,
    pub system_ns: u64,
    pub idle_ns: u64,
    pub iowait_ns: u64,
    pub steal_ns: u64,
    /// Everything but idle and iowait.
    pub busy_ns: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct NodePsi {
    pub cpu: Option<Psi>,
    pub memory: Option<Psi>,
    pub io: Option<Psi>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskIo {
    pub name: String,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub reads: u64,
    pub writes: u64,
    /// Milliseconds the device had IO in flight (for utilisation).
    pub io_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nic {
    pub name: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// diskstats counts in 512-byte sectors whatever the device's sector size.
const SECTOR: u64 = 512;

/// Reads everything; never fails as a whole.
pub fn collect(proc_root: &Path, config: &NodeConfig) -> NodeStats {
    let mut s = NodeStats::default();
    let mut missing =
        |part: &str, e: &dyn std::fmt::Display| s.unavailable.push(format!("{part}: {e}"));
    let read = |rel: &str| std::fs::read_to_string(proc_root.join(rel));

    let kernel_release = read("sys/kernel/osrelease").map(|t| t.trim().to_owned());
    let os = std::fs::read_to_string(&config.os_release)
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .map(|t| OsRelease::parse(&t));
    let uptime = read("uptime")
        .map_err(procfs::ProcError::from)
        .and_then(|t| procfs::Uptime::from_read(t.as_bytes()));
    let load = read("loadavg")
        .map_err(procfs::ProcError::from)
        .and_then(|t| procfs::LoadAverage::from_read(t.as_bytes()));
    let mem = read("meminfo")
        .map_err(procfs::ProcError::from)
        .and_then(|t| procfs::Meminfo::from_read(t.as_bytes()));
    let cpu = read("stat")
        .map_err(procfs::ProcError::from)
        .and_then(|t| parse_cpu(&t, ticks_per_second()));
    let disks = read("diskstats")
        .map_err(procfs::ProcError::from)
        .and_then(|t| parse_disks(&t));
    // The host's network namespace is init's; `<proc>/net/dev` would be the agent's own,
    // which is a pod's in a DaemonSet without hostNetwork.
    let nics = read("1/net/dev")
        .or_else(|_| read("net/dev"))
        .map_err(procfs::ProcError::from)
        .and_then(|t| parse_nics(&t));
    let mounts = read("1/mounts").or_else(|_| read("self/mounts"));

    match kernel_release {
        Ok(k) => s.kernel_release = Some(k),
        Err(e) => missing("kernel release", &e),
    }
    match os {
        Ok(o) => s.os = Some(o),
        Err(e) => missing("os-release", &e),
    }
    match uptime {
        Ok(u) => s.uptime_seconds = Some(u.uptime),
        Err(e) => missing("uptime", &e),
    }
    match load {
        Ok(l) => {
            s.load = Some(Load {
                one: l.one.into(),
                five: l.five.into(),
                fifteen: l.fifteen.into(),
            })
        }
        Err(e) => missing("loadavg", &e),
    }
    match mem {
        // procfs converts meminfo's kB to bytes.
        Ok(m) => {
            s.memory = Some(Memory {
                total_bytes: m.mem_total,
                available_bytes: m.mem_available,
                free_bytes: m.mem_free,
                swap_total_bytes: m.swap_total,
                swap_free_bytes: m.swap_free,
            })
        }
        Err(e) => missing("meminfo", &e),
    }
    match cpu {
        Ok(c) => s.cpu = Some(c),
        Err(e) => missing("cpu", &e),
    }
    match disks {
        Ok(d) => s.disks = d,
        Err(e) => missing("diskstats", &e),
    }
    match nics {
        Ok(n) => s.nics = n,
        Err(e) => missing("net/dev", &e),
    }
    match mounts
        .map_err(procfs::ProcError::from)
        .and_then(|t| fs::disk_mounts(&t))
    {
        Ok(m) => {
            s.filesystems = m
                .iter()
                .filter_map(|m| fs::usage(&config.host_root, m))
                .collect()
        }
        Err(e) => missing("mounts", &e),
    }
    s.psi = read_psi(proc_root, &mut s.unavailable);
    match clock::read() {
        Ok(r) => s.clock = Some(clock::assess(&r, config.clock_max_error)),
        Err(e) => s.unavailable.push(format!("clock: {e}")),
    }
    s
}

fn ticks_per_second() -> u64 {
    Some(rustix::param::clock_ticks_per_second())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// `/proc/stat`'s `cpu` line, through procfs's `KernelStats`.
pub fn parse_cpu(text: &str, ticks_per_second: u64) -> Result<Cpu, procfs::ProcError> {
    let si = procfs::ExplicitSystemInfo {
        boot_time_secs: 0,
        ticks_per_second,
        page_size: 4096,
        is_little_endian: cfg!(target_endian = "little"),
    };
    let k = procfs::KernelStats::from_read(text.as_bytes(), &si)?;
    let ns = |ticks: u64| ticks.saturating_mul(1_000_000_000 / ticks_per_second.max(1));
    let t = &k.total;
    let iowait = t.iowait.unwrap_or(0);
    let idle = t.idle;
    // Saturating: the counters are the kernel's text, and a corrupt or wrapped one must not
    // panic the agent (found by the fuzz targets).
    let all = [
        t.nice,
        t.system,
        idle,
        iowait,
        t.irq.unwrap_or(0),
        t.softirq.unwrap_or(0),
        t.steal.unwrap_or(0),
    ]
    .into_iter()
    .fold(t.user, u64::saturating_add);
    Ok(Cpu {
        cores: k.cpu_time.len(),
        user_ns: ns(t.user.saturating_add(t.nice)),
        system_ns: ns(t.system),
        idle_ns: ns(idle),
        iowait_ns: ns(iowait),
        steal_ns: ns(t.steal.unwrap_or(0)),
        busy_ns: ns(all.saturating_sub(idle).saturating_sub(iowait)),
    })
}

/// `/proc/diskstats`, whole disks and partitions alike, less loop and ram devices.
pub fn parse_disks(text: &str) -> Result<Vec<DiskIo>, procfs::ProcError> {
    let d = procfs::DiskStats::from_read(text.as_bytes())?;
    Ok(d.0
        .into_iter()
        .filter(|d| !d.name.starts_with("loop") && !d.name.starts_with("ram"))
        .map(|d| DiskIo {
            read_bytes: d.sectors_read.saturating_mul(SECTOR),
            write_bytes: d.sectors_written.saturating_mul(SECTOR),
            reads: d.reads,
            writes: d.writes,
            io_ms: d.time_in_progress,
            name: d.name,
        })
        .collect())
}

/// `/proc/net/dev`, sorted by name.
pub fn parse_nics(text: &str) -> Result<Vec<Nic>, procfs::ProcError> {
    let d = procfs::net::InterfaceDeviceStatus::from_read(text.as_bytes())?;
    let mut out: Vec<Nic> =
        d.0.into_values()
            .map(|n| Nic {
                rx_bytes: n.recv_bytes,
                tx_bytes: n.sent_bytes,
                rx_errors: n.recv_errs,
                rx_dropped: n.recv_drop,
                tx_errors: n.sent_errs,
                tx_dropped: n.sent_drop,
                name: n.name,
            })
            .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn psi_of(r: &procfs::PressureRecord) -> PsiLine {
    PsiLine {
        avg10: r.avg10.into(),
        avg60: r.avg60.into(),
        avg300: r.avg300.into(),
        total_us: r.total,
    }
}

fn read_psi(proc_root: &Path, unavailable: &mut Vec<String>) -> NodePsi {
    let open = |f: &str| std::fs::read_to_string(proc_root.join("pressure").join(f));
    let mut psi = NodePsi::default();
    match open("cpu")
        .map_err(procfs::ProcError::from)
        .and_then(|t| procfs::CpuPressure::from_read(t.as_bytes()))
    {
        // System-wide CPU `full` is undefined (always zero), so procfs reads `some` only.
        Ok(p) => {
            psi.cpu = Some(Psi {
                some: psi_of(&p.some),
                full: None,
            })
        }
        Err(e) => unavailable.push(format!("pressure/cpu: {e}")),
    }
    match open("memory")
        .map_err(procfs::ProcError::from)
        .and_then(|t| procfs::MemoryPressure::from_read(t.as_bytes()))
    {
        Ok(p) => {
            psi.memory = Some(Psi {
                some: psi_of(&p.some),
                full: Some(psi_of(&p.full)),
            })
        }
        Err(e) => unavailable.push(format!("pressure/memory: {e}")),
    }
    match open("io")
        .map_err(procfs::ProcError::from)
        .and_then(|t| procfs::IoPressure::from_read(t.as_bytes()))
    {
        Ok(p) => {
            psi.io = Some(Psi {
                some: psi_of(&p.some),
                full: Some(psi_of(&p.full)),
            })
        }
        Err(e) => unavailable.push(format!("pressure/io: {e}")),
    }
    psi
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
