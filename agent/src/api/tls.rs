//! TLS on the gRPC TCP listener. The handshake is done here rather than by tonic so that the
//! `:authority` fix ([`super::h2fix`]) can sit between the decrypted stream and the HTTP/2
//! server: tonic wraps the connections it is given in its own TLS, outside any adapter. The
//! set-up is tonic's own (the same rustls, ring, ALPN `h2`, the client CA with optional
//! authentication, a handshake timeout, handshakes run concurrently), and the connections keep
//! tonic's connection info, so `Request::peer_certs` still names the client's certificate.

use std::{sync::Arc, time::Duration};

use tokio::{
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

use super::{h2fix::H2Fix, read_tls, ApiConfig, ApiError};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("api.{key}: no usable PEM {what}: {source}")]
    Pem {
        key: &'static str,
        what: &'static str,
        source: rustls::pki_types::pem::Error,
    },
    #[error("api.{0}: the file holds no PEM certificate")]
    NoCertificate(&'static str),
    #[error("api.tls_client_ca: {0}")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

fn certificates(key: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            key,
            what: "certificate",
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(key));
    }
    Ok(certs)
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
pub fn acceptor(api: &ApiConfig) -> Result<Acceptor, ApiError> {
    let chain = certificates("tls_cert", &read_tls(&api.tls_cert)?)?;
    let key = PrivateKeyDer::from_pem_slice(&read_tls(&api.tls_key)?).map_err(|source| {
        TlsError::Pem {
            key: "tls_key",
            what: "private key",
            source,
        }
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::from)?;
    let builder = if api.tls_client_ca.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for ca in certificates("tls_client_ca", &read_tls(&api.tls_client_ca)?)? {
            roots.add(ca).map_err(TlsError::from)?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let verifier = if api.tls_client_auth_optional {
            verifier.allow_unauthenticated()
        } else {
            verifier
        };
        builder.with_client_cert_verifier(verifier.build().map_err(TlsError::from)?)
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(TlsError::from)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Acceptor(TlsAcceptor::from(Arc::new(config))))
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
                            tokio::time::timeout(timeout, acceptor.accept(tcp)).await
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
