//! `/metrics` over TLS, optionally with client certificates (`metrics.tls_cert`, `tls_key`,
//! `tls_client_ca`, meaning what the `[api]` keys of the same names mean), set up by the same
//! code as the gRPC listener's TLS ([`crate::api::tls::ServerTls`]: rustls with ring), offering
//! HTTP/1.1.
//!
//! With `tls_client_ca` set, a client without a certificate, or with one that CA did not sign,
//! fails the handshake: it never reaches the HTTP server.

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::api::tls::ServerTls;
pub use crate::api::tls::TlsError;

use super::MetricsConfig;

/// The TLS acceptor `[metrics]` asks for, or `None` for plain HTTP.
pub fn acceptor(config: &MetricsConfig) -> Result<Option<TlsAcceptor>, TlsError> {
    if !config.tls_enabled() {
        return Ok(None);
    }
    let server = ServerTls {
        section: "metrics",
        cert: &config.tls_cert,
        key: &config.tls_key,
        client_ca: &config.tls_client_ca,
        client_auth_optional: false,
    }
    .server_config(b"http/1.1")?;
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_file_is_an_error_naming_the_key_or_the_file() {
        let dir = std::env::temp_dir().join(format!("nodeward-metrics-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not PEM\n").expect("write");
        let config = MetricsConfig {
            tls_cert: empty.clone(),
            tls_key: empty.clone(),
            ..MetricsConfig::default()
        };
        let Err(e) = acceptor(&config) else {
            panic!("a file without a certificate was accepted");
        };
        assert!(e.to_string().starts_with("metrics.tls_cert: "), "{e}");
        let config = MetricsConfig {
            tls_cert: dir.join("missing.pem"),
            tls_key: empty,
            ..MetricsConfig::default()
        };
        let Err(e) = acceptor(&config) else {
            panic!("a missing file was accepted");
        };
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(acceptor(&MetricsConfig::default())
            .expect("plain HTTP")
            .is_none());
    }
}
