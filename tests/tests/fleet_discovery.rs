//! `nodeward fleet` finding its agents through the API server: two stand-in API servers
//! (tests/src/kubeapi.rs) as two contexts of one kubeconfig the test writes — `east` over
//! HTTPS that requires a client certificate (the kubeconfig's `client-certificate` and
//! `client-key` files, the CA as a relative `certificate-authority` path), `west` over HTTPS
//! with a bearer token (`token`, the CA inline as `certificate-authority-data`) — each listing
//! the DaemonSet's pods whose pod IPs are real agents on loopback addresses.
//!
//! - `fleet status --all-contexts --json` lists every agent with its context and the node
//!   name and verdict the agent reports on its own socket; a node without an agent pod and a
//!   node whose pod is Pending are `UNREACHABLE` rows saying so; a pod the label selector
//!   leaves out (another app's) is not asked.
//! - The API server's certificate: accepted unchecked with `insecure-skip-tls-verify`, refused
//!   without a CA, checked against `tls-server-name` (a wrong one refused), each context's
//!   refusal its own row.
//! - With `west`'s API server down, `west` is one row with its error and `east` still lists;
//!   `fleet watch` through `west` alone prints the error every round and goes on, and lists
//!   west's nodes once its API server is back.
//! - The current context alone (no CONTEXT field), `fleet drain` of a node found through the
//!   API (the agent itself says it drains), a node without an agent refused, and a user with
//!   an exec plugin refused with the reason.
//! - The fleet user's RBAC example (packaging/kubernetes/examples/fleet-user/rbac.yaml) grants
//!   exactly the calls `nodeward fleet` made, and validates against the Kubernetes schema.

use std::{
    collections::BTreeSet,
    io::BufRead as _,
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use base64::Engine as _;
use nodeward::api::pb;
use nodeward_tests::{
    agent_binary,
    api::{eventually, TempDir},
    fleet::{rows, Certs, FleetAgent},
    kube::{tool, validate, yaml},
    kubeapi::{KubeApi, TlsFiles},
    skip, text,
};

const NS: &str = "nodeward";
const LABELS: &[(&str, &str)] = &[("app.kubernetes.io/name", "nodeward")];

/// A free port on `ip` (a loopback address of 127/8: every one of them is on `lo`).
fn free(ip: &str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).expect("a free port");
    l.local_addr().expect("its address")
}

fn fleet_in(dir: &Path, env: &[(&str, &str)], args: &[&str], certs: &Certs) -> Output {
    Command::new(agent_binary())
        .arg("fleet")
        .args(args)
        .args(certs.client_args(nodeward_tests::fleet::OPERATOR))
        .args(["--timeout", "60s"])
        .current_dir(dir)
        .env_remove("KUBECONFIG")
        .env("HOME", dir)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run nodeward fleet")
}

fn kubeconfig(east: &KubeApi, west: &KubeApi, ca_pem: &[u8]) -> String {
    let ca_data = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: east\npreferences: {{}}\n\
         clusters:\n\
         - name: east\n  cluster:\n    server: {east}\n    certificate-authority: pki/ca.crt\n\
         - name: west\n  cluster:\n    server: {west}\n    certificate-authority-data: {ca_data}\n\
         - name: west-insecure\n  cluster:\n    server: {west}\n    insecure-skip-tls-verify: true\n\
         - name: west-noca\n  cluster:\n    server: {west}\n\
         - name: west-named\n  cluster:\n    server: {west}\n    certificate-authority-data: {ca_data}\n    tls-server-name: kube-west\n\
         - name: west-misnamed\n  cluster:\n    server: {west}\n    certificate-authority-data: {ca_data}\n    tls-server-name: kube-east\n\
         users:\n\
         - name: ops\n  user:\n    client-certificate: pki/fleet-ops.crt\n    client-key: pki/fleet-ops.key\n\
         - name: west-sa\n  user:\n    token: west-secret-token\n\
         - name: gke\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: gke-gcloud-auth-plugin\n\
         contexts:\n\
         - name: east\n  context:\n    cluster: east\n    user: ops\n\
         - name: west\n  context:\n    cluster: west\n    user: west-sa\n\
         - name: cloud\n  context:\n    cluster: west\n    user: gke\n\
         - name: west-insecure\n  context:\n    cluster: west-insecure\n    user: west-sa\n\
         - name: west-noca\n  context:\n    cluster: west-noca\n    user: west-sa\n\
         - name: west-named\n  context:\n    cluster: west-named\n    user: west-sa\n\
         - name: west-misnamed\n  context:\n    cluster: west-misnamed\n    user: west-sa\n",
        east = east.url(),
        west = west.url(),
    )
}

fn fleet_rbac() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/kubernetes/examples/fleet-user/rbac.yaml")
}

/// The (verb, resource, subresource) triples the fleet user's roles grant; `None` without
/// python3 and PyYAML.
fn granted() -> Option<BTreeSet<(String, String, String)>> {
    let docs = yaml(&fleet_rbac())?;
    let mut out = BTreeSet::new();
    for role in docs
        .iter()
        .filter(|d| d["kind"] == "Role" || d["kind"] == "ClusterRole")
    {
        if role["kind"] == "Role" {
            assert_eq!(
                role["metadata"]["namespace"], NS,
                "the DaemonSet's namespace"
            );
        }
        for rule in role["rules"].as_array().into_iter().flatten() {
            for resource in rule["resources"].as_array().into_iter().flatten() {
                let resource = resource.as_str().unwrap_or_default();
                let (r, sub) = resource.split_once('/').unwrap_or((resource, ""));
                for verb in rule["verbs"].as_array().into_iter().flatten() {
                    let verb = verb.as_str().unwrap_or_default();
                    out.insert((verb.to_owned(), r.to_owned(), sub.to_owned()));
                }
            }
        }
    }
    Some(out)
}

#[test]
fn the_fleet_users_rbac_example_validates_against_the_kubernetes_schema() {
    const TEST: &str = "the_fleet_users_rbac_example_validates_against_the_kubernetes_schema";
    if tool("kubernetes-validate").is_none() {
        return skip(
            TEST,
            "kubernetes-validate not installed (pip install -r tests/requirements.txt)",
        );
    }
    let out = validate(&[fleet_rbac()]);
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    for resource in [
        "role/nodeward-fleet",
        "clusterrole/nodeward-fleet",
        "rolebinding/nodeward-fleet",
        "clusterrolebinding/nodeward-fleet",
    ] {
        assert!(
            report.contains(&format!("passed for resource {resource}")),
            "{resource} was not validated:\n{report}"
        );
    }
}

fn find<'a>(rows: &'a [serde_json::Value], node: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["node"] == node)
        .unwrap_or_else(|| panic!("no row for {node:?} in {rows:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_finds_agents_through_two_api_servers_and_reports_nodes_without_one() {
    let dir = TempDir::new("fleet-discovery");
    let certs = Certs::new(&dir.0.join("pki"));
    // The stand-ins' own certificates, for 127.0.0.1.
    certs.node("kube-east", "127.0.0.1");
    certs.node("kube-west", "127.0.0.1");
    let east = KubeApi::start_tls(&TlsFiles {
        cert: certs.path("kube-east.crt"),
        key: certs.path("kube-east.key"),
        client_ca: Some(certs.path("ca.crt")),
    });
    let west = KubeApi::start_tls(&TlsFiles {
        cert: certs.path("kube-west.crt"),
        key: certs.path("kube-west.key"),
        client_ca: None,
    });
    west.require_token("west-secret-token");
    let ca_pem = std::fs::read(certs.path("ca.crt")).expect("the CA");
    std::fs::write(dir.0.join("kubeconfig"), kubeconfig(&east, &west, &ca_pem)).expect("write");

    // Agents on addresses of their own: 127.<pid>.<n>.1, a free port each, given to the API as
    // the pod's `grpc` container port.
    let block = std::process::id() % 200 + 20;
    let mut agents = Vec::new();
    for (i, (api, node)) in [(&east, "east-1"), (&east, "east-2"), (&west, "west-1")]
        .into_iter()
        .enumerate()
    {
        let ip = format!("127.{block}.{}.1", i + 1);
        let tcp = free(&ip);
        certs.node(node, &ip);
        agents.push(FleetAgent::start(
            &dir.0,
            &certs,
            node,
            tcp,
            None,
            &["ebpf.enabled=false".to_owned()],
        ));
        api.add_node(node, serde_json::Value::Null);
        api.add_daemon_pod(
            NS,
            &format!("nodeward-{node}"),
            node,
            LABELS,
            "Running",
            &ip,
            Some(tcp.port()),
        );
    }
    // A node without an agent pod, one whose pod is Pending, and another app's Running pod
    // (another label) that must not be asked.
    east.add_node("east-3", serde_json::Value::Null);
    let stray = free(&format!("127.{block}.9.1"));
    east.add_daemon_pod(
        NS,
        "other-app",
        "east-3",
        &[("app.kubernetes.io/name", "other")],
        "Running",
        &stray.ip().to_string(),
        Some(stray.port()),
    );
    west.add_node("west-2", serde_json::Value::Null);
    west.add_daemon_pod(NS, "nodeward-west-2", "west-2", LABELS, "Pending", "", None);

    for a in &agents {
        eventually(Duration::from_secs(90), || async {
            (a.own_view().await.1 != "UNKNOWN").then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("{} never left UNKNOWN\n{}", a.node, a.log_text()));
    }

    // Every context: each agent with its context, as it reports itself.
    let out = fleet_in(
        &dir.0,
        &[],
        &[
            "status",
            "--json",
            "--kubeconfig",
            "kubeconfig",
            "--all-contexts",
        ],
        &certs,
    );
    // `cloud` is a context of this kubeconfig whose user runs an exec plugin: refused.
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"gke\"") && err.contains("exec plugin (gke-gcloud-auth-plugin)"),
        "{err}"
    );
    let out = fleet_in(
        &dir.0,
        &[],
        &[
            "status",
            "--json",
            "--kubeconfig",
            "kubeconfig",
            "--context",
            "east,west",
        ],
        &certs,
    );
    assert!(out.status.success(), "{}", text(&out));
    let got = rows(&out);
    assert_eq!(got.len(), 5, "{}", text(&out));
    for a in &agents {
        let (node, verdict) = a.own_view().await;
        let row = find(&got, &node);
        assert_eq!(row["address"], a.tcp.to_string(), "{row}");
        assert_eq!(row["context"], &node[..4], "{row}");
        assert!(row["error"].is_null(), "{row}");
        // The verdict may move while the fleet asks; a row that differs must match the one
        // after.
        if row["verdict"] != verdict.as_str() {
            assert_eq!(row["verdict"], a.own_view().await.1.as_str(), "{row}");
        }
    }
    let e3 = find(&got, "east-3");
    assert_eq!(
        (&e3["verdict"], &e3["context"], &e3["error"]),
        (
            &"UNREACHABLE".into(),
            &"east".into(),
            &"no nodeward pod on this node".into()
        )
    );
    let w2 = find(&got, "west-2");
    assert_eq!(
        w2["error"],
        "the nodeward pod nodeward/nodeward-west-2 is Pending"
    );
    assert!(
        !got.iter()
            .any(|r| r["address"] == stray.to_string().as_str()),
        "another app's pod was asked: {got:?}"
    );
    // Asked as the DaemonSet's pods, by namespace and the manifests' label.
    let pods: Vec<_> = east
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/v1/namespaces/nodeward/pods")
        .collect();
    assert!(
        pods.iter()
            .all(|r| r.query == "labelSelector=app.kubernetes.io%2Fname%3Dnodeward"),
        "{pods:?}"
    );

    // How the API server's certificate is checked: not at all (insecure-skip-tls-verify), not
    // without a CA, against tls-server-name instead of the address.
    let out = fleet_in(
        &dir.0,
        &[],
        &[
            "status",
            "--json",
            "--kubeconfig",
            "kubeconfig",
            "--context",
            "west-insecure,west-noca,west-named,west-misnamed",
        ],
        &certs,
    );
    assert!(out.status.success(), "{}", text(&out));
    let got = rows(&out);
    let in_context =
        |c: &str| -> Vec<&serde_json::Value> { got.iter().filter(|r| r["context"] == c).collect() };
    for ok in ["west-insecure", "west-named"] {
        let nodes: BTreeSet<&str> = in_context(ok)
            .iter()
            .filter_map(|r| r["node"].as_str())
            .collect();
        assert_eq!(nodes, BTreeSet::from(["west-1", "west-2"]), "{ok}: {got:?}");
    }
    for (refused, why) in [
        ("west-noca", "UnknownIssuer"),
        ("west-misnamed", "not valid for name \"kube-east\""),
    ] {
        let rows = in_context(refused);
        assert_eq!(rows.len(), 1, "{refused}: {got:?}");
        let e = rows[0]["error"].as_str().unwrap_or_default();
        assert!(
            e.contains("invalid peer certificate") && e.contains(why),
            "{refused}: {e}"
        );
    }

    // West's API server down: one row for it, east still lists (KUBECONFIG, not the flag).
    west.down();
    let out = fleet_in(
        &dir.0,
        &[("KUBECONFIG", "missing.yaml:kubeconfig")],
        &["status", "--json", "--context", "west", "--context", "east"],
        &certs,
    );
    assert!(out.status.success(), "{}", text(&out));
    let got = rows(&out);
    assert_eq!(got.len(), 4, "{}", text(&out));
    let down = find(&got, "");
    assert_eq!(down["context"], "west", "{down}");
    assert_eq!(down["verdict"], "UNREACHABLE", "{down}");
    let e = down["error"].as_str().expect("an error");
    assert!(
        e.starts_with("context west: cannot list the agent pods") && e.contains("onnect"),
        "{e}"
    );
    for node in ["east-1", "east-2", "east-3"] {
        assert_eq!(find(&got, node)["context"], "east");
    }

    // `fleet watch` through west alone while its API server is down: every round says so and
    // the watch goes on; once the API server is back, the next round lists its nodes.
    let out = fleet_in(
        &dir.0,
        &[],
        &[
            "watch",
            "--json",
            "--kubeconfig",
            "kubeconfig",
            "--context",
            "west",
            "--interval",
            "100ms",
            "--count",
            "2",
        ],
        &certs,
    );
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failed = stderr
        .lines()
        .filter(|l| l.contains("cannot list the agent pods") && l.contains("asking again"))
        .count();
    assert_eq!(
        failed, 2,
        "one line per round, and a second round:\n{stderr}"
    );
    let mut watch = Command::new(agent_binary())
        .arg("fleet")
        .args([
            "watch",
            "--json",
            "--kubeconfig",
            "kubeconfig",
            "--context",
            "west",
            "--interval",
            "200ms",
            "--count",
            "600",
        ])
        .args(certs.client_args(nodeward_tests::fleet::OPERATOR))
        .args(["--timeout", "60s"])
        .current_dir(&dir.0)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nodeward fleet watch");
    let mut err_lines = std::io::BufReader::new(watch.stderr.take().expect("stderr")).lines();
    let first = err_lines.next().and_then(Result::ok).unwrap_or_default();
    assert!(first.contains("cannot list the agent pods"), "{first}");
    west.recover();
    let mut out_lines = std::io::BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let row = out_lines.next().and_then(Result::ok).unwrap_or_default();
    let _ = watch.kill();
    let _ = watch.wait();
    let row: serde_json::Value =
        serde_json::from_str(&row).unwrap_or_else(|e| panic!("{e}: {row}"));
    assert!(
        ["west-1", "west-2"].contains(&row["node"].as_str().unwrap_or_default()),
        "{row}"
    );
    west.down();

    // The current context alone: no context field; ~/.kube/config is read without flags.
    std::fs::create_dir_all(dir.0.join(".kube")).expect("dir");
    let text_config = kubeconfig(&east, &west, &ca_pem).replace("pki/", "../pki/");
    std::fs::write(dir.0.join(".kube/config"), text_config).expect("write");
    let out = fleet_in(&dir.0, &[], &["status", "--json"], &certs);
    assert!(out.status.success(), "{}", text(&out));
    let got = rows(&out);
    assert_eq!(got.len(), 3, "{}", text(&out));
    assert!(got.iter().all(|r| r.get("context").is_none()), "{got:?}");

    // A drain of a node found through the API; the agent itself says it drains.
    let out = fleet_in(
        &dir.0,
        &[],
        &["drain", "east-2", "--keep-drained", "--reason", "discovery"],
        &certs,
    );
    assert!(out.status.success(), "{}", text(&out));
    let status = agents[1]
        .client()
        .await
        .get_drain_status(pb::GetDrainStatusRequest {})
        .await
        .expect("GetDrainStatus")
        .into_inner();
    let state = status.drain.map(|d| d.state);
    assert_eq!(
        state,
        Some(pb::DrainState::Draining as i32),
        "{}",
        text(&out)
    );
    let out = fleet_in(&dir.0, &[], &["drain", "east-3"], &certs);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("east-3: no nodeward pod on this node"),
        "{}",
        text(&out)
    );

    // Every call was one the fleet user's roles grant, and every grant was used.
    let called: BTreeSet<_> = east
        .requests()
        .iter()
        .chain(west.requests().iter())
        .filter_map(nodeward_tests::kubeapi::Recorded::rbac)
        .collect();
    match granted() {
        Some(granted) => assert_eq!(
            called, granted,
            "packaging/kubernetes/examples/fleet-user/rbac.yaml must grant exactly what `nodeward fleet` calls"
        ),
        None => skip(
            "fleet_discovery_rbac",
            "python3 with PyYAML missing (tests/requirements.txt)",
        ),
    }
}
