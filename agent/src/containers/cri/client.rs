//! One connection to the runtime's CRI socket: `Version`, then `ListPodSandbox` +
//! `ListContainers` on every resync and on every container event.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{
    model::{self, PodIdentity},
    pb::{self, runtime_service_client::RuntimeServiceClient},
    Identities, Settings, Status,
};

/// A call that takes longer is treated as the runtime being unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses larger than this are refused (a node's listing is a few MiB at most).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("{call} failed: {status}")]
    Call {
        call: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("{0} took longer than 10 s")]
    Timeout(&'static str),
}

/// A connected runtime.
pub struct Session {
    client: RuntimeServiceClient<Channel>,
    endpoint: PathBuf,
    runtime: String,
}

/// Runs one call with the timeout, naming it in the error.
async fn call<T>(
    name: &'static str,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CriError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(CriError::Call {
            call: name,
            status: Box::new(status),
        }),
        Err(_) => Err(CriError::Timeout(name)),
    }
}

/// A channel to a gRPC server on a Unix socket (the URI is a placeholder tonic needs).
pub async fn unix_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    Endpoint::from_static("http://runtime.invalid")
        .connect_timeout(CALL_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

impl Session {
    /// Connects and asks the runtime's name and version (which also proves it speaks
    /// `runtime.v1`).
    pub async fn connect(endpoint: &Path) -> Result<Self, CriError> {
        let channel = unix_channel(endpoint)
            .await
            .map_err(|source| CriError::Connect {
                path: endpoint.to_path_buf(),
                source,
            })?;
        let mut client = RuntimeServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        let v = call(
            "Version",
            client.version(pb::VersionRequest {
                version: "v1".to_owned(),
            }),
        )
        .await?;
        Ok(Self {
            client,
            endpoint: endpoint.to_path_buf(),
            runtime: model::clean(
                &format!("{} {}", v.runtime_name, v.runtime_version),
                model::MAX_NAME,
            ),
        })
    }

    /// Sandboxes and containers joined into the identity table.
    pub async fn list(
        &mut self,
        annotations: &[String],
    ) -> Result<HashMap<String, Arc<PodIdentity>>, CriError> {
        // Each listing is reduced to what identity keeps and dropped before the next call:
        // the decoded messages (maps, runtime fields) never sit in memory together.
        let pods = {
            let sandboxes = call(
                "ListPodSandbox",
                self.client
                    .list_pod_sandbox(pb::ListPodSandboxRequest { filter: None }),
            )
            .await?
            .items;
            model::pods(&sandboxes, annotations)
        };
        let containers = call(
            "ListContainers",
            self.client
                .list_containers(pb::ListContainersRequest { filter: None }),
        )
        .await?
        .containers;
        Ok(model::join(&pods, &containers))
    }

    /// Lists now, then on every resync tick and every container event, publishing each
    /// table, until cancelled (`Ok`) or the runtime fails (`Err`).
    pub async fn follow(
        &mut self,
        settings: &Settings,
        tx: &watch::Sender<Arc<Identities>>,
        cancel: &CancellationToken,
        last_good: &mut Option<(Arc<Identities>, SystemTime)>,
    ) -> Result<(), CriError> {
        // The event stream runs beside the listing, in a task of its own: a runtime may send
        // the stream's headers only with its first event, and one without the call (containerd
        // 1.6 answers `Unimplemented`) leaves the resync alone. An event only asks for a listing.
        let (event_tx, mut event_rx) = tokio::sync::mpsc::channel::<()>(1);
        let events_on = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = AbortOnDrop(tokio::spawn(watch_events(
            self.client.clone(),
            event_tx,
            events_on.clone(),
        )));
        let start = tokio::time::Instant::now() + settings.resync;
        let mut resync = tokio::time::interval_at(start, settings.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let table = self.list(&settings.annotations).await?;
            let status = Status::Connected {
                endpoint: self.endpoint.clone(),
                runtime: self.runtime.clone(),
                events: events_on.load(std::sync::atomic::Ordering::Relaxed),
            };
            if tx.borrow().status != status {
                tracing::info!(status = %status.describe(), containers = table.len(), "container identity");
            }
            // The table published is the one kept for an outage: one copy, not two.
            let published = Arc::new(Identities {
                status,
                by_container: table,
            });
            *last_good = Some((published.clone(), SystemTime::now()));
            tx.send_replace(published);
            tokio::select! {
                () = cancel.cancelled() => {
                    drop(watcher);
                    return Ok(());
                }
                _ = resync.tick() => {}
                // `None` once the stream ended: the branch is off, the resync goes on.
                Some(()) = event_rx.recv() => {}
            }
        }
    }
}

/// Aborts the task when dropped (the session ended, by error or cancellation).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows the runtime's container events, asking for a listing on each; ends when the
/// runtime has no event stream or it breaks (the resync carries on alone).
async fn watch_events(
    mut client: RuntimeServiceClient<Channel>,
    tx: tokio::sync::mpsc::Sender<()>,
    on: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut stream = match client.get_container_events(pb::GetEventsRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            tracing::debug!(%status, "no CRI container events; resync only");
            return;
        }
    };
    on.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(Ok(_)) = stream.next().await {
        // A listing already asked for covers this event too.
        let _ = tx.try_send(());
    }
    on.store(false, std::sync::atomic::Ordering::Relaxed);
}
