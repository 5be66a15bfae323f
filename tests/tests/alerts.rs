//! The alerting rules an operator pages on (`packaging/prometheus/nodeward-alerts.yaml` and the
//! same rules as a PrometheusRule): `promtool check rules` accepts them, `promtool test rules`
//! fires and resolves every alert on synthetic series, the two files hold the same rules, each
//! alert names its node or pod and has a runbook in docs/alerts.md, and every metric an alert
//! reads is one that a real agent (scraped here, with the fake NVML for the GPU families)
//! exports.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use nodeward_tests::{agent_binary, fake_nvml::FakeNvml, skip, wait_for};
use serde_json::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const RULES: &str = "packaging/prometheus/nodeward-alerts.yaml";
const RULE_TESTS: &str = "packaging/prometheus/tests/nodeward-alerts.test.yaml";
const PROMETHEUS_RULE: &str = "packaging/kubernetes/prometheus-operator/prometheusrule.yaml";
const RUNBOOKS: &str = "docs/alerts.md";

fn path(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

/// The first YAML document of `rel`, as JSON, read by PyYAML (an independent parser); `None`
/// where python3 or PyYAML is missing.
fn yaml(rel: &str) -> Option<Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(path(rel))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).expect("PyYAML printed JSON"))
}

fn promtool_missing(test: &str) -> bool {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        skip(
            test,
            "promtool not installed (Debian package `prometheus`, installed by cargo xtask test)",
        );
    }
    !found
}

/// Every rule of a `groups:` list.
fn rules(groups: &Value) -> Vec<&Value> {
    groups
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules of a group"))
        .collect()
}

fn alert_names(groups: &Value) -> BTreeSet<String> {
    rules(groups)
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .map(str::to_owned)
        .collect()
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_fire_and_resolve_every_alert() {
    const TEST: &str = "alerts_promtool";
    if promtool_missing(TEST) {
        return;
    }
    let Some(tests) = yaml(RULE_TESTS) else {
        return skip(TEST, "python3 with PyYAML missing (tests/requirements.txt)");
    };
    let groups = yaml(RULES).expect("parse the rules")["groups"].clone();

    let (ok, text) = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(path(RULES)));
    assert!(ok, "promtool check rules:\n{text}");
    assert!(
        text.contains(&format!("SUCCESS: {} rules found", rules(&groups).len())),
        "{text}"
    );
    // The PrometheusRule's groups, as a rules file of their own (JSON is YAML).
    let dir = std::env::temp_dir().join(format!("nodeward-alerts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let operator = dir.join("prometheusrule-groups.yaml");
    let spec = yaml(PROMETHEUS_RULE).expect("parse the PrometheusRule");
    std::fs::write(
        &operator,
        serde_json::json!({ "groups": spec["spec"]["groups"] }).to_string(),
    )
    .expect("write the PrometheusRule's groups");
    let (ok, text) = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(&operator));
    assert!(
        ok,
        "promtool check rules on the PrometheusRule's groups:\n{text}"
    );

    let (ok, text) = run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(path(RULE_TESTS)));
    assert!(ok, "promtool test rules:\n{text}");

    // promtool must be able to fail: the same tests against rules whose unhealthy alert
    // waits longer than the tests expect.
    let broken = dir.join("nodeward-alerts.yaml");
    let text = std::fs::read_to_string(path(RULES))
        .expect("read the rules")
        .replacen("for: 5m", "for: 30m", 1);
    std::fs::write(&broken, text).expect("write the changed rules");
    let tests_copy = dir.join("tests/nodeward-alerts.test.yaml");
    std::fs::create_dir_all(tests_copy.parent().expect("parent")).expect("tests dir");
    std::fs::copy(path(RULE_TESTS), &tests_copy).expect("copy the rule tests");
    let (ok, text) = run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(&tests_copy));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !ok && text.contains("NodewardNodeUnhealthy"),
        "the rule tests passed rules that fire later:\n{text}"
    );

    // Each alert is seen firing, and later seen resolved (no alert at a later evaluation).
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().expect("alert_rule_test"))
        .collect();
    let minutes = |v: &Value| -> u64 {
        let t = v["eval_time"].as_str().expect("eval_time");
        humantime::parse_duration(t)
            .unwrap_or_else(|e| panic!("eval_time {t}: {e}"))
            .as_secs()
            / 60
    };
    for alert in alert_names(&groups) {
        let of_alert = || cases.iter().filter(|c| c["alertname"] == alert.as_str());
        let fired = of_alert()
            .filter(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
            .map(|c| minutes(c))
            .min()
            .unwrap_or_else(|| panic!("{alert} is never tested firing"));
        assert!(
            of_alert().any(
                |c| c["exp_alerts"].as_array().is_some_and(Vec::is_empty) && minutes(c) > fired
            ),
            "{alert} is never tested resolving after it fired at {fired}m"
        );
    }
}

#[test]
fn the_prometheus_rule_and_the_rules_file_hold_the_same_rules() {
    const TEST: &str = "alerts_same_rules";
    let (Some(plain), Some(operator)) = (yaml(RULES), yaml(PROMETHEUS_RULE)) else {
        return skip(TEST, "python3 with PyYAML missing (tests/requirements.txt)");
    };
    assert_eq!(operator["kind"], "PrometheusRule");
    assert_eq!(operator["apiVersion"], "monitoring.coreos.com/v1");
    assert!(!alert_names(&plain["groups"]).is_empty());
    assert_eq!(
        plain["groups"], operator["spec"]["groups"],
        "{RULES} and {PROMETHEUS_RULE} differ"
    );
}

#[test]
fn every_alert_has_a_severity_annotations_naming_its_node_and_a_runbook() {
    const TEST: &str = "alerts_annotations";
    let Some(plain) = yaml(RULES) else {
        return skip(TEST, "python3 with PyYAML missing (tests/requirements.txt)");
    };
    let runbooks = std::fs::read_to_string(path(RUNBOOKS)).expect("read docs/alerts.md");
    for rule in rules(&plain["groups"]) {
        let name = rule["alert"].as_str().expect("only alerting rules");
        let severity = rule["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: severity {severity:?}"
        );
        let expr = rule["expr"].as_str().expect("expr");
        for annotation in ["summary", "description"] {
            let text = rule["annotations"][annotation]
                .as_str()
                .unwrap_or_else(|| panic!("{name} has no {annotation}"));
            // An alert about a pod names the pod; every alert whose series carry the node
            // names the node (`absent()` has no series, so no node to name).
            if expr.contains("namespace, pod") {
                assert!(
                    text.contains("{{ $labels.pod }}"),
                    "{name}: the {annotation} does not name the pod"
                );
            }
            if !expr.starts_with("absent(") {
                assert!(
                    text.contains("{{ $labels.node }}"),
                    "{name}: the {annotation} does not name the node"
                );
            }
        }
        assert!(
            runbooks
                .lines()
                .any(|l| l.strip_prefix("### ") == Some(name)),
            "{name} has no `### {name}` runbook section in {RUNBOOKS}"
        );
    }
}

/// The metric names `expr` reads (`nodeward_*`, and `up`, which Prometheus itself writes).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut i = 0;
    while i < bytes.len() {
        if word(bytes[i]) && (i == 0 || !word(bytes[i - 1])) {
            let end = (i..bytes.len())
                .find(|&j| !word(bytes[j]))
                .unwrap_or(bytes.len());
            let ident = &expr[i..end];
            if ident.starts_with("nodeward_") {
                names.insert(ident.to_owned());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

/// The families a scrape declares (`# TYPE name kind`), with a histogram's series names.
fn exported(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split(' ');
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name.to_owned());
    }
    names
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// `GET /metrics` over HTTP/1.0 (no chunked body); `None` while nothing answers.
fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let ok = head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200");
    ok.then(|| body.to_owned())
}

#[test]
fn every_metric_an_alert_reads_is_exported_by_a_real_agent() {
    const TEST: &str = "alerts_metrics_exist";
    let Some(plain) = yaml(RULES) else {
        return skip(TEST, "python3 with PyYAML missing (tests/requirements.txt)");
    };
    let fake = match FakeNvml::build(TEST, &[]) {
        Ok(f) => f,
        Err(reason) => {
            return skip(
                TEST,
                &format!("no fake NVML for the GPU families: {reason}"),
            )
        }
    };
    // Every GPU reading, an XID on the drain list, a lost GPU: the GPU families the alerts read.
    fake.script(&format!(
        "{}\nevents = 0:xid:79\n",
        nodeward_tests::fake_nvml::every_field_script(1)
    ));
    let dir = std::env::temp_dir().join(format!("nodeward-alerts-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let log = dir.join("agent.log");
    let port = free_port();
    let mut agent = Command::new(agent_binary())
        .args([
            "run",
            "--set",
            "agent.tick=200ms",
            "--set",
            "ebpf.enabled=false",
        ])
        .args(["--set", &format!("metrics.listen=127.0.0.1:{port}")])
        .args(["--set", &format!("gpu.library={}", fake.library_str())])
        .args([
            "--set",
            &format!("drain.state_file={}", dir.join("drain.json").display()),
        ])
        .args([
            "--set",
            &format!("api.unix_socket={}", dir.join("api.sock").display()),
        ])
        .args(["--set", "api.tcp_listen="])
        .env("NODEWARD_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create the agent log"))
        .spawn()
        .expect("start nodeward");
    let text = wait_for(Duration::from_secs(30), || {
        scrape(port).filter(|t| t.contains("nodeward_gpu_xid_window_events{"))
    });
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let _ = wait_for(Duration::from_secs(15), || agent.try_wait().ok().flatten());
    let _ = agent.kill();
    let _ = agent.wait();
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let text = text.unwrap_or_else(|| panic!("no scrape with an XID series; log:\n{logged}"));
    let exported = exported(&text);

    let mut read = BTreeSet::new();
    for rule in rules(&plain["groups"]) {
        read.extend(metric_names(rule["expr"].as_str().expect("expr")));
    }
    assert!(
        read.len() > 5,
        "too few metrics found in the alerts: {read:?}"
    );
    let missing: Vec<&String> = read.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "alerts read metrics the agent does not export: {missing:?}"
    );
    // The check can fail: a misspelt name is not among the exported ones.
    let misspelt = metric_names("rate(nodeward_container_rtp_loss_total[5m]) > 0");
    assert!(
        !misspelt.is_subset(&exported),
        "the check would pass a name no agent exports"
    );
}
