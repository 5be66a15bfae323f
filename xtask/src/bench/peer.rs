//! Peer: the same per-cgroup RTT histogram kept by `bpftrace` (0.17: tracepoints only, so
//! `tcp:tcp_probe`, which carries the smoothed RTT) versus by nodeward, under the same TCP
//! request/response load, on loopback and across a veth pair between two network namespaces.
//! Each round runs the load with nothing, with nodeward and with bpftrace, in turn; the rows give
//! each one's effect on the workload, its CPU, and its eBPF programs' run time per exchange.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::{
    agent::{cpu_seconds, prog_ids, program_stats, set_bpf_stats, Agent},
    median,
    scenarios::{program_delta, row, rr_exchanges, Echo, Exchanges, ALL_PROGRAMS},
    veth::VethPair,
    Plan, Row,
};

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
turn in each round, on loopback and on the veth path (two network namespaces, as in the veth \
scenario above). Ratio = transactions/s with the tool / without. CPU of each tool: its \
process (user+system; bpftrace's start-up compilation is excluded by measuring only after its \
programs are attached) and its eBPF programs' run time, per second of load. **eBPF ns per \
exchange**: the run time of the tool's programs (`run_time_ns` from the kernel's accounting, \
the delta over the load) divided by the request/response exchanges completed in the same \
interval; the row puts bpftrace in the baseline column and nodeward in the measured one, so its \
ratio is nodeward ÷ bpftrace (target ≤ 1.0). Both tools' programs see every TCP packet on the \
machine, not only the load's, so other traffic during a run adds to both. As in the other \
scenarios, the transactions and each tool's process CPU come from runs with the kernel's \
per-program accounting off, and the programs' run time from a second run of each tool with it \
on; that run time includes the accounting's two clock reads per program run, which weigh \
more on the tool whose programs run more often: hence the **program runs per exchange** row \
(bpftrace: one `tcp_probe` per segment received; nodeward: `sock_ops` once per flight, and \
its egress and ingress `cgroup_skb` programs on every packet). **CPU per exchange added**: \
the machine's busy CPU (user, system, interrupts, from `/proc/stat`, accounting off) per \
exchange with the tool, minus the same without it in the same round: what the tool costs the \
workload in all (its programs, the helpers and map work they call, its process), with no \
accounting in it; bpftrace in the baseline column, so the ratio is nodeward ÷ bpftrace. On a \
2-core machine that the load keeps busy it follows the transaction rates, and is as noisy.";

/// Where the load runs.
enum Load {
    Loopback(Echo),
    Veth(VethPair),
}

impl Load {
    fn exchange(&self, length: Duration) -> anyhow::Result<Exchanges> {
        match self {
            Self::Loopback(echo) => rr_exchanges(echo.port, length, None),
            Self::Veth(pair) => pair.exchange(length),
        }
    }
}

struct Bpftrace {
    child: Child,
    prog_ids: Vec<u32>,
}

/// Where bpftrace finds tracepoints.
const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs where it is not mounted (a freshly booted VM): without it bpftrace finds no
/// tracepoint. Left mounted: other users of the machine may have come to rely on it meanwhile.
fn ensure_tracefs() -> anyhow::Result<()> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    let status = Command::new("mount")
        .args(["-t", "tracefs", "tracefs", TRACEFS])
        .status()
        .context("mount tracefs")?;
    if !status.success() {
        bail!("mount -t tracefs tracefs {TRACEFS} failed ({status})");
    }
    Ok(())
}

impl Bpftrace {
    fn start() -> anyhow::Result<Self> {
        ensure_tracefs()?;
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

/// The machine's busy CPU seconds so far (user, nice, system, irq, softirq of all CPUs, from
/// `/proc/stat`; idle, iowait and steal left out).
fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal, in USER_HZ (100 on Linux) ticks.
    let busy = at(0) + at(1) + at(2) + at(5) + at(6);
    Ok(busy as f64 / 100.0)
}

/// The load with the accounting off: exchanges per second and busy CPU ns per exchange.
fn unaccounted(load: &Load, length: Duration) -> anyhow::Result<(Exchanges, f64)> {
    set_bpf_stats(false)?;
    let busy0 = machine_busy_seconds()?;
    let done = load.exchange(length)?;
    let busy = machine_busy_seconds()? - busy0;
    Ok((done, busy * 1e9 / done.count.max(1) as f64))
}

#[derive(Default)]
struct Arm {
    rate: Vec<f64>,
    cpu: Vec<f64>,
    programs_cpu: Vec<f64>,
    ns_per_exchange: Vec<f64>,
    runs_per_exchange: Vec<f64>,
    busy_ns_per_exchange: Vec<f64>,
}

impl Arm {
    /// Runs the load while `pid` holds `ids`, with the accounting off (rate, CPU) and then on
    /// (the programs' run time), and records it.
    fn measure(
        &mut self,
        load: &Load,
        length: Duration,
        pid: u32,
        ids: &[u32],
    ) -> anyhow::Result<()> {
        let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
        let (done, busy) = unaccounted(load, length)?;
        self.rate.push(done.per_second());
        self.cpu
            .push((cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64());
        self.busy_ns_per_exchange.push(busy);
        set_bpf_stats(true)?;
        let (p0, t0) = (program_stats(ids), Instant::now());
        let done = load.exchange(length)?;
        let secs = t0.elapsed().as_secs_f64();
        let progs = program_delta(&p0, &program_stats(ids));
        let ns = progs.values().map(|d| d.1 as f64).sum::<f64>();
        let runs = progs.values().map(|d| d.0 as f64).sum::<f64>();
        self.programs_cpu.push(ns / 1e9 / secs);
        self.ns_per_exchange.push(ns / done.count.max(1) as f64);
        self.runs_per_exchange.push(runs / done.count.max(1) as f64);
        Ok(())
    }
}

pub fn loopback(_root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    let load = Load::Loopback(Echo::start(true)?);
    compare(agent_bin, plan, &load, "Peer: TCP request/response")
}

pub fn veth(_root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    let load = Load::Veth(VethPair::start(agent_bin)?);
    compare(agent_bin, plan, &load, "Peer: TCP request/response (veth)")
}

fn compare(agent_bin: &Path, plan: Plan, load: &Load, scenario: &str) -> anyhow::Result<Vec<Row>> {
    let length = Duration::from_secs(plan.seconds);
    let (mut none, mut nw, mut bt) = (Vec::new(), Arm::default(), Arm::default());
    let mut none_busy = Vec::new();
    for round in 0..plan.rounds {
        crate::say(&format!("  peer (round {}/{})", round + 1, plan.rounds));
        let (done, busy) = unaccounted(load, length)?;
        none.push(done.per_second());
        none_busy.push(busy);

        let agent = Agent::start(agent_bin, &["--set", "gpu.enabled=false"], ALL_PROGRAMS)?;
        nw.measure(load, length, agent.pid(), &agent.prog_ids)?;
        agent.stop()?;

        let tool = Bpftrace::start()?;
        bt.measure(load, length, tool.child.id(), &tool.prog_ids)?;
        drop(tool);
    }
    // Each tool's busy CPU per exchange minus the same round's without a tool.
    let added = |arm: &Arm| -> Vec<f64> {
        arm.busy_ns_per_exchange
            .iter()
            .zip(&none_busy)
            .map(|(with, without)| with - without)
            .collect()
    };
    let added_row = {
        let (b, n) = (added(&bt), added(&nw));
        let ratio = median(&n).unwrap_or(f64::NAN) / median(&b).unwrap_or(f64::NAN);
        let mut r = row(
            scenario,
            "CPU per exchange added (machine, accounting off), bpftrace (baseline) vs nodeward",
            "ns",
            b,
            n,
        );
        r.target = Some(("ratio ≤ 1.0".to_owned(), ratio <= 1.0));
        r
    };
    let runs_row = row(
        scenario,
        "eBPF program runs per exchange, bpftrace (baseline) vs nodeward",
        "",
        bt.runs_per_exchange.clone(),
        nw.runs_per_exchange.clone(),
    );
    let per_exchange = {
        let ratio = median(&nw.ns_per_exchange).unwrap_or(f64::NAN)
            / median(&bt.ns_per_exchange).unwrap_or(f64::NAN);
        let mut r = row(
            scenario,
            "eBPF ns per exchange, bpftrace (baseline) vs nodeward",
            "ns",
            bt.ns_per_exchange.clone(),
            nw.ns_per_exchange.clone(),
        );
        r.target = Some(("ratio ≤ 1.0".to_owned(), ratio <= 1.0));
        r
    };
    let mut rows = Vec::new();
    for (name, arm) in [("nodeward", nw), ("bpftrace", bt)] {
        let ratio = median(&arm.rate).unwrap_or(f64::NAN) / median(&none).unwrap_or(f64::NAN);
        let mut r = row(
            scenario,
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
            scenario,
            &format!("{name} process CPU"),
            "s/s",
            vec![],
            arm.cpu,
        ));
        rows.push(row(
            scenario,
            &format!("{name} eBPF programs' CPU"),
            "s/s",
            vec![],
            arm.programs_cpu,
        ));
    }
    rows.push(per_exchange);
    rows.push(runs_row);
    rows.push(added_row);
    Ok(rows)
}
