//! Per-container GPU use against the real daemon: two processes in a test cgroup (a container
//! as the agent sees one) run on a fake GPU whose per-process utilisation samples are scripted
//! for their PIDs; their SM, encoder and decoder shares and memory arrive summed under that
//! container over gRPC and on `/metrics` (promtool accepts the scrape), with the per-process
//! figures and the device's encoder sessions in the `Gpu` message. The expected numbers are
//! the script's, not the agent's. Needs root and cgroup v2 (to make the cgroup); no GPU.
//!
//! Waits here are generous bounds that only catch a hang, never speed assertions.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use nodeward::api::pb;
use nodeward_tests::{
    agent_binary,
    api::{conn, eventually, TempDir},
    cgroup_v2_root,
    fake_nvml::fake,
    is_root, promtool_accepts, skip, wait_for, Cgroup,
};

/// Long enough for any step on a loaded machine.
const WAIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// The value of the sample of `name` whose labels include `label`.
fn sample(body: &str, name: &str, label: &str) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_process_gpu_samples_are_summed_under_their_container_over_grpc_and_metrics() {
    const TEST: &str = "per_process_gpu_samples_are_summed_under_their_container";
    if !is_root() {
        skip(TEST, "needs root to make a cgroup");
        return;
    }
    if cgroup_v2_root().is_none() {
        skip(TEST, "no cgroup v2 hierarchy");
        return;
    }
    let Some(fake) = fake("gpu-pod-usage", &[]) else {
        return;
    };
    let cgroup = Cgroup::new("gpu-pod");
    let mut first = cgroup.spawn(Command::new("sleep").arg("600"));
    let mut second = cgroup.spawn(Command::new("sleep").arg("600"));
    let (a, b) = (first.id(), second.id());
    let key = format!(
        "/{}",
        cgroup
            .path
            .file_name()
            .expect("a cgroup name")
            .to_string_lossy()
    );

    // Real NVML hands out a process's sample once per poll in which it ran: each block below
    // holds for one more nvmlDeviceGetCount call (one per poll) with a newer timestamp.
    let mut script = format!(
        "devices = 1\nall.temp = 40\nall.enc.util = 40\nall.dec.util = 7\n\
         all.enc.stats = 3,120,900\nall.procs.compute = {a}:1048576 {b}:2097152 999999:4096\n"
    );
    for n in 0..2000u32 {
        let t = n + 2;
        let _ = writeln!(
            script,
            "@count {n}\nall.procutil = {a}:30:11:20:5:{t} {b}:25:3:10:0:{t}"
        );
    }
    fake.script(&script);

    let dir = TempDir::new("gpu-pod-usage");
    let socket = dir.0.join("agent.sock");
    let port = free_port();
    let log = dir.0.join("agent.log");
    let _agent = tokio::process::Command::new(agent_binary())
        .args(["run", "--config", "/dev/null"])
        .args(["--set", "ebpf.enabled=false", "--set", "agent.tick=200ms"])
        .args(["--set", "api.tcp_listen="])
        .arg("--set")
        .arg(format!("api.unix_socket={}", socket.display()))
        .args(["--set", &format!("metrics.listen=127.0.0.1:{port}")])
        .args(["--set", &format!("gpu.library={}", fake.library_str())])
        .env("NODEWARD_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create the agent's log"))
        .kill_on_drop(true)
        .spawn()
        .expect("start nodeward run");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let addr = format!("unix:{}", socket.display());
    let client = eventually(WAIT, || {
        let (addr, socket) = (addr.clone(), socket.clone());
        async move { nodeward::client::connect(&conn(&addr), &socket).await.ok() }
    })
    .await
    .unwrap_or_else(|| panic!("the agent does not answer:\n{}", read_log()));

    let gpu = eventually(WAIT, || {
        let mut c = client.clone();
        let key = key.clone();
        async move {
            let r = c.list_gpus(pb::ListGpusRequest {}).await.ok()?.into_inner();
            let g = r.gpus.into_iter().next()?;
            g.containers
                .iter()
                .any(|u| u.container_id == key && u.sm_utilization_ratio > 0.0)
                .then_some(g)
        }
    })
    .await
    .unwrap_or_else(|| panic!("no GPU use under {key}:\n{}", read_log()));
    let usage = gpu
        .containers
        .iter()
        .find(|u| u.container_id == key)
        .expect("checked above");
    assert_eq!(usage.processes, 2, "{gpu:?}");
    assert_eq!(usage.used_memory_bytes, 1_048_576 + 2_097_152, "{gpu:?}");
    assert!(close(usage.sm_utilization_ratio, 0.55), "{usage:?}");
    assert!(close(usage.encoder_utilization_ratio, 0.30), "{usage:?}");
    assert!(close(usage.decoder_utilization_ratio, 0.05), "{usage:?}");
    let process = gpu
        .processes
        .iter()
        .find(|p| p.pid == a)
        .unwrap_or_else(|| panic!("no process {a} in {gpu:?}"));
    assert!(process.sampled, "{process:?}");
    assert_eq!(process.container_id, key);
    assert_eq!(
        (
            process.sm_utilization_percent,
            process.memory_utilization_percent,
            process.encoder_utilization_percent,
            process.decoder_utilization_percent
        ),
        (30, 11, 20, 5)
    );
    // PID 999999 has no cgroup to read: it is listed, but summed under no container.
    assert!(gpu.processes.iter().any(|p| p.pid == 999_999), "{gpu:?}");
    assert_eq!(gpu.containers.len(), 1, "{gpu:?}");
    assert_eq!(gpu.encoder_sessions, 3, "{gpu:?}");
    assert!(close(gpu.encoder_utilization_percent, 40.0), "{gpu:?}");
    assert!(close(gpu.decoder_utilization_percent, 7.0), "{gpu:?}");

    let label = format!("container_id=\"{key}\"");
    let body = wait_for(WAIT, || {
        scrape(port)
            .filter(|b| sample(b, "nodeward_container_gpu_sm_utilization_ratio", &label).is_some())
    })
    .unwrap_or_else(|| panic!("no per-container GPU series for {key}:\n{}", read_log()));
    for (name, want) in [
        ("nodeward_container_gpu_sm_utilization_ratio", 0.55),
        ("nodeward_container_gpu_encoder_utilization_ratio", 0.30),
        ("nodeward_container_gpu_decoder_utilization_ratio", 0.05),
        ("nodeward_container_gpu_memory_used_bytes", 3_145_728.0),
    ] {
        let got = sample(&body, name, &label);
        assert!(
            got.is_some_and(|v| close(v, want)),
            "{name} for {key}: {got:?}, want {want}"
        );
    }
    let line = body
        .lines()
        .find(|l| l.starts_with("nodeward_container_gpu_sm_utilization_ratio{"))
        .expect("checked above");
    for l in ["namespace=", "pod=", "container=", "gpu=\"0\"", "uuid="] {
        assert!(line.contains(l), "{l} missing: {line}");
    }
    promtool_accepts("gpu_pod_usage", &body);

    let _ = first.kill();
    let _ = second.kill();
    let _ = first.wait();
    let _ = second.wait();
}
