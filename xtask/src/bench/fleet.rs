//! Issue 17: `nodeward fleet status` across 200 agents on this machine, end to end.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::{scenarios::row, Plan, Row};

pub const DESCRIPTION: &str = "\
- **fleet status, 200 agents**: 200 release agents, each on its own loopback port behind mutual \
TLS (one node certificate for all, made by `nodeward certs`, verified with `--server-name`), with \
the eBPF, GPU, TCP, UDP, container and metrics sources off and a 5 s tick so that 200 of them fit \
this machine; then `nodeward fleet status --json --parallel 32` (the default per-node timeout, \
2 s) run 10 times per round, each run timed end to end (process start to exit: reading the \
list, 200 TLS handshakes with client certificates, three calls per node, the table). Rows: \
p50 and p99 of those times, the nodes that did not answer per run, and the agents' median \
resident set. Target (issue 17): p99 under 3 s.";

const SCENARIO: &str = "fleet status, 200 agents";
const AGENTS: usize = 200;
const SERVER_NAME: &str = "fleet-bench";

struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn certs(agent_bin: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(agent_bin)
        .arg("certs")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .context("run nodeward certs")?;
    if !out.status.success() {
        bail!(
            "nodeward certs {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `n` distinct free ports: the listeners are all held until every port is known, so the
/// kernel cannot hand out one twice.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()?)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank among a few hundred samples"
    )]
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

pub fn status(_root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    let dir = std::env::temp_dir().join(format!("nodeward-bench-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    certs(agent_bin, &dir, &["ca"])?;
    certs(agent_bin, &dir, &["node", SERVER_NAME, "--ip", "127.0.0.1"])?;
    certs(agent_bin, &dir, &["client", "bench"])?;
    let path = |f: &str| dir.join(f).display().to_string();
    let mut agents = Agents(Vec::new());
    let ports = free_ports(AGENTS)?;
    for (i, port) in ports.iter().enumerate() {
        let set = [
            format!("api.node_name=bench-{i:03}"),
            format!("api.unix_socket={}", path(&format!("{i}.sock"))),
            format!("drain.state_file={}", path(&format!("{i}.drain.json"))),
            format!("api.tcp_listen=127.0.0.1:{port}"),
            format!("api.tls_cert={}", path(&format!("{SERVER_NAME}.crt"))),
            format!("api.tls_key={}", path(&format!("{SERVER_NAME}.key"))),
            format!("api.tls_client_ca={}", path("ca.crt")),
            "ebpf.enabled=false".into(),
            "gpu.enabled=false".into(),
            "tcp.enabled=false".into(),
            "udp.enabled=false".into(),
            "containers.enabled=false".into(),
            "metrics.enabled=false".into(),
            "agent.tick=5s".into(),
        ];
        let mut cmd = Command::new(agent_bin);
        cmd.args(["run", "--config", "/dev/null"]);
        for kv in &set {
            cmd.args(["--set", kv]);
        }
        let child = cmd
            .env("NODEWARD_LOG", "warn")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start an agent")?;
        agents.0.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for port in &ports {
        while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
            if Instant::now() > deadline {
                bail!("the agent on port {port} did not listen within 120 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let list: String = ports.iter().map(|p| format!("127.0.0.1:{p}\n")).collect();
    std::fs::write(dir.join("targets"), list)?;
    let rss: Vec<f64> = agents.0.iter().map(|c| rss_mib(c.id())).collect();

    let mut millis = Vec::new();
    let mut unanswered = Vec::new();
    for round in 0..plan.rounds {
        crate::say(&format!(
            "  fleet status: round {}/{}",
            round + 1,
            plan.rounds
        ));
        for _ in 0..10 {
            let started = Instant::now();
            let out = Command::new(agent_bin)
                .args(["fleet", "status", "--json", "--parallel", "32"])
                .args(["--targets", &path("targets"), "--ca", &path("ca.crt")])
                .args(["--cert", &path("bench.crt"), "--key", &path("bench.key")])
                .args(["--server-name", SERVER_NAME])
                .stderr(Stdio::inherit())
                .output()
                .context("run nodeward fleet status")?;
            millis.push(started.elapsed().as_secs_f64() * 1e3);
            let text = String::from_utf8_lossy(&out.stdout);
            let rows = text.lines().count();
            if !out.status.success() || rows != AGENTS {
                bail!("fleet status gave {rows} rows ({})", out.status);
            }
            #[expect(clippy::cast_precision_loss, reason = "at most 200")]
            unanswered.push(
                text.lines()
                    .filter(|l| l.contains("\"UNREACHABLE\""))
                    .count() as f64,
            );
        }
    }
    drop(agents);
    let _ = std::fs::remove_dir_all(&dir);
    let p99 = percentile(&millis, 0.99);
    let mut p99_row = row(SCENARIO, "end-to-end time, p99", "ms", vec![], vec![p99]);
    p99_row.target = Some(("< 3000 ms (issue 17)".to_owned(), p99 < 3000.0));
    Ok(vec![
        row(
            SCENARIO,
            "end-to-end time, p50",
            "ms",
            vec![],
            vec![percentile(&millis, 0.5)],
        ),
        p99_row,
        row(
            SCENARIO,
            "nodes that did not answer, per run",
            "count",
            vec![],
            unanswered,
        ),
        row(SCENARIO, "agent resident set (each)", "MiB", vec![], rss),
    ])
}
