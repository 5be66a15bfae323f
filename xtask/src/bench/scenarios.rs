//! The benchmark's workloads. Each runs A (no agent) / B (agent running) interleaved.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::{agent::Agent, median, Plan, Row};

pub type Scenario = fn(&Path, &Path, Plan) -> anyhow::Result<Vec<Row>>;

pub const DESCRIPTION: &str = "\
- **UDP load**: `iperf3 -u -b 80M -l 100` on loopback, i.e. 100,000 packets/s of 100-byte \
datagrams, for the run length; the metric is the loss iperf3 reports (%), and the agent's \
`cgroup_skb` programs' average run time per packet from `kernel.bpf_stats_enabled`. Target \
(issue 4): the agent adds under 3 percentage points of loss at 100k packets/s.
- **TCP request/response**: four persistent loopback connections exchanging 64-byte \
requests and responses as fast as they can (a load generator of the project's own, in xtask); \
the metric is transactions/s. Target (issue 3): under 3% lower with the agent (ratio ≥ 0.97).
- **TCP connection churn**: one client opening and closing loopback connections as fast as it \
can; the metric is connections/s, and the `sock:inet_sock_set_state` program's average run time. \
Target (issue 3): under 150 ns per program run.
- **GPU poll**: `nodeward gpu-check` against the tests' fake `libnvidia-ml` presenting 8 GPUs \
with every field set (`tests/fake-nvml/every-field.script`); the metric is the time of one poll \
of all 8 as the agent measures it. Target (issue 6): under 5 ms. No baseline.
- **Agent CPU**: the agent's user+system CPU seconds per second of wall time during the B runs.";

/// Runs `work` alternately without and with the agent; `with_agent` gets the agent.
fn ab<T>(
    plan: Plan,
    agent_bin: &Path,
    min_programs: usize,
    mut work: impl FnMut() -> anyhow::Result<T>,
    mut with_agent: impl FnMut(&Agent, &T, Duration),
) -> anyhow::Result<(Vec<T>, Vec<T>)> {
    let mut a = Vec::new();
    let mut b = Vec::new();
    for _ in 0..plan.rounds {
        a.push(work()?);
        let agent = Agent::start(agent_bin, &["--set", "gpu.enabled=false"], min_programs)?;
        let started = Instant::now();
        let r = work()?;
        with_agent(&agent, &r, started.elapsed());
        agent.stop()?;
        b.push(r);
    }
    Ok((a, b))
}

fn ns_per_run(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    prefix: &str,
) -> f64 {
    let (mut cnt, mut ns) = (0u64, 0u64);
    for (name, (c, t)) in after.iter().filter(|(n, _)| n.starts_with(prefix)) {
        let (c0, t0) = before.get(name).copied().unwrap_or((0, 0));
        cnt += c - c0.min(*c);
        ns += t - t0.min(*t);
    }
    if cnt == 0 {
        f64::NAN
    } else {
        ns as f64 / cnt as f64
    }
}

fn row(scenario: &str, metric: &str, unit: &str, baseline: Vec<f64>, measured: Vec<f64>) -> Row {
    Row {
        scenario: scenario.to_owned(),
        metric: metric.to_owned(),
        unit: unit.to_owned(),
        baseline,
        measured,
        target: None,
    }
}

pub fn udp_iperf(_root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    let port = "5399";
    let iperf = || -> anyhow::Result<f64> {
        let mut server = Command::new("iperf3")
            .args(["-s", "-1", "-p", port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start iperf3 server")?;
        std::thread::sleep(Duration::from_millis(300));
        let out = Command::new("iperf3")
            .args([
                "-c",
                "127.0.0.1",
                "-p",
                port,
                "-u",
                "-b",
                "80M",
                "-l",
                "100",
                "-J",
                "-t",
            ])
            .arg(plan.seconds.to_string())
            .output()
            .context("run iperf3 client")?;
        let _ = server.wait();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
        v["end"]["sum"]["lost_percent"]
            .as_f64()
            .with_context(|| format!("no end.sum.lost_percent in iperf3 output: {}", v["error"]))
    };
    let mut ns = Vec::new();
    let mut cpu = Vec::new();
    let mut rss = Vec::new();
    let before = BTreeMap::new();
    let (a, b) = ab(plan, agent_bin, 3, iperf, |agent, _, elapsed| {
        let after = agent.program_stats();
        ns.push(ns_per_run(&before, &after, "nodeward_udp"));
        cpu.push(agent.cpu_seconds() / elapsed.as_secs_f64());
        rss.push(agent.peak_rss_bytes() / 1_048_576.0);
    })?;
    let added = median(&b).unwrap_or(f64::NAN) - median(&a).unwrap_or(f64::NAN);
    let mut loss = row("UDP load", "packet loss at 100k pkt/s", "%", a, b);
    loss.target = Some((
        "< 3 points added".to_owned(),
        added.is_finite() && added < 3.0,
    ));
    Ok(vec![
        loss,
        row(
            "UDP load",
            "cgroup_skb program run time",
            "ns/packet",
            vec![],
            ns,
        ),
        row("UDP load", "agent CPU", "s/s", vec![], cpu),
        row("UDP load", "agent peak RSS", "MiB", vec![], rss),
    ])
}

/// A loopback echo server for the TCP scenarios; stops when dropped.
struct Echo {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Echo {
    /// With `echo` false, connections are accepted and closed at once (the churn scenario
    /// must not be limited by a thread per connection).
    fn start(echo: bool) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut c) = conn else { continue };
                if !echo {
                    continue;
                }
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(Self { port, stop })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

pub fn tcp_rr(_root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    let echo = Echo::start(true)?;
    let port = echo.port;
    let run = || -> anyhow::Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(plan.seconds);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || -> anyhow::Result<u64> {
                    let mut c = TcpStream::connect(("127.0.0.1", port))?;
                    c.set_nodelay(true)?;
                    let req = [7u8; 64];
                    let mut resp = [0u8; 64];
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        c.write_all(&req)?;
                        c.read_exact(&mut resp)?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h
                .join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        }
        Ok(total as f64 / plan.seconds as f64)
    };
    let mut cpu = Vec::new();
    let (a, b) = ab(plan, agent_bin, 1, run, |agent, _, elapsed| {
        cpu.push(agent.cpu_seconds() / elapsed.as_secs_f64());
    })?;
    let ratio = median(&b).unwrap_or(f64::NAN) / median(&a).unwrap_or(f64::NAN);
    let mut rate = row("TCP request/response", "transactions", "/s", a, b);
    rate.target = Some(("ratio ≥ 0.97".to_owned(), ratio >= 0.97));
    Ok(vec![
        rate,
        row("TCP request/response", "agent CPU", "s/s", vec![], cpu),
    ])
}

pub fn tcp_connect(_root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    let echo = Echo::start(false)?;
    let port = echo.port;
    let run = || -> anyhow::Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(plan.seconds);
        let mut n = 0u64;
        while Instant::now() < deadline {
            let c = TcpStream::connect(("127.0.0.1", port))?;
            drop(c);
            n += 1;
        }
        Ok(n as f64 / plan.seconds as f64)
    };
    let mut ns = Vec::new();
    let (a, b) = ab(plan, agent_bin, 1, run, |agent, _, _| {
        ns.push(ns_per_run(
            &BTreeMap::new(),
            &agent.program_stats(),
            "nodeward_tcp",
        ));
    })?;
    let ratio = median(&b).unwrap_or(f64::NAN) / median(&a).unwrap_or(f64::NAN);
    let mut rate = row("TCP connection churn", "connections", "/s", a, b);
    rate.target = Some(("ratio ≥ 0.97".to_owned(), ratio >= 0.97));
    let per_run = median(&ns).unwrap_or(f64::NAN);
    let mut cost = row(
        "TCP connection churn",
        "inet_sock_set_state program run time",
        "ns/run",
        vec![],
        ns,
    );
    cost.target = Some(("< 150 ns".to_owned(), per_run < 150.0));
    Ok(vec![rate, cost])
}

pub fn gpu_poll(root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    let dir = root.join("target/bench/fake-nvml");
    std::fs::create_dir_all(&dir)?;
    let lib = dir.join("libnvidia-ml.so.1");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(root.join("tests/fake-nvml/fake_nvml.c"))
        .status()
        .context("cc (the fake NVML library is C)")?;
    if !status.success() {
        bail!("cc failed on tests/fake-nvml/fake_nvml.c");
    }
    let script = std::fs::read_to_string(root.join("tests/fake-nvml/every-field.script"))?;
    std::fs::write(
        dir.join("fake_nvml.script"),
        format!("devices = 8\n{script}"),
    )?;
    let mut micros = Vec::new();
    for _ in 0..plan.rounds.max(3) * 2 {
        let out = Command::new(agent_bin)
            .args([
                "--set",
                &format!("gpu.library={}", lib.display()),
                "gpu-check",
                "--json",
            ])
            .output()
            .context("nodeward gpu-check")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("gpu-check JSON: {}", String::from_utf8_lossy(&out.stderr)))?;
        let us = v["poll_micros"]
            .as_f64()
            .context("no poll_micros in gpu-check output")?;
        micros.push(us / 1000.0);
    }
    let ms = median(&micros).unwrap_or(f64::NAN);
    let mut r = row(
        "GPU poll, 8 fake devices",
        "one poll of all devices",
        "ms",
        vec![],
        micros,
    );
    r.target = Some(("< 5 ms".to_owned(), ms < 5.0));
    Ok(vec![r])
}
