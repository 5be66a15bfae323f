//! Throw-away certificates for the TLS tests, made with rcgen and written as PEM files.

use std::{net::SocketAddr, path::PathBuf};

use nodeward::api::ApiConfig;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};

use crate::api::{api_config, conn, TempDir};

/// A throw-away CA with a server certificate for localhost/127.0.0.1, written as PEM files.
pub struct Pki {
    pub dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub fn new(stem: &str) -> Self {
        let dir = TempDir::new(stem);
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "nodeward test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        std::fs::write(dir.0.join("ca.pem"), ca.pem()).expect("write CA");
        let pki = Self { dir, ca };
        let mut server =
            CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
        server
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        server
            .distinguished_name
            .push(DnType::CommonName, "nodeward agent");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        pki.issue("server", server);
        pki
    }

    pub fn issue(&self, name: &str, params: CertificateParams) {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).expect("write cert");
        std::fs::write(self.path(&format!("{name}.der")), cert.der()).expect("write DER");
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).expect("write key");
    }

    /// A client certificate with this common name; returns its name for `client_conn`.
    pub fn client(&self, cn: &str) -> String {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let name = format!("client-{cn}");
        self.issue(&name, params);
        name
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.0.join(file)
    }

    pub fn server_config(&self, client_ca: bool) -> ApiConfig {
        ApiConfig {
            tcp_listen: "127.0.0.1:0".to_owned(),
            tls_cert: self.path("server.pem"),
            tls_key: self.path("server.key"),
            tls_client_ca: if client_ca {
                self.path("ca.pem")
            } else {
                PathBuf::new()
            },
            ..api_config(&self.dir)
        }
    }

    pub fn client_conn(&self, addr: SocketAddr, cert: Option<&str>) -> nodeward::client::Conn {
        let mut c = conn(&format!("https://127.0.0.1:{}", addr.port()));
        c.tls_ca = Some(self.path("ca.pem"));
        c.tls_domain = Some("localhost".to_owned());
        if let Some(name) = cert {
            c.tls_cert = Some(self.path(&format!("{name}.pem")));
            c.tls_key = Some(self.path(&format!("{name}.key")));
        }
        c
    }
}
