//! Which pod holds which GPU, from the kubelet's pod-resources API (`v1.PodResourcesLister/
//! List` on `/var/lib/kubelet/pod-resources/kubelet.sock`): the fallback for GPU attribution
//! where NVML lists no processes (containers without the host PID namespace, MIG instances),
//! as dcgm-exporter does it.
//!
//! One task ([`run`]) lists the kubelet's assignments every resync and publishes them on a watch
//! channel the bridge reads when it publishes a GPU poll: no kubelet call is on the per-tick
//! path. A socket that is absent or stops answering is a status (the GPU source's fidelity says
//! it), never an error; the assignments of a kubelet that stopped answering are dropped at
//! once, since a stale assignment would credit one pod with another's work.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::cri::model::{clean, MAX_NAME};

/// The code generated from `proto/vendor/podresources/v1/api.proto` (client only; see
/// `proto/vendor/README.md`).
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unused_qualifications,
    rustdoc::all,
    reason = "generated code"
)]
pub mod pb {
    include!("generated/v1.rs");
}

pub const NAME: &str = "pod-resources";

/// The kubelet's socket where `containers.pod_resources_socket` is not set.
pub const DEFAULT_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

/// A call that takes longer is treated as the kubelet being unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses larger than this are refused (a node's listing is well under 1 MiB).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PodResourcesError {
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("List failed: {0}")]
    Call(Box<tonic::Status>),
    #[error("List took longer than 10 s")]
    Timeout,
}

/// Where the device assignments come from right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// `containers.pod_resources_socket = "none"`.
    Disabled,
    /// No socket at the path (not a Kubernetes node, or the DaemonSet does not mount it).
    NoSocket { path: PathBuf },
    /// The last `List` worked.
    Connected { path: PathBuf },
    /// The last `List` failed: no assignments are used.
    Lost { path: PathBuf, error: String },
}

impl Status {
    /// In words, for the GPU source's fidelity.
    pub fn describe(&self) -> String {
        match self {
            Self::Disabled => "GPU→pod by device assignment: off".to_owned(),
            Self::NoSocket { path } => format!(
                "GPU→pod by device assignment: no kubelet pod-resources socket at {}",
                path.display()
            ),
            Self::Connected { path } => format!(
                "GPU→pod by device assignment: kubelet pod-resources at {}",
                path.display()
            ),
            Self::Lost { path, error } => format!(
                "GPU→pod by device assignment unavailable: kubelet pod-resources at {} \
                 unreachable ({error}); process samples only",
                path.display()
            ),
        }
    }
}

/// One container a device is assigned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// The extended resource it was requested as (`nvidia.com/gpu`, `nvidia.com/mig-1g.10gb`).
    pub resource: String,
}

/// The kubelet's device assignments: device id (a GPU or MIG UUID) → the containers holding it.
#[derive(Debug, Clone)]
pub struct Assignments {
    pub status: Status,
    pub by_device: HashMap<String, Vec<Holder>>,
}

impl Assignments {
    fn empty(status: Status) -> Self {
        Self {
            status,
            by_device: HashMap::new(),
        }
    }

    /// The one container holding `device`; `None` when none does or several share it (a
    /// time-sliced GPU): its utilisation cannot then be split between them.
    pub fn sole_holder(&self, device: &str) -> Option<&Holder> {
        match self.by_device.get(device).map(Vec::as_slice) {
            Some([one]) => Some(one),
            _ => None,
        }
    }
}

/// Whether a kubelet resource name is an NVIDIA GPU or MIG instance (`nvidia.com/gpu`,
/// `nvidia.com/gpu.shared`, `nvidia.com/mig-<profile>`): other devices (NICs, FPGAs) are not
/// GPUs this agent reads.
fn is_gpu_resource(name: &str) -> bool {
    name.strip_prefix("nvidia.com/")
        .is_some_and(|r| r == "gpu" || r.starts_with("gpu.") || r.starts_with("mig-"))
}

/// The GPU devices of a `List` reply, by device id.
pub fn assignments(reply: &pb::ListPodResourcesResponse) -> HashMap<String, Vec<Holder>> {
    let mut out: HashMap<String, Vec<Holder>> = HashMap::new();
    for pod in &reply.pod_resources {
        for c in &pod.containers {
            for d in c
                .devices
                .iter()
                .filter(|d| is_gpu_resource(&d.resource_name))
            {
                for id in &d.device_ids {
                    out.entry(id.clone()).or_default().push(Holder {
                        namespace: clean(&pod.namespace, MAX_NAME),
                        pod: clean(&pod.name, MAX_NAME),
                        container: clean(&c.name, MAX_NAME),
                        resource: clean(&d.resource_name, MAX_NAME),
                    });
                }
            }
        }
    }
    out
}

/// The socket configured: `None` for `"none"`.
fn socket_path(configured: &str) -> Option<PathBuf> {
    let c = configured.trim();
    if c == "none" {
        return None;
    }
    let c = c.strip_prefix("unix://").unwrap_or(c);
    Some(PathBuf::from(if c.is_empty() { DEFAULT_SOCKET } else { c }))
}

/// The channel the task publishes on, holding the first status.
pub fn channel(
    socket: &str,
) -> (
    watch::Sender<Arc<Assignments>>,
    watch::Receiver<Arc<Assignments>>,
) {
    let status = match socket_path(socket) {
        None => Status::Disabled,
        Some(path) => Status::NoSocket { path },
    };
    watch::channel(Arc::new(Assignments::empty(status)))
}

async fn list(path: &Path) -> Result<pb::ListPodResourcesResponse, PodResourcesError> {
    let channel = super::cri::client::unix_channel(path).await?;
    let mut client = pb::pod_resources_lister_client::PodResourcesListerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE);
    match tokio::time::timeout(CALL_TIMEOUT, client.list(pb::ListPodResourcesRequest {})).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(PodResourcesError::Call(Box::new(status))),
        Err(_) => Err(PodResourcesError::Timeout),
    }
}

/// The task: lists the kubelet's assignments every `resync` until cancelled; never fails (and
/// with the socket off, only waits for the cancellation).
pub async fn run(
    socket: String,
    resync: Duration,
    tx: watch::Sender<Arc<Assignments>>,
    cancel: CancellationToken,
) {
    let Some(path) = socket_path(&socket) else {
        // Off: nothing to list, but a task that ends early stops the agent.
        cancel.cancelled().await;
        return;
    };
    loop {
        let next = if path.exists() {
            match list(&path).await {
                Ok(reply) => Assignments {
                    status: Status::Connected { path: path.clone() },
                    by_device: assignments(&reply),
                },
                Err(e) => Assignments::empty(Status::Lost {
                    path: path.clone(),
                    error: e.to_string(),
                }),
            }
        } else {
            Assignments::empty(Status::NoSocket { path: path.clone() })
        };
        if tx.borrow().status != next.status {
            tracing::info!(status = %next.status.describe(), "GPU device assignments");
        }
        tx.send_replace(Arc::new(next));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(resync) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, containers: &[(&str, &str, &[&str])]) -> pb::PodResources {
        pb::PodResources {
            name: name.to_owned(),
            namespace: ns.to_owned(),
            containers: containers
                .iter()
                .map(|(c, resource, ids)| pb::ContainerResources {
                    name: (*c).to_owned(),
                    devices: vec![pb::ContainerDevices {
                        resource_name: (*resource).to_owned(),
                        device_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
                        topology: None,
                    }],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn gpu_and_mig_devices_map_to_their_containers_and_other_devices_do_not() {
        let reply = pb::ListPodResourcesResponse {
            pod_resources: vec![
                pod(
                    "media",
                    "transcode-0",
                    &[("ffmpeg", "nvidia.com/gpu", &["GPU-a"])],
                ),
                pod(
                    "ml",
                    "infer-0",
                    &[
                        ("model", "nvidia.com/mig-1g.10gb", &["MIG-b"]),
                        ("nic", "example.com/sriov", &["0000:3b:00.1"]),
                    ],
                ),
                pod(
                    "media",
                    "shared-0",
                    &[("a", "nvidia.com/gpu.shared", &["GPU-c"])],
                ),
                pod(
                    "media",
                    "shared-1",
                    &[("b", "nvidia.com/gpu.shared", &["GPU-c"])],
                ),
            ],
        };
        let a = Assignments {
            status: Status::Connected {
                path: PathBuf::from("/k.sock"),
            },
            by_device: assignments(&reply),
        };
        let h = a.sole_holder("GPU-a").expect("GPU-a held");
        assert_eq!(
            (h.namespace.as_str(), h.pod.as_str(), h.container.as_str()),
            ("media", "transcode-0", "ffmpeg")
        );
        assert_eq!(
            a.sole_holder("MIG-b").map(|h| h.pod.as_str()),
            Some("infer-0")
        );
        assert!(!a.by_device.contains_key("0000:3b:00.1"), "not a GPU");
        assert_eq!(a.by_device["GPU-c"].len(), 2);
        assert_eq!(
            a.sole_holder("GPU-c"),
            None,
            "a shared GPU has no sole holder"
        );
        assert_eq!(a.sole_holder("GPU-z"), None);
    }

    #[test]
    fn socket_defaults_to_the_kubelets_and_none_turns_it_off() {
        assert_eq!(socket_path(""), Some(PathBuf::from(DEFAULT_SOCKET)));
        assert_eq!(
            socket_path("unix:///x.sock"),
            Some(PathBuf::from("/x.sock"))
        );
        assert_eq!(socket_path("none"), None);
    }

    #[test]
    fn a_lost_kubelet_says_only_process_samples_are_used() {
        let s = Status::Lost {
            path: PathBuf::from("/k.sock"),
            error: "connection refused".to_owned(),
        };
        assert!(
            s.describe().contains("unreachable") && s.describe().contains("process samples only")
        );
    }
}
