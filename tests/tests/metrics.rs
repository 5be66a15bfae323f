//! `/metrics` as Prometheus meets it: the agent binary is started, scraped, and its text is
//! judged by independent tools — `promtool check metrics`, and a real Prometheus server that
//! scrapes the agent and answers PromQL over its HTTP API with the series the agent exported.
//!
//! The GPU series come from the fake NVML (so a value can be checked end to end without a GPU);
//! the UDP counters from real datagrams on loopback when the tests run as root (eBPF).
//! Tools that are missing (Debian's `prometheus` package, a C compiler) skip with the reason.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use nodeward_tests::{agent_binary, fake_nvml::FakeNvml, is_root, skip, tool, wait_for};

/// A port that was free a moment ago (the listener is closed before the port is handed on).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// One HTTP/1.1 exchange: `(status, head, body)`; `None` if nothing listens or it hangs up.
fn http(port: u16, method: &str, target: &str) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, head.to_owned(), body.to_owned()))
}

/// A running agent; SIGTERM and wait on drop.
struct Agent {
    child: Child,
    port: u16,
    log: PathBuf,
    // Kept alive for the agent's lifetime: the GPU source reads it.
    _fake: Option<FakeNvml>,
}

impl Agent {
    /// Starts `nodeward run` with `/metrics` on a free port, the fake NVML if one can be
    /// built (with `script`), and eBPF only as root.
    fn start(test: &str, script: &str) -> Self {
        Self::launch(test, Some(script), &[])
    }

    /// As [`Agent::start`]; `gpu_script: None` runs without a GPU source, `extra` are more
    /// `--set key=value` pairs.
    fn launch(test: &str, gpu_script: Option<&str>, extra: &[String]) -> Self {
        let port = free_port();
        let fake = gpu_script.and_then(|script| match FakeNvml::build(test, &[]) {
            Ok(f) => {
                f.script(script);
                Some(f)
            }
            Err(reason) => {
                eprintln!("{test}: no fake NVML ({reason}); GPU series are not checked");
                None
            }
        });
        let log = std::env::temp_dir().join(format!("nodeward-{test}-{}.log", std::process::id()));
        let mut cmd = Command::new(agent_binary());
        let state =
            std::env::temp_dir().join(format!("nodeward-{test}-{}-drain.json", std::process::id()));
        let _ = std::fs::remove_file(&state);
        cmd.args(["run", "--set", "agent.tick=200ms"])
            .args(["--set", &format!("metrics.listen=127.0.0.1:{port}")])
            // Its own drain state, not /run/nodeward's (shared with every other agent).
            .args(["--set", &format!("drain.state_file={}", state.display())])
            .args(["--set", &format!("ebpf.enabled={}", is_root())])
            .env("NODEWARD_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create agent log"));
        match &fake {
            Some(f) => cmd.args(["--set", &format!("gpu.library={}", f.library_str())]),
            None => cmd.args(["--set", "gpu.enabled=false"]),
        };
        for kv in extra {
            cmd.args(["--set", kv]);
        }
        let mut child = cmd.spawn().expect("start nodeward");
        let up = wait_for(Duration::from_secs(30), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the agent exited ({status}) before serving /metrics:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            http(port, "GET", "/metrics").filter(|(s, _, _)| *s == 200)
        });
        assert!(up.is_some(), "no /metrics on port {port} within 30 s");
        Self {
            child,
            port,
            log,
            _fake: fake,
        }
    }

    fn scrape(&self) -> String {
        let (status, head, body) =
            http(self.port, "GET", "/metrics").expect("the agent answers a scrape");
        assert_eq!(status, 200, "{head}");
        body
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if wait_for(Duration::from_secs(15), || {
            self.child.try_wait().ok().flatten()
        })
        .is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `BPF_ENABLE_STATS(BPF_STATS_RUN_TIME)`: run-time statistics stay on while the returned
/// descriptor is open. `None` where the kernel refuses (before 5.8, or no CAP_SYS_ADMIN).
fn enable_bpf_run_time_stats() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr { struct { __u32 type; } enable_stats; ... }; BPF_STATS_RUN_TIME = 0.
    let attr = [0u32; 2];
    // SAFETY: the kernel reads `size_of_val(&attr)` bytes from a live, initialised array.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr) as libc::c_long,
        )
    };
    // SAFETY: a non-negative return is a new descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// The value of the sample written exactly as `series` (name and labels) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

const GPU_SCRIPT: &str = "devices = 1\ndev.0.uuid = GPU-nodeward-test-0\ndev.0.temp = 61\n";

#[test]
fn a_scrape_passes_promtool_and_carries_the_agents_own_cost() {
    const TEST: &str = "metrics_promtool";
    let Some(promtool) = tool("promtool") else {
        skip(TEST, "promtool not installed (Debian package `prometheus`)");
        return;
    };
    let agent = Agent::start(TEST, GPU_SCRIPT);

    if is_root() {
        // Run-time statistics on for this test only: the kernel turns them off again when the
        // descriptor closes (the sysctl would leave them on for everyone if the test died).
        let stats = enable_bpf_run_time_stats();
        // Real datagrams on loopback: the eBPF programs count each one leaving and arriving.
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
        let to = rx.local_addr().expect("local addr");
        for _ in 0..50 {
            tx.send_to(&[0u8; 64], to).expect("send UDP");
        }
        let counted = wait_for(Duration::from_secs(10), || {
            sample(&agent.scrape(), "nodeward_udp_packets_total").filter(|n| *n >= 100.0)
        });
        assert!(
            counted.is_some(),
            "50 datagrams on loopback were not counted twice each:\n{}",
            agent.scrape()
        );
        if stats.is_some() {
            let text = agent.scrape();
            let runs: f64 = text
                .lines()
                .filter(|l| {
                    l.starts_with("nodeward_ebpf_program_runs_total{program=\"nodeward_udp")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            assert!(
                runs >= 100.0,
                "the UDP programs ran for 50 datagrams each way, per bpf_prog_info:\n{text}"
            );
        }
        drop(stats);
    }

    let text = agent.scrape();
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    check
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = check.wait_with_output().expect("promtool finishes");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics found problems:\n{}{}\nin:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    for family in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "process_virtual_memory_bytes",
        "nodeward_tcp_rtt_seconds",
        "nodeward_health_verdict_state",
        "nodeward_ebpf_stats_enabled",
        "nodeward_ebpf_program_run_seconds_total",
        "nodeward_source_up",
    ] {
        assert!(
            text.contains(&format!("# HELP {family} "))
                && text.contains(&format!("# TYPE {family} ")),
            "{family} has no HELP/TYPE:\n{text}"
        );
    }
    let rss = sample(&text, "process_resident_memory_bytes").expect("RSS sample");
    assert!(
        rss > 1e6,
        "an agent of under 1 MB RSS is not plausible: {rss}"
    );
    if agent._fake.is_some() {
        assert_eq!(
            sample(
                &text,
                "nodeward_gpu_temperature_celsius{gpu=\"0\",uuid=\"GPU-nodeward-test-0\"}"
            ),
            Some(61.0),
            "{text}"
        );
    }
    if is_root() {
        let programs = sample(&text, "nodeward_ebpf_programs_loaded").unwrap_or(0.0);
        assert!(
            programs >= 1.0,
            "as root the agent holds eBPF programs:\n{text}"
        );
    }

    let (status, _, body) = http(agent.port, "HEAD", "/metrics").expect("HEAD answered");
    assert_eq!((status, body.as_str()), (200, ""));
    let (status, _, _) = http(agent.port, "GET", "/nope").expect("GET answered");
    assert_eq!(status, 404);
    let (status, head, _) = http(agent.port, "POST", "/metrics").expect("POST answered");
    assert_eq!(status, 405, "{head}");
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The static `node` label the tests' Prometheus puts on the agent's series, as
/// docs/metrics.md tells host installs to.
const NODE: &str = "test-node";

/// A Prometheus server on a free loopback port with its own config and data; killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(binary: &std::path::Path, target_port: u16) -> Self {
        // One directory per instance: the tests of this file run in parallel in one process,
        // and two Prometheus servers sharing a config and a TSDB directory scrape each other's
        // target or lose their data when the other one is dropped.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("nodeward-prometheus-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("create Prometheus dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: nodeward\n    static_configs:\n\
                 \x20     - targets: ['127.0.0.1:{target_port}']\n\
                 \x20       labels: {{node: {NODE}}}\n"
            ),
        )
        .expect("write Prometheus config");
        let port = free_port();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).expect("create Prometheus log"))
            .spawn()
            .expect("start prometheus");
        Self { child, port, dir }
    }

    fn api(&self, target: &str) -> Option<serde_json::Value> {
        let (status, _, body) = http(self.port, "GET", target)?;
        if status != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    /// The result vector of an instant query, once it is non-empty.
    fn query(&self, promql: &str) -> Option<Vec<serde_json::Value>> {
        let v = self.api(&format!("/api/v1/query?query={}", encode(promql)))?;
        let result = v["data"]["result"].as_array()?.clone();
        (!result.is_empty()).then_some(result)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Waits until Prometheus has scraped the agent without error; panics with its log if not.
    fn wait_healthy(&self) -> serde_json::Value {
        let target = wait_for(Duration::from_secs(60), || {
            let v = self.api("/api/v1/targets")?;
            let t = v["data"]["activeTargets"].as_array()?.first()?.clone();
            (t["health"] == "up").then_some(t)
        });
        target.unwrap_or_else(|| {
            panic!(
                "Prometheus never scraped the agent successfully:\n{:?}\n{}",
                self.api("/api/v1/targets"),
                self.log()
            )
        })
    }

    /// The single value of an instant query, once there is one.
    fn value(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql)?;
        let [one] = result.as_slice() else {
            panic!("{promql}: more than one series: {result:?}");
        };
        one["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_scrapes_the_agent_and_promql_returns_its_series() {
    const TEST: &str = "metrics_prometheus";
    let Some(binary) = tool("prometheus") else {
        skip(
            TEST,
            "prometheus not installed (Debian package `prometheus`)",
        );
        return;
    };
    let agent = Agent::start(TEST, GPU_SCRIPT);
    let prom = Prometheus::start(&binary, agent.port);

    // The target is healthy only once Prometheus parsed a whole scrape without error.
    let target = prom.wait_healthy();
    assert_eq!(target["lastError"], "", "{target}");

    let version = env!("CARGO_PKG_VERSION");
    let build = wait_for(Duration::from_secs(30), || {
        prom.query("nodeward_build_info{job=\"nodeward\"}")
    })
    .expect("nodeward_build_info is queryable");
    assert_eq!(build.len(), 1, "{build:?}");
    assert_eq!(build[0]["metric"]["version"], version, "{build:?}");
    assert_eq!(
        build[0]["metric"]["instance"],
        format!("127.0.0.1:{}", agent.port)
    );
    assert_eq!(build[0]["metric"]["node"], NODE, "{build:?}");
    assert_eq!(build[0]["value"][1], "1");

    let rss = prom
        .query("process_resident_memory_bytes > 1e6")
        .expect("the agent's RSS is stored and above 1 MB");
    assert_eq!(rss.len(), 1, "{rss:?}");

    if agent._fake.is_some() {
        let temp = prom
            .query("nodeward_gpu_temperature_celsius")
            .expect("the fake GPU's temperature is stored");
        assert_eq!(temp.len(), 1, "{temp:?}");
        assert_eq!(temp[0]["metric"]["uuid"], "GPU-nodeward-test-0");
        assert_eq!(temp[0]["metric"]["gpu"], "0");
        assert_eq!(temp[0]["value"][1], "61");
        let up = prom
            .query("nodeward_source_up{source=\"gpu\"} == 1")
            .expect("the GPU source is up");
        assert_eq!(up.len(), 1, "{up:?}");
    }

    // Every dashboard query evaluates on this Prometheus with the `node` variable set to the
    // label the scrape configuration adds ...
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("read the dashboard"))
            .expect("the dashboard is valid JSON");
    let mut exprs = Vec::new();
    queries(&dashboard, &mut exprs);
    let promql = |e: &str| e.replace("$node", NODE).replace("$__rate_interval", "1m");
    for e in exprs.iter().filter(|e| !e.starts_with("label_values(")) {
        let answer = prom.api(&format!("/api/v1/query?query={}", encode(&promql(e))));
        assert!(
            answer.is_some_and(|a| a["status"] == "success"),
            "the dashboard's query does not evaluate: {}",
            promql(e)
        );
    }
    // ... and the verdict panel turns the state set into the number its value mappings show.
    let panel = exprs
        .iter()
        .find(|e| e.contains("nodeward_health_verdict_state"))
        .expect("a verdict panel");
    let consistent = wait_for(Duration::from_secs(30), || {
        let current = prom.query("nodeward_health_verdict_state == 1")?;
        let [state] = current.as_slice() else {
            panic!("not exactly one current state: {current:?}");
        };
        let number = match state["metric"]["state"].as_str()? {
            "unknown" => 0.0,
            "healthy" => 1.0,
            "degraded" => 2.0,
            "unhealthy" => 3.0,
            other => panic!("unknown state {other}"),
        };
        (prom.value(&promql(panel))? == number).then_some(number)
    });
    assert!(
        consistent.is_some(),
        "the verdict panel's {} never matched nodeward_health_verdict_state",
        promql(panel)
    );
}

#[test]
fn a_taken_port_is_logged_naming_the_address_and_the_agent_runs_on() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let log = std::env::temp_dir().join(format!("nodeward-taken-{}.log", std::process::id()));
    let mut agent = Command::new(agent_binary())
        .args([
            "run",
            "--set",
            "ebpf.enabled=false",
            "--set",
            "gpu.enabled=false",
        ])
        .args(["--set", &format!("metrics.listen={addr}")])
        .env("NODEWARD_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create log"))
        .spawn()
        .expect("start nodeward");
    let logged = wait_for(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("nodeward is running").then_some(text)
    });
    let still_running = agent.try_wait().expect("try_wait").is_none();
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = agent.wait().expect("agent exits");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(
        logged.is_some() && still_running,
        "the agent did not run on:\n{text}"
    );
    assert!(
        text.contains(&format!("cannot listen for scrapes on {addr}"))
            && text.contains("metrics.listen"),
        "{text}"
    );
    assert!(status.success(), "{status}: {text}");
}

const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md");
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../packaging/grafana/nodeward.json"
);
/// Documented but not exported by the test's agent: none (the health families come from the
/// API's published state, which the test's agent serves).
const PLANNED: &[&str] = &[];

/// The metric names in the tables of docs/metrics.md, up to its migration table (which names
/// the old ones).
fn documented() -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(DOCS).expect("read docs/metrics.md");
    let current = text.split("\n## Migration").next().unwrap_or_default();
    current
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
        .filter(|n| n.starts_with("nodeward_") || n.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

/// Every `nodeward_…` and `process_…` metric name in a PromQL expression, a histogram's
/// `_bucket`, `_sum` and `_count` series under the histogram's name.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let words = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
    for word in words.filter(|w| w.starts_with("nodeward_") || w.starts_with("process_")) {
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| word.strip_suffix(suffix))
            .filter(|base| base.ends_with("_seconds"))
            .unwrap_or(word);
        out.push(name.to_owned());
    }
    out
}

/// Every PromQL string in a dashboard: panel targets' `expr` and template variable queries.
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition" | "query", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| queries(i, out)),
        _ => {}
    }
}

#[test]
fn every_exported_metric_is_documented_and_the_dashboard_queries_only_those() {
    let docs = documented();
    assert!(
        docs.len() > 50,
        "docs/metrics.md lists too few metrics: {docs:?}"
    );

    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("read the dashboard"))
            .expect("the dashboard is valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "a dashboard of {} panels", panels.len());
    let mut exprs = Vec::new();
    queries(&dashboard, &mut exprs);
    let used: std::collections::BTreeSet<String> =
        exprs.iter().flat_map(|e| metric_names(e)).collect();
    for e in exprs
        .iter()
        .filter(|e| e.contains("nodeward_") || e.contains("process_"))
    {
        assert!(
            !e.contains("instance=~")
                && (e.contains("node=~\"$node\"") || e.starts_with("label_values(")),
            "a dashboard query not keyed by the `node` variable: {e}"
        );
    }
    for name in &used {
        assert!(
            docs.contains(name),
            "the dashboard queries {name}, which docs/metrics.md does not list"
        );
    }
    for must in [
        "nodeward_health_verdict_state",
        "nodeward_tcp_rtt_seconds",
        "nodeward_container_rtp_jitter_seconds",
        "nodeward_container_live_streams",
        "nodeward_gpu_xid_window_events",
        "process_resident_memory_bytes",
    ] {
        assert!(used.contains(must), "the dashboard does not show {must}");
    }

    // Scrape an agent that has every GPU reading (the fake NVML), an XID event and a GPU
    // process (this test's own, so its cgroup resolves), and, as root, the eBPF sources.
    // The throttle reasons (not exported as a metric) time out, so that the per-GPU NVML
    // error counter has a series.
    // A second GPU in MIG mode with one MIG device, for the MIG series.
    let script = format!(
        "{}\nevents = 0:xid:79\nall.throttle = ERR:10\n\
         devices = 2\ndev.1.mig.mode = 1\ndev.1.mig.count = 1\n\
         dev.1.mig.0.mem.total = 1073741824\ndev.1.mig.0.mem.used = 0\n",
        nodeward_tests::fake_nvml::every_field_script(1).replace(
            "all.procs.compute = 101:1048576 102:2097152",
            &format!("all.procs.compute = {}:1048576", std::process::id())
        )
    );
    let agent = Agent::start("metrics_docs", &script);
    let full = agent._fake.is_some() && is_root();
    let text = if full {
        wait_for(Duration::from_secs(20), || {
            let t = agent.scrape();
            (t.contains("nodeward_gpu_xid_window_events{")
                && t.contains("nodeward_container_gpu_memory_used_bytes{"))
            .then_some(t)
        })
        .unwrap_or_else(|| panic!("no XID or GPU process series:\n{}", agent.scrape()))
    } else {
        agent.scrape()
    };
    let exported: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .map(str::to_owned)
        .collect();
    let undocumented: Vec<&String> = exported.difference(&docs).collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in docs/metrics.md: {undocumented:?}"
    );
    if full {
        let stale: Vec<&String> = docs
            .difference(&exported)
            .filter(|n| !PLANNED.contains(&n.as_str()))
            .collect();
        assert!(
            stale.is_empty(),
            "documented but not exported by a fully equipped agent: {stale:?}"
        );
    } else {
        skip(
            "metrics_docs",
            "not root or no C compiler: whether every documented metric is exported was not checked",
        );
    }
}

#[test]
fn the_verdict_and_the_stores_numbers_reach_the_scrape() {
    let cpu_stall_before = cpu_some_stall_seconds();
    let agent = Agent::start("metrics_health", GPU_SCRIPT);
    // The verdict leaves 0 (unknown) once every enabled source has reported or said it cannot
    // run: the same moment GetNodeHealth leaves UNKNOWN.
    let state = |t: &str, s: &str| {
        sample(
            t,
            &format!("nodeward_health_verdict_state{{state=\"{s}\"}}"),
        )
    };
    let text = wait_for(Duration::from_secs(30), || {
        let t = agent.scrape();
        (state(&t, "unknown") == Some(0.0)).then_some(t)
    })
    .unwrap_or_else(|| panic!("the verdict stayed unknown:\n{}", agent.scrape()));
    assert_eq!(sample(&text, "nodeward_drain_active"), Some(0.0));
    let states: Vec<f64> = ["unknown", "healthy", "degraded", "unhealthy"]
        .iter()
        .map(|s| state(&text, s).unwrap_or_else(|| panic!("no {s} series:\n{text}")))
        .collect();
    assert_eq!(
        states.iter().filter(|v| **v == 1.0).count(),
        1,
        "exactly one current state: {states:?}"
    );
    assert!(states.iter().all(|v| *v == 0.0 || *v == 1.0), "{states:?}");
    // Node-wide numbers come from the store once the node source reported: the kernel's
    // CPU stall time, which /proc/pressure shows too, read before the agent started and after
    // the scrape.
    let scraped = sample(
        &text,
        "nodeward_node_pressure_seconds_total{resource=\"cpu\",kind=\"some\"}",
    )
    .unwrap_or_else(|| panic!("no node CPU pressure:\n{text}"));
    if let (Some(before), Some(after)) = (cpu_stall_before, cpu_some_stall_seconds()) {
        assert!(
            before <= scraped && scraped <= after,
            "{scraped} s exported, {before} .. {after} s in /proc/pressure/cpu"
        );
    }
}

/// `total=` of the `some` line of /proc/pressure/cpu, in seconds; `None` without PSI.
fn cpu_some_stall_seconds() -> Option<f64> {
    let psi = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    let total_us: f64 = psi
        .lines()
        .find(|l| l.starts_with("some "))?
        .rsplit("total=")
        .next()?
        .trim()
        .parse()
        .ok()?;
    Some(total_us / 1e6)
}

/// The agent's own p99 RTT for `key` over its 60 s window, in microseconds, and the samples in
/// that window, from gRPC `GetContainerNetwork`.
fn agent_p99_us(socket: &std::path::Path, key: &str) -> Option<(u64, u64)> {
    use nodeward::api::pb;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let addr = format!("unix:{}", socket.display());
        let mut client = nodeward::client::connect(&nodeward_tests::api::conn(&addr), socket)
            .await
            .ok()?;
        let network = client
            .get_container_network(pb::GetContainerNetworkRequest {
                container_id: key.to_owned(),
            })
            .await
            .ok()?
            .into_inner()
            .network?;
        let w = network.windows.iter().find(|w| w.window_seconds == 60)?;
        Some((w.rtt_p99_us, w.samples))
    })
}

/// The width of the exported histogram bucket that holds `us`: how far `histogram_quantile()`
/// may be from the true quantile when both fall in it.
fn bucket_width_s(us: u64) -> f64 {
    let bounds = nodeward::metrics::rtt::LE_US;
    let upper = bounds.iter().position(|le| *le >= us).expect("below 8.4 s");
    let lower = if upper == 0 { 0 } else { bounds[upper - 1] };
    (bounds[upper] - lower) as f64 / 1e6
}

/// A container's TCP traffic runs behind a 20 ms ± 5 ms delay line while a real Prometheus
/// scrapes the agent every second: the p99 Prometheus computes from the exported histogram
/// (`histogram_quantile(0.99, sum by (le) (rate(nodeward_tcp_rtt_seconds_bucket[1m])))`, the
/// container's series only) is within the width of its bucket of the agent's own p99
/// (GetContainerNetwork, at the kernel's 1/16 resolution).
#[test]
fn prometheus_p99_from_the_rtt_histogram_matches_the_agents_own_p99() {
    use nodeward_tests::{
        api::TempDir,
        cgroup_v2_root,
        net::DelayLine,
        pingpong::{network, prerequisites, start_client, start_server, wait_done, Proc},
        Cgroup,
    };
    const TEST: &str = "metrics_rtt_histogram";
    const CONNS: u32 = 4;
    const ROUNDS: u32 = 100;
    let Some(binary) = tool("prometheus") else {
        skip(
            TEST,
            "prometheus not installed (Debian package `prometheus`)",
        );
        return;
    };
    let Some(python) = prerequisites(TEST) else {
        return;
    };
    let v2_root = cgroup_v2_root().expect("prerequisites checked cgroup v2");
    let dir = TempDir::new(TEST);
    let socket = dir.0.join("agent.sock");
    let agent = Agent::launch(
        TEST,
        None,
        &[
            format!("api.unix_socket={}", socket.display()),
            "api.tcp_listen=".to_owned(),
        ],
    );
    let prom = Prometheus::start(&binary, agent.port);
    prom.wait_healthy();

    let net = network(97);
    let (server_cg, client_cg) = (Cgroup::new("mrtt-srv"), Cgroup::new("mrtt-cli"));
    let key = format!(
        "/{}",
        client_cg
            .path
            .strip_prefix(&v2_root)
            .expect("test cgroup under the v2 root")
            .display()
    );
    let _server = Proc(start_server(&net, &server_cg, &python, &[5001]));
    // One exchange without delay first, so that the container's series exist in Prometheus
    // before the measured traffic: rate() cannot see what a counter did before its first scrape.
    let (_warm, mut warm_out, _) = start_client(&net, &client_cg, &python, 5001, 1, 1, 0);
    wait_done(&mut warm_out);
    let count = format!("nodeward_tcp_rtt_seconds_count{{container_id=\"{key}\",node=\"{NODE}\"}}");
    let before = wait_for(Duration::from_secs(30), || prom.value(&count)).unwrap_or_else(|| {
        panic!(
            "{key} has no RTT histogram in Prometheus:\n{}",
            agent.scrape()
        )
    });

    let _line = DelayLine::start(
        &python,
        &net.client,
        6,
        &["-p", "tcp", "--dport", "5001"],
        20.0,
        5.0,
        0.0,
    );
    let (_client, mut out, _) = start_client(&net, &client_cg, &python, 5001, CONNS, ROUNDS, 1);
    wait_done(&mut out);
    // Prometheus has everything once it stored what the agent serves now, twice alike.
    let series = format!("nodeward_tcp_rtt_seconds_count{{container_id=\"{key}\",");
    let direct = || {
        let text = agent.scrape();
        let line = text.lines().find(|l| l.starts_with(&series))?;
        line.rsplit(' ').next()?.parse::<f64>().ok()
    };
    let stored = wait_for(Duration::from_secs(30), || {
        let (now, stored) = (direct()?, prom.value(&count)?);
        (now == stored && now >= before + f64::from(CONNS * ROUNDS)).then_some(stored)
    })
    .unwrap_or_else(|| {
        panic!(
            "Prometheus never caught up with the agent's count: {:?} vs {:?} (before {before})",
            prom.value(&count),
            direct()
        )
    });

    let (agent_p99_us, window_samples) = agent_p99_us(&socket, &key)
        .unwrap_or_else(|| panic!("GetContainerNetwork has no 60 s window for {key}"));
    let promql = format!(
        "histogram_quantile(0.99, sum by (le) (rate(nodeward_tcp_rtt_seconds_bucket{{container_id=\"{key}\"}}[1m])))"
    );
    let prom_p99 = prom
        .value(&promql)
        .unwrap_or_else(|| panic!("no answer to {promql}"));
    let agent_p99 = agent_p99_us as f64 / 1e6;
    let width = bucket_width_s(agent_p99_us);
    eprintln!(
        "{TEST}: Prometheus p99 {:.2} ms, agent p99 {:.2} ms ({window_samples} samples in 60 s, \
         {stored} in the histogram), bucket width {:.2} ms",
        prom_p99 * 1e3,
        agent_p99 * 1e3,
        width * 1e3
    );
    assert!(
        agent_p99 > 0.015 && agent_p99 < 0.1,
        "the agent's p99 {agent_p99} s is not the delay line's 20 ± 5 ms"
    );
    assert!(
        (prom_p99 - agent_p99).abs() <= width,
        "Prometheus p99 {prom_p99} s vs the agent's {agent_p99} s: more than the bucket width {width} s apart"
    );
}
