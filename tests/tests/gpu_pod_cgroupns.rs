//! GPU processes mapped to their workloads by an agent in a private cgroup namespace, as in the
//! DaemonSet: there `/proc/<pid>/cgroup` of every other process reads relative to the agent's
//! own cgroup (`0::/../system.slice/x.service`). The agent runs under `unshare --cgroup` in a
//! cgroup of its own; a process in a `system.slice/<unit>.service` cgroup and one in a
//! kubelet-style container cgroup (`kubepods/burstable/pod<uid>/<64-hex id>`) are scripted as
//! GPU processes of the fake NVML. The service's process is keyed by the unit's host path and
//! the workload is named by its unit; the container's by its id.
//!
//! Needs root and cgroup v2 (to make the cgroups) and `unshare` (util-linux); no GPU. Waits are
//! generous bounds that only catch a hang.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use nodeward::api::pb;
use nodeward_tests::{
    agent_binary,
    api::{conn, eventually, TempDir},
    cgroup_v2_root,
    fake_nvml::fake,
    is_root, skip, Cgroup,
};

const WAIT: Duration = Duration::from_secs(60);
const TEST: &str = "gpu_processes_are_mapped_from_a_private_cgroup_namespace";

/// Directories made for the test, removed (deepest first) on drop; those that existed before
/// are left alone. Processes in them are killed first.
struct Made {
    dirs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Made {
    fn dir(&mut self, path: &Path) {
        if !path.exists() {
            std::fs::create_dir(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
            self.dirs.push(path.to_path_buf());
        }
    }

    /// `sleep` moved into the cgroup at `path`.
    fn sleeper(&mut self, path: &Path) -> u32 {
        let child = Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        std::fs::write(path.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", path.display()));
        self.children.push(child);
        pid
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_processes_are_mapped_from_a_private_cgroup_namespace() {
    if !is_root() {
        return skip(TEST, "needs root to make cgroups and a cgroup namespace");
    }
    let Some(root) = cgroup_v2_root() else {
        return skip(TEST, "no cgroup v2 hierarchy");
    };
    if Command::new("unshare").arg("--version").output().is_err() {
        return skip(TEST, "unshare (util-linux) is missing");
    }
    let Some(nvml) = fake(TEST, &[]) else {
        return;
    };
    let pid = std::process::id();
    let unit = format!("nodeward-test-gpuns-{pid}.service");
    let uid = format!("{pid:08x}-0000-4000-8000-00000000c9c9");
    let id = format!("{pid:08x}{}", "c".repeat(56));
    let mut made = Made {
        dirs: Vec::new(),
        children: Vec::new(),
    };
    made.dir(&root.join("system.slice"));
    let svc_dir = root.join("system.slice").join(&unit);
    made.dir(&svc_dir);
    for d in ["kubepods", "kubepods/burstable"] {
        made.dir(&root.join(d));
    }
    let pod_dir = root.join("kubepods/burstable").join(format!("pod{uid}"));
    made.dir(&pod_dir);
    let ctr_dir = pod_dir.join(&id);
    made.dir(&ctr_dir);
    let svc_pid = made.sleeper(&svc_dir);
    let ctr_pid = made.sleeper(&ctr_dir);

    let mut script = format!(
        "devices = 1\nall.temp = 40\nall.procs.compute = {svc_pid}:1048576 {ctr_pid}:2097152\n"
    );
    for n in 0..2000u32 {
        let t = n + 2;
        let _ = writeln!(
            script,
            "@count {n}\nall.procutil = {svc_pid}:30:0:0:0:{t} {ctr_pid}:20:0:0:0:{t}"
        );
    }
    nvml.script(&script);

    let dir = TempDir::new("gpu-pod-cgroupns");
    let socket = dir.0.join("agent.sock");
    let agent_cg = Cgroup::new("gpuns-agent");
    let mut cmd = Command::new("unshare");
    cmd.args(["--cgroup", "--"])
        .arg(agent_binary())
        .args(["run", "--config", "/dev/null"])
        .args(["--set", "ebpf.enabled=false", "--set", "agent.tick=200ms"])
        .args(["--set", "containers.runtime_endpoint=none"])
        .args(["--set", "containers.pod_resources_socket=none"])
        .args(["--set", "api.tcp_listen=", "--set", "metrics.enabled=false"])
        .arg("--set")
        .arg(format!("api.unix_socket={}", socket.display()))
        .args(["--set", &format!("gpu.library={}", nvml.library_str())])
        .env("NODEWARD_LOG", "warn")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut agent = agent_cg.spawn(&mut cmd);
    let addr = format!("unix:{}", socket.display());
    let client = eventually(WAIT, || {
        let (addr, socket) = (addr.clone(), socket.clone());
        async move { nodeward::client::connect(&conn(&addr), &socket).await.ok() }
    })
    .await
    .expect("the agent answers");
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/cgroup")).ok();
    assert_ne!(
        ns(&agent.id().to_string()),
        ns("self"),
        "the agent runs in a cgroup namespace of its own"
    );

    let svc_key = format!("/system.slice/{unit}");
    let gpu = eventually(WAIT, || {
        let mut c = client.clone();
        async move {
            let r = c.list_gpus(pb::ListGpusRequest {}).await.ok()?.into_inner();
            let g = r.gpus.into_iter().next()?;
            (g.processes.len() == 2 && g.processes.iter().all(|p| !p.container_id.is_empty()))
                .then_some(g)
        }
    })
    .await
    .expect("both GPU processes are attributed");
    let key_of = |pid: u32| {
        gpu.processes
            .iter()
            .find(|p| p.pid == pid)
            .map(|p| p.container_id.clone())
    };
    assert_eq!(key_of(svc_pid), Some(svc_key.clone()), "{gpu:?}");
    assert_eq!(key_of(ctr_pid), Some(id.clone()), "{gpu:?}");

    // The service's workload is named by its unit, and carries the GPU use.
    let named = eventually(WAIT, || {
        let mut c = client.clone();
        let key = svc_key.clone();
        async move {
            let r = c
                .list_containers(pb::ListContainersRequest::default())
                .await
                .ok()?
                .into_inner();
            r.containers.into_iter().find(|c| c.id == key)
        }
    })
    .await
    .expect("the service is listed");
    assert_eq!(named.name, unit);
    let usage = gpu
        .containers
        .iter()
        .find(|u| u.container_id == svc_key)
        .expect("the service's GPU use");
    assert!(
        (usage.sm_utilization_ratio - 0.30).abs() < 1e-9,
        "{usage:?}"
    );
    assert_eq!(usage.container_name, unit, "{usage:?}");

    let _ = agent.kill();
    let _ = agent.wait();
}
