//! A kubelet pod-resources server of the tests' own (the kubelet is not installable here): the
//! generated `v1.PodResourcesLister` server on a Unix socket, answering `List` with what the
//! test sets and counting the calls; it stops (and its socket goes) when told or dropped.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The generated messages and server (`tests/tests/pod_resources_codegen.rs` keeps it current).
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unused_qualifications,
    reason = "generated code"
)]
pub mod pb {
    include!("generated/podresources_v1_server.rs");
}

#[derive(Default)]
struct Lister {
    reply: Mutex<pb::ListPodResourcesResponse>,
    calls: AtomicU64,
}

#[tonic::async_trait]
impl pb::pod_resources_lister_server::PodResourcesLister for Arc<Lister> {
    async fn list(
        &self,
        _: Request<pb::ListPodResourcesRequest>,
    ) -> Result<Response<pb::ListPodResourcesResponse>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let reply = self
            .reply
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .clone();
        Ok(Response::new(reply))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<pb::AllocatableResourcesRequest>,
    ) -> Result<Response<pb::AllocatableResourcesResponse>, Status> {
        Err(Status::unimplemented("not in the test server"))
    }

    async fn get(
        &self,
        _: Request<pb::GetPodResourcesRequest>,
    ) -> Result<Response<pb::GetPodResourcesResponse>, Status> {
        Err(Status::unimplemented("not in the test server"))
    }
}

/// A running stand-in kubelet.
pub struct FakeKubelet {
    pub socket: PathBuf,
    lister: Arc<Lister>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// One container holding devices of one resource.
pub fn pod(
    namespace: &str,
    name: &str,
    container: &str,
    resource: &str,
    device_ids: &[&str],
) -> pb::PodResources {
    pb::PodResources {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        containers: vec![pb::ContainerResources {
            name: container.to_owned(),
            devices: vec![pb::ContainerDevices {
                resource_name: resource.to_owned(),
                device_ids: device_ids.iter().map(|s| (*s).to_owned()).collect(),
                topology: None,
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

impl FakeKubelet {
    /// Serves `List` with `pods` on `socket`.
    pub fn start(socket: &Path, pods: Vec<pb::PodResources>) -> Self {
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket).expect("bind the kubelet socket");
        let lister = Arc::new(Lister {
            reply: Mutex::new(pb::ListPodResourcesResponse {
                pod_resources: pods,
            }),
            calls: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        let (svc, s) = (lister.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(pb::pod_resources_lister_server::PodResourcesListerServer::new(svc))
                .serve_with_incoming_shutdown(incoming, s.cancelled())
                .await;
        });
        Self {
            socket: socket.to_path_buf(),
            lister,
            stop,
            task: Some(task),
        }
    }

    /// `List` calls answered so far.
    pub fn calls(&self) -> u64 {
        self.lister.calls.load(Ordering::Relaxed)
    }

    /// Stops serving, as a kubelet that crashed: the socket file stays, nobody answers on it.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_file(&self.socket);
    }
}
