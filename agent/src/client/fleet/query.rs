//! Asking every agent at once, at most `--parallel` at a time, each within `--timeout`.

use std::{sync::Arc, time::Duration};

use tokio::{sync::Semaphore, task::JoinSet};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::{row::Row, targets::Target, FleetError};
use crate::{
    api::pb::{self, node_health_client::NodeHealthClient},
    client::chain,
};

/// How to reach the agents: plain HTTP/2 without `--ca` (agents on loopback), mutual TLS with.
#[derive(Clone)]
pub struct Dialer {
    tls: Option<ClientTlsConfig>,
    /// `--server-name`: one name every agent's certificate carries (a DaemonSet's shared
    /// certificate) instead of each node's own.
    server_name: Option<String>,
    pub timeout: Duration,
}

impl Dialer {
    pub fn new(
        tls: Option<&super::TlsFiles>,
        server_name: Option<String>,
        timeout: Duration,
    ) -> Result<Self, FleetError> {
        let tls = match tls {
            None => None,
            Some(files) => {
                let mut config =
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&files.ca)?));
                if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
                    config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
                }
                Some(config)
            }
        };
        Ok(Self {
            tls,
            server_name,
            timeout,
        })
    }

    /// The name the agent's certificate must carry: `--server-name`, else the node name the
    /// list gives, else the host it is reached at.
    pub fn server_name(&self, target: &Target) -> String {
        self.server_name
            .clone()
            .or_else(|| target.node.clone())
            .unwrap_or_else(|| target.host.clone())
    }

    /// A connected client, or why not (within the per-node timeout).
    pub async fn connect(&self, target: &Target) -> Result<NodeHealthClient<Channel>, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", target.address()))
            .map_err(|e| chain(&e))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone().domain_name(self.server_name(target)))
                .map_err(|e| chain(&e))?;
        }
        match tokio::time::timeout(self.timeout, endpoint.connect()).await {
            Ok(Ok(channel)) => Ok(NodeHealthClient::new(channel)),
            Ok(Err(e)) => Err(chain(&e)),
            Err(_) => Err(format!(
                "no connection within {}",
                humantime::format_duration(self.timeout)
            )),
        }
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, FleetError> {
    std::fs::read(path).map_err(|source| FleetError::ReadFile {
        path: path.to_path_buf(),
        source,
    })
}

/// A failed call's words: the status message, or for a transport failure (a refused
/// certificate, a reset) its causes.
fn call_error(status: &tonic::Status) -> String {
    use std::error::Error as _;
    match status.source() {
        Some(source) => {
            let causes = chain(source);
            if causes.starts_with(status.message()) {
                causes
            } else {
                format!("{}: {causes}", status.message())
            }
        }
        None if status.message().is_empty() => format!("{:?}", status.code()),
        None => format!("{:?}: {}", status.code(), status.message()),
    }
}

/// One agent's row: its health, drain state and containers, or `UNREACHABLE` with the error.
pub async fn ask(dialer: &Dialer, target: &Target) -> Row {
    let answer = tokio::time::timeout(dialer.timeout, async {
        let mut client = dialer.connect(target).await?;
        let health = client
            .get_node_health(pb::GetNodeHealthRequest {})
            .await
            .map_err(|s| call_error(&s))?
            .into_inner();
        let drain = client
            .get_drain_status(pb::GetDrainStatusRequest {})
            .await
            .map_err(|s| call_error(&s))?
            .into_inner();
        let containers = client
            .list_containers(pb::ListContainersRequest::default())
            .await
            .map_err(|s| call_error(&s))?
            .into_inner();
        Ok::<_, String>((health, drain, containers))
    })
    .await;
    match answer {
        Ok(Ok((health, drain, containers))) => Row::answered(target, &health, &drain, &containers),
        Ok(Err(e)) => Row::unreachable(target, e),
        Err(_) => Row::unreachable(
            target,
            format!(
                "no answer within {}",
                humantime::format_duration(dialer.timeout)
            ),
        ),
    }
}

/// Runs `f` for every target, at most `parallel` at once; the results in the targets' order.
pub async fn for_each<T, F, Fut>(targets: &[Target], parallel: usize, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(Target) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(parallel.max(1)));
    let mut set = JoinSet::new();
    for (i, t) in targets.iter().enumerate() {
        let permits = permits.clone();
        let job = f(t.clone());
        set.spawn(async move {
            // The semaphore is never closed, so acquiring only waits.
            let _permit = permits.acquire_owned().await;
            (i, job.await)
        });
    }
    let mut out: Vec<Option<T>> = (0..targets.len()).map(|_| None).collect();
    while let Some(done) = set.join_next().await {
        match done {
            Ok((i, v)) => out[i] = Some(v),
            // A job that panicked is a bug in this client: surface it, do not hide a row.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    out.into_iter().flatten().collect()
}

/// Every target's row, at most `parallel` asked at once.
pub async fn ask_all(dialer: &Dialer, targets: &[Target], parallel: usize) -> Vec<Row> {
    let dialer = Arc::new(dialer.clone());
    for_each(targets, parallel, |t| {
        let dialer = dialer.clone();
        async move { ask(&dialer, &t).await }
    })
    .await
}
