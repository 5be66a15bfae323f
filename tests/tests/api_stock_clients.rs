//! Stock gRPC clients as users run them, with no options: Python grpcio (grpc-core, which sends
//! a Unix socket's path as `:authority`) on the Unix socket, on plain TCP and on TLS, and
//! grpcurl on the Unix socket with its default authority. The replies are checked by decoding
//! the bytes the client received with the agent's own message types.

use nodeward::api::pb;
use nodeward_tests::{
    api::{api_config, feed_all, health_config, verdict_becomes, TempDir, TestApi},
    pki::Pki,
    python_grpcio, skip,
};
use prost::Message as _;

/// A stock grpcio client: `grpc.insecure_channel(target)` or, with a CA file,
/// `grpc.secure_channel(target, grpc.ssl_channel_credentials(ca))`, no channel options. Calls
/// GetNodeHealth and ListContainers with empty requests and prints each reply's bytes in hex.
const CLIENT: &str = r#"
import sys, grpc
target = sys.argv[1]
if len(sys.argv) > 2:
    with open(sys.argv[2], "rb") as f:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=f.read()))
else:
    channel = grpc.insecure_channel(target)
for method in ("GetNodeHealth", "ListContainers"):
    reply = channel.unary_unary("/nodeward.v1.NodeHealth/" + method)(b"", timeout=30)
    print(method, reply.hex())
"#;

/// The replies a grpcio client got from `target`.
async fn python_calls(
    target: &str,
    ca: Option<&std::path::Path>,
) -> (pb::GetNodeHealthResponse, pb::ListContainersResponse) {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.args(["-c", CLIENT, target]);
    if let Some(ca) = ca {
        cmd.arg(ca);
    }
    let out = cmd.output().await.expect("run python3");
    assert!(
        out.status.success(),
        "grpcio on {target} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("python prints text");
    let reply = |method: &str| -> Vec<u8> {
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix(method)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {method} reply from {target}: {stdout}"));
        (0..line.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex"))
            .collect()
    };
    let health = pb::GetNodeHealthResponse::decode(reply("GetNodeHealth").as_slice())
        .expect("a GetNodeHealth reply");
    let containers = pb::ListContainersResponse::decode(reply("ListContainers").as_slice())
        .expect("a ListContainers reply");
    (health, containers)
}

fn check(
    target: &str,
    (health, containers): (pb::GetNodeHealthResponse, pb::ListContainersResponse),
) {
    let health = health
        .health
        .unwrap_or_else(|| panic!("{target}: no health"));
    assert_eq!(health.node, "test-node", "{target}");
    assert_eq!(health.verdict, pb::Verdict::Healthy as i32, "{target}");
    assert!(
        !containers.containers.is_empty(),
        "{target}: the fed containers are listed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_with_no_options_calls_the_unix_socket_and_plain_tcp() {
    const TEST: &str = "python_grpcio_with_no_options_calls_the_unix_socket_and_plain_tcp";
    if !python_grpcio(TEST) {
        return;
    }
    let dir = TempDir::new("api-stock");
    let config = nodeward::api::ApiConfig {
        tcp_listen: "127.0.0.1:0".to_owned(),
        ..api_config(&dir)
    };
    let api = TestApi::start(config, health_config()).await;
    feed_all(&api.store, 1);
    verdict_becomes(&mut api.client().await, pb::Verdict::Healthy).await;
    let unix = format!("unix:{}", api.socket.display());
    check(&unix, python_calls(&unix, None).await);
    let tcp = api.tcp.expect("TCP listener").to_string();
    check(&tcp, python_calls(&tcp, None).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_with_no_options_calls_the_tls_listener_and_its_socket() {
    const TEST: &str = "python_grpcio_with_no_options_calls_the_tls_listener_and_its_socket";
    if !python_grpcio(TEST) {
        return;
    }
    let pki = Pki::new("api-stock-tls");
    let api = TestApi::start(pki.server_config(false), health_config()).await;
    feed_all(&api.store, 1);
    verdict_becomes(&mut api.client().await, pb::Verdict::Healthy).await;
    let port = api.tcp.expect("TLS listener").port();
    // The server certificate names localhost and 127.0.0.1.
    for target in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        check(
            &target,
            python_calls(&target, Some(&pki.path("ca.pem"))).await,
        );
    }
    let unix = format!("unix:{}", api.socket.display());
    check(&unix, python_calls(&unix, None).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_with_its_default_authority_calls_the_unix_socket() {
    const TEST: &str = "grpcurl_with_its_default_authority_calls_the_unix_socket";
    let grpcurl = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".to_owned());
    if !std::process::Command::new(&grpcurl)
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        skip(TEST, "grpcurl not found (set GRPCURL to its path)");
        return;
    }
    let dir = TempDir::new("api-stock-grpcurl");
    let api = TestApi::start(api_config(&dir), health_config()).await;
    feed_all(&api.store, 1);
    verdict_becomes(&mut api.client().await, pb::Verdict::Healthy).await;
    let out = tokio::process::Command::new(&grpcurl)
        .args(["-plaintext", "-unix"])
        .arg(&api.socket)
        .arg("nodeward.v1.NodeHealth/GetNodeHealth")
        .output()
        .await
        .expect("run grpcurl");
    assert!(
        out.status.success(),
        "grpcurl failed: {}",
        nodeward_tests::text(&out)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("grpcurl prints JSON");
    assert_eq!(v["health"]["node"], "test-node", "{v}");
    assert_eq!(v["health"]["verdict"], "VERDICT_HEALTHY", "{v}");
}
