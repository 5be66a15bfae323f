//! The GPU autoscaling example (packaging/kubernetes/examples/gpu-autoscaling): its Deployment
//! and HPA validate against the Kubernetes 1.37 schema offline (kubernetes-validate), the HPA
//! asks for the metric the prometheus-adapter rule serves, built from a series the agent
//! exports, for the Deployment it names; and the rule's query, with the series and label
//! matchers substituted as the adapter does, run by a real Prometheus against the agent's
//! /metrics, returns the utilisation scripted into a fake NVML for the pod's processes.
//!
//! Waits here are generous bounds that only catch a hang, never speed assertions.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use nodeward_tests::{
    agent_binary,
    api::TempDir,
    cgroup_v2_root,
    containerd::{self, Containerd, Pod, PodSpec},
    fake_nvml::fake,
    is_root, skip, tool, wait_for, Cgroup,
};
use serde_json::Value;

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../packaging/kubernetes/examples/gpu-autoscaling"
);
const METRICS_DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md");

/// Long enough for any step on a loaded machine.
const WAIT: Duration = Duration::from_secs(60);

fn example(file: &str) -> PathBuf {
    Path::new(EXAMPLE).join(file)
}

/// Every document of a YAML file, as JSON, read by PyYAML (an independent parser).
fn yaml(path: &Path) -> Option<Vec<Value>> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
        ])
        .arg(path)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The example's three files, parsed: (Deployment, HPA, adapter rule), or None without PyYAML.
fn parsed() -> Option<(Value, Value, Value)> {
    let one = |f: &str| yaml(&example(f)).and_then(|d| d.into_iter().next());
    let rules = one("prometheus-adapter-rules.yaml")?;
    Some((
        one("deployment.yaml")?,
        one("hpa.yaml")?,
        rules["rules"][0].clone(),
    ))
}

/// The metric names docs/metrics.md documents (its tables' first column).
fn documented() -> Vec<String> {
    std::fs::read_to_string(METRICS_DOC)
        .expect("read docs/metrics.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split_once('`'))
        .map(|(name, _)| name.to_owned())
        .collect()
}

/// The series name a PromQL selector such as `name{a="b"}` selects.
fn series_of(selector: &str) -> &str {
    selector.split('{').next().unwrap_or_default().trim()
}

/// The HPA, the Deployment and the adapter rule agree: the HPA scales the Deployment on the
/// Pods metric the rule serves, out above 0.8, and the rule reads a series the agent exports,
/// by the labels that name the pod.
fn consistent(deployment: &Value, hpa: &Value, rule: &Value) -> Result<(), String> {
    let field = |v: &Value, what: &str| -> Result<String, String> {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{what} missing or not a string: {v}"))
    };
    if hpa["apiVersion"] != "autoscaling/v2" || hpa["kind"] != "HorizontalPodAutoscaler" {
        return Err(format!("not an autoscaling/v2 HPA: {hpa}"));
    }
    let target = &hpa["spec"]["scaleTargetRef"];
    if target["kind"] != deployment["kind"]
        || target["apiVersion"] != deployment["apiVersion"]
        || field(&target["name"], "scaleTargetRef.name")?
            != field(&deployment["metadata"]["name"], "Deployment name")?
        || hpa["metadata"]["namespace"] != deployment["metadata"]["namespace"]
    {
        return Err(format!("the HPA targets {target}, not the Deployment"));
    }
    let [metric] = hpa["spec"]["metrics"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    else {
        return Err(format!("not one metric: {}", hpa["spec"]["metrics"]));
    };
    if metric["type"] != "Pods" {
        return Err(format!("not a Pods metric: {metric}"));
    }
    let wanted = field(&metric["pods"]["metric"]["name"], "pods.metric.name")?;
    let goal = &metric["pods"]["target"];
    let average = field(&goal["averageValue"], "target.averageValue")?;
    if goal["type"] != "AverageValue" || !(average == "800m" || average == "0.8") {
        return Err(format!("not an average target of 0.8: {goal}"));
    }

    let served = field(&rule["name"]["as"], "rule name.as")?;
    if served != wanted {
        return Err(format!(
            "the HPA asks for {wanted}, the rule serves {served}"
        ));
    }
    let series = field(&rule["seriesQuery"], "rule seriesQuery")?;
    let series = series_of(&series);
    if !documented().iter().any(|d| d == series) {
        return Err(format!(
            "the rule reads {series}, which the agent does not export"
        ));
    }
    let matches = field(&rule["name"]["matches"], "rule name.matches")?;
    if matches.trim_start_matches('^').trim_end_matches('$') != series {
        return Err(format!("name.matches {matches} does not name {series}"));
    }
    let overrides = &rule["resources"]["overrides"];
    if overrides["namespace"]["resource"] != "namespace" || overrides["pod"]["resource"] != "pod" {
        return Err(format!(
            "the rule does not map namespace and pod: {overrides}"
        ));
    }
    let query = field(&rule["metricsQuery"], "rule metricsQuery")?;
    for part in ["<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"] {
        if !query.contains(part) {
            return Err(format!("metricsQuery lacks {part}: {query}"));
        }
    }
    Ok(())
}

/// `kubernetes-validate --strict` on `files`, without network where we can cut it (root).
fn validate(validator: &Path, files: &[PathBuf]) -> (bool, String) {
    let mut cmd = if is_root() && tool("unshare").is_some() {
        let mut c = Command::new("unshare");
        c.arg("--net").arg(validator);
        c
    } else {
        Command::new(validator)
    };
    let out = cmd
        .args(["--strict", "--kubernetes-version", "1.37.0"])
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

#[test]
fn the_example_deployment_and_hpa_validate_offline_and_ask_for_the_rules_metric() {
    const TEST: &str = "gpu_autoscaling_schema";
    let Some(validator) = tool("kubernetes-validate") else {
        skip(
            TEST,
            "kubernetes-validate not installed (pip install -r tests/requirements.txt)",
        );
        return;
    };
    let files = [example("deployment.yaml"), example("hpa.yaml")];
    let (ok, report) = validate(&validator, &files);
    assert!(ok, "{report}");
    for resource in [
        "deployment/live-transcoder",
        "horizontalpodautoscaler/live-transcoder",
    ] {
        assert!(
            report.contains(&format!(
                "passed for resource {resource} against version 1.37"
            )),
            "{resource} was not validated:\n{report}"
        );
    }

    // The validator must be able to fail: a misspelt field in a copy of the HPA.
    let dir = TempDir::new("gpu-autoscaling-schema");
    let bad = dir.0.join("hpa.yaml");
    let hpa = std::fs::read_to_string(example("hpa.yaml")).expect("read the HPA");
    std::fs::write(&bad, hpa.replace("averageValue:", "averageValu:")).expect("write copy");
    let (ok, report) = validate(&validator, &[bad]);
    assert!(
        !ok && report.contains("averageValu"),
        "a misspelt field passed validation:\n{report}"
    );

    let Some((deployment, hpa, rule)) = parsed() else {
        skip(
            TEST,
            "python3 with PyYAML not available (pip install -r tests/requirements.txt)",
        );
        return;
    };
    consistent(&deployment, &hpa, &rule).unwrap_or_else(|e| panic!("{e}"));

    // The check must be able to fail: a wrong metric name, a series the agent does not export,
    // a missing field, another target.
    let mut wrong = hpa.clone();
    wrong["spec"]["metrics"][0]["pods"]["metric"]["name"] = "gpu_utilization".into();
    assert!(consistent(&deployment, &wrong, &rule).is_err());
    let mut wrong = rule.clone();
    wrong["seriesQuery"] = "nodeward_container_gpu_sm_utilisation_ratio{pod!=\"\"}".into();
    wrong["name"]["matches"] = "^nodeward_container_gpu_sm_utilisation_ratio$".into();
    assert!(consistent(&deployment, &hpa, &wrong).is_err());
    let mut wrong = hpa.clone();
    wrong["spec"]["metrics"][0]["pods"]["target"] = serde_json::json!({"type": "AverageValue"});
    assert!(consistent(&deployment, &wrong, &rule).is_err());
    let mut wrong = hpa.clone();
    wrong["spec"]["scaleTargetRef"]["name"] = "vod-transcoder".into();
    assert!(consistent(&deployment, &wrong, &rule).is_err());
    let mut wrong = rule;
    wrong["resources"]["overrides"]
        .as_object_mut()
        .expect("overrides")
        .remove("pod");
    assert!(consistent(&deployment, &hpa, &wrong).is_err());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// A GET on a loopback port: the body of a 200 answer.
fn get(port: u16, target: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A child process killed on drop, before the directory it owns is removed.
struct Guard {
    child: Child,
    _dir: Option<TempDir>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Prometheus server on a free loopback port scraping `target_port` every second, with a
/// directory of its own (config and TSDB) per instance.
fn prometheus(binary: &Path, target_port: u16) -> (Guard, u16, PathBuf) {
    let owned = TempDir::new("gpu-autoscaling-prometheus");
    let dir = owned.0.clone();
    std::fs::create_dir_all(dir.join("data")).expect("create Prometheus dir");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: nodeward\n    honor_labels: true\n\
             \x20   static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        ),
    )
    .expect("write Prometheus config");
    let port = free_port();
    let log = dir.join("log");
    let child = Command::new(binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create Prometheus log"))
        .spawn()
        .expect("start prometheus");
    (
        Guard {
            child,
            _dir: Some(owned),
        },
        port,
        log,
    )
}

/// The agent, serving /metrics on `port`, reading the fake NVML at `library` and, where given,
/// pod names from the CRI runtime at `runtime`; its log in `dir`/agent.log.
fn agent(dir: &Path, port: u16, library: &str, runtime: Option<&Path>) -> Guard {
    let mut cmd = Command::new(agent_binary());
    cmd.args(["run", "--config", "/dev/null"])
        .args(["--set", "ebpf.enabled=false", "--set", "agent.tick=200ms"])
        .args(["--set", "api.tcp_listen="])
        .arg("--set")
        .arg(format!(
            "api.unix_socket={}",
            dir.join("agent.sock").display()
        ))
        .args(["--set", &format!("metrics.listen=127.0.0.1:{port}")])
        .args(["--set", &format!("gpu.library={library}")]);
    if let Some(socket) = runtime {
        cmd.arg("--set")
            .arg(format!(
                "containers.runtime_endpoint=unix://{}",
                socket.display()
            ))
            .args(["--set", "containers.runtime_resync=1s"]);
    }
    let child = cmd
        .env("NODEWARD_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).expect("create the agent's log"))
        .spawn()
        .expect("start nodeward run");
    Guard { child, _dir: None }
}

/// The result vector of an instant query, once it is non-empty.
fn query(port: u16, promql: &str) -> Option<Vec<Value>> {
    let body = get(port, &format!("/api/v1/query?query={}", encode(promql)))?;
    let v: Value = serde_json::from_str(&body).ok()?;
    let result = v["data"]["result"].as_array()?.clone();
    (!result.is_empty()).then_some(result)
}

#[test]
fn prometheus_runs_the_adapter_rules_query_and_gets_the_pods_scripted_gpu_utilisation() {
    const TEST: &str = "gpu_autoscaling_promql";
    let Some(binary) = tool("prometheus") else {
        skip(
            TEST,
            "prometheus not installed (Debian package `prometheus`)",
        );
        return;
    };
    if !is_root() {
        skip(TEST, "needs root to make a cgroup");
        return;
    }
    if cgroup_v2_root().is_none() {
        skip(TEST, "no cgroup v2 hierarchy");
        return;
    }
    let Some((_, _, rule)) = parsed() else {
        skip(
            TEST,
            "python3 with PyYAML not available (pip install -r tests/requirements.txt)",
        );
        return;
    };
    let Some(fake) = fake("gpu-autoscaling", &[]) else {
        return;
    };
    // Two containers of one pod on one GPU, their processes scripted at 95% and 75% SM: the
    // rule's per-pod figure is their average.
    let first = Cgroup::new("gpu-hpa-a");
    let second = Cgroup::new("gpu-hpa-b");
    let mut p = first.spawn(Command::new("sleep").arg("600"));
    let mut q = second.spawn(Command::new("sleep").arg("600"));
    let (a, b) = (p.id(), q.id());
    let mut script =
        format!("devices = 1\nall.temp = 40\nall.procs.compute = {a}:1048576 {b}:1048576\n");
    // One sample per poll with a newer timestamp, as real NVML hands them out.
    for n in 0..2000u32 {
        let t = n + 2;
        let _ = writeln!(
            script,
            "@count {n}\nall.procutil = {a}:95:0:0:0:{t} {b}:75:0:0:0:{t}"
        );
    }
    fake.script(&script);

    let dir = TempDir::new("gpu-autoscaling");
    let port = free_port();
    let log = dir.0.join("agent.log");
    let _agent = agent(&dir.0, port, &fake.library_str(), None);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let (_prom, prom_port, prom_log) = prometheus(&binary, port);

    // The query as the adapter runs it for the pods of one namespace: the rule's series, its
    // resource labels as matchers, grouped by the pod label. These bare cgroups have no CRI
    // names, so the agent labels both with namespace="" and pod="" (one unnamed pod), which
    // is what the matchers select.
    let series = series_of(rule["seriesQuery"].as_str().expect("seriesQuery")).to_owned();
    let promql = rule["metricsQuery"]
        .as_str()
        .expect("metricsQuery")
        .replace("<<.Series>>", &series)
        .replace("<<.LabelMatchers>>", r#"namespace="",pod=~"""#)
        .replace("<<.GroupBy>>", "pod");
    // Both containers' series must be in Prometheus before the average means anything.
    let containers = format!("count({series})");
    wait_for(WAIT, || {
        query(prom_port, &containers)
            .filter(|r| r[0]["value"][1] == "2")
            .map(|_| ())
    })
    .unwrap_or_else(|| {
        panic!(
            "Prometheus never had both containers' series:\nagent:\n{}\nprometheus:\n{}",
            read(&log),
            read(&prom_log)
        )
    });
    let result = query(prom_port, &promql)
        .unwrap_or_else(|| panic!("{promql} returned nothing:\n{}", read(&prom_log)));
    let [pod] = result.as_slice() else {
        panic!("{promql}: not one pod: {result:?}");
    };
    let value: f64 = pod["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{promql}: no value in {pod}"));
    assert!(
        (value - 0.85).abs() < 1e-9,
        "{promql} = {value}, want the scripted average 0.85"
    );

    let _ = p.kill();
    let _ = q.kill();
    let _ = p.wait();
    let _ = q.wait();
}

/// The host PIDs in a pod's container cgroup (the cgroupfs driver puts it at
/// `<cgroup parent>/<container id>`).
fn container_pids(pod: &Pod) -> Option<Vec<u32>> {
    let dir = cgroup_v2_root()?
        .join(pod.cgroup_parent.trim_start_matches('/'))
        .join(&pod.container_id);
    let pids: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .ok()?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    (!pids.is_empty()).then_some(pids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_query_gives_each_real_pod_its_scripted_gpu_utilisation() {
    const TEST: &str = "gpu_autoscaling_cri";
    let Some(binary) = tool("prometheus") else {
        skip(
            TEST,
            "prometheus not installed (Debian package `prometheus`)",
        );
        return;
    };
    if let Some(why) = containerd::unavailable() {
        skip(TEST, &why);
        return;
    }
    let Some((_, hpa, rule)) = parsed() else {
        skip(
            TEST,
            "python3 with PyYAML not available (pip install -r tests/requirements.txt)",
        );
        return;
    };
    let Some(fake) = fake("gpu-autoscaling-cri", &[]) else {
        return;
    };
    let namespace = hpa["metadata"]["namespace"].as_str().expect("namespace");
    let ctrd = Containerd::start("gpu-autoscaling-cri");
    let mut cri = ctrd.client().await;
    // Two pods of the example's namespace, their transcoders scripted at 90% and 60% SM.
    let mut pods = Vec::new();
    for (n, (name, sm)) in [("live-transcoder-0", 90u32), ("live-transcoder-1", 60)]
        .into_iter()
        .enumerate()
    {
        let spec = PodSpec {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            // UUID-shaped, as the kubelet's: the cgroup path parser expects hex and dashes.
            uid: format!(
                "{:08x}-0000-4000-8000-{:012x}",
                std::process::id(),
                n + 0xa0
            ),
            container: "transcoder".to_owned(),
            labels: std::collections::HashMap::new(),
            annotations: std::collections::HashMap::new(),
        };
        let pod = containerd::run_pod(&ctrd, &mut cri, &spec)
            .await
            .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
        let pids = wait_for(WAIT, || container_pids(&pod))
            .unwrap_or_else(|| panic!("no processes in {name}'s container cgroup"));
        pods.push((name, sm, pids, pod));
    }
    let procs: Vec<String> = pods
        .iter()
        .flat_map(|(_, _, pids, _)| pids.iter().map(|p| format!("{p}:1048576")))
        .collect();
    let mut script = format!(
        "devices = 1\nall.temp = 40\nall.procs.compute = {}\n",
        procs.join(" ")
    );
    // One sample per poll with a newer timestamp, as real NVML hands them out.
    for n in 0..2000u32 {
        let t = n + 2;
        let samples: Vec<String> = pods
            .iter()
            .flat_map(|(_, sm, pids, _)| pids.iter().map(move |p| format!("{p}:{sm}:0:0:0:{t}")))
            .collect();
        let _ = writeln!(script, "@count {n}\nall.procutil = {}", samples.join(" "));
    }
    fake.script(&script);

    let dir = TempDir::new("gpu-autoscaling-cri-agent");
    let port = free_port();
    let log = dir.0.join("agent.log");
    let _agent = agent(&dir.0, port, &fake.library_str(), Some(&ctrd.socket()));
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let (_prom, prom_port, prom_log) = prometheus(&binary, port);

    // The adapter's discovery query finds both pods' series...
    let discovery = rule["seriesQuery"].as_str().expect("seriesQuery");
    let names: Vec<&str> = pods.iter().map(|(name, _, _, _)| *name).collect();
    let found = wait_for(WAIT, || {
        let r = query(prom_port, discovery)?;
        let mut got: Vec<String> = r
            .iter()
            .filter(|s| s["metric"]["namespace"] == namespace)
            .filter_map(|s| s["metric"]["pod"].as_str().map(str::to_owned))
            .collect();
        got.sort();
        (got == names).then_some(got)
    });
    assert!(
        found.is_some(),
        "{discovery} never found {names:?}:\n{:?}\nagent:\n{}\nprometheus:\n{}",
        query(prom_port, discovery),
        read(&log),
        read(&prom_log)
    );
    // ...and its metrics query, as the adapter fills it in for these pods, gives each pod the
    // utilisation scripted for its processes.
    let promql = rule["metricsQuery"]
        .as_str()
        .expect("metricsQuery")
        .replace("<<.Series>>", series_of(discovery))
        .replace(
            "<<.LabelMatchers>>",
            &format!(r#"namespace="{namespace}",pod=~"{}""#, names.join("|")),
        )
        .replace("<<.GroupBy>>", "pod");
    let result = query(prom_port, &promql)
        .unwrap_or_else(|| panic!("{promql} returned nothing:\n{}", read(&prom_log)));
    assert_eq!(result.len(), pods.len(), "{promql}: {result:?}");
    for (name, sm, _, _) in &pods {
        let value: Option<f64> = result
            .iter()
            .find(|s| s["metric"]["pod"] == *name)
            .and_then(|s| s["value"][1].as_str()?.parse().ok());
        let want = f64::from(*sm) / 100.0;
        assert!(
            value.is_some_and(|v| (v - want).abs() < 1e-9),
            "{promql}: {name} = {value:?}, want {want}"
        );
    }
    for (_, _, _, pod) in &pods {
        containerd::remove_pod(&mut cri, pod).await;
    }
}
