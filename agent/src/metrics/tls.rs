//! `/metrics` over TLS, optionally with client certificates (`metrics.tls_cert`, `tls_key`,
//! `tls_client_ca`, meaning what the `[api]` keys of the same names mean). The files are read
//! with the API's reader ([`crate::api::read_tls`]); the gRPC server hands its PEM to tonic,
//! which keeps its rustls set-up private, so the scrape server builds its own rustls config,
//! with the same provider (ring) and the same rustls that tonic compiles in.
//!
//! With `tls_client_ca` set, a client without a certificate, or with one that CA did not sign,
//! fails the handshake: it never reaches the HTTP server.

use std::{path::Path, sync::Arc};

use tokio_rustls::{
    rustls::{
        self,
        pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
        server::WebPkiClientVerifier,
        RootCertStore, ServerConfig,
    },
    TlsAcceptor,
};

use super::MetricsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read; the error names it.
    #[error("metrics TLS: {0}")]
    Read(#[from] crate::api::ApiError),
    #[error("metrics.{key}: no usable PEM {what} in {path}: {source}")]
    Pem {
        key: &'static str,
        what: &'static str,
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("metrics.{key}: {path} holds no PEM {what}")]
    Empty {
        key: &'static str,
        what: &'static str,
        path: String,
    },
    #[error("metrics.tls_client_ca: {0}")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
    #[error("metrics TLS set-up failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Every certificate in the PEM file that `key` names.
fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = crate::api::read_tls(path)?;
    let shown = || path.display().to_string();
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            key,
            what: "certificate",
            path: shown(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key,
            what: "certificate",
            path: shown(),
        });
    }
    Ok(certs)
}

/// The TLS acceptor `[metrics]` asks for, or `None` for plain HTTP.
pub fn acceptor(config: &MetricsConfig) -> Result<Option<TlsAcceptor>, TlsError> {
    if !config.tls_enabled() {
        return Ok(None);
    }
    let chain = certificates("tls_cert", &config.tls_cert)?;
    let key = PrivateKeyDer::from_pem_slice(&crate::api::read_tls(&config.tls_key)?).map_err(
        |source| TlsError::Pem {
            key: "tls_key",
            what: "private key",
            path: config.tls_key.display().to_string(),
            source,
        },
    )?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = if config.tls_client_ca.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for ca in certificates("tls_client_ca", &config.tls_client_ca)? {
            roots.add(ca)?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut server = builder.with_single_cert(chain, key)?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
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
