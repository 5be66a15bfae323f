//! Agent footprint: the agent's CPU seconds per second and peak memory at idle, under a paced
//! TCP request/response load at two rates, and with 100 and 1,000 containers.
//!
//! The containers are real cgroups, named as the kubelet's systemd driver names them, created
//! in the host's cgroup v2 hierarchy (and, on a hybrid host, in the v1 controllers the agent
//! reads), so the agent discovers them and reads the kernel's own stat files on every tick. No
//! process runs in them: what is measured is the cost of watching them, not of their traffic.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    agent::Agent,
    scenarios::{program_delta, row, rr_load, Echo, ALL_PROGRAMS},
    Plan, Row,
};

pub const DESCRIPTION: &str = "\
- **Agent footprint**: the release agent with its default configuration (GPU off; its own \
socket and listener ports), started afresh for each row and round; after 2 s (start-up and the \
first scans) its CPU use (user+system from `/proc/<pid>/stat`) is measured over the run length, \
and its peak RSS (VmHWM) read at the end. Rows: idle; under the TCP request/response load \
paced at two rates, with the `sock_ops` program's measured runs per second (each RTT sample is \
one run; connection events and other callbacks are runs too), which is the RTT sample rate the \
agent is under; and idle with 100 and 1,000 containers: real cgroups named as the kubelet's \
systemd driver names them (burstable pods, two containers each), created in the host's cgroup \
v2 hierarchy and in the v1 controllers the agent reads on this hybrid host, with no process in \
them, so the agent discovers them and reads the kernel's stat files every tick. The count \
`nodeward containers` lists over the API is shown, so a row where the agent missed containers \
says so. The CPU of the agent's eBPF programs is shown apart: the kernel charges it to whichever \
task or softirq ran them, not to the agent's process. No baseline: this is the agent's own cost.";

const SCENARIO: &str = "Agent footprint";
const SOCKOPS: &str = "nodeward_tcp_sockops";

#[derive(Clone, Copy)]
enum Case {
    Idle,
    /// Paced TCP request/response at this many transactions per second.
    Rr(f64),
    Containers(usize),
}

impl Case {
    fn name(self) -> String {
        match self {
            Self::Idle => "idle".to_owned(),
            Self::Rr(r) => format!("TCP RR paced at {r:.0} transactions/s"),
            Self::Containers(n) => format!("idle, {n} containers"),
        }
    }
}

/// Samples of one case over the rounds.
#[derive(Default)]
struct Samples {
    cpu: Vec<f64>,
    rss: Vec<f64>,
    sockops_per_s: Vec<f64>,
    /// CPU seconds per second spent in the agent's eBPF programs (the kernel charges it to
    /// whichever task or softirq ran them, not to the agent).
    programs_cpu: Vec<f64>,
    containers_seen: Vec<f64>,
}

pub fn footprint(root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    // Five cases with a fresh agent each: three rounds are enough to show the spread and keep
    // the full run within its 20 minutes.
    let plan = Plan {
        rounds: plan.rounds.min(3),
        ..plan
    };
    let echo = Echo::start(true)?;
    // Chosen so that the sock_ops program runs about 10k and 50k times a second here (each
    // transaction is two runs here: 4,000 gave 8,025/s); the rows report the measured rate.
    let plain = [Case::Idle, Case::Rr(5_000.0), Case::Rr(25_000.0)];
    let mut out: Vec<(Case, Samples)> = plain.iter().map(|&c| (c, Samples::default())).collect();
    for round in 0..plan.rounds {
        for (case, samples) in &mut out {
            crate::say(&format!(
                "  footprint: {} (round {}/{})",
                case.name(),
                round + 1,
                plan.rounds
            ));
            measure(root, agent_bin, plan, *case, echo.port, samples)?;
        }
    }
    let mut cgroups = RealCgroups::default();
    for n in [100, 1_000] {
        cgroups.grow_to(n).context("create cgroups")?;
        let mut samples = Samples::default();
        for round in 0..plan.rounds {
            crate::say(&format!(
                "  footprint: {} (round {}/{})",
                Case::Containers(n).name(),
                round + 1,
                plan.rounds
            ));
            measure(
                root,
                agent_bin,
                plan,
                Case::Containers(n),
                echo.port,
                &mut samples,
            )?;
        }
        out.push((Case::Containers(n), samples));
    }
    drop(cgroups);
    let mut rows = Vec::new();
    for (case, s) in out {
        let name = case.name();
        let scenario = format!("{SCENARIO}: {name}");
        let mut cpu = row(&scenario, "agent CPU", "s/s", vec![], s.cpu.clone());
        if let Case::Containers(1_000) = case {
            let m = super::median(&s.cpu).unwrap_or(f64::NAN);
            cpu.target = Some(("≤ 0.05 s/s at 1,000".to_owned(), m <= 0.05));
        }
        rows.push(cpu);
        rows.push(row(
            &scenario,
            "CPU in the agent's eBPF programs (all programs' run time)",
            "s/s",
            vec![],
            s.programs_cpu,
        ));
        rows.push(row(&scenario, "agent peak RSS", "MiB", vec![], s.rss));
        match case {
            Case::Rr(_) => rows.push(row(
                &scenario,
                "`nodeward_tcp_sockops` runs (RTT samples and other socket events)",
                "/s",
                vec![],
                s.sockops_per_s,
            )),
            Case::Containers(_) => rows.push(row(
                &scenario,
                "containers `nodeward containers` lists",
                "",
                vec![],
                s.containers_seen,
            )),
            Case::Idle => {}
        }
    }
    Ok(rows)
}

fn measure(
    _root: &Path,
    agent_bin: &Path,
    plan: Plan,
    case: Case,
    port: u16,
    s: &mut Samples,
) -> anyhow::Result<()> {
    let agent = Agent::start(agent_bin, &["--set", "gpu.enabled=false"], ALL_PROGRAMS)?;
    // Past start-up (loading and attaching the programs) and the first scans, so that the
    // figures are the steady state.
    std::thread::sleep(Duration::from_secs(2));
    let (cpu0, progs0, t0) = (agent.cpu_seconds(), agent.program_stats(), Instant::now());
    let length = Duration::from_secs(plan.seconds);
    match case {
        Case::Rr(rate) => {
            rr_load(port, length, Some(rate))?;
        }
        Case::Idle | Case::Containers(_) => std::thread::sleep(length),
    }
    let secs = t0.elapsed().as_secs_f64();
    s.cpu.push((agent.cpu_seconds() - cpu0) / secs);
    let delta = program_delta(&progs0, &agent.program_stats());
    s.sockops_per_s
        .push(delta.get(SOCKOPS).map_or(f64::NAN, |d| d.0 as f64 / secs));
    s.programs_cpu
        .push(delta.values().map(|d| d.1 as f64).sum::<f64>() / 1e9 / secs);
    if let Case::Containers(_) = case {
        s.containers_seen
            .push(containers_reported(agent_bin, &agent.socket));
    }
    s.rss.push(agent.peak_rss_bytes() / 1_048_576.0);
    agent.stop()
}

/// How many containers `nodeward containers` lists, asked of the agent under test.
fn containers_reported(bin: &Path, socket: &str) -> f64 {
    let Ok(out) = std::process::Command::new(bin)
        .args(["containers", "--json", "--addr", &format!("unix:{socket}")])
        .output()
    else {
        return f64::NAN;
    };
    serde_json::from_slice::<serde_json::Value>(&out.stdout).map_or(f64::NAN, |v| containers_in(&v))
}

/// The length of `containers` in a `ListContainersResponse` as `--json` prints it.
fn containers_in(v: &serde_json::Value) -> f64 {
    match &v["containers"] {
        serde_json::Value::Array(a) => a.len() as f64,
        // An empty list is left out of protobuf's JSON mapping.
        serde_json::Value::Null if v.is_object() => 0.0,
        _ => f64::NAN,
    }
}

/// Real cgroups for N containers, removed (deepest first) when dropped.
#[derive(Default)]
struct RealCgroups {
    /// Directories this benchmark created, in creation order.
    created: Vec<PathBuf>,
    containers: usize,
}

/// The hierarchies the agent reads container stats from on this host: the v2 one and, on a
/// hybrid host, the v1 controllers.
fn hierarchies() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    let unified = base.join("unified");
    if unified.join("cgroup.procs").exists() {
        let mut v = vec![unified];
        for c in ["cpu", "cpuacct", "memory", "blkio", "pids"] {
            if base.join(c).join("cgroup.procs").exists() {
                v.push(base.join(c));
            }
        }
        v
    } else {
        vec![base.to_path_buf()]
    }
}

/// The kubelet's systemd-driver path of container `i`: two containers per burstable pod. The
/// pod UIDs carry a `beac` mark so that they cannot be mistaken for a real pod's.
fn container_path(i: usize) -> String {
    let pod = i / 2;
    let uid = format!("{pod:08x}_0000_4000_8000_beac{pod:08x}");
    format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{:064x}.scope",
        0xbeac_0000_u64 + i as u64
    )
}

impl RealCgroups {
    fn grow_to(&mut self, n: usize) -> anyhow::Result<()> {
        let bases = hierarchies();
        for i in self.containers..n {
            let rel = container_path(i);
            for base in &bases {
                let mut dir = base.clone();
                for part in Path::new(&rel) {
                    dir.push(part);
                    if !dir.exists() {
                        std::fs::create_dir(&dir)
                            .with_context(|| format!("mkdir {}", dir.display()))?;
                        self.created.push(dir.clone());
                    }
                }
            }
        }
        self.containers = n;
        Ok(())
    }
}

impl Drop for RealCgroups {
    fn drop(&mut self) {
        // A cgroup directory is removed with rmdir, children before parents.
        for dir in self.created.iter().rev() {
            if let Err(e) = std::fs::remove_dir(dir) {
                crate::say(&format!("bench: cannot remove {}: {e}", dir.display()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn containers_are_counted_and_an_absent_list_is_none() {
        let two: serde_json::Value =
            serde_json::from_str(r#"{"containers": [{"id": "a"}, {"id": "b"}]}"#).expect("JSON");
        assert_eq!(containers_in(&two), 2.0);
        // `nodeward containers --json` with no container prints `{}`.
        assert_eq!(containers_in(&serde_json::json!({})), 0.0);
        assert!(containers_in(&serde_json::json!("error")).is_nan());
    }

    #[test]
    fn container_paths_follow_the_kubelet_systemd_naming() {
        let p = container_path(3);
        assert!(p.starts_with("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"));
        assert!(p.ends_with(".scope"));
        assert_ne!(container_path(2), container_path(3));
        assert_eq!(
            Path::new(&container_path(2)).parent(),
            Path::new(&container_path(3)).parent()
        );
    }

    #[test]
    fn program_delta_counts_only_what_ran_between_readings() {
        let before = BTreeMap::from([("p".to_owned(), (10, 1000))]);
        let after = BTreeMap::from([("p".to_owned(), (30, 3000)), ("q".to_owned(), (5, 50))]);
        let d = program_delta(&before, &after);
        assert_eq!(d["p"], (20, 2000));
        assert_eq!(d["q"], (5, 50));
    }
}
