//! A supervised task that panics inside the real agent: fault injection (the
//! `fault-injection` feature, which `cargo xtask test` builds the binary with;
//! `NODEWARD_FAULT_INJECT`, see `agent/src/fault.rs`) makes the TCP or the GPU source, or the
//! health evaluator, panic once. The agent must keep answering the API while the task waits out its back-off, report a
//! `SourceRestarted` condition naming the task and the panic, count the restart in
//! `/metrics`, deliver data from the restarted source again (ground truth: connections and GPU
//! readings this test makes after the restart), and — for TCP — attach its eBPF programs afresh
//! without leaving the old programs or links in the kernel.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use nodeward::api::pb;
use nodeward_tests::{
    agent_binary,
    api::{conn, eventually, TempDir},
    bpf_objects_of, bpftool_has, cgroup_v2_root,
    fake_nvml::fake,
    is_root, skip, Cgroup,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Each step's time limit: many ticks, so a slow shared machine is no failure.
const STEP: Duration = Duration::from_secs(60);
/// The back-off before the restart, made long (the default is 1 s) so that the test can see
/// the agent while the task is down.
const BACKOFF: &str = "4s";

type Client = pb::node_health_client::NodeHealthClient<tonic::transport::Channel>;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// `nodeward run` (built with the `fault-injection` feature) with the fault armed, its API
/// on a socket of its own, `/metrics` on a free port and its log in a file.
struct Agent {
    child: tokio::process::Child,
    client: Client,
    metrics_port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl Agent {
    async fn start(stem: &str, fault: &str, extra: &[&str]) -> Self {
        let dir = TempDir::new(stem);
        let socket = dir.0.join("agent.sock");
        let log = dir.0.join("agent.log");
        let metrics_port = free_port();
        let mut cmd = tokio::process::Command::new(agent_binary());
        cmd.args(["run", "--config", "/dev/null"])
            .args(["--set", "api.tcp_listen=", "--set", "agent.tick=200ms"])
            .args(["--set", "health.interval=100ms"])
            .arg("--set")
            .arg(format!("metrics.listen=127.0.0.1:{metrics_port}"))
            .arg("--set")
            .arg(format!("api.unix_socket={}", socket.display()));
        for kv in extra {
            cmd.args(["--set", kv]);
        }
        let child = cmd
            .env("NODEWARD_FAULT_INJECT", fault)
            .env("NODEWARD_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("start nodeward run");
        let addr = format!("unix:{}", socket.display());
        let client = eventually(STEP, || {
            let (addr, socket) = (addr.clone(), socket.clone());
            async move { nodeward::client::connect(&conn(&addr), &socket).await.ok() }
        })
        .await;
        let agent = Self {
            child,
            client: client.unwrap_or_else(|| panic!("the daemon never answered on its socket")),
            metrics_port,
            log,
            _dir: dir,
        };
        let armed = eventually(STEP, || {
            let text = agent.log_text();
            async move { text.contains("fault injection armed").then_some(()) }
        })
        .await;
        assert!(
            armed.is_some(),
            "the agent did not arm the fault (built without the fault-injection feature?):\n{}",
            agent.log_text()
        );
        agent
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("the agent runs")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One GetNodeHealth call; `None` if it fails or takes longer than 5 s.
    async fn health(&self) -> Option<pb::NodeHealthReport> {
        let mut c = self.client.clone();
        tokio::time::timeout(
            Duration::from_secs(5),
            c.get_node_health(pb::GetNodeHealthRequest {}),
        )
        .await
        .ok()?
        .ok()?
        .into_inner()
        .health
    }

    /// One scrape of `/metrics`.
    async fn scrape(&self) -> Option<String> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .ok()?;
        let request = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        s.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
    }

    async fn stop(mut self) -> String {
        let pid = i32::try_from(self.pid()).expect("pid fits");
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let exit = tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("exits in time")
            .expect("wait");
        let log = self.log_text();
        assert!(exit.success(), "clean exit: {exit:?}\n{log}");
        log
    }
}

/// The value of `series` (name and labels, exactly) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// The task's `(restarts, up)` in a scrape.
fn task_metrics(text: &str, task: &str) -> Option<(f64, f64)> {
    Some((
        sample(
            text,
            &format!("nodeward_task_restarts_total{{task=\"{task}\"}}"),
        )?,
        sample(text, &format!("nodeward_task_up{{task=\"{task}\"}}"))?,
    ))
}

fn restart_condition<'a>(
    report: &'a pb::NodeHealthReport,
    task: &str,
) -> Option<&'a pb::Condition> {
    report
        .conditions
        .iter()
        .find(|c| c.r#type == "SourceRestarted" && c.subject == task)
}

/// What the test saw from before the panic until the restarted task ran again.
#[derive(Debug, Default)]
struct Outage {
    /// GetNodeHealth calls made, and how many failed or timed out.
    calls: u32,
    failed_calls: u32,
    /// Scrapes that showed the task down (`nodeward_task_up` 0).
    scrapes_down: u32,
    /// API answers, made while the task was down, that carried `SourceRestarted` with reason
    /// `RestartPending` and the panic message.
    answers_pending: u32,
}

/// Polls the API and `/metrics` every 100 ms until the task has restarted once and runs again.
async fn watch_the_outage(agent: &Agent, task: &str) -> Outage {
    let panic_message = format!("panicked: fault injected into {task}");
    let mut seen = Outage::default();
    let deadline = Instant::now() + STEP;
    loop {
        assert!(
            Instant::now() < deadline,
            "{task} did not restart within {STEP:?}: {seen:?}\n{}",
            agent.log_text()
        );
        let metrics = agent.scrape().await.and_then(|t| task_metrics(&t, task));
        let report = agent.health().await;
        seen.calls += 1;
        match (&report, metrics) {
            (None, _) => seen.failed_calls += 1,
            (Some(r), Some((_, 0.0))) => {
                seen.scrapes_down += 1;
                if restart_condition(r, task).is_some_and(|c| {
                    c.reason == "RestartPending" && c.message.contains(&panic_message)
                }) {
                    seen.answers_pending += 1;
                }
            }
            _ => {}
        }
        if metrics.is_some_and(|(restarts, up)| restarts >= 1.0 && up == 1.0) {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks what the agent says once the task runs again: one restart counted, and a counted
/// `SourceRestarted` warning naming the task, its restart count and the panic.
async fn assert_restart_reported(agent: &Agent, task: &str) {
    let text = agent.scrape().await.expect("a scrape after the restart");
    assert_eq!(
        task_metrics(&text, task),
        Some((1.0, 1.0)),
        "one restart, running again:\n{text}"
    );
    let report = agent
        .health()
        .await
        .expect("GetNodeHealth after the restart");
    let c = restart_condition(&report, task)
        .unwrap_or_else(|| panic!("no SourceRestarted for {task}: {:?}", report.conditions));
    assert_eq!(c.severity, pb::Severity::Warning as i32, "{c:?}");
    assert!(
        [pb::ConditionStatus::Firing, pb::ConditionStatus::Recovering]
            .map(|s| s as i32)
            .contains(&c.status),
        "counted until health.recovery has passed: {c:?}"
    );
    assert!(
        c.message.contains(task)
            && c.message.contains("1 ")
            && c.message
                .contains(&format!("panicked: fault injected into {task}")),
        "{}",
        c.message
    );
    assert!(
        report.causes.iter().any(|k| k.r#type == "SourceRestarted"),
        "the warning counts towards the verdict: {:?}",
        report.causes
    );
    assert_ne!(report.verdict, pb::Verdict::Healthy as i32);
    let log = agent.log_text();
    assert!(
        log.contains("task failed; restarting it") && log.contains(task),
        "the failure is logged:\n{log}"
    );
}

fn have_python() -> bool {
    std::process::Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// An echo server (python3) in `cgroup` on 127.0.0.1 that serves one connection.
fn echo_server(cgroup: &Cgroup) -> (std::process::Child, u16) {
    let script = [
        "import socket",
        "s = socket.socket()",
        "s.bind(('127.0.0.1', 0))",
        "s.listen(1)",
        "print(s.getsockname()[1], flush=True)",
        "c, _ = s.accept()",
        "while True:",
        "    d = c.recv(4096)",
        "    if not d:",
        "        break",
        "    c.sendall(d)",
        "c.close()",
    ]
    .join("\n");
    let mut child = cgroup.spawn(
        std::process::Command::new("python3")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let mut line = String::new();
    let stdout = child.stdout.take().expect("server stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
        .expect("server prints its port");
    (child, line.trim().parse().expect("port number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_source_that_panics_is_restarted_reported_and_reattached_without_leaks() {
    const TEST: &str = "supervise_tcp_panic";
    const TASK: &str = "ebpf/tcp";
    if !is_root() {
        return skip(TEST, "needs root (eBPF, cgroups)");
    }
    let Some(v2_root) = cgroup_v2_root() else {
        return skip(TEST, "no cgroup v2 hierarchy");
    };
    if !have_python() {
        return skip(TEST, "python3 is missing (the echo server)");
    }
    if std::process::Command::new("bpftool")
        .arg("version")
        .output()
        .is_err()
    {
        return skip(TEST, "bpftool is not installed");
    }
    // The panic comes after 50 ticks (10 s at 200 ms), long after start-up, so that the
    // programs of the first run can be recorded first.
    let agent = Agent::start(
        "supervise-tcp",
        &format!("panic:{TASK}:50:{BACKOFF}"),
        &["gpu.enabled=false", "udp.enabled=false"],
    )
    .await;
    let pid = agent.pid();
    let before = eventually(STEP, || {
        let objects = bpf_objects_of(pid);
        async move { (!objects.0.is_empty() && !objects.1.is_empty()).then_some(objects) }
    })
    .await
    .unwrap_or_else(|| panic!("the TCP source attached nothing:\n{}", agent.log_text()));
    let text = agent.scrape().await.expect("a scrape before the panic");
    assert_eq!(
        task_metrics(&text, TASK),
        Some((0.0, 1.0)),
        "the programs were recorded before the panic (else the machine is too slow for 50 ticks)"
    );
    for id in &before.0 {
        assert!(bpftool_has("prog", *id), "bpftool sees program {id}");
    }

    let outage = watch_the_outage(&agent, TASK).await;
    assert_eq!(
        outage.failed_calls, 0,
        "the API answered every call while {TASK} was down: {outage:?}"
    );
    assert!(
        outage.scrapes_down > 0 && outage.answers_pending > 0,
        "seen during the {BACKOFF} back-off: the task down in /metrics and RestartPending in \
         the API: {outage:?}"
    );
    assert_restart_reported(&agent, TASK).await;

    // Attached afresh: as many programs and links as before, none of them the old ones, and
    // the old ones gone from the kernel.
    let after = bpf_objects_of(pid);
    assert_eq!(
        (after.0.len(), after.1.len()),
        (before.0.len(), before.1.len()),
        "programs and links after the restart {after:?}, before {before:?}"
    );
    assert!(
        after.0.is_disjoint(&before.0) && after.1.is_disjoint(&before.1),
        "attached afresh: {after:?} vs {before:?}"
    );
    let leaked = nodeward_tests::wait_for(Duration::from_secs(10), || {
        let left: Vec<String> = before
            .0
            .iter()
            .filter(|id| bpftool_has("prog", **id))
            .map(|id| format!("prog {id}"))
            .chain(
                before
                    .1
                    .iter()
                    .filter(|id| bpftool_has("link", **id))
                    .map(|id| format!("link {id}")),
            )
            .collect();
        left.is_empty().then_some(())
    });
    assert!(
        leaked.is_some(),
        "the failed run's programs or links are still in the kernel: {before:?}"
    );

    // Data flows again: a connection made now, in a cgroup made now, shows RTT samples.
    let cgroup = Cgroup::new("supervise-tcp");
    let key = format!(
        "/{}",
        cgroup
            .path
            .strip_prefix(&v2_root)
            .expect("under the v2 root")
            .display()
    );
    let (mut server, port) = echo_server(&cgroup);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let echo = |conn: &mut std::net::TcpStream| {
        use std::io::{Read as _, Write as _};
        for _ in 0..20 {
            conn.write_all(b"ping").expect("write");
            let mut buf = [0u8; 4];
            conn.read_exact(&mut buf).expect("echo");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    echo(&mut conn);
    let mut client = agent.client.clone();
    let network = eventually(STEP, || {
        let (mut c, key) = (client.clone(), key.clone());
        echo(&mut conn);
        async move {
            let n = c
                .get_container_network(pb::GetContainerNetworkRequest { container_id: key })
                .await
                .ok()?
                .into_inner()
                .network?;
            n.windows
                .iter()
                .any(|w| w.window_seconds == 10 && w.samples > 0)
                .then_some(n)
        }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{key}'s connection after the restart never showed RTT samples:\n{}",
            agent.log_text()
        )
    });
    assert!(network.established_connections >= 1, "{network:?}");
    drop(conn);
    let _ = server.wait();
    let _ = client.get_node_health(pb::GetNodeHealthRequest {}).await;

    let log = agent.stop().await;
    let gone = nodeward_tests::wait_for(Duration::from_secs(10), || {
        let any = after.0.iter().any(|id| bpftool_has("prog", *id))
            || after.1.iter().any(|id| bpftool_has("link", *id));
        (!any).then_some(())
    });
    assert!(
        gone.is_some(),
        "programs left after SIGTERM: {after:?}\n{log}"
    );
    eprintln!(
        "{TEST}: {} API calls during the outage, {} failed; {} scrapes saw the task down, {} \
         answers carried RestartPending; programs {} and links {} before and after, old ones gone",
        outage.calls,
        outage.failed_calls,
        outage.scrapes_down,
        outage.answers_pending,
        before.0.len(),
        before.1.len()
    );
}

/// Threads of `pid` whose name starts with `prefix` (names are cut to 15 bytes).
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim_end().starts_with(prefix))
                })
                .count()
        })
        .unwrap_or(0)
}

/// The first GPU's temperature in a scrape.
fn gpu_temperature(text: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with("nodeward_gpu_temperature_celsius{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_source_that_panics_is_restarted_reported_and_polls_again() {
    const TEST: &str = "supervise_gpu_panic";
    const TASK: &str = "gpu";
    let Some(fake) = fake("supervise", &[]) else {
        return;
    };
    fake.script("devices = 1\ndev.0.uuid = GPU-supervise-0\ndev.0.temp = 40\n");
    let library = format!("gpu.library={}", fake.library_str());
    let agent = Agent::start(
        "supervise-gpu",
        &format!("panic:{TASK}:25:{BACKOFF}"),
        &["ebpf.enabled=false", "tcp.enabled=false", &library],
    )
    .await;
    let pid = agent.pid();

    let outage = watch_the_outage(&agent, TASK).await;
    assert_eq!(
        outage.failed_calls, 0,
        "the API answered every call while {TASK} was down: {outage:?}"
    );
    assert!(
        outage.scrapes_down > 0 && outage.answers_pending > 0,
        "seen during the {BACKOFF} back-off: {outage:?}"
    );
    assert_restart_reported(&agent, TASK).await;

    // The restarted source polls: a reading set now reaches /metrics.
    fake.script("devices = 1\ndev.0.uuid = GPU-supervise-0\ndev.0.temp = 71\n");
    let polled = eventually(STEP, || async {
        let text = agent.scrape().await?;
        (gpu_temperature(&text) == Some(71.0)).then_some(())
    })
    .await;
    assert!(
        polled.is_some(),
        "the restarted GPU source never showed the new temperature:\n{}",
        agent.log_text()
    );
    // The failed run's NVML event thread stopped with it: one event thread, not two.
    let one = nodeward_tests::wait_for(Duration::from_secs(10), || {
        (threads_named(pid, "nodeward-gpu-ev") == 1).then_some(())
    });
    assert!(
        one.is_some(),
        "{} GPU event threads after the restart",
        threads_named(pid, "nodeward-gpu-ev")
    );
    agent.stop().await;
    eprintln!(
        "{TEST}: {} API calls during the outage, {} failed; {} scrapes saw the task down, {} \
         answers carried RestartPending; one event thread after the restart",
        outage.calls, outage.failed_calls, outage.scrapes_down, outage.answers_pending
    );
}

/// The health evaluator is a supervised task like a source: a panic in it is restarted with
/// back-off and reported as `SourceRestarted` for `health` and in `nodeward_task_*`; the API
/// keeps answering (with the last verdict) while it is down, and the drain state, which lives
/// outside the evaluator, survives its restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_evaluator_that_panics_is_restarted_and_reported_like_a_source() {
    const TEST: &str = "supervise_health_panic";
    const TASK: &str = "health";
    // The evaluator's "ticks" are changes of the published state: the first verdict (UNKNOWN
    // until the sources report) is one, the drain begun below another. A machine whose
    // conditions flap only makes the panic come sooner.
    let agent = Agent::start(
        "supervise-health",
        &format!("panic:{TASK}:2:{BACKOFF}"),
        &[
            "gpu.enabled=false",
            "udp.enabled=false",
            "tcp.enabled=false",
        ],
    )
    .await;
    let verdict = eventually(STEP, || async {
        agent
            .health()
            .await
            .filter(|r| r.verdict != pb::Verdict::Unknown as i32)
    })
    .await;
    assert!(
        verdict.is_some(),
        "the sources never reported:\n{}",
        agent.log_text()
    );
    let mut client = agent.client.clone();
    client
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "supervise-test".into(),
            reason: "evaluator restart".into(),
            deadline_seconds: 600,
        })
        .await
        .expect("BeginDrain");

    let outage = watch_the_outage(&agent, TASK).await;
    assert_eq!(
        outage.failed_calls, 0,
        "the API answered every call while {TASK} was down: {outage:?}"
    );
    assert_restart_reported(&agent, TASK).await;
    let report = agent.health().await.expect("GetNodeHealth");
    assert_eq!(
        report.drain.map(|d| d.state),
        Some(pb::DrainState::Draining as i32),
        "the drain outlives the evaluator's restart"
    );
    let log = agent.stop().await;
    assert!(
        log.contains("panicked: fault injected into health"),
        "the panic is logged:\n{log}"
    );
    eprintln!(
        "{TEST}: {} API calls during the outage, {} failed; {} scrapes saw the evaluator down; \
         the drain kept across the restart",
        outage.calls, outage.failed_calls, outage.scrapes_down
    );
}
