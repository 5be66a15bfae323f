//! The gRPC API: `nodeward.v1.NodeHealth`, `grpc.health.v1.Health` and server reflection (v1),
//! on a Unix socket and on TCP (TLS optional, required off loopback). Both listeners take
//! every stock gRPC client as it comes: [`h2fix`] mends the `:authority` that grpc-core clients
//! send on a Unix socket, which h2 would refuse. It only translates: the
//! health engine (a task of its own, `health::evaluator`) decides and publishes, the store
//! holds the data, the drain controller (in `health`) holds the drain.
//!
//! The generated code is checked in under `generated/` (see `tests/tests/proto_codegen.rs`, which
//! regenerates it and fails on a difference), so building the agent needs no `protoc`.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::{wrappers::UnixListenerStream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::transport::{server::TcpIncoming, Server};

use crate::{health::evaluator::Health, store::Store};

pub mod authz;
pub mod config;
mod convert;
pub mod h2fix;
pub mod identity;
pub mod requests;
pub mod service;
pub(crate) mod tls;

/// The drain state and the published health, which the API translates.
pub use crate::health::{drain, hub};
pub use config::ApiConfig;

/// The code generated from `proto/nodeward/v1/*.proto`.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unused_qualifications,
    reason = "generated code"
)]
pub mod pb {
    include!("generated/nodeward.v1.rs");
    /// The encoded descriptors of `nodeward.v1`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("generated/nodeward_v1_descriptor.bin");
}

/// How long open calls (Watch streams, health watches) get to finish after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ApiConfigError),
    #[error("cannot create the socket directory {path}: {source}")]
    SocketDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket {0} is in use by a running process (another nodeward?)")]
    SocketInUse(PathBuf),
    #[error("cannot listen on {what}: {source}")]
    Bind {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("server reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server on {what} failed: {source}")]
    Serve {
        what: String,
        source: tonic::transport::Error,
    },
}

/// The API with its listeners bound, ready to serve.
#[derive(Debug)]
pub struct BoundApi {
    service: service::Service,
    limits: config::ApiLimits,
    unix: Option<(UnixListener, PathBuf)>,
    tcp: Option<(TcpListener, SocketAddr, Option<tls::Acceptor>)>,
    cancel: CancellationToken,
}

/// The environment variable the DaemonSet sets to the Kubernetes node's name (downward API):
/// inside a pod the hostname is the pod's, not the node's.
pub const NODE_NAME_ENV: &str = "NODE_NAME";

/// The node's name: the gRPC replies' and the Node object the Kubernetes publisher patches.
pub fn node_name(configured: &str) -> String {
    pick_node_name(configured, std::env::var(NODE_NAME_ENV).ok(), || {
        std::fs::read_to_string("/proc/sys/kernel/hostname").ok()
    })
}

/// `api.node_name`, else `NODE_NAME`, else the kernel's hostname, else `unknown`.
fn pick_node_name(
    configured: &str,
    env: Option<String>,
    hostname: impl FnOnce() -> Option<String>,
) -> String {
    [Some(configured.to_owned()), env]
        .into_iter()
        .flatten()
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty())
        .or_else(|| {
            hostname()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

async fn bind_tcp(
    api: &ApiConfig,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr, Option<tls::Acceptor>), ApiError> {
    let tls = if api.tls_enabled() {
        Some(tls::acceptor(api)?)
    } else {
        None
    };
    let what = || format!("tcp:{addr}");
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| ApiError::Bind {
            what: what(),
            source,
        })?;
    let local = l.local_addr().map_err(|source| ApiError::Bind {
        what: what(),
        source,
    })?;
    Ok((l, local, tls))
}

fn bind_unix(
    path: &std::path::Path,
    mode: u32,
    gid: Option<u32>,
) -> Result<UnixListener, ApiError> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ApiError::SocketDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    if path.exists() {
        // A socket left by a crashed agent is removed; one that still answers belongs to a
        // running agent and is left alone.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ApiError::SocketInUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let what = || format!("unix:{}", path.display());
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        what: what(),
        source,
    })?;
    if gid.is_some() {
        std::os::unix::fs::chown(path, None, gid).map_err(|source| ApiError::Bind {
            what: what(),
            source,
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        ApiError::Bind {
            what: what(),
            source,
        }
    })?;
    Ok(listener)
}

/// A server builder with the configured limits: tonic's own builder sets none (it even lifts
/// hyper's default of 200 concurrent streams per connection).
fn limited(limits: &config::ApiLimits) -> Server {
    let interval = limits.http2_keepalive_interval;
    let builder = Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams_per_connection)
        .timeout(limits.request_timeout)
        .http2_keepalive_interval((!interval.is_zero()).then_some(interval))
        .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout));
    // tonic sends a GOAWAY at this age and lets open calls finish. No
    // `max_connection_age_grace`: tonic 0.14 then skips the GOAWAY and only closes the
    // connection hard at age + grace.
    if limits.max_connection_age.is_zero() {
        builder
    } else {
        builder.max_connection_age(limits.max_connection_age)
    }
}

impl BoundApi {
    /// Validates the config and binds the listeners (so that errors show before serving).
    pub async fn bind(
        api: &ApiConfig,
        health: &Health,
        store: Arc<Store>,
        cancel: CancellationToken,
    ) -> Result<Self, ApiError> {
        // A child: the API stops with the daemon, and stopping the API's own parts (Watch
        // streams) never cancels the daemon's other tasks.
        let cancel = cancel.child_token();
        api.validate()?;
        // A listener that cannot start is logged and left out; the agent keeps collecting and
        // serves on the other one (as with sources that cannot run on this node).
        let unix = if api.unix_socket.as_os_str().is_empty() {
            None
        } else {
            match bind_unix(&api.unix_socket, api.socket_mode()?, api.socket_gid()?) {
                Ok(l) => Some((l, api.unix_socket.clone())),
                Err(e) => {
                    tracing::error!(error = %e, "gRPC Unix socket listener not started");
                    None
                }
            }
        };
        let tcp = match api.tcp_addr()? {
            None => None,
            Some(addr) => match bind_tcp(api, addr).await {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!(error = %e, "gRPC TCP listener not started");
                    None
                }
            },
        };
        let service = service::Service::new(service::ServiceParts {
            node: node_name(&api.node_name),
            store,
            health: health.subscribe(),
            drain: health.drain.clone(),
            clock: health.clock.clone(),
            heartbeat: api.watch_heartbeat,
            default_deadline: api.drain_default_deadline,
            drain_policy: api.drain_policy()?,
            max_watch_streams: api.limits.max_watch_streams,
            cancel: cancel.clone(),
        });
        Ok(Self {
            service,
            limits: api.limits.clone(),
            unix,
            tcp,
            cancel,
        })
    }

    /// The bound TCP address (useful with port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().map(|(_, a, _)| *a)
    }

    /// Serves until the token is cancelled, then removes the socket file.
    pub async fn serve(self) -> Result<(), ApiError> {
        let Self {
            service,
            limits,
            unix,
            tcp,
            cancel,
        } = self;
        let no_listener = unix.is_none() && tcp.is_none();
        if no_listener {
            tracing::error!("no gRPC listener could start; the API is not served");
        }
        let (reporter, health_service) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<pb::node_health_server::NodeHealthServer<service::Service>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        // v1alpha too: grpcio-reflection's Python client and older grpcurl speak only v1alpha.
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let node_health = pb::node_health_server::NodeHealthServer::new(service);
        let routes = |builder: Server| {
            let mut builder = builder;
            builder
                .add_service(health_service.clone())
                .add_service(reflection.clone())
                .add_service(reflection_alpha.clone())
                .add_service(node_health.clone())
        };
        // Graceful shutdown waits for open calls; a client holding a stream open gets
        // SHUTDOWN_GRACE, then the server is dropped.
        let stop = || {
            let cancel = cancel.clone();
            async move {
                cancel.cancelled().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            }
        };

        let unix_path = unix.as_ref().map(|(_, p)| p.clone());
        let unix_task = async {
            let Some((listener, path)) = unix else {
                return Ok(());
            };
            let what = format!("unix:{}", path.display());
            tracing::info!(listen = %what, "gRPC API listening");
            let incoming = UnixListenerStream::new(listener).map(|c| c.map(h2fix::H2Fix::new));
            let serve =
                routes(limited(&limits)).serve_with_incoming_shutdown(incoming, cancel.cancelled());
            tokio::select! {
                r = serve => r.map_err(|source| ApiError::Serve { what, source }),
                _ = stop() => Ok(()),
            }
        };
        let tcp_task = async {
            let Some((listener, addr, tls)) = tcp else {
                return Ok(());
            };
            let what = format!("tcp:{addr}{}", if tls.is_some() { " (TLS)" } else { "" });
            tracing::info!(listen = %what, "gRPC API listening");
            // The TLS handshake is ours, not tonic's, so that the authority fix sits inside it.
            let served = if let Some(acceptor) = tls {
                let incoming = tls::incoming(
                    listener,
                    acceptor,
                    limits.tls_handshake_timeout,
                    cancel.clone(),
                );
                let serve = routes(limited(&limits))
                    .serve_with_incoming_shutdown(incoming, cancel.cancelled());
                tokio::select! {
                    r = serve => r,
                    _ = stop() => Ok(()),
                }
            } else {
                let incoming = TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .map(|c| c.map(h2fix::H2Fix::new));
                let serve = routes(limited(&limits))
                    .serve_with_incoming_shutdown(incoming, cancel.cancelled());
                tokio::select! {
                    r = serve => r,
                    _ = stop() => Ok(()),
                }
            };
            served.map_err(|source| ApiError::Serve { what, source })
        };
        // Health watchers (e.g. a load balancer) learn of the shutdown before connections close.
        let announce = async {
            cancel.cancelled().await;
            reporter
                .set_not_serving::<pb::node_health_server::NodeHealthServer<service::Service>>()
                .await;
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        };
        let servers = async {
            let both = tokio::join!(unix_task, tcp_task);
            if no_listener {
                // Nothing to serve, but the task lives as long as the daemon: its end would
                // read as a failure.
                cancel.cancelled().await;
            }
            both
        };
        tokio::pin!(servers);
        let (u, t) = tokio::select! {
            r = &mut servers => r,
            () = announce => servers.await,
        };
        cancel.cancel();
        if let Some(path) = unix_path {
            let _ = std::fs::remove_file(&path);
        }
        u.and(t)
    }
}

#[cfg(test)]
mod node_name_tests {
    use super::pick_node_name;

    #[test]
    fn node_name_prefers_config_then_downward_api_then_hostname() {
        let host = || Some("pod-hostname\n".to_owned());
        assert_eq!(pick_node_name("cfg", Some("node-1".into()), host), "cfg");
        assert_eq!(pick_node_name("", Some("node-1".into()), host), "node-1");
        assert_eq!(pick_node_name("", Some(" ".into()), host), "pod-hostname");
        assert_eq!(pick_node_name("", None, host), "pod-hostname");
        assert_eq!(pick_node_name("", None, || None), "unknown");
    }
}
