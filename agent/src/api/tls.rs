//! TLS on the gRPC TCP listener. The handshake is done here rather than by tonic so that the
//! `:authority` fix ([`super::h2fix`]) can sit between the decrypted stream and the HTTP/2
//! server: tonic wraps the connections it is given in its own TLS, outside any adapter. The
//! set-up is tonic's own (the same rustls, ring, ALPN `h2`, the client CA with optional
//! authentication, a handshake timeout, handshakes run concurrently), and the connections keep
//! tonic's connection info, so `Request::peer_certs` still names the client's certificate.

use std::{path::Path, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinSet,
};
use tokio_rustls::{
    rustls::{
        self,
        pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
        server::WebPkiClientVerifier,
        RootCertStore, ServerConfig,
    },
    server::TlsStream,
    TlsAcceptor,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::{h2fix::H2Fix, ApiConfig};

/// A TLS server's files and options: the keys of the same names in `[api]` and `[metrics]`.
#[derive(Debug, Clone, Copy)]
pub struct ServerTls<'a> {
    /// The config section the keys are in (`api`, `metrics`), for the error messages.
    pub section: &'static str,
    pub cert: &'a Path,
    pub key: &'a Path,
    /// Empty: no client certificates asked for.
    pub client_ca: &'a Path,
    /// Clients without a certificate are let in (those with one must present a valid one).
    pub client_auth_optional: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{section}.{key}: cannot read {path}: {source}")]
    Read {
        section: &'static str,
        key: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{section}.{key}: no usable PEM {what} in {path}: {source}")]
    Pem {
        section: &'static str,
        key: &'static str,
        what: &'static str,
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{section}.{key}: {path} holds no PEM certificate")]
    NoCertificate {
        section: &'static str,
        key: &'static str,
        path: String,
    },
    #[error("{section}.tls_client_ca: {source}")]
    ClientCa {
        section: &'static str,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("{section} TLS set-up failed: {source}")]
    Rustls {
        section: &'static str,
        source: rustls::Error,
    },
}

impl ServerTls<'_> {
    /// The PEM file that `key` names, read.
    fn read(&self, key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
        std::fs::read(path).map_err(|source| TlsError::Read {
            section: self.section,
            key,
            path: path.display().to_string(),
            source,
        })
    }

    /// Every certificate in the PEM file that `key` names (at least one).
    fn certificates(
        &self,
        key: &'static str,
        path: &Path,
    ) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let shown = || path.display().to_string();
        let certs = CertificateDer::pem_slice_iter(&self.read(key, path)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Pem {
                section: self.section,
                key,
                what: "certificate",
                path: shown(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate {
                section: self.section,
                key,
                path: shown(),
            });
        }
        Ok(certs)
    }

    /// The rustls server configuration (ring, safe protocol versions, the client CA when one
    /// is named), offering `alpn`.
    pub fn server_config(&self, alpn: &[u8]) -> Result<ServerConfig, TlsError> {
        let section = self.section;
        let rustls_error = |source| TlsError::Rustls { section, source };
        let chain = self.certificates("tls_cert", self.cert)?;
        let key =
            PrivateKeyDer::from_pem_slice(&self.read("tls_key", self.key)?).map_err(|source| {
                TlsError::Pem {
                    section,
                    key: "tls_key",
                    what: "private key",
                    path: self.key.display().to_string(),
                    source,
                }
            })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(rustls_error)?;
        let builder = if self.client_ca.as_os_str().is_empty() {
            builder.with_no_client_auth()
        } else {
            let mut roots = RootCertStore::empty();
            for ca in self.certificates("tls_client_ca", self.client_ca)? {
                roots.add(ca).map_err(rustls_error)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if self.client_auth_optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|source| TlsError::ClientCa { section, source })?;
            builder.with_client_cert_verifier(verifier)
        };
        let mut config = builder.with_single_cert(chain, key).map_err(rustls_error)?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }
}

/// The server side of TLS as `[api]` configures it.
#[derive(Clone)]
pub struct Acceptor(TlsAcceptor);

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor")
    }
}

/// The acceptor `[api]`'s TLS keys ask for (the caller checked that TLS is on).
pub fn acceptor(api: &ApiConfig) -> Result<Acceptor, TlsError> {
    let config = ServerTls {
        section: "api",
        cert: &api.tls_cert,
        key: &api.tls_key,
        client_ca: &api.tls_client_ca,
        client_auth_optional: api.tls_client_auth_optional,
    }
    .server_config(b"h2")?;
    Ok(Acceptor(TlsAcceptor::from(Arc::new(config))))
}

/// How long a connection whose handshake failed is kept half-open so that its client reads the
/// alert that says why (see [`handshake`]).
const LINGER: Duration = Duration::from_secs(1);
/// The most a refused client may still send while its connection lingers.
const LINGER_BYTES: usize = 256 * 1024;

/// Runs the server side of a TLS handshake on `tcp`. Where it fails (a client certificate
/// refused, none sent), rustls has written the alert that says why, but under TLS 1.3 the
/// client has already finished its side and sent its first request: closing the socket with
/// that request unread makes the kernel answer with a reset, which can reach the client before
/// it reads the alert, so the client sees "broken pipe" or "connection reset" instead of
/// "certificate required". The connection is therefore closed gently: our side shut for
/// writing (the alert, then FIN), what the client still sends read and dropped until it closes
/// or [`LINGER`] passes.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
) -> std::io::Result<TlsStream<TcpStream>> {
    match acceptor.accept(tcp).into_fallible().await {
        Ok(tls) => Ok(tls),
        Err((e, tcp)) => {
            linger(tcp).await;
            Err(e)
        }
    }
}

async fn linger(mut tcp: TcpStream) {
    if tcp.shutdown().await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    let mut read = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while read < LINGER_BYTES {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

/// A finished handshake, as the gRPC server takes it.
pub type Conn = H2Fix<TlsStream<TcpStream>>;

/// Accepts on `listener` and runs each handshake (bounded by `timeout`) beside the others; the
/// connections whose handshake succeeds come out of the stream. Stops when `cancel` fires or
/// the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    Acceptor(acceptor): Acceptor,
    timeout: Duration,
    cancel: CancellationToken,
) -> ReceiverStream<Result<Conn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut handshakes = JoinSet::new();
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tx.closed() => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => {
                        let _ = tcp.set_nodelay(true);
                        let acceptor = acceptor.clone();
                        handshakes.spawn(async move {
                            tokio::time::timeout(timeout, handshake(&acceptor, tcp)).await
                        });
                    }
                    Err(e) => {
                        // Out of descriptors, or a connection reset before it was accepted:
                        // wait a little rather than spin, and go on.
                        tracing::debug!(error = %e, "gRPC TLS accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(done) = handshakes.join_next(), if !handshakes.is_empty() => match done {
                    Ok(Ok(Ok(tls))) => {
                        if tx.send(Ok(H2Fix::new(tls))).await.is_err() {
                            break;
                        }
                    }
                    Ok(Ok(Err(e))) => tracing::debug!(error = %e, "gRPC TLS handshake failed"),
                    Ok(Err(_)) => tracing::debug!("gRPC TLS handshake timed out"),
                    Err(e) => tracing::debug!(error = %e, "gRPC TLS handshake task failed"),
                },
            }
        }
    });
    ReceiverStream::new(rx)
}
