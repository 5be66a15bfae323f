//! `nodeward probe --verify`: proves, on the kernel it runs on, that every eBPF program in the
//! agent passes the verifier and that the hook paths the probe chooses attach and produce data.
//!
//! It loads each program of the embedded object on its own (verifier verdict, instruction
//! counts), then attaches what the daemon would attach on this node (the TCP latency programs
//! for the path [`crate::sources::tcp::plan`] picks, the UDP/RTP programs), moves itself into a throw-away child cgroup, makes loopback traffic there, and
//! reads the result back through the sources' own code. Every count is compared with the traffic
//! it made: the kernel maps are the only witness, nothing is inferred.

mod traffic;

use std::path::Path;

use aya::programs::Program;
use serde::Serialize;

use crate::{
    config::Config,
    probe::Capabilities,
    sources::{tcp, udp},
};

use self::traffic::{
    rtp_traffic, tcp_traffic, ChildCgroup, RTP_PACKETS, TCP_CONNECTIONS, TCP_EXCHANGES,
};

/// Lines of a verifier log kept in the report (its end, where the reason is).
const LOG_LINES: usize = 8;

/// The verifier's verdict on one program, loaded on its own.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramCheck {
    pub name: String,
    pub kind: String,
    pub loaded: bool,
    /// Instructions after the verifier's rewrites (`xlated_prog_len / 8`).
    pub xlated_insns: Option<u32>,
    /// Instructions the verifier walked (kernels ≥ 5.16 report it).
    pub verified_insns: Option<u32>,
    /// The load error with the last lines of the verifier log.
    pub error: Option<String>,
}

/// One hook path attached for real and fed with traffic.
#[derive(Debug, Clone, Serialize)]
pub struct PathCheck {
    pub source: &'static str,
    /// `chosen`: what the daemon uses on this node; `fallback`: a path of the TCP fallback
    /// chain forced on, to prove it would work if chosen.
    pub role: &'static str,
    /// The hook path (as the source reports it).
    pub path: String,
    /// Paths of the `auto` chain tried before `path` that failed, each with its reason.
    pub fell_back_from: Vec<String>,
    pub attached: bool,
    pub error: Option<String>,
    /// What was generated (packets, exchanges, connections), and what the kernel maps counted.
    pub generated: u64,
    pub observed: u64,
    /// How `observed` is compared with `generated`.
    pub rule: &'static str,
    pub passed: bool,
    /// TCP paths keyed by the child cgroup: the agent's RTT figures for it next to the
    /// exchanges as the client timed them (reported, not judged: loopback RTTs are tens of
    /// microseconds; tests put a delay on `lo` and compare).
    pub rtt: Option<RttCheck>,
}

/// The agent's RTT and jitter for the child cgroup against the client's own timing of the same
/// exchanges (write of the request to the end of the read of the reply).
#[derive(Debug, Clone, Serialize)]
pub struct RttCheck {
    /// `tcp.rtt_method` as resolved on this kernel, and what a sample is (`raw`, `smoothed`).
    pub method: String,
    pub sample: String,
    pub path_samples: u64,
    pub p50_us: f64,
    pub jitter_rfc3550_us: f64,
    pub timed_exchanges: u64,
    pub timed_p50_us: f64,
    /// The agent's estimator (RFC 3550, gain 1/16, averaged over the samples that update it)
    /// run over each connection's timed exchanges.
    pub timed_jitter_rfc3550_us: f64,
}

impl RttCheck {
    fn new(
        snap: &tcp::TcpSnapshot,
        window: &tcp::snapshot::WindowStats,
        timed: &[Vec<std::time::Duration>],
    ) -> Self {
        let micros: Vec<Vec<f64>> = timed
            .iter()
            .map(|c| c.iter().map(|d| d.as_secs_f64() * 1e6).collect())
            .collect();
        let mut all: Vec<f64> = micros.iter().flatten().copied().collect();
        all.sort_by(f64::total_cmp);
        Self {
            method: snap
                .fidelity
                .rtt_method
                .map_or("none", tcp::RttMethod::name)
                .to_owned(),
            sample: snap.fidelity.rtt_sample.name().to_owned(),
            path_samples: window.path_samples,
            p50_us: window.p50_rtt_us,
            jitter_rfc3550_us: window.jitter_rfc3550_us,
            timed_exchanges: all.len() as u64,
            timed_p50_us: all.get(all.len() / 2).copied().unwrap_or(0.0),
            timed_jitter_rfc3550_us: rfc3550_mean(&micros),
        }
    }
}

/// RFC 3550's interarrival-jitter estimator (`J += (|D| − J) / 16`) over each sequence of RTTs,
/// J averaged over every update: the figure the agent reports as `jitter_rfc3550_us`.
fn rfc3550_mean(sequences: &[Vec<f64>]) -> f64 {
    let (mut sum, mut n) = (0.0, 0u64);
    for seq in sequences {
        let mut j = 0.0;
        for pair in seq.windows(2) {
            j += ((pair[1] - pair[0]).abs() - j) / 16.0;
            sum += j;
            n += 1;
        }
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub kernel: String,
    pub cgroup: String,
    pub programs: Vec<ProgramCheck>,
    pub paths: Vec<PathCheck>,
    /// TCP attributions this kernel cannot run, with the reason (not attempted).
    pub unavailable: Vec<String>,
    /// Every path chosen on this node attached and produced the data expected.
    pub passed: bool,
    /// Every fallback this kernel supports attached and produced the data expected too.
    pub fallbacks_passed: bool,
}

impl Report {
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = format!(
            "kernel {} (cgroups: {})\nprograms:\n",
            self.kernel, self.cgroup
        );
        for p in &self.programs {
            let insns = match (p.xlated_insns, p.verified_insns) {
                (Some(x), Some(v)) => format!("{x} insns, {v} verified"),
                (Some(x), None) => format!("{x} insns"),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "  {} {} ({}) {}",
                if p.loaded { "loaded  " } else { "REJECTED" },
                p.name,
                p.kind,
                insns
            );
            if let Some(e) = &p.error {
                for line in e.lines() {
                    let _ = writeln!(s, "      {line}");
                }
            }
        }
        let _ = writeln!(s, "hook paths:");
        for p in &self.paths {
            let _ = writeln!(
                s,
                "  {} {} {}: {} — attached {}, generated {}, observed {} ({})",
                if p.passed { "ok  " } else { "FAIL" },
                p.role,
                p.source,
                p.path,
                if p.attached { "yes" } else { "no" },
                p.generated,
                p.observed,
                p.rule
            );
            if let Some(r) = &p.rtt {
                let _ = writeln!(
                    s,
                    "      rtt ({} method, {} samples): p50 {:.3} ms, jitter {:.3} ms over {} path samples; \
                     client-timed: p50 {:.3} ms, jitter {:.3} ms over {} exchanges",
                    r.method,
                    r.sample,
                    r.p50_us / 1e3,
                    r.jitter_rfc3550_us / 1e3,
                    r.path_samples,
                    r.timed_p50_us / 1e3,
                    r.timed_jitter_rfc3550_us / 1e3,
                    r.timed_exchanges
                );
            }
            for f in &p.fell_back_from {
                let _ = writeln!(s, "      fell back from {f}");
            }
            if let Some(e) = &p.error {
                let _ = writeln!(s, "      {e}");
            }
        }
        for u in &self.unavailable {
            let _ = writeln!(s, "  n/a  fallback {u}");
        }
        let _ = write!(
            s,
            "verify: {} (fallbacks: {})",
            if self.passed { "PASS" } else { "FAIL" },
            if self.fallbacks_passed {
                "pass"
            } else {
                "FAIL"
            }
        );
        s
    }
}

/// The error of a failed load, with the end of the verifier log (where its reason is).
fn describe_error(e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() <= LOG_LINES + 1 {
        return lines.join("\n");
    }
    let mut out = vec![lines[0], "…"];
    out.extend(&lines[lines.len() - LOG_LINES..]);
    out.join("\n")
}

fn load_one(program: &mut Program) -> Result<(), aya::programs::ProgramError> {
    match program {
        Program::TracePoint(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::SchedClassifier(p) => p.load(),
        Program::KProbe(p) => p.load(),
        _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
    }
}

/// Loads every program of the object, each on its own, and records the verifier's verdict.
/// The TCP programs are loaded with `tcp.rtt_method = "segment"`, their largest variant (the
/// verifier prunes the timing code for every other method); the hook-path checks load them
/// with the method the config resolves to.
pub fn check_programs() -> Result<Vec<ProgramCheck>, String> {
    let segment = agent_ebpf::tcp::rtt_method::SEGMENT;
    let mut ebpf = crate::ebpf::loader_owning(&[])
        .override_global("RTT_METHOD", &segment, true)
        .load(crate::ebpf::OBJECT)
        .map_err(|e| format!("loading the eBPF object: {e}"))?;
    let mut out = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        let kind = format!("{:?}", program.prog_type());
        let result = load_one(program);
        let info = program.info().ok();
        out.push(ProgramCheck {
            name: name.to_owned(),
            kind,
            loaded: result.is_ok(),
            xlated_insns: info
                .as_ref()
                .and_then(aya::programs::ProgramInfo::size_translated)
                .map(|b| b / 8),
            verified_insns: info
                .as_ref()
                .and_then(aya::programs::ProgramInfo::verified_instruction_count),
            error: result.err().map(|e| describe_error(&e)),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Attaches the TCP latency programs for the path `attribution` leads to, makes traffic and
/// counts the RTT samples of the child cgroup. `Err` when this kernel cannot run that path.
fn tcp_check(
    config: &Config,
    caps: &Capabilities,
    cgroup: Option<&ChildCgroup>,
    attribution: tcp::Attribution,
    role: &'static str,
) -> Result<PathCheck, String> {
    // `auto` falls back along the chain as the daemon does; a forced path is tried alone.
    let mut paths = tcp::chain(caps, attribution).map_err(|e| e.to_string())?;
    for (_, plan) in &mut paths {
        plan.proc_root.clone_from(&config.paths.proc_root);
    }
    let first_path = paths.first().map(|(_, p)| p.path()).unwrap_or("none");
    let mut check = PathCheck {
        source: tcp::NAME,
        role,
        path: first_path.to_owned(),
        fell_back_from: Vec::new(),
        attached: false,
        error: None,
        generated: TCP_CONNECTIONS * TCP_EXCHANGES,
        observed: 0,
        rule: "RTT samples in the child cgroup >= request/response exchanges",
        passed: false,
        rtt: None,
    };
    let (mut collector, plan) = match tcp::Collector::attach_chain(
        paths,
        &config.tcp,
        config.agent.tick,
        &config.network.windows,
    ) {
        Ok((c, _, plan)) => (c, plan),
        Err(e) => {
            check.error = Some(describe_error(&e));
            return Ok(check);
        }
    };
    check.path = plan.path().to_owned();
    check.fell_back_from = collector.fell_back_from().to_vec();
    if plan.recorder == tcp::Recorder::SockDiag {
        check.generated = TCP_CONNECTIONS;
        check.rule = "sockets polled in the child cgroup >= connections held open";
    }
    if cgroup.is_none() || plan.recorder == tcp::Recorder::Netns {
        check.rule = if plan.recorder == tcp::Recorder::SockDiag {
            "sockets polled on the node >= connections held open"
        } else {
            "RTT samples on the node >= request/response exchanges"
        };
    }
    check.attached = true;
    if let Err(e) = collector.tick() {
        check.error = Some(format!("baseline read: {e}"));
        return Ok(check);
    }
    let traffic = tcp_traffic();
    let snapshot = collector.tick();
    match (traffic, snapshot) {
        (Err(e), _) => check.error = Some(format!("loopback traffic: {e}")),
        (_, Err(e)) => check.error = Some(format!("read: {e}")),
        (Ok(traffic), Ok(snap)) => {
            drop(traffic.clients);
            let _ = traffic.server.join();
            // Namespace cookies are not cgroup ids, and without cgroup v2 there is no child
            // cgroup: then every sample on the node counts.
            let containers: Vec<_> = match cgroup {
                Some(cg) if plan.recorder != tcp::Recorder::Netns => {
                    snap.container(cg.id()).into_iter().collect()
                }
                _ => snap.containers.values().collect(),
            };
            check.observed = containers
                .iter()
                .filter_map(|c| c.windows.first())
                .map(|w| w.samples)
                .sum();
            check.passed = check.observed >= check.generated;
            if let Some(cg) = cgroup.filter(|_| plan.recorder != tcp::Recorder::Netns) {
                if let Some(w) = snap.container(cg.id()).and_then(|c| c.windows.first()) {
                    check.rtt = Some(RttCheck::new(&snap, w, &traffic.timed));
                }
            }
        }
    }
    Ok(check)
}

fn udp_check(config: &Config, caps: &Capabilities, cgroup: &ChildCgroup) -> PathCheck {
    let mut check = PathCheck {
        source: udp::NAME,
        role: "chosen",
        path: udp::HOOK.to_owned(),
        fell_back_from: Vec::new(),
        attached: false,
        error: None,
        generated: RTP_PACKETS,
        observed: 0,
        rule: "RTP packets of the stream received in the child cgroup == packets received",
        passed: false,
        rtt: None,
    };
    let mut source = match udp::Source::start(
        &config.udp,
        config.agent.tick,
        &config.network.windows,
        caps,
    ) {
        Ok(s) => s,
        Err(e) => {
            check.error = Some(describe_error(&e));
            return check;
        }
    };
    check.attached = true;
    match rtp_traffic() {
        Err(e) => check.error = Some(format!("loopback traffic: {e}")),
        Ok((_, rx_port, received)) => match source.poll() {
            Err(e) => check.error = Some(format!("read: {e}")),
            Ok(snap) => {
                check.generated = received;
                let mut egress = 0;
                if let Some(c) = snap.container(cgroup.id()) {
                    check.observed = c
                        .streams
                        .iter()
                        .filter(|s| s.ssrc == 0x5eed_cafe && s.endpoint.local_port == rx_port)
                        .map(|s| s.packets)
                        .sum();
                    egress = c
                        .flows
                        .iter()
                        .filter(|f| {
                            f.endpoint.direction == "egress" && f.endpoint.remote_port == rx_port
                        })
                        .map(|f| f.packets)
                        .sum();
                }
                check.passed =
                    received == RTP_PACKETS && check.observed == received && egress == received;
                if !check.passed {
                    check.error = Some(format!(
                        "sent {RTP_PACKETS}, received {received}, egress flow counted {egress}"
                    ));
                }
            }
        },
    }
    check
}

/// Runs every check. Needs root and a cgroup v2 hierarchy to make the child cgroup in.
pub fn run(config: &Config) -> Result<Report, String> {
    let caps = Capabilities::probe(&config.paths);
    if !caps.is_root {
        return Err("--verify needs root (it loads eBPF programs and makes a cgroup)".to_owned());
    }
    let programs = check_programs()?;
    // Without cgroup v2 (cgroup v1 only) there is no child cgroup to make: the counts are then
    // the node's, and the UDP source (which needs cgroup v2) is reported unavailable.
    let root = caps.cgroup.unified().map(Path::to_path_buf);
    let cgroup = root.as_deref().map(ChildCgroup::enter).transpose()?;
    let cgroup = cgroup.as_ref();
    let mut paths = Vec::new();
    let mut unavailable = Vec::new();
    // The path the daemon would take: `tcp.attribution` (default `auto`), sock_diag when eBPF
    // is turned off.
    let chosen = if config.ebpf.enabled {
        config.tcp.attribution
    } else {
        tcp::Attribution::SockDiag
    };
    match tcp_check(config, &caps, cgroup, chosen, "chosen") {
        Ok(p) => paths.push(p),
        // No path at all (not even sock_diag): the chosen TCP path fails.
        Err(reason) => paths.push(PathCheck {
            source: tcp::NAME,
            role: "chosen",
            path: "none".to_owned(),
            fell_back_from: Vec::new(),
            attached: false,
            error: Some(reason),
            generated: 0,
            observed: 0,
            rule: "a path must be chosen",
            passed: false,
            rtt: None,
        }),
    }
    // Where `auto` landed, after any run-time fallback.
    let chosen_path = paths.last().map(|p| p.path.clone());
    // The fallback chain, each link forced on, in the order `auto` would fall to them.
    for attribution in [
        tcp::Attribution::Listen,
        tcp::Attribution::SockCreate,
        tcp::Attribution::Egress,
        tcp::Attribution::Netns,
        tcp::Attribution::SockDiag,
    ]
    .into_iter()
    .filter(|a| *a != chosen)
    {
        // `auto` may have landed on this very path already.
        let same = tcp::plan(&caps, attribution)
            .is_ok_and(|(_, p)| chosen_path.as_deref() == Some(p.path()));
        if same {
            continue;
        }
        match tcp_check(config, &caps, cgroup, attribution, "fallback") {
            Ok(p) => paths.push(p),
            Err(reason) => unavailable.push(format!("{attribution:?}: {reason}")),
        }
    }
    match cgroup {
        Some(cg) => paths.push(udp_check(config, &caps, cg)),
        None => unavailable.push(format!(
            "{}: needs a cgroup v2 hierarchy (cgroups here: {:?})",
            udp::NAME,
            caps.cgroup
        )),
    }
    let passed = paths
        .iter()
        .filter(|p| p.role == "chosen")
        .all(|p| p.passed);
    let fallbacks_passed = paths.iter().all(|p| p.passed);
    Ok(Report {
        kernel: caps.kernel_release.clone(),
        cgroup: match cgroup {
            Some(cg) => format!("v2, child {}", cg.path.display()),
            None => format!("{:?} (no child cgroup: node-wide counts)", caps.cgroup),
        },
        programs,
        paths,
        unavailable,
        passed,
        fallbacks_passed,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3550_mean_runs_the_agents_estimator_per_connection() {
        // One connection alternating 10 and 20: |D| = 10 each time, J climbs 10/16 of the way
        // per step; a second connection of one sample adds no update.
        let seqs = vec![vec![10.0, 20.0, 10.0], vec![5.0]];
        let j1 = 10.0 / 16.0;
        let j2 = j1 + (10.0 - j1) / 16.0;
        assert!((super::rfc3550_mean(&seqs) - (j1 + j2) / 2.0).abs() < 1e-12);
        assert_eq!(super::rfc3550_mean(&[vec![]]), 0.0);
    }

    use super::*;

    #[test]
    fn a_long_verifier_log_keeps_its_first_line_and_its_end() {
        let log: String = (0..40).map(|i| format!("line {i}\n")).collect();
        let short = describe_error(&format!("load failed: Verifier output:\n{log}"));
        let lines: Vec<&str> = short.lines().collect();
        assert_eq!(lines.len(), LOG_LINES + 2, "{short}");
        assert_eq!(lines[0], "load failed: Verifier output:");
        assert_eq!(lines[1], "…");
        assert_eq!(lines[lines.len() - 1], "line 39");
        assert_eq!(describe_error(&"one line"), "one line");
    }
}
