//! GPUs tied to pods through the kubelet's pod-resources API where NVML lists no process (a
//! container without the host PID namespace, a MIG instance). The kubelet is not installable
//! here: a pod-resources server of the tests' own (`nodeward_tests::podresources`, the
//! generated `v1.PodResourcesLister` server on a Unix socket) stands in for it. The fake NVML
//! is scripted with no processes at all; the GPU the stand-in assigns to one container gets
//! the device's figures under that pod's names over gRPC and on `/metrics`, marked as a device
//! assignment; a GPU two containers share is credited to neither. The server gone: the
//! attribution goes at once (a stale one would credit the wrong pod), the GPU source's fidelity
//! says why, the agent keeps running; the server back: the names return. A GPU in MIG mode is
//! handed out by its MIG devices: each pod is credited with its own MIG device, not the GPU.
//!
//! Needs no root and no GPU. Waits are generous bounds that only catch a hang.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::Stdio,
    time::Duration,
};

use nodeward::api::pb;
use nodeward_tests::{
    agent_binary,
    api::{conn, eventually, TempDir},
    fake_nvml::fake,
    podresources::{pod, FakeKubelet},
    promtool_accepts,
};

const WAIT: Duration = Duration::from_secs(60);
const TEST: &str = "gpus_are_tied_to_pods_by_device_assignment_where_nvml_lists_no_process";
const GPU0: &str = "GPU-5a5a0000-0000-4000-8000-000000000000";
const GPU1: &str = "GPU-5a5a0000-0000-4000-8000-000000000001";
const KEY: &str = "pod-resources:media/transcode-0/ffmpeg";

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

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn kubelet_pods() -> Vec<nodeward_tests::podresources::pb::PodResources> {
    vec![
        pod("media", "transcode-0", "ffmpeg", "nvidia.com/gpu", &[GPU0]),
        // Time-slicing: two containers on one GPU; its use cannot be split between them.
        pod("media", "shared-0", "a", "nvidia.com/gpu.shared", &[GPU1]),
        pod("media", "shared-1", "b", "nvidia.com/gpu.shared", &[GPU1]),
        pod(
            "net",
            "router-0",
            "r",
            "example.com/sriov-vf",
            &["0000:3b:00.1"],
        ),
    ]
}

async fn gpus(client: &nodeward_tests::drain::Client) -> Option<pb::ListGpusResponse> {
    Some(
        client
            .clone()
            .list_gpus(pb::ListGpusRequest {})
            .await
            .ok()?
            .into_inner(),
    )
}

async fn gpu_fidelity(client: &nodeward_tests::drain::Client) -> String {
    let h = client
        .clone()
        .get_node_health(pb::GetNodeHealthRequest {})
        .await
        .expect("GetNodeHealth")
        .into_inner();
    h.health
        .map(|h| h.sources)
        .unwrap_or_default()
        .into_iter()
        .find(|s| s.name == "gpu")
        .map(|s| s.fidelity)
        .unwrap_or_default()
}

fn usage_of<'a>(r: &'a pb::ListGpusResponse, uuid: &str) -> Vec<&'a pb::GpuContainerUsage> {
    r.gpus
        .iter()
        .filter(|g| g.uuid == uuid)
        .flat_map(|g| g.containers.iter())
        .collect()
}

/// The agent, run with the fake NVML and the stand-in kubelet, its API on a Unix socket.
struct Agent {
    agent: tokio::process::Child,
    client: nodeward_tests::drain::Client,
    /// `/metrics` on 127.0.0.1.
    port: u16,
    log: std::path::PathBuf,
}

impl Agent {
    async fn start(dir: &TempDir, kubelet_sock: &std::path::Path, nvml: &str) -> Self {
        let socket = dir.0.join("agent.sock");
        let port = free_port();
        let log = dir.0.join("agent.log");
        let agent = tokio::process::Command::new(agent_binary())
            .args(["run", "--config", "/dev/null"])
            .args(["--set", "ebpf.enabled=false", "--set", "agent.tick=200ms"])
            .args(["--set", "containers.runtime_endpoint=none"])
            .args(["--set", "containers.runtime_resync=1s"])
            .arg("--set")
            .arg(format!(
                "containers.pod_resources_socket={}",
                kubelet_sock.display()
            ))
            .args(["--set", "api.tcp_listen="])
            .arg("--set")
            .arg(format!("api.unix_socket={}", socket.display()))
            .args(["--set", &format!("metrics.listen=127.0.0.1:{port}")])
            .args(["--set", &format!("gpu.library={nvml}")])
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
        .await
        .unwrap_or_else(|| {
            panic!(
                "the agent does not answer:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        Self {
            agent,
            client,
            port,
            log,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpus_are_tied_to_pods_by_device_assignment_where_nvml_lists_no_process() {
    let Some(nvml) = fake(TEST, &[]) else {
        return;
    };
    // No process on either GPU: only the device figures, which the assignment credits.
    nvml.script(&format!(
        "devices = 2\nall.temp = 40\nall.procs.compute =\nall.procs.graphics =\n\
         dev.0.uuid = {GPU0}\ndev.0.util.gpu = 87\ndev.0.mem.total = 17179869184\ndev.0.mem.used = 3221225472\n\
         dev.0.enc.util = 40\ndev.0.dec.util = 12\n\
         dev.1.uuid = {GPU1}\ndev.1.util.gpu = 55\n"
    ));
    let dir = TempDir::new("pod-resources-gpu");
    let kubelet_sock = dir.0.join("kubelet.sock");
    let mut kubelet = FakeKubelet::start(&kubelet_sock, kubelet_pods());
    let Agent {
        mut agent,
        client,
        port,
        log,
    } = Agent::start(&dir, &kubelet_sock, &nvml.library_str()).await;
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let r = eventually(WAIT, || async {
        gpus(&client)
            .await
            .filter(|r| usage_of(r, GPU0).iter().any(|u| u.container_id == KEY))
    })
    .await
    .unwrap_or_else(|| panic!("GPU0 is not credited to its pod:\n{}", read_log()));
    let u = usage_of(&r, GPU0);
    assert_eq!(u.len(), 1, "{r:?}");
    let u = u[0];
    assert_eq!(u.attribution(), pb::GpuAttribution::DeviceAssignment);
    assert_eq!(
        (
            u.pod_namespace.as_str(),
            u.pod_name.as_str(),
            u.container_name.as_str(),
            u.processes
        ),
        ("media", "transcode-0", "ffmpeg", 0)
    );
    assert!(close(u.sm_utilization_ratio, 0.87), "{u:?}");
    assert!(close(u.encoder_utilization_ratio, 0.40), "{u:?}");
    assert!(close(u.decoder_utilization_ratio, 0.12), "{u:?}");
    assert_eq!(u.used_memory_bytes, 3_221_225_472);
    assert!(
        usage_of(&r, GPU1).is_empty(),
        "a shared GPU is credited to neither holder: {r:?}"
    );
    // The health report is evaluated on its own interval: it catches up.
    eventually(WAIT, || async {
        gpu_fidelity(&client)
            .await
            .contains("GPU→pod by device assignment: kubelet pod-resources at")
            .then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("the GPU fidelity names the kubelet: {:?}", read_log()));

    // /metrics: the pod's names from the kubelet on its GPU series; a valid exposition.
    let body = eventually(WAIT, || async {
        scrape(port).filter(|b| b.contains("pod=\"transcode-0\""))
    })
    .await
    .unwrap_or_else(|| panic!("/metrics lacks the pod:\n{}", read_log()));
    let sm = body
        .lines()
        .find(|l| {
            l.starts_with("nodeward_container_gpu_sm_utilization_ratio{")
                && l.contains("pod=\"transcode-0\"")
        })
        .unwrap_or_else(|| panic!("no SM series for the pod:\n{body}"));
    assert!(
        sm.contains("namespace=\"media\"")
            && sm.contains("container=\"ffmpeg\"")
            && sm.contains(&format!("uuid=\"{GPU0}\"")),
        "{sm}"
    );
    let v: f64 = sm
        .rsplit_once(' ')
        .and_then(|(_, v)| v.parse().ok())
        .expect("a value");
    assert!(close(v, 0.87), "{sm}");
    assert!(!body.contains("pod=\"shared-0\""), "shared GPU credited");
    promtool_accepts(TEST, &body);
    let calls = kubelet.calls();
    assert!(calls >= 1);

    // The kubelet goes away (its socket stays, as after a crash): no stale credit, the
    // fidelity says why, the agent keeps running.
    kubelet.stop().await;
    let fidelity = eventually(WAIT, || async {
        let f = gpu_fidelity(&client).await;
        f.contains("unreachable").then_some(f)
    })
    .await
    .unwrap_or_else(|| panic!("the fidelity does not say so:\n{}", read_log()));
    assert!(fidelity.contains("process samples only"), "{fidelity}");
    eventually(WAIT, || async {
        gpus(&client)
            .await
            .filter(|r| !r.gpus.is_empty() && usage_of(r, GPU0).is_empty())
    })
    .await
    .expect("GPU0's credit goes with the kubelet");
    assert!(agent.try_wait().expect("try_wait").is_none(), "agent runs");

    // The kubelet back: the credit returns.
    let kubelet = FakeKubelet::start(&kubelet_sock, kubelet_pods());
    eventually(WAIT, || async {
        gpus(&client).await.filter(|r| {
            usage_of(r, GPU0)
                .iter()
                .any(|u| u.pod_name == "transcode-0")
        })
    })
    .await
    .expect("the credit returns with the kubelet");
    assert!(kubelet.calls() >= 1);
    let _ = agent.kill().await;
}

const MIG_TEST: &str = "each_mig_device_is_credited_to_the_pod_it_is_assigned_to_not_the_whole_gpu";
const MIG0: &str = "MIG-5a5a0000-0000-4000-8000-0000000000a0";
const MIG1: &str = "MIG-5a5a0000-0000-4000-8000-0000000000a1";
const MIG2: &str = "MIG-5a5a0000-0000-4000-8000-0000000000a2";
const GIB: u64 = 1 << 30;

/// The `/metrics` line of `family` whose labels contain every one of `labels`.
fn series<'a>(body: &'a str, family: &str, labels: &[String]) -> Option<&'a str> {
    body.lines().find(|l| {
        l.strip_prefix(family)
            .is_some_and(|rest| rest.starts_with('{'))
            && labels.iter().all(|want| l.contains(want.as_str()))
    })
}

fn value(line: &str) -> f64 {
    line.rsplit_once(' ')
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no value in {line}"))
}

/// Two pods each given one MIG device of the same GPU: each is credited with its own MIG
/// device (its memory, over gRPC and on `/metrics` with its pod's names), neither with the
/// whole GPU; the third MIG device is nobody's; a GPU with MIG mode off lists no MIG device
/// and is still assigned whole. The GPU in MIG mode gives no utilisation, as a real driver
/// does, and the agent reports that as no series, no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_mig_device_is_credited_to_the_pod_it_is_assigned_to_not_the_whole_gpu() {
    let Some(nvml) = fake(MIG_TEST, &[]) else {
        return;
    };
    nvml.script(&format!(
        "devices = 2\nall.temp = 40\nall.procs.compute =\nall.procs.graphics =\n\
         dev.0.uuid = {GPU0}\ndev.0.util.gpu = 87\ndev.0.mem.total = {total}\ndev.0.mem.used = {used}\n\
         dev.0.mig.mode = 1\ndev.0.mig.count = 3\n\
         dev.0.mig.0.uuid = {MIG0}\ndev.0.mig.0.gi = 1\ndev.0.mig.0.ci = 0\n\
         dev.0.mig.0.mem.total = {ten}\ndev.0.mig.0.mem.used = {one}\n\
         dev.0.mig.1.uuid = {MIG1}\ndev.0.mig.1.gi = 2\ndev.0.mig.1.ci = 0\n\
         dev.0.mig.1.mem.total = {ten}\ndev.0.mig.1.mem.used = {two}\n\
         dev.0.mig.2.uuid = {MIG2}\ndev.0.mig.2.gi = 3\ndev.0.mig.2.ci = 0\n\
         dev.0.mig.2.mem.total = {ten}\ndev.0.mig.2.mem.used = 0\n\
         dev.1.uuid = {GPU1}\ndev.1.util.gpu = 55\ndev.1.mig.mode = 0\ndev.1.mig.count = 2\n",
        total = 80 * GIB,
        used = 3 * GIB,
        ten = 10 * GIB,
        one = GIB,
        two = 2 * GIB,
    ));
    let dir = TempDir::new("pod-resources-mig");
    let kubelet_sock = dir.0.join("kubelet.sock");
    let _kubelet = FakeKubelet::start(
        &kubelet_sock,
        vec![
            pod(
                "media",
                "transcode-0",
                "ffmpeg",
                "nvidia.com/mig-1g.10gb",
                &[MIG0],
            ),
            pod(
                "media",
                "transcode-1",
                "ffmpeg",
                "nvidia.com/mig-1g.10gb",
                &[MIG1],
            ),
            pod("media", "whole-0", "ffmpeg", "nvidia.com/gpu", &[GPU1]),
        ],
    );
    let Agent {
        mut agent,
        client,
        port,
        log,
    } = Agent::start(&dir, &kubelet_sock, &nvml.library_str()).await;
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let holder = |r: &pb::ListGpusResponse, mig: &str| {
        r.gpus
            .iter()
            .flat_map(|g| g.mig_devices.iter())
            .find(|m| m.uuid == mig)
            .map(|m| m.pod_name.clone())
    };
    let r = eventually(WAIT, || async {
        gpus(&client).await.filter(|r| {
            holder(r, MIG0).as_deref() == Some("transcode-0")
                && holder(r, MIG1).as_deref() == Some("transcode-1")
                && usage_of(r, GPU1).iter().any(|u| u.pod_name == "whole-0")
        })
    })
    .await
    .unwrap_or_else(|| panic!("the MIG devices are not credited:\n{}", read_log()));
    let g0 = r.gpus.iter().find(|g| g.uuid == GPU0).expect("GPU0");
    assert!(g0.mig_enabled, "{g0:?}");
    let migs: Vec<_> = g0
        .mig_devices
        .iter()
        .map(|m| {
            (
                m.uuid.as_str(),
                m.gpu_instance_id,
                m.compute_instance_id,
                m.memory_used_bytes,
                m.memory_total_bytes,
                m.container_id.as_str(),
                m.pod_namespace.as_str(),
                m.pod_name.as_str(),
                m.container_name.as_str(),
            )
        })
        .collect();
    assert_eq!(
        migs,
        [
            (
                MIG0,
                Some(1),
                Some(0),
                Some(GIB),
                Some(10 * GIB),
                "pod-resources:media/transcode-0/ffmpeg",
                "media",
                "transcode-0",
                "ffmpeg"
            ),
            (
                MIG1,
                Some(2),
                Some(0),
                Some(2 * GIB),
                Some(10 * GIB),
                "pod-resources:media/transcode-1/ffmpeg",
                "media",
                "transcode-1",
                "ffmpeg"
            ),
            (
                MIG2,
                Some(3),
                Some(0),
                Some(0),
                Some(10 * GIB),
                "",
                "",
                "",
                ""
            ),
        ]
    );
    assert!(
        g0.containers.is_empty(),
        "no pod is credited with the whole GPU in MIG mode: {:?}",
        g0.containers
    );
    assert!(
        g0.nvml_errors_total.is_empty() && !g0.unreadable.iter().any(|u| u == "utilization"),
        "MIG mode's missing utilisation is no failure: {g0:?}"
    );
    let g1 = r.gpus.iter().find(|g| g.uuid == GPU1).expect("GPU1");
    assert!(!g1.mig_enabled && g1.mig_devices.is_empty(), "{g1:?}");

    let body = eventually(WAIT, || async {
        scrape(port).filter(|b| b.contains("pod=\"transcode-1\""))
    })
    .await
    .unwrap_or_else(|| panic!("/metrics lacks the MIG pods:\n{}", read_log()));
    for (mig, pod, bytes) in [(MIG0, "transcode-0", GIB), (MIG1, "transcode-1", 2 * GIB)] {
        let labels = [
            format!("uuid=\"{GPU0}\""),
            format!("mig_uuid=\"{mig}\""),
            format!("pod=\"{pod}\""),
            "namespace=\"media\"".to_owned(),
            "container=\"ffmpeg\"".to_owned(),
        ];
        let line = series(&body, "nodeward_gpu_mig_memory_used_bytes", &labels)
            .unwrap_or_else(|| panic!("no MIG series for {pod}:\n{body}"));
        #[expect(clippy::cast_precision_loss, reason = "a few GiB")]
        let want = bytes as f64;
        assert!(close(value(line), want), "{line}");
        assert!(
            series(
                &body,
                "nodeward_container_gpu_memory_used_bytes",
                &labels[2..]
            )
            .is_none(),
            "{pod} is credited with a whole GPU:\n{body}"
        );
    }
    let free = [format!("mig_uuid=\"{MIG2}\""), "pod=\"\"".to_owned()];
    assert!(
        series(&body, "nodeward_gpu_mig_memory_used_bytes", &free).is_some(),
        "the unassigned MIG device is listed without a pod:\n{body}"
    );
    assert!(
        series(&body, "nodeward_gpu_mig_enabled", &["gpu=\"0\"".to_owned()])
            .is_some_and(|l| close(value(l), 1.0)),
        "{body}"
    );
    assert!(
        series(
            &body,
            "nodeward_gpu_utilization_ratio",
            &["gpu=\"0\"".to_owned()]
        )
        .is_none(),
        "no utilisation in MIG mode, not a 0:\n{body}"
    );
    promtool_accepts(MIG_TEST, &body);
    let _ = agent.kill().await;
}
