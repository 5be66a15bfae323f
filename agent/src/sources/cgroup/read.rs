//! Reads one workload's stats from its cgroup directories: the v2 files where the v2 hierarchy
//! has the controllers, the v1 equivalents otherwise, and PSI from the v2 directory (present on
//! hybrid hosts too). A file that is missing leaves its fields empty; a workload whose
//! directories are all gone by the end of the read exited mid-scan and yields `None`.

use std::{
    ffi::CStr,
    io::Read as _,
    os::fd::OwnedFd,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::parse::{self, DeviceIo, Psi};
use crate::containers::CgroupDirs;

/// Raw counters and gauges of one cgroup. Times are nanoseconds; `None` means the kernel did
/// not provide the value (controller absent, file missing or unreadable).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CgroupStats {
    pub cpu: CpuStats,
    pub memory: MemoryStats,
    pub io: Vec<DeviceIo>,
    pub pids: PidsStats,
    pub psi: PsiStats,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CpuStats {
    pub usage_ns: Option<u64>,
    pub user_ns: Option<u64>,
    pub system_ns: Option<u64>,
    /// CFS bandwidth periods that elapsed, and those in which the cgroup was throttled.
    pub nr_periods: Option<u64>,
    pub nr_throttled: Option<u64>,
    pub throttled_ns: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MemoryStats {
    pub current_bytes: Option<u64>,
    /// `None` with `current_bytes` present means no limit.
    pub limit_bytes: Option<u64>,
    pub anon_bytes: Option<u64>,
    pub file_bytes: Option<u64>,
    pub inactive_file_bytes: Option<u64>,
    /// What the kubelet evicts on: usage minus inactive file cache.
    pub working_set_bytes: Option<u64>,
    /// Times the cgroup hit its limit and the OOM killer was invoked (v2 only).
    pub oom_events: Option<u64>,
    /// Processes killed by the OOM killer in this cgroup.
    pub oom_kill_events: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PidsStats {
    pub current: Option<u64>,
    /// `None` with `current` present means no limit.
    pub limit: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PsiStats {
    pub cpu: Option<Psi>,
    pub memory: Option<Psi>,
    pub io: Option<Psi>,
}

/// USER_HZ: v1 `cpuacct.stat` counts in these ticks. It is 100 on every Linux ABI the agent
/// targets (it is fixed by the ABI, unlike the kernel's internal HZ).
const USER_HZ: u64 = 100;

/// Big enough for v1 `memory.stat` (about 1.5 KiB) in one read; it grows when a file is larger.
const INITIAL_BUF: usize = 8192;

/// Reads files with one reused buffer, so a scan of thousands of cgroups does not allocate a
/// string per file.
#[derive(Debug, Default)]
pub struct Reader {
    buf: Vec<u8>,
    /// The relative path of the last CPU check, reused.
    path: String,
    /// Files that existed but held something unparsable, since the reader was made.
    pub parse_errors: u64,
}

impl Reader {
    /// The text of `dir/file`, or `None` when the directory is not given, the file is missing,
    /// or the cgroup was removed (reads of a removed cgroup fail with ENODEV).
    fn text(&mut self, dir: Option<&Dir>, file: &CStr) -> Option<&str> {
        let dir = dir?;
        use rustix::fs::{Mode, OFlags};
        let fd =
            rustix::fs::openat(dir, file, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()?;
        self.fill(fd)
    }

    /// Reads all of `fd` into the reused buffer.
    fn fill(&mut self, fd: OwnedFd) -> Option<&str> {
        let mut f = std::fs::File::from(fd);
        if self.buf.is_empty() {
            self.buf.resize(INITIAL_BUF, 0);
        }
        // cgroup files are seq_files: one read returns everything that fits, and a short read
        // is the end. Reading straight into a reused buffer saves the size probe and the
        // extra read-to-EOF that `read_to_string` makes, half the syscalls of a scan.
        let mut filled = 0;
        loop {
            let n = f.read(&mut self.buf[filled..]).ok()?;
            filled += n;
            if n == 0 || filled < self.buf.len() {
                break;
            }
            let grown = self.buf.len() * 2;
            self.buf.resize(grown, 0);
        }
        std::str::from_utf8(&self.buf[..filled]).ok()
    }

    fn value<T>(
        &mut self,
        dir: Option<&Dir>,
        file: &CStr,
        parse: impl FnOnce(&str) -> Result<T, parse::ParseError>,
    ) -> Option<T> {
        let text = self.text(dir, file)?;
        match parse(text) {
            Ok(v) => Some(v),
            Err(e) => {
                self.parse_errors += 1;
                tracing::trace!(file = ?file, error = %e, "unparsable cgroup file");
                None
            }
        }
    }

    fn pick<const N: usize>(
        &mut self,
        dir: Option<&Dir>,
        file: &CStr,
        keys: [&str; N],
    ) -> [Option<u64>; N] {
        match self.text(dir, file) {
            Some(text) => parse::keyed_pick(text, keys),
            None => [None; N],
        }
    }

    /// Only the workload's total CPU usage in ns (v2 `cpu.stat`, v1 `cpuacct.usage`): one file,
    /// opened relative to its hierarchy's root (`root`, opened once by the caller) by the
    /// workload's path `rel` below it, so the check costs three system calls and the kernel
    /// resolves only the names below the root. `None` when the file cannot be read or parsed
    /// (the caller then reads everything, which says why).
    pub fn cpu_usage_ns(&mut self, root: &CpuRoot, rel: &str) -> Option<u64> {
        use rustix::fs::{Mode, OFlags};
        let file = if root.v2 { "cpu.stat" } else { "cpuacct.usage" };
        self.path.clear();
        self.path.push_str(rel);
        self.path.push('/');
        self.path.push_str(file);
        let fd = rustix::fs::openat(
            &root.fd,
            self.path.as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let text = self.fill(fd)?;
        if root.v2 {
            let [usage] = parse::keyed_pick(text, ["usage_usec"]);
            usage.map(|us| us.saturating_mul(1000))
        } else {
            parse::u64_value(text).ok()
        }
    }

    /// Reads one workload. `v2_controllers` says whether the v2 directory has the controllers
    /// (pure v2) or only PSI and ids (hybrid).
    pub fn read(&mut self, dirs: &CgroupDirs, v2_controllers: bool) -> Option<CgroupStats> {
        let u = open_dir(dirs.unified.as_deref());
        let mut s = if v2_controllers {
            self.read_v2(u.as_ref())
        } else {
            self.read_v1(dirs)
        };
        let u = u.as_ref();
        s.psi = PsiStats {
            cpu: self.value(u, c"cpu.pressure", parse::psi),
            memory: self.value(u, c"memory.pressure", parse::psi),
            io: self.value(u, c"io.pressure", parse::psi),
        };
        // Checked after reading, so a cgroup removed part-way is dropped rather than reported
        // with half its numbers.
        dirs.any_exists().then_some(s)
    }

    fn read_v2(&mut self, d: Option<&Dir>) -> CgroupStats {
        let [usage, user, system, periods, throttled, throttled_us] = self.pick(
            d,
            c"cpu.stat",
            [
                "usage_usec",
                "user_usec",
                "system_usec",
                "nr_periods",
                "nr_throttled",
                "throttled_usec",
            ],
        );
        let us = |v: Option<u64>| v.map(|v| v.saturating_mul(1000));
        let current = self.value(d, c"memory.current", parse::u64_value);
        let limit = self.value(d, c"memory.max", parse::limit).flatten();
        let [anon, file, inactive_file] =
            self.pick(d, c"memory.stat", ["anon", "file", "inactive_file"]);
        let [oom, oom_kill] = self.pick(d, c"memory.events", ["oom", "oom_kill"]);
        let io = self
            .value(d, c"io.stat", parse::io_stat_v2)
            .unwrap_or_default();
        CgroupStats {
            cpu: CpuStats {
                usage_ns: us(usage),
                user_ns: us(user),
                system_ns: us(system),
                nr_periods: periods,
                nr_throttled: throttled,
                throttled_ns: us(throttled_us),
            },
            memory: memory(current, limit, anon, file, inactive_file, oom, oom_kill),
            io,
            pids: PidsStats {
                current: self.value(d, c"pids.current", parse::u64_value),
                limit: self.value(d, c"pids.max", parse::limit).flatten(),
            },
            psi: PsiStats::default(),
        }
    }

    fn read_v1(&mut self, dirs: &CgroupDirs) -> CgroupStats {
        let (acct, cpu, m, b, p) = (
            open_dir(dirs.cpuacct.as_deref()),
            open_dir(dirs.cpu.as_deref()),
            open_dir(dirs.memory.as_deref()),
            open_dir(dirs.blkio.as_deref()),
            open_dir(dirs.pids.as_deref()),
        );
        let (acct, cpu, m, b, p) = (
            acct.as_ref(),
            cpu.as_ref(),
            m.as_ref(),
            b.as_ref(),
            p.as_ref(),
        );
        let usage = self.value(acct, c"cpuacct.usage", parse::u64_value);
        let [user, system] = self.pick(acct, c"cpuacct.stat", ["user", "system"]);
        let ticks = |v: Option<u64>| v.map(|t| t.saturating_mul(1_000_000_000 / USER_HZ));
        let [periods, throttled, throttled_ns] = self.pick(
            cpu,
            c"cpu.stat",
            ["nr_periods", "nr_throttled", "throttled_time"],
        );

        let current = self.value(m, c"memory.usage_in_bytes", parse::u64_value);
        let limit = self
            .value(m, c"memory.limit_in_bytes", parse::limit)
            .flatten();
        // The `total_` keys include descendants, matching what v2 and memory.usage_in_bytes
        // report for a container with sub-cgroups.
        let [rss, cache, inactive_file, shmem] = self.pick(
            m,
            c"memory.stat",
            [
                "total_rss",
                "total_cache",
                "total_inactive_file",
                "total_shmem",
            ],
        );
        let [oom_kill] = self.pick(m, c"memory.oom_control", ["oom_kill"]);
        // v1 counts shared memory in the page cache; v2's `anon` includes it. Align on v2.
        let anon = rss.map(|r| r + shmem.unwrap_or(0));
        let file = cache.map(|c| c.saturating_sub(shmem.unwrap_or(0)));

        let io = match (
            self.text(b, c"blkio.throttle.io_service_bytes")
                .map(str::to_owned),
            self.text(b, c"blkio.throttle.io_serviced"),
        ) {
            (Some(bytes), Some(ops)) => match parse::blkio_v1(&bytes, ops) {
                Ok(io) => io,
                Err(_) => {
                    self.parse_errors += 1;
                    Vec::new()
                }
            },
            _ => Vec::new(),
        };
        CgroupStats {
            cpu: CpuStats {
                usage_ns: usage,
                user_ns: ticks(user),
                system_ns: ticks(system),
                nr_periods: periods,
                nr_throttled: throttled,
                throttled_ns,
            },
            memory: memory(current, limit, anon, file, inactive_file, None, oom_kill),
            io,
            pids: PidsStats {
                current: self.value(p, c"pids.current", parse::u64_value),
                limit: self.value(p, c"pids.max", parse::limit).flatten(),
            },
            psi: PsiStats::default(),
        }
    }
}

/// The root of the hierarchy that holds the workloads' CPU counter: the v2 one where it has the
/// controllers, else v1 `cpuacct`.
#[derive(Debug)]
pub struct CpuRoot {
    fd: OwnedFd,
    v2: bool,
}

impl CpuRoot {
    /// `None` when the layout has no such hierarchy or its root cannot be opened.
    pub fn open(layout: &crate::containers::Layout) -> Option<Self> {
        use crate::containers::Layout;
        let (dir, v2) = match layout {
            Layout::V2 { unified } => (Some(unified.as_path()), true),
            Layout::Hybrid { v1, .. } | Layout::V1 { v1 } => (v1.cpuacct.as_deref(), false),
        };
        Some(Self {
            fd: open_dir(dir)?,
            v2,
        })
    }
}

/// A cgroup directory opened once per read (`O_PATH`), so each file is opened relative to it
/// and the kernel resolves one name instead of the whole path every time.
type Dir = OwnedFd;

fn open_dir(path: Option<&Path>) -> Option<Dir> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path?)
        .ok()
        .map(OwnedFd::from)
}

fn memory(
    current: Option<u64>,
    limit: Option<u64>,
    anon: Option<u64>,
    file: Option<u64>,
    inactive_file: Option<u64>,
    oom: Option<u64>,
    oom_kill: Option<u64>,
) -> MemoryStats {
    MemoryStats {
        current_bytes: current,
        limit_bytes: limit,
        anon_bytes: anon,
        file_bytes: file,
        inactive_file_bytes: inactive_file,
        working_set_bytes: current.map(|c| c.saturating_sub(inactive_file.unwrap_or(0))),
        oom_events: oom,
        oom_kill_events: oom_kill,
    }
}

/// Where a fixture or test wants the files of one cgroup: a helper for building `CgroupDirs`
/// over a single v2 directory.
pub fn v2_dirs(dir: PathBuf) -> CgroupDirs {
    CgroupDirs {
        unified: Some(dir),
        ..CgroupDirs::default()
    }
}

#[cfg(test)]
#[path = "read_tests.rs"]
mod tests;
