//! The agent's own cost and state: CPU time and memory from `/proc/self`, the run time and run
//! count of its eBPF programs from the kernel's `bpf_prog_info`, and which sources run.
//!
//! eBPF run time is only counted while `kernel.bpf_stats_enabled = 1` (it costs a little per
//! program run), so the switch is exported next to the numbers: a zero with the switch off
//! means "not measured", not "free".

use std::collections::BTreeMap;

use super::Metrics;
use crate::sources::Feeds;

const PROC_SELF: &str = "/proc/self";
const BPF_STATS_ENABLED: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// CPU, memory, threads, file descriptors, start time; and a build-info series.
pub fn encode_process(m: &mut Metrics) {
    m.gauge(
        "nodeward_build_info",
        "The agent's version, as a label; the value is always 1.",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    let stat = std::fs::read_to_string(format!("{PROC_SELF}/stat")).unwrap_or_default();
    let Some(stat) = ProcStat::parse(&stat) else {
        return;
    };
    let ticks = sysconf(libc::_SC_CLK_TCK).unwrap_or(100) as f64;
    let page = sysconf(libc::_SC_PAGESIZE).unwrap_or(4096) as f64;
    m.counter(
        "nodeward_process_cpu_seconds_total",
        "CPU time the agent has used, user and system, in seconds.",
        &[],
        (stat.utime + stat.stime) as f64 / ticks,
    );
    m.gauge(
        "nodeward_process_resident_memory_bytes",
        "The agent's resident set size, in bytes.",
        &[],
        stat.rss_pages as f64 * page,
    );
    m.gauge(
        "nodeward_process_threads",
        "Threads in the agent's process.",
        &[],
        stat.threads as f64,
    );
    if let Some(boot) = std::fs::read_to_string("/proc/stat")
        .ok()
        .as_deref()
        .and_then(boot_time)
    {
        m.gauge(
            "nodeward_process_start_time_seconds",
            "When the agent started, in seconds since the Unix epoch.",
            &[],
            boot as f64 + stat.start_ticks as f64 / ticks,
        );
    }
    if let Ok(fds) = std::fs::read_dir(format!("{PROC_SELF}/fd")) {
        m.gauge(
            "nodeward_process_open_fds",
            "File descriptors the agent holds open (eBPF programs, maps and links among them).",
            &[],
            fds.count() as f64,
        );
    }
}

fn sysconf(name: libc::c_int) -> Option<libc::c_long> {
    // SAFETY: sysconf only reads a system constant.
    let v = unsafe { libc::sysconf(name) };
    (v > 0).then_some(v)
}

/// The fields of `/proc/<pid>/stat` that are exported.
#[derive(Debug, PartialEq, Eq)]
struct ProcStat {
    utime: u64,
    stime: u64,
    threads: u64,
    start_ticks: u64,
    rss_pages: u64,
}

impl ProcStat {
    /// The command name (field 2) may hold spaces and parentheses, so fields are counted from
    /// the last `)`. Field numbers below are proc(5)'s, 1-based.
    fn parse(text: &str) -> Option<Self> {
        let rest = &text[text.rfind(')')? + 1..];
        // `rest` starts at field 3 (state).
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        Some(Self {
            utime: field(14)?,
            stime: field(15)?,
            threads: field(20)?,
            start_ticks: field(22)?,
            rss_pages: field(24)?,
        })
    }
}

/// `btime` of `/proc/stat`: boot time in seconds since the epoch.
fn boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Run time and count of each eBPF program the agent holds, summed by program name.
pub fn encode_ebpf(m: &mut Metrics) {
    let enabled = std::fs::read_to_string(BPF_STATS_ENABLED)
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok());
    m.gauge(
        "nodeward_ebpf_stats_enabled",
        "Whether the kernel counts eBPF run time (sysctl kernel.bpf_stats_enabled); \
         nodeward_ebpf_program_run_seconds_total stays 0 while it is 0.",
        &[],
        f64::from(enabled.unwrap_or(0)),
    );
    const RUN_SECONDS: &str =
        "Time the kernel spent running the agent's eBPF programs, by program name, in seconds.";
    const RUNS: &str = "Times the kernel ran the agent's eBPF programs, by program name.";
    m.declare(
        "nodeward_ebpf_program_run_seconds_total",
        super::Kind::Counter,
        RUN_SECONDS,
    );
    m.declare(
        "nodeward_ebpf_program_runs_total",
        super::Kind::Counter,
        RUNS,
    );
    let programs = own_programs();
    m.gauge(
        "nodeward_ebpf_programs_loaded",
        "eBPF programs the agent holds loaded.",
        &[],
        programs.len() as f64,
    );
    // One program name may be loaded more than once (one copy per attach point): those
    // copies are one series.
    let mut by_name: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for p in programs.values() {
        let entry = by_name.entry(p.name.as_str()).or_default();
        entry.0 += p.run_time_ns;
        entry.1 += p.run_count;
    }
    for (name, (nanos, runs)) in by_name {
        let labels = [("program", name)];
        m.counter(
            "nodeward_ebpf_program_run_seconds_total",
            RUN_SECONDS,
            &labels,
            nanos as f64 / 1e9,
        );
        m.counter(
            "nodeward_ebpf_program_runs_total",
            RUNS,
            &labels,
            runs as f64,
        );
    }
}

/// What the kernel's `bpf_prog_info` says about one program.
#[derive(Debug)]
struct ProgramStats {
    name: String,
    run_time_ns: u64,
    run_count: u64,
}

/// The eBPF programs whose descriptors this process holds, by program id.
///
/// The descriptors are found through `/proc/self/fdinfo` and asked with
/// `BPF_OBJ_GET_INFO_BY_FD`, which needs no capability beyond holding the descriptor (walking
/// every program on the node with `BPF_PROG_GET_NEXT_ID` would need CAP_SYS_ADMIN).
fn own_programs() -> BTreeMap<u32, ProgramStats> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("{PROC_SELF}/fdinfo")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Some(id) = std::fs::read_to_string(entry.path())
            .ok()
            .as_deref()
            .and_then(program_id)
        else {
            continue;
        };
        // The descriptor may have been closed and its number reused since fdinfo was read:
        // the id check drops such an answer.
        if let Some((info_id, stats)) = program_info(fd) {
            if info_id == id {
                out.insert(id, stats);
            }
        }
    }
    out
}

/// The program id of an fdinfo text that belongs to an eBPF program (a link's fdinfo names
/// its program too, but has no `prog_type:` line).
fn program_id(fdinfo: &str) -> Option<u32> {
    if !fdinfo.lines().any(|l| l.starts_with("prog_type:")) {
        return None;
    }
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("prog_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a program descriptor: `(id, stats)`.
fn program_info(fd: u32) -> Option<(u32, ProgramStats)> {
    use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};
    // SAFETY: both are plain C structs for which all-zero bytes are a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the kernel requires the unused part of the union to be zero.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = fd;
    attr.info.info_len = std::mem::size_of::<bpf_prog_info>() as u32;
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    // SAFETY: `attr` points at `info`, which outlives the call and is as long as info_len
    // says; a bad descriptor makes the call fail, it does not touch other memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<bpf_attr>() as libc::c_long,
        )
    };
    if rc != 0 {
        return None;
    }
    let name: Vec<u8> = info
        .name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    let name = match String::from_utf8_lossy(&name).into_owned() {
        n if n.is_empty() => format!("id{}", info.id),
        n => n,
    };
    Some((
        info.id,
        ProgramStats {
            name,
            run_time_ns: info.run_time_ns,
            run_count: info.run_cnt,
        },
    ))
}

/// Which sources started, and which could not (the reason is in the log and in `nodeward
/// probe`; as a label it would be free text).
#[derive(Debug, Clone)]
pub struct SourceList {
    started: Vec<&'static str>,
    unavailable: Vec<&'static str>,
}

impl SourceList {
    pub fn from_feeds(feeds: &Feeds) -> Self {
        Self {
            started: feeds.started.clone(),
            unavailable: feeds.unavailable.iter().map(|(name, _)| *name).collect(),
        }
    }

    pub fn encode(&self, m: &mut Metrics) {
        const HELP: &str = "1 for each source that runs, 0 for one that could not start \
                            (the agent's log says why).";
        for name in &self.started {
            m.gauge("nodeward_source_up", HELP, &[("source", name)], 1.0);
        }
        for name in &self.unavailable {
            m.gauge("nodeward_source_up", HELP, &[("source", name)], 0.0);
        }
    }
}

/// Restarts and state of each supervised task (the sources and the health evaluator), from its
/// supervisor's channel.
pub fn encode_task(name: &str, h: &crate::supervise::TaskHealth, m: &mut Metrics) {
    m.counter(
        "nodeward_task_restarts_total",
        "Times the supervisor restarted the task (a source or the health evaluator) after a failure or panic.",
        &[("task", name)],
        f64::from(h.restarts),
    );
    m.gauge(
        "nodeward_task_up",
        "1 while the supervised task runs; 0 while it waits to be restarted after a \
         failure, or after the supervisor gave up on it.",
        &[("task", name)],
        if h.up { 1.0 } else { 0.0 },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_that_restarted_and_runs_is_up_with_its_count_and_one_waiting_is_down() {
        let mut m = Metrics::new();
        let mut h = crate::supervise::TaskHealth {
            restarts: 2,
            ..Default::default()
        };
        encode_task("ebpf/tcp", &h, &mut m);
        h.up = false;
        encode_task("gpu", &h, &mut m);
        let text = m.render();
        for line in [
            "nodeward_task_restarts_total{task=\"ebpf/tcp\"} 2",
            "nodeward_task_up{task=\"ebpf/tcp\"} 1",
            "nodeward_task_up{task=\"gpu\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }

    // A /proc/<pid>/stat line in the kernel's layout, with a command name holding ") (".
    const STAT: &str = "4242 (tokio ) (x) S 1 4242 4242 0 -1 4194560 3312 0 0 0 \
        150 75 0 0 20 0 4 0 123456 1234567890 2048 18446744073709551615 1 1 0 0 0 0 0 \
        4096 17987 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn proc_stat_fields_are_counted_from_the_last_parenthesis() {
        assert_eq!(
            ProcStat::parse(STAT),
            Some(ProcStat {
                utime: 150,
                stime: 75,
                threads: 4,
                start_ticks: 123456,
                rss_pages: 2048,
            })
        );
        assert_eq!(ProcStat::parse("garbage"), None);
    }

    #[test]
    fn boot_time_is_read_from_proc_stat() {
        let text = "cpu  1 2 3 4\nintr 5\nctxt 6\nbtime 1763776800\nprocesses 7\n";
        assert_eq!(boot_time(text), Some(1_763_776_800));
        assert_eq!(boot_time("cpu 1\n"), None);
    }

    #[test]
    fn program_id_is_found_only_in_program_fdinfo() {
        let prog = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1057\nprog_type:\t8\n\
                    prog_jited:\t1\nprog_tag:\tab12cd34ef567890\nmemlock:\t4096\nprog_id:\t73\n\
                    run_time_ns:\t0\nrun_cnt:\t0\nrecursion_misses:\t0\nverified_insns:\t48\n";
        let map = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1057\nmap_type:\t1\n\
                   key_size:\t8\nvalue_size:\t8\nmax_entries:\t1024\nmap_flags:\t0x0\n\
                   map_extra:\t0x0\nmemlock:\t8192\nmap_id:\t12\nfrozen:\t0\n";
        let link = "pos:\t0\nflags:\t02000000\nmnt_id:\t16\nino:\t1057\nlink_type:\tcgroup\n\
                    link_id:\t5\nprog_tag:\tab12cd34ef567890\nprog_id:\t73\n";
        assert_eq!(program_id(prog), Some(73));
        assert_eq!(program_id(map), None);
        // A link names its program, but is not one: asking it for bpf_prog_info would
        // return its bpf_link_info.
        assert_eq!(program_id(link), None);
    }

    #[test]
    fn this_process_reports_its_own_cost() {
        let mut m = Metrics::new();
        encode_process(&mut m);
        let text = m.render();
        let rss = text
            .lines()
            .find_map(|l| l.strip_prefix("nodeward_process_resident_memory_bytes "))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("an RSS sample");
        // A running test binary holds at least a megabyte and surely less than 10 GiB.
        assert!(rss > 1e6 && rss < 1e10, "{rss}");
        assert!(m.has("nodeward_process_cpu_seconds_total"), "{text}");
        assert!(m.has("nodeward_process_start_time_seconds"), "{text}");
    }
}
