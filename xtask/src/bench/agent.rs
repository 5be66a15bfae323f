//! The agent under test: started from the release binary, stopped with SIGTERM, and its eBPF
//! programs' run time read from the kernel (`kernel.bpf_stats_enabled`).

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns per-program run-time accounting on; returns the previous value.
pub fn enable_bpf_stats() -> anyhow::Result<String> {
    let before = std::fs::read_to_string(STATS).unwrap_or_else(|_| "0".to_owned());
    std::fs::write(STATS, "1").with_context(|| format!("enable {STATS}"))?;
    Ok(before)
}

/// Turns the per-program accounting on or off. Off while a workload's rate is measured: the
/// accounting reads the clock twice around every program run (on this VM a paravirtual clock
/// read each), so it slows a workload in proportion to the program runs it causes, which is
/// no cost the agent has where the accounting is off (the default).
pub fn set_bpf_stats(on: bool) -> anyhow::Result<()> {
    std::fs::write(STATS, if on { "1" } else { "0" }).with_context(|| format!("write {STATS}"))
}

pub fn restore_bpf_stats(before: &str) {
    let _ = std::fs::write(STATS, before.trim());
}

pub struct Agent {
    child: Child,
    pub prog_ids: Vec<u32>,
    /// The agent's gRPC Unix socket (one per benchmark process, so that an agent that another
    /// session runs on the default socket and ports is neither disturbed nor measured).
    pub socket: String,
}

/// The socket and listeners every benchmark agent uses: its own socket, and the TCP and metrics
/// listeners on ports the kernel picks, so they never collide with another agent's.
fn isolation() -> (String, Vec<String>) {
    let socket = format!("/run/nodeward-bench-{}.sock", std::process::id());
    let args = [
        format!("api.unix_socket={socket}"),
        "api.tcp_listen=127.0.0.1:0".to_owned(),
        "metrics.listen=127.0.0.1:0".to_owned(),
    ]
    .into_iter()
    .flat_map(|kv| ["--set".to_owned(), kv])
    .collect();
    (socket, args)
}

impl Agent {
    /// Starts `nodeward run` with `args` and waits until it holds at least `min_programs`
    /// eBPF programs (0: until it has run for a second).
    pub fn start(bin: &Path, args: &[&str], min_programs: usize) -> anyhow::Result<Self> {
        let (socket, isolate) = isolation();
        // A socket left by an earlier run would look like a serving agent.
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(bin)
            .arg("run")
            .args(isolate)
            .args(args)
            .env("NODEWARD_LOG", "warn")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut agent = Self {
            child,
            prog_ids: Vec::new(),
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            agent.prog_ids = prog_ids(agent.child.id());
            // Ready when it holds its programs and its socket answers connections.
            let serving = std::os::unix::net::UnixStream::connect(&agent.socket).is_ok();
            if serving && agent.prog_ids.len() >= min_programs {
                break;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                bail!("the agent exited during start-up: {status}");
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent loaded {} of {min_programs} programs in 30 s",
                    agent.prog_ids.len()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Per program name: (run count, total run time in ns) so far.
    pub fn program_stats(&self) -> BTreeMap<String, (u64, u64)> {
        program_stats(&self.prog_ids)
    }

    /// CPU time (user + system) the agent has used, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// Peak resident set size so far (VmHWM), in bytes.
    pub fn peak_rss_bytes(&self) -> f64 {
        self.status_kb("VmHWM:")
    }

    /// Resident set size now (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> f64 {
        self.status_kb("VmRSS:")
    }

    fn status_kb(&self, key: &str) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(key))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or(f64::NAN, |kb| kb * 1024.0)
    }

    pub fn stop(mut self) -> anyhow::Result<()> {
        let _ = crate::send_signal(self.child.id(), rustix::process::Signal::Term);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("the agent exited with {status}");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        bail!("the agent did not stop within 15 s of SIGTERM")
    }
}

/// The BPF program ids a process holds, from `/proc/<pid>/fdinfo`.
pub fn prog_ids(pid: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for e in dir.flatten() {
        if let Ok(text) = std::fs::read_to_string(e.path()) {
            for line in text.lines() {
                if let Some(id) = line
                    .strip_prefix("prog_id:")
                    .and_then(|v| v.trim().parse().ok())
                {
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
        }
    }
    ids
}

/// Per program name: (run count, total run time in ns) so far, of the programs `ids`.
pub fn program_stats(ids: &[u32]) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for id in ids {
        let Ok(o) = Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string(), "-j"])
            .output()
        else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) else {
            continue;
        };
        let name = v["name"].as_str().unwrap_or("?").to_owned();
        let cnt = v["run_cnt"].as_u64().unwrap_or(0);
        let ns = v["run_time_ns"].as_u64().unwrap_or(0);
        let e = out.entry(name).or_insert((0, 0));
        e.0 += cnt;
        e.1 += ns;
    }
    out
}

/// CPU time (user + system) process `pid` has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may contain spaces) start after ") ".
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after the state.
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let hz = rustix::param::clock_ticks_per_second() as f64;
    (ticks(11) + ticks(12)) / hz
}
