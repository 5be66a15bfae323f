//! The agent's own cost and state: the standard `process_*` series every Prometheus client
//! library exports (read from `/proc/self` with procfs), the run time and run count of its eBPF
//! programs from the kernel's `bpf_prog_info`, and which sources run.
//!
//! eBPF run time is only counted while `kernel.bpf_stats_enabled = 1` (it costs a little per
//! program run), so the switch is exported next to the numbers: a zero with the switch off
//! means "not measured", not "free".

use std::collections::BTreeMap;

use procfs::process::{LimitValue, Process};

use super::Metrics;
use crate::sources::Feeds;

const PROC_SELF: &str = "/proc/self";
const BPF_STATS_ENABLED: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// A build-info series, and the `process_*` families with the names and meanings of the Go and
/// Rust client libraries' process collectors, so that the dashboards people already have for
/// their exporters work for the agent too. A figure `/proc` does not give is left out.
pub fn encode_process(m: &mut Metrics) {
    m.gauge(
        "nodeward_build_info",
        "The agent's version, as a label; the value is always 1.",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    let Ok(me) = Process::myself() else {
        return;
    };
    if let Ok(stat) = me.stat() {
        let ticks = procfs::ticks_per_second() as f64;
        m.counter(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            &[],
            (stat.utime + stat.stime) as f64 / ticks,
        );
        m.gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            &[],
            stat.rss as f64 * procfs::page_size() as f64,
        );
        m.gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            &[],
            stat.vsize as f64,
        );
        m.gauge(
            "process_threads",
            "Number of OS threads in the process.",
            &[],
            stat.num_threads as f64,
        );
        if let Ok(boot) = procfs::boot_time_secs() {
            m.gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                &[],
                boot as f64 + stat.starttime as f64 / ticks,
            );
        }
    }
    if let Ok(fds) = me.fd_count() {
        m.gauge(
            "process_open_fds",
            "Number of open file descriptors (eBPF programs, maps and links among them).",
            &[],
            fds as f64,
        );
    }
    if let Ok(limits) = me.limits() {
        if let LimitValue::Value(max) = limits.max_open_files.soft_limit {
            m.gauge(
                "process_max_fds",
                "Maximum number of open file descriptors.",
                &[],
                max as f64,
            );
        }
    }
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

    fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} sample in:\n{text}"))
    }

    #[test]
    fn this_process_reports_its_own_cost_as_getrusage_and_getrlimit_see_it() {
        // Ground truth through other doors than /proc: getrusage(2) before and after the
        // scrape (other tests' threads run meanwhile), getrlimit(2), the clock.
        let rusage = || {
            // SAFETY: an all-zero rusage is a valid out-parameter.
            let mut u: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: `u` is a valid out-pointer.
            assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) }, 0);
            u
        };
        let cpu_of = |u: &libc::rusage| {
            (u.ru_utime.tv_sec + u.ru_stime.tv_sec) as f64
                + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) as f64 / 1e6
        };
        let before = rusage();
        let mut m = Metrics::new();
        encode_process(&mut m);
        let after = rusage();
        let text = m.render();
        let rss = value(&text, "process_resident_memory_bytes");
        // ru_maxrss is the peak RSS in KiB: the current RSS cannot exceed it.
        assert!(
            rss > 1e6 && rss <= after.ru_maxrss as f64 * 1024.0,
            "RSS {rss} vs peak {} KiB",
            after.ru_maxrss
        );
        assert!(value(&text, "process_virtual_memory_bytes") >= rss);
        // /proc truncates user and system time to clock ticks (10 ms each).
        let cpu = value(&text, "process_cpu_seconds_total");
        assert!(
            cpu >= cpu_of(&before) - 0.02 && cpu <= cpu_of(&after) + 1e-6,
            "cpu {cpu} vs getrusage {} .. {}",
            cpu_of(&before),
            cpu_of(&after)
        );
        // SAFETY: an all-zero rlimit is a valid out-parameter.
        let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
        // SAFETY: `limit` is a valid out-pointer.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(value(&text, "process_max_fds"), limit.rlim_cur as f64);
        let open = value(&text, "process_open_fds");
        assert!(open >= 3.0 && open <= limit.rlim_cur as f64, "{open}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        let start = value(&text, "process_start_time_seconds");
        // The test binary started before this test and within the last day.
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "{start} vs {now}"
        );
    }
}
