//! `cargo xtask bench`: what the agent costs, measured as ratios against a baseline taken in the
//! same run, A/B interleaved, and written to `docs/BENCHMARKS.md`.
//!
//! Each scenario runs its workload alternately without the agent (A) and with the release-built
//! agent running (B), `rounds` times, and reports the median and the spread (min–max) of each
//! side and the ratio of the medians. Timings are never asserted anywhere: the report states
//! each target next to the figure, met or not.

mod agent;
mod collector;
mod drain;
mod fleet;
mod footprint;
mod identity;
mod load;
mod peer;
mod scenarios;
mod veth;

use std::{fmt::Write as _, path::Path, process::Command, time::Instant};

use anyhow::Context as _;

use crate::{cargo, say, setup, step};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Fewer rounds and shorter runs (about 3 minutes).
    #[arg(long)]
    quick: bool,
    /// Run only the scenarios whose name starts with this text, in any case (e.g. `load`,
    /// `peer`); the report then goes
    /// to `target/bench/BENCHMARKS-only.md`, leaving `docs/BENCHMARKS.md` to full runs.
    #[arg(long)]
    only: Option<String>,
}

/// The load generators and measuring clients (`tests/src/bin/nodeward-bench`), built next to
/// the agent: they link the agent's library but are no part of the shipped binary.
pub const BENCH_BIN: &str = "nodeward-bench";

/// `nodeward-bench`, from the same build directory as `agent_bin`.
pub fn bench_bin(agent_bin: &Path) -> std::path::PathBuf {
    agent_bin.with_file_name(BENCH_BIN)
}

/// Settings shared by every scenario.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub rounds: usize,
    pub seconds: u64,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    /// Samples without the agent (empty where there is no baseline).
    pub baseline: Vec<f64>,
    /// Samples with the agent.
    pub measured: Vec<f64>,
    /// The target, in words, and whether the median meets it.
    pub target: Option<(String, bool)>,
}

pub fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn spread(v: &[f64]) -> String {
    let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    match (
        finite.iter().copied().reduce(f64::min),
        finite.iter().copied().reduce(f64::max),
    ) {
        (Some(lo), Some(hi)) => format!("{} – {}", fmt(lo), fmt(hi)),
        _ => "–".to_owned(),
    }
}

fn fmt(x: f64) -> String {
    if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

pub fn run(root: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    if !crate::is_root() {
        anyhow::bail!("cargo xtask bench needs root (it loads eBPF programs and enables kernel.bpf_stats_enabled)");
    }
    setup::ensure_build_tools()?;
    setup::ensure_bench_tools()?;
    step(
        "building nodeward in release mode",
        cargo().args(["build", "--release", "-p", "nodeward"]),
    )?;
    // A build of its own: building both packages in one cargo run would unify their features
    // and put the tests' fixtures into the agent being measured.
    step(
        "building the load generators (nodeward-bench) in release mode",
        cargo().args([
            "build",
            "--release",
            "-p",
            "nodeward-tests",
            "--bin",
            BENCH_BIN,
        ]),
    )?;
    let plan = if args.quick {
        Plan {
            rounds: 2,
            seconds: 3,
        }
    } else {
        Plan {
            rounds: 5,
            seconds: 8,
        }
    };
    let agent_bin = root.join("target/release/nodeward");
    let started = Instant::now();
    let stats_before = agent::enable_bpf_stats()?;
    let mut rows = Vec::new();
    let scenarios: Vec<(&str, scenarios::Scenario)> = vec![
        ("UDP load (iperf3, loopback)", scenarios::udp_iperf),
        ("UDP flood (one-packet flows)", scenarios::udp_flood),
        ("TCP request/response (loopback)", scenarios::tcp_rr),
        (
            "TCP request/response (veth, two network namespaces)",
            veth::tcp_rr,
        ),
        ("TCP connection churn (loopback)", scenarios::tcp_connect),
        ("GPU poll, 8 fake devices", scenarios::gpu_poll),
        ("agent footprint", footprint::footprint),
        ("cgroup scan scaling", collector::scan),
        ("pod identity, 1,000 containers", identity::identity),
        ("API latency and Watch memory", collector::api),
        ("TCP start-up seed, 50,000 connections", drain::seed),
        ("drain status, 50,000 streams", drain::status),
        ("fleet status, 200 agents", fleet::status),
        ("peer: bpftrace RTT histogram (loopback)", peer::loopback),
        ("peer: bpftrace RTT histogram (veth)", peer::veth),
        (
            "load soak: gRPC callers, Watch streams, RTT samples",
            load::soak,
        ),
    ];
    let scenarios: Vec<_> = scenarios
        .into_iter()
        .filter(|(name, _)| {
            args.only
                .as_ref()
                .is_none_or(|o| name.to_lowercase().starts_with(o.to_lowercase().as_str()))
        })
        .collect();
    let total = scenarios.len();
    for (i, (name, scenario)) in scenarios.into_iter().enumerate() {
        say(&format!(
            "bench [{}/{total}] {name} ({} rounds of {} s, elapsed {:.0} s)",
            i + 1,
            plan.rounds,
            plan.seconds,
            started.elapsed().as_secs_f64()
        ));
        match scenario(root, &agent_bin, plan) {
            Ok(mut r) => rows.append(&mut r),
            Err(e) => {
                say(&format!("bench: {name} failed: {e:#}"));
                rows.push(Row {
                    scenario: name.to_owned(),
                    metric: format!("failed: {e}"),
                    unit: String::new(),
                    baseline: vec![],
                    measured: vec![],
                    target: None,
                });
            }
        }
    }
    agent::restore_bpf_stats(&stats_before);
    let mut report = render(&rows, plan, args.quick, started.elapsed().as_secs());
    let path = if args.only.is_some() {
        let dir = root.join("target/bench");
        std::fs::create_dir_all(&dir)?;
        dir.join("BENCHMARKS-only.md")
    } else {
        let path = root.join("docs/BENCHMARKS.md");
        // The sections measured by hand, below the marker, stay as they are.
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(at) = old.find(KEPT_MARKER) {
            report.push('\n');
            report.push_str(&old[at..]);
        }
        path
    };
    std::fs::write(&path, report).with_context(|| format!("write {}", path.display()))?;
    say(&format!(
        "wrote {} in {:.0} s",
        path.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The line in docs/BENCHMARKS.md after which a full run keeps the file as it was: the
/// sections measured by hand.
const KEPT_MARKER: &str =
    "<!-- Measured by hand from here on: `cargo xtask bench` keeps this part as it is. -->";

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or("?".to_owned(), |kb| {
            format!("{:.0} GiB", kb as f64 / 1048576.0)
        });
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem}; kernel {kernel}; {rustc}")
}

fn render(rows: &[Row], plan: Plan, quick: bool, secs: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `cargo xtask bench{}` (do not edit by hand, down to the sections measured \
         by hand, which a full run keeps). Each workload ran {} times without the agent \
         (baseline) and {} times with the release-built agent running, interleaved A/B (and, \
         for the programs' run time, once more with the agent and the kernel's accounting on); figures are medians, with the min – max spread. Ratio = with agent / \
         baseline. Rows without a baseline measure the agent itself (its programs, its CPU and \
         memory, its scan and API); their spread is over rounds (or scans, or calls). Run time: \
         {secs} s.\n",
        if quick { " --quick" } else { "" },
        plan.rounds,
        plan.rounds
    );
    let _ = writeln!(s, "Machine: {}\n", machine());
    let _ = writeln!(
        s,
        "This machine is a shared 2-core VM: absolute figures are noisy; the ratios, taken in one \
         run, are what to compare.\n"
    );
    let _ = writeln!(
        s,
        "| scenario | metric | baseline (median) | baseline spread | with agent (median) | with agent spread | ratio | target | met |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let b = median(&r.baseline);
        let m = median(&r.measured);
        let ratio = match (b, m) {
            (Some(b), Some(m)) if b != 0.0 => format!("{:.3}", m / b),
            _ => "–".to_owned(),
        };
        let (target, met) = match &r.target {
            Some((t, ok)) => (t.clone(), if *ok { "met" } else { "not met" }.to_owned()),
            None => ("–".to_owned(), "–".to_owned()),
        };
        let unit =
            |x: Option<f64>| x.map_or("–".to_owned(), |x| format!("{} {}", fmt(x), r.unit));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.metric,
            unit(b),
            if r.baseline.is_empty() {
                "–".to_owned()
            } else {
                spread(&r.baseline)
            },
            unit(m),
            spread(&r.measured),
            ratio,
            target,
            met
        );
    }
    let _ = writeln!(s, "\n## Scenarios\n");
    let _ = writeln!(s, "{}", scenarios::DESCRIPTION);
    let _ = writeln!(s, "{}", veth::DESCRIPTION);
    let _ = writeln!(s, "{}", footprint::DESCRIPTION);
    let _ = writeln!(s, "{}", collector::DESCRIPTION);
    let _ = writeln!(s, "{}", identity::DESCRIPTION);
    let _ = writeln!(s, "{}", drain::DESCRIPTION);
    let _ = writeln!(s, "{}", fleet::DESCRIPTION);
    let _ = writeln!(s, "{}", peer::DESCRIPTION);
    let _ = writeln!(s, "{}", load::DESCRIPTION);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_nan() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median(&[]), None);
    }
}
