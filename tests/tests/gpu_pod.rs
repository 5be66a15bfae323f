//! `ListGpus` says why the GPU source is not available, over gRPC against the real daemon: an
//! NVML library that is missing, one whose `nvmlInit` fails, one that fails as a whole while
//! the agent runs (and the reason clearing when it comes back), and the source turned off. The
//! reasons are compared with what the fake NVML was made to do, not with what the agent
//! computed. No GPU and no root needed (eBPF off).
//!
//! Waits here are generous bounds that only catch a hang, never speed assertions.

use std::{path::PathBuf, process::Stdio, time::Duration};

use nodeward::api::{pb, pb::node_health_client::NodeHealthClient};
use nodeward_tests::{
    agent_binary,
    api::{conn, eventually, TempDir},
    fake_nvml::fake,
};
use tonic::transport::Channel;

/// Long enough for any step on a loaded machine.
const WAIT: Duration = Duration::from_secs(60);

/// `nodeward run` with eBPF off, its API on a Unix socket and the given `--set`s.
struct Agent {
    child: tokio::process::Child,
    log: PathBuf,
    client: NodeHealthClient<Channel>,
}

impl Agent {
    async fn start(dir: &TempDir, sets: &[String]) -> Self {
        let socket = dir.0.join("agent.sock");
        let log = dir.0.join("agent.log");
        let mut command = tokio::process::Command::new(agent_binary());
        command
            .args(["run", "--config", "/dev/null"])
            .args(["--set", "ebpf.enabled=false", "--set", "agent.tick=200ms"])
            .args(["--set", "api.tcp_listen=", "--set", "metrics.enabled=false"])
            .arg("--set")
            .arg(format!("api.unix_socket={}", socket.display()));
        for set in sets {
            command.args(["--set", set]);
        }
        let mut child = command
            .env("NODEWARD_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the agent's log"))
            .kill_on_drop(true)
            .spawn()
            .expect("start nodeward run");
        let addr = format!("unix:{}", socket.display());
        let client = eventually(WAIT, || {
            let (addr, socket) = (addr.clone(), socket.clone());
            async move { nodeward::client::connect(&conn(&addr), &socket).await.ok() }
        })
        .await;
        let Some(client) = client else {
            let _ = child.kill().await;
            panic!(
                "the agent does not answer on its socket:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Self { child, log, client }
    }

    /// Asks `ListGpus` until `f` holds; panics with the last answer and the log if it never does.
    async fn gpus_until(
        &self,
        what: &str,
        f: impl Fn(&pb::ListGpusResponse) -> bool,
    ) -> pb::ListGpusResponse {
        let last = std::sync::Mutex::new(None);
        let got = eventually(WAIT, || {
            let mut c = self.client.clone();
            let (f, last) = (&f, &last);
            async move {
                let r = c.list_gpus(pb::ListGpusRequest {}).await.ok()?.into_inner();
                let ok = f(&r);
                *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
                ok.then_some(r)
            }
        })
        .await;
        got.unwrap_or_else(|| {
            panic!(
                "ListGpus never showed {what}; last {:?}\n{}",
                last.lock().unwrap_or_else(|e| e.into_inner()),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_gpus_names_a_missing_library_and_the_library_it_looked_for() {
    let dir = TempDir::new("gpu-reason-missing");
    let missing = dir.0.join("no-driver").join("libnvidia-ml.so.1");
    let agent = Agent::start(&dir, &[format!("gpu.library={}", missing.display())]).await;
    let r = agent
        .gpus_until("the missing library", |r| {
            r.reason.contains("cannot load the NVML library")
        })
        .await;
    assert!(!r.available, "{r:?}");
    assert!(r.gpus.is_empty(), "{r:?}");
    assert!(
        r.reason.contains(&missing.display().to_string()),
        "the reason names the path it tried: {r:?}"
    );
    // The CLI's table view prints the same reason.
    let out = std::process::Command::new(agent_binary())
        .args(["gpus", "--addr"])
        .arg(format!("unix:{}", dir.0.join("agent.sock").display()))
        .env_remove("NODEWARD_LOG")
        .output()
        .expect("run the CLI");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text, format!("no GPU source on this node: {}\n", r.reason));
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_gpus_names_an_nvml_init_that_fails() {
    let Some(fake) = fake("gpu-reason-init", &[]) else {
        return;
    };
    // 18: NVML_ERROR_LIB_RM_VERSION_MISMATCH, a driver updated without a reboot.
    fake.script("init = 18\ndevices = 1\n");
    let dir = TempDir::new("gpu-reason-init");
    let agent = Agent::start(&dir, &[format!("gpu.library={}", fake.library_str())]).await;
    let r = agent
        .gpus_until("the version mismatch", |r| {
            r.reason.contains("driver/library version mismatch")
        })
        .await;
    assert!(!r.available, "{r:?}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_gpus_says_why_while_nvml_fails_and_clears_the_reason_when_it_is_back() {
    let Some(fake) = fake("gpu-reason-degrade", &[]) else {
        return;
    };
    let base = "devices = 2\nall.temp = 40\n";
    fake.script(base);
    let dir = TempDir::new("gpu-reason-degrade");
    let agent = Agent::start(&dir, &[format!("gpu.library={}", fake.library_str())]).await;
    let r = agent
        .gpus_until("two GPUs", |r| r.available && r.gpus.len() == 2)
        .await;
    assert_eq!(r.reason, "", "{r:?}");

    fake.script("devices = ERR:999\n");
    let r = agent
        .gpus_until("the source degraded", |r| !r.available)
        .await;
    assert!(
        r.reason.contains("GPU source degraded") && r.reason.contains("re-initialising"),
        "{r:?}"
    );

    fake.script(base);
    let r = agent
        .gpus_until("the GPUs back", |r| r.available && r.gpus.len() == 2)
        .await;
    assert_eq!(r.reason, "", "{r:?}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_gpus_says_the_source_is_turned_off() {
    let dir = TempDir::new("gpu-reason-off");
    let agent = Agent::start(&dir, &["gpu.enabled=false".to_owned()]).await;
    let r = agent.gpus_until("a reason", |r| !r.reason.is_empty()).await;
    assert!(!r.available, "{r:?}");
    assert!(r.reason.contains("gpu.enabled = false"), "{r:?}");
    let mut child = agent.child;
    let _ = child.kill().await;
}
