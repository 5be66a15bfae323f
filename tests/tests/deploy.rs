//! The cluster deployment: the Kubernetes manifests validate against the API schema of
//! Kubernetes 1.37 (kubernetes-validate from PyPI, which ships the schemas, run without a
//! network), and they hand the agent what it needs: host PID, the host paths the config points
//! at, eBPF capabilities, gRPC probes on the port the Service names, a config the agent accepts.
//! The container file builds on Anolis OS 23 and starts the binary the RPM installs.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use nodeward_tests::{
    agent_binary, cap_number, grantable_caps, is_root,
    kube::{find, strings, tool, validate, yaml},
    skip,
};
use serde_json::Value;

const KUBE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/kubernetes");
const CONTAINERFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/Containerfile");

/// The manifests of the base `kubectl apply -k packaging/kubernetes/` applies (not its
/// subdirectories, nor `kustomization.yaml`, which is kustomize's and no Kubernetes object;
/// tests/tests/kustomize.rs checks that it lists exactly these).
fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(KUBE)
        .expect("read packaging/kubernetes")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn the_manifests_validate_against_the_kubernetes_1_37_schema_offline() {
    const TEST: &str = "kube_schema";
    if tool("kubernetes-validate").is_none() {
        skip(
            TEST,
            "kubernetes-validate not installed (pip install -r tests/requirements.txt)",
        );
        return;
    }
    let files = manifests();
    let out = validate(&files);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    for resource in [
        "namespace/nodeward",
        "serviceaccount/nodeward",
        "clusterrole/nodeward",
        "clusterrolebinding/nodeward",
        "configmap/nodeward",
        "daemonset/nodeward",
        "service/nodeward",
        "networkpolicy/nodeward",
    ] {
        assert!(
            report.contains(&format!(
                "passed for resource {resource} against version 1.37"
            )),
            "{resource} was not validated:\n{report}"
        );
    }

    // The validator must be able to fail: a misspelt field in a copy of the DaemonSet.
    let dir = std::env::temp_dir().join(format!("nodeward-kube-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bad = dir.join("daemonset.yaml");
    let daemonset = std::fs::read_to_string(Path::new(KUBE).join("30-daemonset.yaml"))
        .expect("read the DaemonSet");
    std::fs::write(&bad, daemonset.replace("hostPID:", "hostPid:")).expect("write copy");
    let out = validate(&[bad]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hostPid"),
        "a misspelt field passed validation"
    );
}

#[test]
fn the_daemonset_gives_the_agent_what_its_config_and_probes_expect() {
    const TEST: &str = "kube_daemonset";
    let mut docs = Vec::new();
    for f in manifests() {
        match yaml(&f) {
            Some(d) => docs.extend(d),
            None => {
                skip(
                    TEST,
                    "python3 with PyYAML not available (pip install -r tests/requirements.txt)",
                );
                return;
            }
        }
    }
    let ds = find(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    // One toleration with operator Exists and no key tolerates every taint.
    assert!(
        pod["tolerations"]
            .as_array()
            .expect("tolerations")
            .iter()
            .any(|t| t["operator"] == "Exists"
                && t.get("key").is_none()
                && t.get("effect").is_none()),
        "not every taint is tolerated: {}",
        pod["tolerations"]
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"], true, "capabilities, not privileged");
    let caps = strings(&sc["capabilities"]["add"]);
    for cap in ["BPF", "PERFMON", "NET_ADMIN"] {
        assert!(caps.contains(&cap), "{cap} missing: {caps:?}");
    }
    for r in ["requests", "limits"] {
        assert!(c["resources"][r]["memory"].is_string(), "no memory {r}");
    }

    // Probes: gRPC health on the container port named grpc, which the Service exposes.
    let port = |name: &str| {
        c["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port {name}"))
    };
    // Probes ask the agent over the Unix socket the ConfigMap's config serves (the pod's TCP
    // listener is loopback-only without TLS, out of a kubelet gRPC probe's reach).
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let cmd = strings(&c[probe]["exec"]["command"]);
        assert_eq!(
            cmd,
            [
                "/usr/bin/nodeward",
                "status",
                "--addr",
                "unix:/run/nodeward/nodeward.sock"
            ],
            "{probe}"
        );
    }
    assert!(port("grpc") > 0);
    let svc = find(&docs, "Service");
    assert_eq!(svc["spec"]["clusterIP"], "None", "headless");
    let svc_ports: Vec<&str> = svc["spec"]["ports"]
        .as_array()
        .expect("service ports")
        .iter()
        .filter_map(|p| p["targetPort"].as_str())
        .collect();
    assert_eq!(svc_ports, ["grpc", "metrics"]);
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(port("metrics").to_string().as_str())
    );

    // The host paths eBPF and the collectors need are mounted, and the config points at them.
    let mount_of = |host: &str| -> String {
        let volume = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["hostPath"]["path"] == host)
            .unwrap_or_else(|| panic!("no hostPath volume for {host}"));
        c["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["name"] == volume["name"])
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("volume for {host} not mounted"))
            .to_owned()
    };
    let cgroup = mount_of("/sys/fs/cgroup");
    let proc = mount_of("/proc");
    mount_of("/sys/kernel/btf");
    mount_of("/sys/kernel/tracing");
    mount_of("/run/nodeward");

    let toml = find(&docs, "ConfigMap")["data"]["nodeward.toml"]
        .as_str()
        .expect("nodeward.toml in the ConfigMap")
        .to_owned();
    let dir = std::env::temp_dir().join(format!("nodeward-kube-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("nodeward.toml");
    std::fs::write(&file, &toml).expect("write config");
    let shown = Command::new(agent_binary())
        .arg("--config")
        .arg(&file)
        .args(["config", "show"])
        .env_remove("NODEWARD_LOG")
        .output()
        .expect("run nodeward config show");
    let _ = std::fs::remove_dir_all(&dir);
    let shown_text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.status.success(),
        "the agent rejects the ConfigMap's config: {}",
        String::from_utf8_lossy(&shown.stderr)
    );
    assert!(
        shown_text.contains(&format!("cgroup_root = \"{cgroup}\"")),
        "{shown_text}"
    );
    assert!(
        shown_text.contains(&format!("proc_root = \"{proc}\"")),
        "{shown_text}"
    );
    assert!(
        shown_text.contains(&format!("listen = \"0.0.0.0:{}\"", port("metrics"))),
        "metrics must listen on the pod address and the declared port:\n{shown_text}"
    );

    // prometheus-operator's PodMonitor scrapes the same named port.
    let pm = yaml(&Path::new(KUBE).join("prometheus-operator/podmonitor.yaml"))
        .expect("parse the PodMonitor");
    let pm = find(&pm, "PodMonitor");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"],
        ds["spec"]["selector"]["matchLabels"]
    );
}

/// Whether a NetworkPolicy's ingress rules admit a connection to the named container port
/// `port` from a pod in a namespace labelled `ns_labels`, by the API's rules: a rule admits when
/// one of its peers matches (no `from`: every peer) and one of its ports does (no `ports`:
/// every port). Only the parts the shipped policy may use are read; anything else fails the
/// test, so that a policy using more cannot pass unchecked.
fn admits(policy: &Value, ns_labels: &[(&str, &str)], port: &str) -> bool {
    let peer_matches = |peer: &Value| {
        let keys: Vec<&String> = peer.as_object().expect("a peer").keys().collect();
        assert_eq!(keys, ["namespaceSelector"], "unchecked peer: {peer}");
        let sel = &peer["namespaceSelector"];
        assert!(sel.get("matchExpressions").is_none(), "unchecked: {sel}");
        sel["matchLabels"]
            .as_object()
            .expect("matchLabels")
            .iter()
            .all(|(k, v)| ns_labels.iter().any(|(lk, lv)| lk == k && v == lv))
    };
    policy["spec"]["ingress"]
        .as_array()
        .expect("ingress rules")
        .iter()
        .any(|rule| {
            let from_ok = rule
                .get("from")
                .and_then(Value::as_array)
                .is_none_or(|peers| peers.iter().any(peer_matches));
            let port_ok = rule
                .get("ports")
                .and_then(Value::as_array)
                .is_none_or(|ports| {
                    ports
                        .iter()
                        .any(|p| p["port"] == port && p["protocol"] == "TCP")
                });
            from_ok && port_ok
        })
}

#[test]
fn the_network_policy_admits_metrics_only_from_monitoring_and_grpc_only_from_the_control_plane() {
    const TEST: &str = "kube_networkpolicy";
    let Some(docs) = yaml(&Path::new(KUBE).join("50-networkpolicy.yaml")) else {
        skip(
            TEST,
            "python3 with PyYAML not available (pip install -r tests/requirements.txt)",
        );
        return;
    };
    let policy = find(&docs, "NetworkPolicy");
    let ds_docs = yaml(&Path::new(KUBE).join("30-daemonset.yaml")).expect("parse the DaemonSet");
    let ds = find(&ds_docs, "DaemonSet");
    assert_eq!(policy["metadata"]["namespace"], ds["metadata"]["namespace"]);
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"], ds["spec"]["selector"]["matchLabels"],
        "the policy selects the agent's pods"
    );
    assert!(strings(&policy["spec"]["policyTypes"]).contains(&"Ingress"));
    let pod = &ds["spec"]["template"]["spec"];
    assert_ne!(
        pod["hostNetwork"], true,
        "a NetworkPolicy does not apply to hostNetwork pods"
    );
    // Named ports resolve to the container's ports.
    let container_ports = strings(
        &pod["containers"][0]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| p["name"].clone())
            .collect(),
    )
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    for rule in policy["spec"]["ingress"].as_array().expect("rules") {
        for p in rule["ports"].as_array().expect("each rule names its ports") {
            let name = p["port"].as_str().expect("a named port");
            assert!(
                container_ports.iter().any(|c| c == name),
                "{name} is not a container port: {container_ports:?}"
            );
        }
    }

    let monitoring = [("kubernetes.io/metadata.name", "monitoring")];
    let control_plane = [
        ("kubernetes.io/metadata.name", "fleet-controller"),
        ("nodeward.io/api-client", "true"),
    ];
    let other = [("kubernetes.io/metadata.name", "default")];
    assert!(admits(policy, &monitoring, "metrics"));
    assert!(!admits(policy, &monitoring, "grpc"));
    assert!(admits(policy, &control_plane, "grpc"));
    assert!(!admits(policy, &control_plane, "metrics"));
    for port in ["metrics", "grpc"] {
        assert!(
            !admits(policy, &other, port),
            "{port} open to any namespace"
        );
        assert!(
            !admits(policy, &[], port),
            "{port} open to unlabelled namespaces"
        );
    }
}

#[test]
fn the_container_file_builds_on_anolis_23_and_starts_the_rpms_binary() {
    let text = std::fs::read_to_string(CONTAINERFILE).expect("read the Containerfile");
    let from: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .collect();
    // A short name: the build host's registries.conf picks the registry or mirror.
    assert_eq!(from, ["openanolis/anolisos:23"]);
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        text.contains(&format!("target/rpm/nodeward-{version}-1.x86_64.rpm")),
        "the default RPM path names another version than {version}"
    );
    let spec = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/rpm/nodeward.spec.in"
    ))
    .expect("read the spec template");
    assert!(
        spec.lines().any(|l| l.trim() == "%{_bindir}/nodeward")
            && text.contains("ENTRYPOINT [\"/usr/bin/nodeward\"]"),
        "the image must start the binary where the RPM installs it"
    );
}

/// The DaemonSet's container runs with a read-only root filesystem and a handful of
/// capabilities instead of `privileged`; the agent must work so. Run it that way here: in a
/// private mount namespace whose root mount is read-only (a `touch` proves it) but for the one
/// writable volume the DaemonSet mounts (`/run/nodeward`, here a test directory), with exactly
/// the DaemonSet's capabilities (those this sandbox can grant). The eBPF sources start, the API
/// answers on the socket in the writable directory, and nothing failed with EROFS.
#[test]
fn the_agent_runs_with_the_daemonsets_capabilities_on_a_read_only_root() {
    const TEST: &str = "kube_read_only_root";
    if !is_root() {
        return skip(TEST, "needs root for a mount namespace and capabilities");
    }
    let (Some(unshare), Some(setpriv)) = (tool("unshare"), tool("setpriv")) else {
        return skip(
            TEST,
            "unshare or setpriv missing (Debian package `util-linux`)",
        );
    };
    let Some(docs) = yaml(&Path::new(KUBE).join("30-daemonset.yaml")) else {
        return skip(TEST, "python3 with PyYAML missing (tests/requirements.txt)");
    };
    let pod = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{sc}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{sc}");
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{sc}");
    let writable: Vec<&str> = c["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .filter(|m| m["readOnly"] != true)
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert_eq!(writable, ["/run/nodeward"], "the only writable volume");
    let add = strings(&sc["capabilities"]["add"]);
    let (caps, missing) = grantable_caps(&add);
    assert!(
        add.iter()
            .all(|c| cap_number(&format!("CAP_{c}")).is_some()),
        "the test does not know every capability the DaemonSet adds: {add:?}"
    );
    if !missing.is_empty() {
        eprintln!("{TEST}: this machine cannot grant {missing:?}; testing without them");
    }

    let run_dir = std::env::temp_dir().join(format!("nodeward-ro-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).expect("create the run directory");
    let socket = run_dir.join("nodeward.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    // The run directory stays writable (its own bind mount); then the root mount of this
    // namespace only is made read-only, and a write to it must fail before the agent starts.
    let script = r#"set -e
mount --bind "$RUN" "$RUN"
mount -o remount,bind,ro /
if touch /var/tmp/nodeward-ro-probe 2>/dev/null; then echo "root is writable" >&2; exit 97; fi
exec "$SETPRIV" --inh-caps="-all,$CAPS" --bounding-set="-all,$CAPS" "$AGENT" run \
  --set gpu.enabled=false --set api.tcp_listen= --set "api.unix_socket=$RUN/nodeward.sock" \
  --set "metrics.listen=127.0.0.1:$PORT""#;
    let mut agent = Command::new(unshare)
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env("RUN", &run_dir)
        .env("SETPRIV", setpriv)
        .env("CAPS", &caps)
        .env("AGENT", agent_binary())
        .env("PORT", port.to_string())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("NODEWARD_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the agent in a read-only mount namespace");
    let scrape = nodeward_tests::wait_for(std::time::Duration::from_secs(30), || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.contains("nodeward_source_up").then_some(body)
    });
    let status = Command::new(agent_binary())
        .args(["status", "--json", "--addr"])
        .arg(format!("unix:{}", socket.display()))
        .env_remove("NODEWARD_LOG")
        .output()
        .expect("run nodeward status");
    // SAFETY: kill has no memory-safety preconditions; sh exec'd into setpriv, then the agent.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let exited = nodeward_tests::wait_for(std::time::Duration::from_secs(15), || {
        agent.try_wait().ok().flatten()
    });
    let out = agent.wait_with_output().expect("agent exits");
    let log = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&run_dir);

    let scrape = scrape.unwrap_or_else(|| panic!("no metrics scrape; log:\n{log}"));
    for source in ["ebpf/tcp", "ebpf/udp"] {
        assert!(
            scrape.contains(&format!("nodeward_source_up{{source=\"{source}\"}} 1")),
            "{source} did not start on a read-only root with {caps}:\n{scrape}\nlog:\n{log}"
        );
    }
    assert!(
        status.status.success(),
        "the API did not answer on the writable volume: {}\nlog:\n{log}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        !log.contains("Read-only file system") && !log.contains("os error 30"),
        "something tried to write to the read-only root:\n{log}"
    );
    assert!(
        exited.is_some_and(|s| s.success()),
        "the agent stops cleanly: {exited:?}\n{log}"
    );
}
