//! Peer: the same per-cgroup RTT histogram kept by `bpftrace` (0.17: tracepoints only, so
//! `tcp:tcp_probe`, which carries the smoothed RTT) versus by nodeward, under the same TCP
//! request/response load. Each round runs the load with nothing, with nodeward and with
//! bpftrace, in turn; the rows give each one's effect on the workload and its CPU.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::{
    agent::{cpu_seconds, prog_ids, program_stats, Agent},
    median,
    scenarios::{program_delta, row, rr_load, Echo, ALL_PROGRAMS},
    Plan, Row,
};

const SCENARIO: &str = "Peer: TCP request/response";

/// An RTT histogram per cgroup, printed every second as nodeward reads its maps on every tick.
/// `cgroup` is the cgroup of the task running when the probe fires (in softirq, whichever task
/// that is): the attribution nodeward avoids by reading the socket's cgroup, kept here because
/// bpftrace 0.17 has no way to reach the socket's cgroup from this tracepoint.
const SCRIPT: &str = "tracepoint:tcp:tcp_probe { @rtt_us[cgroup] = hist(args->srtt); } \
                      interval:s:1 { print(@rtt_us); }";

pub const DESCRIPTION: &str = "\
- **Peer**: the TCP request/response load (as above, unpaced) run with nothing, with nodeward, \
and with `bpftrace -e 'tracepoint:tcp:tcp_probe { @rtt_us[cgroup] = hist(args->srtt); } \
interval:s:1 { print(@rtt_us); }'`, the nearest equivalent bpftrace 0.17 can express (it keeps \
the histogram per cgroup of the task that happens to run, where nodeward uses the socket's \
cgroup, and only RTT, where nodeward also keeps jitter, retransmits and per-peer figures), in \
turn in each round. Ratio = transactions/s with the tool / without. CPU of each tool: its \
process (user+system, including bpftrace's start-up compilation, which is excluded by measuring \
only after its programs are attached) and its eBPF programs' run time, per second of load.";

struct Bpftrace {
    child: Child,
    prog_ids: Vec<u32>,
}

impl Bpftrace {
    fn start() -> anyhow::Result<Self> {
        let mut child = Command::new("bpftrace")
            .args(["-e", SCRIPT])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start bpftrace")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // The tracepoint and the interval programs.
            let ids = prog_ids(child.id());
            if ids.len() >= 2 {
                // Let it finish attaching and print its first histogram.
                std::thread::sleep(Duration::from_secs(1));
                return Ok(Self {
                    prog_ids: prog_ids(child.id()),
                    child,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("bpftrace exited during start-up: {status}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("bpftrace attached {} programs in 60 s", ids.len());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        let _ = crate::send_signal(self.child.id(), rustix::process::Signal::Int);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct Arm {
    rate: Vec<f64>,
    cpu: Vec<f64>,
    programs_cpu: Vec<f64>,
}

/// Runs the load while `pid` holds `ids`; returns (transactions/s, process CPU s/s, programs'
/// CPU s/s).
fn measured(port: u16, length: Duration, pid: u32, ids: &[u32]) -> anyhow::Result<[f64; 3]> {
    let (cpu0, p0, t0) = (cpu_seconds(pid), program_stats(ids), Instant::now());
    let rate = rr_load(port, length, None)?;
    let secs = t0.elapsed().as_secs_f64();
    let progs = program_delta(&p0, &program_stats(ids));
    Ok([
        rate,
        (cpu_seconds(pid) - cpu0) / secs,
        progs.values().map(|d| d.1 as f64).sum::<f64>() / 1e9 / secs,
    ])
}

pub fn bpftrace(_root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    let echo = Echo::start(true)?;
    let length = Duration::from_secs(plan.seconds);
    let (mut none, mut nw, mut bt) = (Vec::new(), Arm::default(), Arm::default());
    for round in 0..plan.rounds {
        crate::say(&format!("  peer (round {}/{})", round + 1, plan.rounds));
        none.push(rr_load(echo.port, length, None)?);

        let agent = Agent::start(agent_bin, &["--set", "gpu.enabled=false"], ALL_PROGRAMS)?;
        let [r, c, p] = measured(echo.port, length, agent.pid(), &agent.prog_ids)?;
        agent.stop()?;
        nw.rate.push(r);
        nw.cpu.push(c);
        nw.programs_cpu.push(p);

        let tool = Bpftrace::start()?;
        let [r, c, p] = measured(echo.port, length, tool.child.id(), &tool.prog_ids)?;
        drop(tool);
        bt.rate.push(r);
        bt.cpu.push(c);
        bt.programs_cpu.push(p);
    }
    let mut rows = Vec::new();
    for (name, arm) in [("nodeward", nw), ("bpftrace", bt)] {
        let ratio = median(&arm.rate).unwrap_or(f64::NAN) / median(&none).unwrap_or(f64::NAN);
        let mut r = row(
            SCENARIO,
            &format!("transactions, nothing vs {name}"),
            "/s",
            none.clone(),
            arm.rate,
        );
        if name == "nodeward" {
            r.target = Some(("ratio ≥ 0.97".to_owned(), ratio >= 0.97));
        }
        rows.push(r);
        rows.push(row(
            SCENARIO,
            &format!("{name} process CPU"),
            "s/s",
            vec![],
            arm.cpu,
        ));
        rows.push(row(
            SCENARIO,
            &format!("{name} eBPF programs' CPU"),
            "s/s",
            vec![],
            arm.programs_cpu,
        ));
    }
    Ok(rows)
}
