//! The few Kubernetes API calls the agent makes, over HTTP/1.1 (HTTPS with the cluster's CA, or
//! plain HTTP to a local server), with a bearer token read afresh for every request (projected
//! service-account tokens rotate).
//!
//! A client made from a kubeconfig (`nodeward fleet`) adds what a kubeconfig carries beyond that
//! ([`Credentials`]): inline CA data, a client certificate, a fixed token, a server URL with a
//! path prefix, or no verification of the server's certificate at all.
//!
//! A connection per request: the agent calls the API a few times per heartbeat, so a kept-alive
//! connection would save nothing worth its reconnect logic.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::{
    rustls::{
        self,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::CryptoProvider,
        pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
        ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    },
    TlsConnector,
};

/// Where the API server is and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `https://host:port` or `http://host:port`.
    pub server: String,
    /// A file holding the bearer token; `None`: no `Authorization` header.
    pub token_file: Option<PathBuf>,
    /// The CA bundle that signs the server's certificate (HTTPS only).
    pub ca_file: Option<PathBuf>,
}

/// What a kubeconfig can carry beyond [`Target`]. The default adds nothing.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// PEM CA certificates (`certificate-authority-data`), trusted besides `Target::ca_file`.
    pub ca_pem: Option<Vec<u8>>,
    /// A PEM client certificate chain and its PEM key, presented to the server.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// A fixed bearer token (a kubeconfig's `token`); `Target::token_file` wins when both are set.
    pub token: Option<String>,
    /// The name the server's certificate must carry (`tls-server-name`) instead of the host.
    pub server_name: Option<String>,
    /// Accept any server certificate (`insecure-skip-tls-verify`). Signatures are still
    /// checked, so the handshake is genuine, but nothing says who the server is.
    pub insecure: bool,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token or the key.
        f.debug_struct("Credentials")
            .field("ca_pem", &self.ca_pem.is_some())
            .field("identity", &self.identity.is_some())
            .field("token", &self.token.is_some())
            .field("server_name", &self.server_name)
            .field("insecure", &self.insecure)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("kubernetes.server {0:?}: expected http://HOST:PORT or https://HOST:PORT")]
    Url(String),
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: no usable PEM certificate: {1}")]
    Pem(PathBuf, String),
    #[error("{0}: {1}")]
    PemData(&'static str, String),
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
    #[error("connecting to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("HTTP exchange with {0}: {1}")]
    Http(String, hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("no answer from {0} within {1:?}")]
    Timeout(String, Duration),
    #[error("{method} {path}: {status}: {message}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        message: String,
        /// `Retry-After` of a 429 or 503, in seconds.
        retry_after: Option<u64>,
    },
}

impl ClientError {
    /// The server's own wait, when it asked for one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => retry_after.map(Duration::from_secs),
            _ => None,
        }
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The patch types the API server takes; the agent sends strategic merge patches, which merge
/// lists by their merge key (`status.conditions` by `type`).
pub const STRATEGIC_MERGE: &str = "application/strategic-merge-patch+json";

/// A client of one API server.
#[derive(Clone)]
pub struct Client {
    target: Target,
    host: String,
    port: u16,
    /// The server URL's path (`https://host/k8s/clusters/c-1`: `/k8s/clusters/c-1`), put before
    /// every request's path; empty for most servers.
    prefix: String,
    token: Option<String>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(target: Target, timeout: Duration) -> Result<Self, ClientError> {
        Self::with_credentials(target, Credentials::default(), timeout)
    }

    /// A client with what a kubeconfig adds to `target`.
    pub fn with_credentials(
        target: Target,
        creds: Credentials,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let bad = || ClientError::Url(target.server.clone());
        let (https, rest) = match target.server.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            _ => return Err(bad()),
        };
        let (authority, prefix) = match rest.split_once('/') {
            Some((a, p)) => (a, format!("/{}", p.trim_end_matches('/'))),
            None => (rest, String::new()),
        };
        let prefix = if prefix == "/" { String::new() } else { prefix };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| bad())?)
            }
            _ => (authority, if https { 443 } else { 80 }),
        };
        if host.is_empty() || host.contains('/') || host.starts_with(':') {
            return Err(bad());
        }
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = if https {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?;
            let builder = if creds.insecure {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
            } else {
                builder.with_root_certificates(roots(&target, &creds)?)
            };
            let config = match &creds.identity {
                Some((cert, key)) => {
                    let chain = CertificateDer::pem_slice_iter(cert)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| ClientError::PemData("client certificate", e.to_string()))?;
                    if chain.is_empty() {
                        return Err(ClientError::PemData(
                            "client certificate",
                            "no certificate in it".to_owned(),
                        ));
                    }
                    let key = PrivateKeyDer::from_pem_slice(key)
                        .map_err(|e| ClientError::PemData("client key", e.to_string()))?;
                    builder.with_client_auth_cert(chain, key)?
                }
                None => builder.with_no_client_auth(),
            };
            let name = creds.server_name.clone().unwrap_or_else(|| host.clone());
            let name = ServerName::try_from(name).map_err(|_| bad())?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Self {
            target,
            host,
            port,
            prefix,
            token: creds.token,
            tls,
            timeout,
        })
    }

    /// `GET path`, the JSON answer.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, path, None, Value::Null).await
    }

    /// `PATCH path` with a strategic merge patch.
    pub async fn patch(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call(Method::PATCH, path, Some(STRATEGIC_MERGE), body.clone())
            .await
    }

    /// `POST path` with a JSON object.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call(Method::POST, path, Some("application/json"), body.clone())
            .await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Value,
    ) -> Result<Value, ClientError> {
        match tokio::time::timeout(
            self.timeout,
            self.exchange(&method, path, content_type, body),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout(
                self.target.server.clone(),
                self.timeout,
            )),
        }
    }

    async fn exchange(
        &self,
        method: &Method,
        path: &str,
        content_type: Option<&str>,
        body: Value,
    ) -> Result<Value, ClientError> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.prefix))
            .header(header::HOST, format!("{}:{}", self.host, self.port))
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("nodeward/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        if let Some(file) = &self.target.token_file {
            let token = tokio::fs::read_to_string(file)
                .await
                .map_err(|e| ClientError::Read(file.clone(), e))?;
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", token.trim()));
        } else if let Some(token) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let payload = if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        };
        let req = req.body(Full::new(payload))?;
        let server = || self.target.server.clone();
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| ClientError::Connect(server(), e))?;
        let response = match &self.tls {
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| ClientError::Connect(server(), e))?;
                send(TokioIo::new(tls), req).await
            }
            None => send(TokioIo::new(tcp), req).await,
        }
        .map_err(|e| ClientError::Http(server(), e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(server(), e))?
            .to_bytes();
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            Ok(answer)
        } else {
            let message = answer.get("message").and_then(Value::as_str).map_or_else(
                || String::from_utf8_lossy(&bytes).into_owned(),
                str::to_owned,
            );
            Err(ClientError::Status {
                method: method.clone(),
                path: path.to_owned(),
                status,
                message,
                retry_after,
            })
        }
    }
}

/// The CA certificates that sign the server's: the file's and the inline ones.
fn roots(target: &Target, creds: &Credentials) -> Result<RootCertStore, ClientError> {
    let mut roots = RootCertStore::empty();
    if let Some(ca) = &target.ca_file {
        let pem = std::fs::read(ca).map_err(|e| ClientError::Read(ca.clone(), e))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::Pem(ca.clone(), e.to_string()))?;
        if certs.is_empty() {
            return Err(ClientError::Pem(ca.clone(), "none in the file".to_owned()));
        }
        for c in certs {
            roots.add(c)?;
        }
    }
    if let Some(pem) = &creds.ca_pem {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::PemData("certificate authority data", e.to_string()))?;
        if certs.is_empty() {
            return Err(ClientError::PemData(
                "certificate authority data",
                "no certificate in it".to_owned(),
            ));
        }
        for c in certs {
            roots.add(c)?;
        }
    }
    Ok(roots)
}

/// `insecure-skip-tls-verify`: any certificate is taken for the server's, but the handshake's
/// signatures are checked with it as usual.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn send<T>(
    io: TokioIo<T>,
    req: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(conn);
    let response = sender.send_request(req).await;
    // The body is read after this returns; the connection task ends once it is.
    drop(driver);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(server: &str) -> Target {
        Target {
            server: server.to_owned(),
            token_file: None,
            ca_file: None,
        }
    }

    #[test]
    fn servers_are_read_with_their_scheme_and_port() {
        let c =
            Client::new(target("http://127.0.0.1:8080"), Duration::from_secs(1)).expect("http URL");
        assert_eq!(
            (c.host.as_str(), c.port, c.tls.is_some()),
            ("127.0.0.1", 8080, false)
        );
        let c = Client::new(target("https://10.0.0.1"), Duration::from_secs(1)).expect("https");
        assert_eq!(
            (c.host.as_str(), c.port, c.tls.is_some()),
            ("10.0.0.1", 443, true)
        );
        let c =
            Client::new(target("https://[fd00::1]:6443/"), Duration::from_secs(1)).expect("IPv6");
        assert_eq!((c.host.as_str(), c.port), ("fd00::1", 6443));
        let c = Client::new(
            target("https://rancher.example/k8s/clusters/c-1/"),
            Duration::from_secs(1),
        )
        .expect("a path prefix");
        assert_eq!(
            (c.host.as_str(), c.port, c.prefix.as_str()),
            ("rancher.example", 443, "/k8s/clusters/c-1")
        );
        for bad in [
            "10.0.0.1:443",
            "ftp://x",
            "http://",
            "http://h:notaport",
            "http:///x",
        ] {
            assert!(
                Client::new(target(bad), Duration::from_secs(1)).is_err(),
                "{bad} was accepted"
            );
        }
    }
}
