//! A stand-in container runtime for the identity benchmark: the generated CRI `runtime.v1`
//! server on a Unix socket that lists a fixed set of pod sandboxes and containers and counts
//! every call (the methods it does not implement answer `Unimplemented`, as containerd 1.6
//! does for the event stream).

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The generated messages and server (`tests/tests/cri_codegen.rs` keeps it current).
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unused_qualifications,
    reason = "generated code"
)]
pub mod pb {
    include!("generated/runtime_v1_server.rs");
}

struct Runtime {
    sandboxes: Vec<pb::PodSandbox>,
    containers: Vec<pb::Container>,
    calls: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl pb::runtime_service_server::RuntimeService for Runtime {
    async fn version(
        &self,
        _: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(pb::VersionResponse {
            version: "0.1.0".to_owned(),
            runtime_name: "bench-runtime".to_owned(),
            runtime_version: "1".to_owned(),
            runtime_api_version: "v1".to_owned(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        _: Request<pb::ListPodSandboxRequest>,
    ) -> Result<Response<pb::ListPodSandboxResponse>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(pb::ListPodSandboxResponse {
            items: self.sandboxes.clone(),
        }))
    }

    async fn list_containers(
        &self,
        _: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(pb::ListContainersResponse {
            containers: self.containers.clone(),
        }))
    }
}

/// One pod per container, named `bench-<i>` in namespace `bench-<i % 10>` with five labels.
fn listing(container_ids: &[String]) -> (Vec<pb::PodSandbox>, Vec<pb::Container>) {
    let mut sandboxes = Vec::new();
    let mut containers = Vec::new();
    for (i, id) in container_ids.iter().enumerate() {
        let sandbox_id = format!("sandbox-{i}");
        sandboxes.push(pb::PodSandbox {
            id: sandbox_id.clone(),
            metadata: Some(pb::PodSandboxMetadata {
                name: format!("bench-{i}"),
                uid: format!("00000000-0000-4000-8000-{i:012x}"),
                namespace: format!("bench-{}", i % 10),
                attempt: 0,
            }),
            labels: (0..5)
                .map(|k| (format!("label-{k}"), format!("value-{i}-{k}")))
                .collect(),
            ..Default::default()
        });
        containers.push(pb::Container {
            id: id.clone(),
            pod_sandbox_id: sandbox_id,
            metadata: Some(pb::ContainerMetadata {
                name: format!("app-{i}"),
                attempt: 0,
            }),
            image: Some(pb::ImageSpec {
                image: "example/app:1".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    (sandboxes, containers)
}

/// Serves the listing of `container_ids` on `socket` until `stop`; returns the call counter.
pub fn serve(
    socket: &Path,
    container_ids: &[String],
    stop: CancellationToken,
) -> std::io::Result<Arc<AtomicU64>> {
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)?;
    let calls = Arc::new(AtomicU64::new(0));
    let (sandboxes, containers) = listing(container_ids);
    let svc = Runtime {
        sandboxes,
        containers,
        calls: calls.clone(),
    };
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(pb::runtime_service_server::RuntimeServiceServer::new(svc))
            .serve_with_incoming_shutdown(incoming, stop.cancelled())
            .await;
    });
    Ok(calls)
}
