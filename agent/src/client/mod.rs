//! The client side of the gRPC API: `nodeward status`, `watch`, `containers`, `gpus` and
//! `drain {start,status,cancel}`, human tables by default and `--json` for scripts; `fleet`
//! asks many agents at once, and `certs` makes the certificates that secure them.
//!
//! Exit codes: 0 on success, 69 (`EX_UNAVAILABLE`) when the agent cannot be reached, 1 when the
//! agent answered with an error, 64 for a bad address or argument.

use std::{path::PathBuf, process::ExitCode};

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::api::pb::{self, node_health_client::NodeHealthClient};

pub mod args;
pub mod certs;
pub mod fleet;
mod json;
mod render;

pub use args::{Conn, ContainersArgs, DrainCommand, WatchArgs};

/// `EX_UNAVAILABLE` from sysexits.h.
pub const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad address {0:?}: expected unix:/path, an absolute socket path, http://host:port or https://host:port")]
    BadAddr(String),
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("the agent answered {code:?}: {message}")]
    Rpc { code: tonic::Code, message: String },
    #[error("cannot print JSON: {0}")]
    Json(#[from] json::JsonError),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        Self::Rpc {
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

impl ClientError {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Self::BadAddr(_) | Self::Usage(_) | Self::ReadFile { .. } => crate::EXIT_USAGE,
            Self::Connect { .. } => EXIT_UNAVAILABLE,
            Self::Rpc {
                code: tonic::Code::Unavailable,
                ..
            } => EXIT_UNAVAILABLE,
            Self::Rpc { .. } | Self::Json(_) => 1,
        })
    }
}

/// An error with its causes ("transport error: No such file or directory"), since tonic's own
/// message alone says little.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = c.source();
    }
    out
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::ReadFile {
        path: path.clone(),
        source,
    })
}

/// Connects to the agent. `default_socket` is used when `--addr` is not given.
pub async fn connect(
    conn: &Conn,
    default_socket: &std::path::Path,
) -> Result<NodeHealthClient<Channel>, ClientError> {
    Ok(NodeHealthClient::new(channel(conn, default_socket).await?))
}

/// A channel to the agent, for any of its services (NodeHealth, grpc.health.v1, reflection).
pub async fn channel(
    conn: &Conn,
    default_socket: &std::path::Path,
) -> Result<Channel, ClientError> {
    let addr = conn
        .addr
        .clone()
        .unwrap_or_else(|| format!("unix:{}", default_socket.display()));
    let socket = addr
        .strip_prefix("unix://")
        .or_else(|| addr.strip_prefix("unix:"))
        .map(str::to_owned)
        .or_else(|| addr.starts_with('/').then(|| addr.clone()));
    let channel = if let Some(path) = socket {
        // The URI is required by tonic but unused: the connector below dials the socket.
        let endpoint = Endpoint::try_from("http://localhost")
            .map_err(|_| ClientError::BadAddr(addr.clone()))?
            .connect_timeout(conn.connect_timeout);
        endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                detail: chain(&source),
            })?
    } else if addr.starts_with("http://") || addr.starts_with("https://") {
        let mut endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|_| ClientError::BadAddr(addr.clone()))?
            .connect_timeout(conn.connect_timeout);
        if addr.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &conn.tls_ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&conn.tls_cert, &conn.tls_key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(domain) = &conn.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|source| ClientError::Connect {
                    addr: addr.clone(),
                    detail: chain(&source),
                })?;
        } else if conn.tls_ca.is_some() || conn.tls_cert.is_some() {
            return Err(ClientError::Usage(
                "--tls-* options need an https:// address".to_owned(),
            ));
        }
        endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                detail: chain(&source),
            })?
    } else {
        return Err(ClientError::BadAddr(addr));
    };
    Ok(channel)
}

pub(crate) fn default_requester() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    format!("nodeward-cli/{user}")
}

/// Prints a reply in protobuf's JSON mapping, as grpcurl does (see `json`).
fn print_json<M: json::Reply>(reply: &M) -> Result<(), ClientError> {
    Ok(json::Printer::new()?.print(reply)?)
}

pub async fn status(conn: &Conn, socket: &std::path::Path) -> Result<(), ClientError> {
    let reply = connect(conn, socket)
        .await?
        .get_node_health(pb::GetNodeHealthRequest {})
        .await?
        .into_inner();
    if conn.json {
        return print_json(&reply);
    }
    print!("{}", render::health(&reply));
    Ok(())
}

pub async fn watch(args: &WatchArgs, socket: &std::path::Path) -> Result<(), ClientError> {
    let mut client = connect(&args.conn, socket).await?;
    let mut stream = client
        .watch_node_health(pb::WatchNodeHealthRequest {
            heartbeat_seconds: args.heartbeat,
        })
        .await?
        .into_inner();
    let printer = if args.conn.json {
        Some(json::Printer::new()?)
    } else {
        None
    };
    let mut n = 0u64;
    while let Some(msg) = stream.message().await? {
        if let Some(printer) = &printer {
            println!("{}", printer.line(&msg)?);
        } else {
            println!("{}", render::watch_line(&msg));
        }
        n += 1;
        if args.count != 0 && n >= args.count {
            break;
        }
    }
    Ok(())
}

pub async fn containers(
    args: &ContainersArgs,
    socket: &std::path::Path,
) -> Result<(), ClientError> {
    // `-l` takes what `kubectl -l` takes; several are joined (all must hold).
    let req = pb::ListContainersRequest {
        pod_name: args.pod.clone().unwrap_or_default(),
        pod_namespace: args.namespace.clone().unwrap_or_default(),
        selector: args.labels.join(","),
        ..Default::default()
    };
    let reply = connect(&args.conn, socket)
        .await?
        .list_containers(req)
        .await?
        .into_inner();
    if args.conn.json {
        return print_json(&reply);
    }
    print!("{}", render::containers(&reply));
    Ok(())
}

pub async fn gpus(conn: &Conn, socket: &std::path::Path) -> Result<(), ClientError> {
    let reply = connect(conn, socket)
        .await?
        .list_gpus(pb::ListGpusRequest {})
        .await?
        .into_inner();
    if conn.json {
        return print_json(&reply);
    }
    print!("{}", render::gpus(&reply));
    Ok(())
}

pub async fn drain(cmd: &DrainCommand, socket: &std::path::Path) -> Result<(), ClientError> {
    match cmd {
        DrainCommand::Start {
            conn,
            requested_by,
            reason,
            deadline,
        } => {
            let deadline_seconds = match deadline {
                None => 0,
                Some(d) if d.as_secs() == 0 => {
                    return Err(ClientError::Usage(
                        "--deadline must be at least 1s".to_owned(),
                    ))
                }
                Some(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            };
            let req = pb::BeginDrainRequest {
                requested_by: requested_by.clone().unwrap_or_else(default_requester),
                reason: reason.clone(),
                deadline_seconds,
            };
            let reply = connect(conn, socket)
                .await?
                .begin_drain(req)
                .await?
                .into_inner();
            if conn.json {
                return print_json(&reply);
            }
            let already = if reply.already_draining {
                " (joined the drain already in progress)"
            } else {
                ""
            };
            println!("draining{already}");
            print!("{}", render::drain_info(reply.drain.as_ref()));
        }
        DrainCommand::Status { conn } => {
            let reply = connect(conn, socket)
                .await?
                .get_drain_status(pb::GetDrainStatusRequest {})
                .await?
                .into_inner();
            if conn.json {
                return print_json(&reply);
            }
            print!("{}", render::drain_status(&reply));
        }
        DrainCommand::Cancel {
            conn,
            requested_by,
            reason,
        } => {
            let req = pb::CancelDrainRequest {
                requested_by: requested_by.clone().unwrap_or_else(default_requester),
                reason: reason.clone(),
            };
            let reply = connect(conn, socket)
                .await?
                .cancel_drain(req)
                .await?
                .into_inner();
            if conn.json {
                return print_json(&reply);
            }
            println!(
                "{}",
                if reply.was_draining {
                    "drain cancelled"
                } else {
                    "the node was not draining"
                }
            );
        }
    }
    Ok(())
}
