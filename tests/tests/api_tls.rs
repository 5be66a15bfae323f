//! The gRPC API over TCP with TLS (rustls): server certificates only, required client
//! certificates, and the drain allow-list matched against a client certificate's common name.
//! Certificates are made for each test with rcgen.

use nodeward::api::{pb, ApiConfig};
use nodeward_tests::{
    agent_binary,
    api::{conn, health_config, TempDir, TestApi},
    pki::Pki,
};
use tonic::Code;

async fn health(c: &nodeward::client::Conn) -> Result<pb::GetNodeHealthResponse, String> {
    let mut client = nodeward::client::connect(c, std::path::Path::new("/nonexistent"))
        .await
        .map_err(|e| e.to_string())?;
    client
        .get_node_health(pb::GetNodeHealthRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|e| e.to_string())
}

async fn begin(c: &nodeward::client::Conn) -> Result<pb::BeginDrainResponse, tonic::Status> {
    let mut client = nodeward::client::connect(c, std::path::Path::new("/nonexistent"))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    client
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "tls-test".into(),
            reason: String::new(),
            deadline_seconds: 0,
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_client_certificates_serves_verified_clients_and_refuses_plaintext() {
    let pki = Pki::new("tls-server-only");
    let mut cfg = pki.server_config(false);
    // Over TCP only listed identities may drain; callers without a certificate by this name.
    cfg.drain_allowed_identities = vec!["anonymous".to_owned()];
    let api = TestApi::start(cfg, health_config()).await;
    let addr = api.tcp.expect("TCP listener bound");

    let c = pki.client_conn(addr, None);
    let h = health(&c)
        .await
        .expect("a TLS client that trusts the CA is served");
    assert_eq!(h.health.expect("health").node, "test-node");
    let drain = begin(&c)
        .await
        .expect("BeginDrain over TLS")
        .drain
        .expect("drain");
    assert_eq!(
        drain.requesters[0].identity, "anonymous",
        "no client certificate, no name"
    );

    let plain = conn(&format!("http://127.0.0.1:{}", addr.port()));
    assert!(
        health(&plain).await.is_err(),
        "plaintext must not be served on a TLS listener"
    );

    let mut untrusting = conn(&format!("https://127.0.0.1:{}", addr.port()));
    untrusting.tls_domain = Some("localhost".to_owned());
    assert!(
        health(&untrusting).await.is_err(),
        "a client that does not trust the CA fails the handshake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_name_the_caller_and_refuse_those_without() {
    let pki = Pki::new("tls-mutual");
    let controller = pki.client("rollout-controller");
    let mut cfg = pki.server_config(true);
    cfg.drain_allowed_identities = vec!["cn:rollout-controller".to_owned()];
    let api = TestApi::start(cfg, health_config()).await;
    let addr = api.tcp.expect("TCP listener bound");

    let with_cert = pki.client_conn(addr, Some(&controller));
    health(&with_cert)
        .await
        .expect("a client with a certificate from the CA is served");
    let drain = begin(&with_cert)
        .await
        .expect("BeginDrain")
        .drain
        .expect("drain");
    assert_eq!(drain.requesters[0].identity, "cn:rollout-controller");

    let without = pki.client_conn(addr, None);
    assert!(
        health(&without).await.is_err(),
        "no client certificate, no service"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_allow_list_refuses_other_certificate_names() {
    let pki = Pki::new("tls-allow");
    let controller = pki.client("rollout-controller");
    let intruder = pki.client("intruder");
    let mut cfg = pki.server_config(true);
    cfg.drain_allowed_identities = vec!["cn:rollout-controller".to_owned()];
    let api = TestApi::start(cfg, health_config()).await;
    let addr = api.tcp.expect("TCP listener bound");

    let refused = begin(&pki.client_conn(addr, Some(&intruder)))
        .await
        .expect_err("intruder may not drain");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("cn:intruder"),
        "{}",
        refused.message()
    );
    health(&pki.client_conn(addr, Some(&intruder)))
        .await
        .expect("but may read the health");

    let ok = begin(&pki.client_conn(addr, Some(&controller)))
        .await
        .expect("the allowed name may drain");
    assert_eq!(
        ok.drain.expect("drain").state,
        pb::DrainState::Draining as i32
    );
}

#[test]
fn tcp_off_loopback_needs_tls() {
    let cfg = ApiConfig {
        tcp_listen: "0.0.0.0:50051".to_owned(),
        ..ApiConfig::default()
    };
    let e = cfg.validate().expect_err("plaintext on all interfaces");
    assert_eq!(e.key, "tcp_listen");
    assert!(e.allowed.contains("TLS"), "{}", e.allowed);
    let cfg = ApiConfig {
        tcp_listen: "0.0.0.0:50051".to_owned(),
        tls_cert: "/etc/nodeward/tls.crt".into(),
        tls_key: "/etc/nodeward/tls.key".into(),
        tls_client_ca: "/etc/nodeward/ca.crt".into(),
        ..ApiConfig::default()
    };
    assert!(cfg.validate().is_ok());
}

/// `nodeward config check` on a config file, with extra `--set` flags: exit code and stderr.
fn config_check(name: &str, toml: &str, set: &[&str]) -> (Option<i32>, String) {
    let dir = TempDir::new(name);
    let path = dir.0.join("nodeward.toml");
    std::fs::write(&path, toml).expect("write config");
    let mut cmd = std::process::Command::new(agent_binary());
    cmd.env_remove("NODEWARD_LOG").arg("--config").arg(&path);
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd
        .args(["config", "check"])
        .output()
        .expect("run nodeward");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_check_refuses_off_loopback_tls_that_lets_anonymous_callers_drain() {
    let unsafe_listener = "[api]\ntcp_listen = \"0.0.0.0:50051\"\n\
        tls_cert = \"/etc/nodeward/tls.crt\"\ntls_key = \"/etc/nodeward/tls.key\"\n";
    let (code, stderr) = config_check("cfg-anon", unsafe_listener, &[]);
    assert_eq!(code, Some(64), "{stderr}");
    for key in [
        "api.tcp_listen",
        "api.tls_client_ca",
        "api.drain_allowed_identities",
    ] {
        assert!(stderr.contains(key), "{key} not named: {stderr}");
    }
    // The same file with either way out is valid: the refusal was this rule and nothing else.
    let (code, stderr) = config_check(
        "cfg-anon-ca",
        unsafe_listener,
        &["api.tls_client_ca=/etc/nodeward/ca.crt"],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = config_check(
        "cfg-anon-list",
        unsafe_listener,
        &["api.drain_allowed_identities=[\"cn:rollout-controller\"]"],
    );
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn config_check_refuses_malformed_allow_list_entries_naming_them() {
    for entry in [
        "uid:abc",
        "uid:",
        "cn:",
        "user:root",
        "uid:007",
        "dns:",
        "dns:Upper.Case",
        "uri:no-scheme",
        "spiffe://td/x",
    ] {
        let toml = format!("[api]\ndrain_allowed_identities = [\"uid:0\", \"{entry}\"]\n");
        let (code, stderr) = config_check("cfg-ids", &toml, &[]);
        assert_eq!(code, Some(64), "{entry}: {stderr}");
        assert!(
            stderr.contains("api.drain_allowed_identities")
                && stderr.contains(&format!("\"{entry}\"")),
            "{entry}: {stderr}"
        );
    }
    let (code, stderr) = config_check(
        "cfg-ids-ok",
        "[api]\ndrain_allowed_identities = [\"uid:0\", \"cn:rollout\", \"dns:ctl.ops\", \
         \"uri:spiffe://td/ns/ops/sa/rollout\", \"anonymous\"]\n",
        &[],
    );
    assert_eq!(code, Some(0), "{stderr}");
}

/// A client that connects to the TLS listener and never sends its ClientHello is dropped once
/// `api.limits.tls_handshake_timeout` passes (tonic sets no timeout of its own), while other
/// clients are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_tls_handshake_is_dropped() {
    use tokio::io::AsyncReadExt as _;

    let pki = Pki::new("tls-handshake-timeout");
    let mut config = pki.server_config(false);
    config.limits.tls_handshake_timeout = std::time::Duration::from_secs(1);
    let api = TestApi::start(config, health_config()).await;
    let addr = api.tcp.expect("TCP listener bound");

    let mut silent = tokio::net::TcpStream::connect(addr)
        .await
        .expect("TCP connect");
    let c = pki.client_conn(addr, None);
    health(&c)
        .await
        .expect("a TLS client is served while another stalls its handshake");
    // Without the timeout the read would never end; the bound only keeps a failure from
    // hanging the suite.
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), silent.read(&mut buf))
        .await
        .expect("the agent closes a stalled handshake");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the stalled connection ends without an answer: {read:?}"
    );
}
