//! A real containerd with its CRI plugin, started for one test with its own root, state,
//! socket and config (Debian's `containerd` 1.6 + `runc`, see TOOLCHAIN.md): the cgroupfs
//! driver, `native` snapshotter, host-network sandboxes, and a static busybox image the harness
//! builds itself as an OCI archive (no registry is reachable) and imports with `ctr`. Pods are
//! created through CRI `RunPodSandbox` / `CreateContainer` / `StartContainer`, so their cgroups,
//! names and labels are the runtime's own.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use nodeward::containers::cri::{
    client::unix_channel,
    pb::{self, runtime_service_client::RuntimeServiceClient},
};
use tonic::transport::Channel;

use crate::{run, send_signal, wait_for};

/// The image both sandboxes and workloads run.
pub const IMAGE: &str = "nodeward.test/busybox:1";
const BUSYBOX: &str = "/bin/busybox";

/// Why containerd cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if !crate::is_root() {
        return Some("needs root".to_owned());
    }
    for tool in ["containerd", "ctr", "runc"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!(
                "{tool} not installed (cargo xtask setup installs it)"
            ));
        }
    }
    if !Path::new(BUSYBOX).exists() {
        return Some("busybox-static not installed".to_owned());
    }
    None
}

/// A containerd of the test's own; stopped and cleaned up on drop.
#[derive(Debug)]
pub struct Containerd {
    pub dir: PathBuf,
    child: Option<Child>,
    /// Cgroup parents of the pods created, for the clean-up.
    pods: std::sync::Mutex<Vec<String>>,
}

impl Containerd {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// Writes the config, starts containerd and imports the image.
    pub fn start(stem: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("nodeward-{stem}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("containerd dir");
        std::fs::write(dir.join("config.toml"), config(&dir)).expect("containerd config");
        let image = build_image(&dir);
        let mut c = Self {
            dir,
            child: None,
            pods: std::sync::Mutex::default(),
        };
        c.restart();
        run(Command::new("ctr")
            .arg("-a")
            .arg(c.socket())
            .args([
                "-n",
                "k8s.io",
                "images",
                "import",
                "--snapshotter",
                "native",
            ])
            .arg(&image));
        c
    }

    /// Starts (again) the stopped containerd and waits for its socket.
    pub fn restart(&mut self) {
        let log = std::fs::File::create(self.dir.join("containerd.log")).expect("log file");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        self.child = Some(child);
        let sock = self.socket();
        wait_for(Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&sock).ok()
        })
        .unwrap_or_else(|| panic!("containerd did not open {}", sock.display()));
    }

    /// Stops containerd (SIGTERM, then waits); the containers' shims keep running, as on a
    /// node where the runtime restarts.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = send_signal(child.id(), rustix::process::Signal::Term);
            let _ = child.wait();
        }
    }

    pub async fn client(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(
            unix_channel(&self.socket())
                .await
                .expect("connect to containerd"),
        )
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
        // The shims this containerd started (their command lines name its socket), then what
        // ran under them, by the pods' cgroups.
        let marker = self.dir.to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&marker) {
                let _ = send_signal(pid, rustix::process::Signal::Kill);
            }
        }
        let parents = self.pods.lock().map(|p| p.clone()).unwrap_or_default();
        for parent in &parents {
            kill_pod_processes(parent);
        }
        // Rootfs and shm mounts of the sandboxes and containers, deepest first.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(marker.as_str()))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        for parent in &parents {
            remove_pod_cgroup_dirs(parent);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Each cgroup hierarchy's directory for this path (v1 controllers and the v2 one).
fn hierarchy_dirs(cgroup_path: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(cgroup_path.trim_start_matches('/')))
        .filter(|d| d.is_dir())
        .collect()
}

fn kill_pod_processes(parent: &str) {
    for dir in hierarchy_dirs(parent) {
        for sub in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let procs =
                std::fs::read_to_string(sub.path().join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                let _ = send_signal(pid, rustix::process::Signal::Kill);
            }
        }
    }
}

fn remove_pod_cgroup_dirs(parent: &str) {
    for dir in hierarchy_dirs(parent) {
        // The processes just killed may take a moment to leave.
        wait_for(Duration::from_secs(5), || {
            for sub in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if sub.path().is_dir() {
                    let _ = std::fs::remove_dir(sub.path());
                }
            }
            std::fs::remove_dir(&dir).ok()
        });
    }
}

/// A pod to create.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub container: String,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
}

/// A running pod: its sandbox and its one container.
#[derive(Debug, Clone)]
pub struct Pod {
    pub sandbox_id: String,
    pub container_id: String,
    /// The cgroup parent the kubelet's cgroupfs driver would give a burstable pod.
    pub cgroup_parent: String,
}

fn node_namespaces() -> pb::NamespaceOption {
    pb::NamespaceOption {
        network: pb::NamespaceMode::Node.into(),
        pid: pb::NamespaceMode::Container.into(),
        ipc: pb::NamespaceMode::Pod.into(),
        ..Default::default()
    }
}

/// Creates and starts a pod with one container (that sleeps) through CRI.
pub async fn run_pod(
    ctrd: &Containerd,
    client: &mut RuntimeServiceClient<Channel>,
    spec: &PodSpec,
) -> Result<Pod, tonic::Status> {
    run_pod_with(ctrd, client, spec, &["/bin/sleep", "100000"]).await
}

/// Creates and starts a pod whose one container runs `command` (busybox applets in the
/// image: `sleep`, `sh`, `nc`, `cat`).
pub async fn run_pod_with(
    ctrd: &Containerd,
    client: &mut RuntimeServiceClient<Channel>,
    spec: &PodSpec,
    command: &[&str],
) -> Result<Pod, tonic::Status> {
    let cgroup_parent = format!("/kubepods/burstable/pod{}", spec.uid);
    if let Ok(mut pods) = ctrd.pods.lock() {
        pods.push(cgroup_parent.clone());
    }
    let logs = ctrd.dir.join("logs").join(&spec.uid);
    let _ = std::fs::create_dir_all(&logs);
    let sandbox_config = pb::PodSandboxConfig {
        metadata: Some(pb::PodSandboxMetadata {
            name: spec.name.clone(),
            uid: spec.uid.clone(),
            namespace: spec.namespace.clone(),
            attempt: 0,
        }),
        log_directory: logs.to_string_lossy().into_owned(),
        labels: spec.labels.clone(),
        annotations: spec.annotations.clone(),
        linux: Some(pb::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.clone(),
            security_context: Some(pb::LinuxSandboxSecurityContext {
                namespace_options: Some(node_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let sandbox_id = client
        .run_pod_sandbox(pb::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    let container_id = client
        .create_container(pb::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.clone(),
            config: Some(pb::ContainerConfig {
                metadata: Some(pb::ContainerMetadata {
                    name: spec.container.clone(),
                    attempt: 0,
                }),
                image: Some(pb::ImageSpec {
                    image: IMAGE.to_owned(),
                    ..Default::default()
                }),
                command: command.iter().map(|s| (*s).to_owned()).collect(),
                log_path: format!("{}.log", spec.container),
                linux: Some(pb::LinuxContainerConfig {
                    security_context: Some(pb::LinuxContainerSecurityContext {
                        namespace_options: Some(node_namespaces()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox_config),
        })
        .await?
        .into_inner()
        .container_id;
    client
        .start_container(pb::StartContainerRequest {
            container_id: container_id.clone(),
        })
        .await?;
    Ok(Pod {
        sandbox_id,
        container_id,
        cgroup_parent,
    })
}

/// Stops and removes a pod through CRI.
pub async fn remove_pod(client: &mut RuntimeServiceClient<Channel>, pod: &Pod) {
    let id = pod.sandbox_id.clone();
    client
        .stop_pod_sandbox(pb::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .expect("StopPodSandbox");
    client
        .remove_pod_sandbox(pb::RemovePodSandboxRequest { pod_sandbox_id: id })
        .await
        .expect("RemovePodSandbox");
}

fn config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.overlayfs"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
"#
    )
}

/// sha256 and size of a file, via coreutils.
fn digest(path: &Path) -> (String, u64) {
    let out = run(Command::new("sha256sum").arg(path));
    let hex = out
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_owned();
    (hex, std::fs::metadata(path).expect("stat blob").len())
}

/// Moves a file into the OCI layout's blobs under its digest.
fn blob(oci: &Path, file: &Path) -> (String, u64) {
    let (hex, size) = digest(file);
    std::fs::rename(file, oci.join("blobs/sha256").join(&hex)).expect("move blob");
    (hex, size)
}

/// A one-layer OCI image archive of a static busybox with `sleep`; the files the sandbox
/// bind-mounts over (`/etc/resolv.conf`, `/etc/hosts`, `/etc/hostname`) exist as files.
fn build_image(dir: &Path) -> PathBuf {
    let rootfs = dir.join("image-rootfs");
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("rootfs dir");
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).expect("copy busybox");
    for link in ["sleep", "sh", "nc", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(link)).expect("symlink");
    }
    for f in ["resolv.conf", "hosts", "hostname"] {
        std::fs::write(rootfs.join("etc").join(f), "").expect("etc file");
    }
    let oci = dir.join("image-oci");
    std::fs::create_dir_all(oci.join("blobs/sha256")).expect("oci dir");
    let layer = dir.join("layer.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."));
    let (l, ls) = blob(&oci, &layer);
    let cfg = dir.join("config.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/bin/sleep","2147483647"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{l}"]}}}}"#
        ),
    )
    .expect("image config");
    let (c, cs) = blob(&oci, &cfg);
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{c}","size":{cs}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{l}","size":{ls}}}]}}"#
        ),
    )
    .expect("manifest");
    let (m, ms) = blob(&oci, &manifest);
    std::fs::write(
        oci.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{m}","size":{ms},"annotations":{{"io.containerd.image.name":"{IMAGE}","org.opencontainers.image.ref.name":"1"}}}}]}}"#
        ),
    )
    .expect("index");
    std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
    let archive = dir.join("image.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&oci)
        .arg("-cf")
        .arg(&archive)
        .arg("."));
    archive
}
