//! An NVML whose `nvmlInit` never returns (the fake's `init = hang`): the GPU source's start
//! does not hold the agent up, the run uses NVML once it answers late, and the real daemon
//! shows the silent GPU source UNAVAILABLE with the reason once
//! `health.source_first_report_timeout` is over, over gRPC and on `/metrics`, with the verdict
//! out of UNKNOWN and the agent answering throughout. No GPU and no root needed (eBPF off).
//!
//! Waits here are generous bounds that only catch a hang, never speed assertions.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::Stdio,
    time::Duration,
};

use nodeward::{
    api::pb,
    sources::gpu::{GpuSnapshot, SourceStatus},
};
use nodeward_tests::{
    agent_binary,
    api::{conn, eventually, TempDir},
    fake_nvml::fake,
};

/// Long enough for any step on a loaded machine.
const WAIT: Duration = Duration::from_secs(60);

const HUNG: &str = "init = hang\ndevices = 1\nall.temp = 41\n";

async fn until(
    rx: &mut tokio::sync::watch::Receiver<GpuSnapshot>,
    what: &str,
    f: fn(&GpuSnapshot) -> bool,
) -> GpuSnapshot {
    tokio::time::timeout(WAIT, async {
        loop {
            rx.changed().await.expect("the source publishes");
            let s = rx.borrow_and_update().clone();
            if f(&s) {
                break s;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no snapshot where {what} within {WAIT:?}"))
}

#[test]
fn a_hung_nvml_init_does_not_hold_up_the_start_and_a_late_answer_is_used() {
    let Some(fake) = fake("hung-init", &[]) else {
        return;
    };
    fake.script(HUNG);
    let mut config = fake.config();
    config.agent.tick = Duration::from_millis(100);

    // Today's start would block in nvmlInit for ever: run it on a thread and only catch a hang.
    let (gpu, shared) = (config.gpu.clone(), config.shared());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(nodeward::sources::gpu::Source::start(&gpu, &shared));
    });
    let source = rx
        .recv_timeout(WAIT)
        .expect("the GPU source's start returns while nvmlInit hangs")
        .expect("a hung NVML is not a reason to give up on the source");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut rx = source.subscribe();
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(source.run(cancel.clone()));
        // Several poll intervals while NVML hangs: nothing is published as a reading.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !rx.has_changed().expect("the run is alive"),
            "a snapshot was published while nvmlInit hung: {:?}",
            rx.borrow().status
        );
        assert!(
            !task.is_finished(),
            "the run waits for NVML, it does not end"
        );

        // The driver comes back: the same run polls the GPU it finds.
        fake.script("devices = 1\nall.temp = 41\n");
        let s = until(&mut rx, "the GPU is read", |s| s.devices.len() == 1).await;
        assert!(matches!(s.status, SourceStatus::Running), "{:?}", s.status);
        assert_eq!(
            s.devices[0].temperature_celsius.value().copied(),
            Some(41),
            "{:?}",
            s.devices[0].temperature_celsius
        );
        cancel.cancel();
        let ended = tokio::time::timeout(WAIT, task)
            .await
            .expect("the run stops when cancelled")
            .expect("joined");
        assert!(ended.is_ok(), "{ended:?}");
    });
}

#[test]
fn a_run_cancelled_while_nvml_hangs_stops_at_once() {
    let Some(fake) = fake("hung-cancel", &[]) else {
        return;
    };
    fake.script(HUNG);
    let config = fake.config();
    let (gpu, shared) = (config.gpu.clone(), config.shared());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(nodeward::sources::gpu::Source::start(&gpu, &shared));
    });
    let source = rx
        .recv_timeout(WAIT)
        .expect("start returns")
        .expect("source starts");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(source.run(cancel.clone()));
        cancel.cancel();
        let ended = tokio::time::timeout(WAIT, task)
            .await
            .expect("shutdown does not wait for a hung nvmlInit")
            .expect("joined");
        assert!(ended.is_ok(), "{ended:?}");
    });
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// The body of `GET /metrics`, or `None` if the agent does not answer.
fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verdict_leaves_unknown_when_nvml_never_answers() {
    let Some(fake) = fake("hung-agent", &[]) else {
        return;
    };
    fake.script(HUNG);
    let dir = TempDir::new("hung-agent");
    let socket = dir.0.join("agent.sock");
    let port = free_port();
    let log = dir.0.join("agent.log");
    let mut child = tokio::process::Command::new(agent_binary())
        .args(["run", "--config", "/dev/null"])
        .args(["--set", "ebpf.enabled=false", "--set", "agent.tick=200ms"])
        .args(["--set", "api.tcp_listen="])
        .arg("--set")
        .arg(format!("api.unix_socket={}", socket.display()))
        .args(["--set", &format!("metrics.listen=127.0.0.1:{port}")])
        .args(["--set", &format!("gpu.library={}", fake.library_str())])
        .args(["--set", "health.source_first_report_timeout=3s"])
        .env("NODEWARD_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create the agent's log"))
        .kill_on_drop(true)
        .spawn()
        .expect("start nodeward run");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // The agent answers although nvmlInit never returns.
    let addr = format!("unix:{}", socket.display());
    let client = eventually(WAIT, || {
        let (addr, socket) = (addr.clone(), socket.clone());
        async move { nodeward::client::connect(&conn(&addr), &socket).await.ok() }
    })
    .await
    .unwrap_or_else(|| panic!("the agent does not answer on its socket:\n{}", read_log()));

    // Past the bound the verdict leaves UNKNOWN with the GPU unavailable and the reason.
    let report = eventually(WAIT, || {
        let mut c = client.clone();
        async move {
            let r = c
                .get_node_health(pb::GetNodeHealthRequest {})
                .await
                .ok()?
                .into_inner()
                .health?;
            (r.verdict != pb::Verdict::Unknown as i32).then_some(r)
        }
    })
    .await
    .unwrap_or_else(|| panic!("the verdict stayed UNKNOWN:\n{}", read_log()));
    let gpu = report
        .sources
        .iter()
        .find(|s| s.name == "gpu")
        .unwrap_or_else(|| panic!("no gpu source in {:?}", report.sources));
    assert_eq!(
        gpu.state,
        pb::SourceState::Unavailable as i32,
        "{:?}",
        report.sources
    );
    assert_eq!(gpu.reason, "no first report within 3s");
    assert!(
        report
            .conditions
            .iter()
            .any(|c| c.r#type == "SourceNoFirstReport" && c.subject == "gpu"),
        "{:?}",
        report.conditions
    );
    // The other sources reported: the verdict is theirs plus the silent GPU's warning.
    assert_eq!(report.verdict, pb::Verdict::Degraded as i32, "{report:?}");

    // /metrics says the same, and still answers.
    let body = scrape(port).unwrap_or_else(|| panic!("no /metrics:\n{}", read_log()));
    for line in [
        "nodeward_health_source_state{source=\"gpu\",state=\"unavailable\"} 1",
        "nodeward_health_source_state{source=\"gpu\",state=\"pending\"} 0",
        "nodeward_health_condition{type=\"SourceNoFirstReport\",severity=\"warning\"} 1",
        "nodeward_health_verdict_state{state=\"unknown\"} 0",
    ] {
        assert!(body.lines().any(|l| l == line), "{line} missing:\n{body}");
    }

    // SIGTERM: the agent stops cleanly, not held by the thread stuck in nvmlInit.
    let pid = i32::try_from(child.id().expect("pid")).expect("pid fits");
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let exit = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap_or_else(|_| panic!("the agent did not stop:\n{}", read_log()))
        .expect("wait");
    assert!(exit.success(), "{exit:?}:\n{}", read_log());
}
