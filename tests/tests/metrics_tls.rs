//! `/metrics` over TLS with client certificates, through the real agent and stock clients:
//! Python's `ssl`/`urllib` and curl with a client certificate signed by `metrics.tls_client_ca`
//! get the scrape (and promtool accepts it); without a certificate, with one from another CA,
//! or in plain HTTP, they get nothing. Certificates are made per test with rcgen
//! (`nodeward_tests::pki`). No root needed (eBPF and the GPU off).

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use nodeward_tests::{agent_binary, pki::Pki, skip, tool, wait_for};

const TEST: &str = "metrics_tls";
/// A bound that only catches a hang.
const WAIT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// GET `url` with Python's urllib, trusting `ca` and presenting `client` (`(cert, key)`).
/// `Ok(body)` on a 200, `Err(what Python said)` otherwise.
fn python_get(url: &str, ca: &Path, client: Option<(&Path, &Path)>) -> Result<String, String> {
    const SCRIPT: &str = r#"
import ssl, sys, urllib.request
url, ca, cert, key = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca)
if cert:
    ctx.load_cert_chain(cert, key)
with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
    sys.stdout.write(r.read().decode())
"#;
    let (cert, key) = client.map_or((String::new(), String::new()), |(c, k)| {
        (c.display().to_string(), k.display().to_string())
    });
    let out = Command::new("python3")
        .args(["-c", SCRIPT, url])
        .arg(ca)
        .args([cert, key])
        .output()
        .expect("run python3");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// GET `url` with curl; same contract as [`python_get`].
fn curl_get(url: &str, ca: &Path, client: Option<(&Path, &Path)>) -> Result<String, String> {
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--fail", "--max-time", "10"])
        .arg("--cacert")
        .arg(ca);
    if let Some((cert, key)) = client {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    let out = cmd.arg(url).output().expect("run curl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `promtool check metrics` on `text`: what it printed, if it failed.
fn promtool_check(text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    // Lint warnings (exit 3 in some versions) are not errors of the format.
    match out.status.code() {
        Some(0 | 3) => Ok(()),
        _ => Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

struct Agent(std::process::Child, PathBuf);

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        if wait_for(WAIT, || self.0.try_wait().ok().flatten()).is_none() {
            let _ = self.0.kill();
        }
    }
}

/// `nodeward run` serving `/metrics` over TLS on `port` with `pki`'s server certificate,
/// requiring client certificates from `pki`'s CA.
fn start_agent(pki: &Pki, port: u16) -> Agent {
    let log = pki.path("agent.log");
    let child = Command::new(agent_binary())
        .args(["run", "--config", "/dev/null"])
        .args(["--set", "ebpf.enabled=false", "--set", "gpu.enabled=false"])
        .args(["--set", "api.enabled=false"])
        .args(["--set", &format!("metrics.listen=127.0.0.1:{port}")])
        .arg("--set")
        .arg(format!(
            "metrics.tls_cert={}",
            pki.path("server.pem").display()
        ))
        .arg("--set")
        .arg(format!(
            "metrics.tls_key={}",
            pki.path("server.key").display()
        ))
        .arg("--set")
        .arg(format!(
            "metrics.tls_client_ca={}",
            pki.path("ca.pem").display()
        ))
        .env("NODEWARD_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create the agent's log"))
        .spawn()
        .expect("start nodeward run");
    Agent(child, log)
}

/// A plain HTTP GET of Prometheus' own API on loopback, as JSON.
fn prometheus_api(port: u16, target: &str) -> Option<serde_json::Value> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then_some(())?;
    serde_json::from_str(body).ok()
}

#[test]
fn prometheus_scrapes_with_its_tls_config_and_is_refused_without_a_client_certificate() {
    let Some(prometheus) = tool("prometheus") else {
        return skip(
            TEST,
            "prometheus not installed (Debian package `prometheus`)",
        );
    };
    let pki = Pki::new("metrics-tls-prom");
    let client = pki.client("prometheus");
    let port = free_port();
    let agent = start_agent(&pki, port);
    let dir = pki.path("prometheus");
    std::fs::create_dir_all(dir.join("data")).expect("create Prometheus dir");
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path(&format!("{client}.pem")),
        pki.path(&format!("{client}.key")),
    );
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n\
         \x20 - job_name: with_cert\n    scheme: https\n    tls_config:\n\
         \x20     ca_file: {ca}\n      cert_file: {cert}\n      key_file: {key}\n\
         \x20     server_name: localhost\n\
         \x20   static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n\
         \x20 - job_name: without_cert\n    scheme: https\n    tls_config:\n\
         \x20     ca_file: {ca}\n      server_name: localhost\n\
         \x20   static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n",
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
    );
    std::fs::write(dir.join("prometheus.yml"), config).expect("write Prometheus config");
    let web = free_port();
    let mut child = Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).expect("create Prometheus log"))
        .spawn()
        .expect("start prometheus");
    // Both targets scraped at least once: one up, the other down with the handshake's error.
    let targets = wait_for(Duration::from_secs(60), || {
        let v = prometheus_api(web, "/api/v1/targets")?;
        let targets = v["data"]["activeTargets"].as_array()?.clone();
        let health = |job: &str| {
            targets
                .iter()
                .find(|t| t["labels"]["job"] == job)
                .map(|t| t["health"].as_str().unwrap_or_default().to_owned())
        };
        (health("with_cert")? == "up" && health("without_cert")? == "down").then_some(targets)
    });
    let _ = child.kill();
    let _ = child.wait();
    let targets = targets.unwrap_or_else(|| {
        panic!(
            "Prometheus did not scrape with its certificate and fail without:\n{:?}\n{}\n{}",
            prometheus_api(web, "/api/v1/targets"),
            std::fs::read_to_string(dir.join("log")).unwrap_or_default(),
            std::fs::read_to_string(&agent.1).unwrap_or_default()
        )
    });
    let refused = targets
        .iter()
        .find(|t| t["labels"]["job"] == "without_cert")
        .expect("the job without a certificate");
    assert_ne!(refused["lastError"], "", "{refused}");
}

#[test]
fn metrics_over_tls_serve_only_clients_with_a_certificate_from_the_configured_ca() {
    if tool("python3").is_none() {
        return skip(TEST, "python3 missing (the stock HTTPS client)");
    }
    let pki = Pki::new("metrics-tls");
    let client = pki.client("prometheus");
    let other = Pki::new("metrics-tls-other");
    let stranger = other.client("prometheus");
    let port = free_port();
    let agent = start_agent(&pki, port);
    let read_log = || std::fs::read_to_string(&agent.1).unwrap_or_default();
    let url = format!("https://localhost:{port}/metrics");
    let ca = pki.path("ca.pem");
    let cert = (
        pki.path(&format!("{client}.pem")),
        pki.path(&format!("{client}.key")),
    );
    let cert = (cert.0.as_path(), cert.1.as_path());

    // A certificate signed by the configured CA: the scrape.
    let body = wait_for(WAIT, || python_get(&url, &ca, Some(cert)).ok())
        .unwrap_or_else(|| panic!("no scrape over TLS within {WAIT:?}:\n{}", read_log()));
    assert!(
        body.contains("# TYPE nodeward_health_verdict_state gauge"),
        "{body}"
    );
    if tool("promtool").is_some() {
        promtool_check(&body).unwrap_or_else(|e| panic!("promtool rejects the scrape: {e}"));
    } else {
        skip(
            TEST,
            "promtool missing: the TLS scrape's format is not checked",
        );
    }

    // Refused: no certificate, another CA's certificate, plain HTTP on the TLS port.
    let e = python_get(&url, &ca, None).expect_err("a client without a certificate");
    assert!(!e.contains("nodeward_"), "{e}");
    let theirs = (
        other.path(&format!("{stranger}.pem")),
        other.path(&format!("{stranger}.key")),
    );
    let e = python_get(&url, &ca, Some((&theirs.0, &theirs.1)))
        .expect_err("a certificate from another CA");
    assert!(!e.contains("nodeward_"), "{e}");
    let plain = format!("http://localhost:{port}/metrics");
    let e = python_get(&plain, &ca, None).expect_err("plain HTTP on the TLS port");
    assert!(!e.contains("nodeward_"), "{e}");

    // The same with curl.
    if tool("curl").is_some() {
        let body = curl_get(&url, &ca, Some(cert)).expect("curl with the client certificate");
        assert!(body.contains("nodeward_health_verdict_state"), "{body}");
        curl_get(&url, &ca, None).expect_err("curl without a certificate");
        curl_get(&url, &ca, Some((&theirs.0, &theirs.1)))
            .expect_err("curl with another CA's certificate");
    } else {
        skip(TEST, "curl missing: checked with Python only");
    }

    // The agent still serves after the refused handshakes.
    python_get(&url, &ca, Some(cert)).expect("a scrape after the refused clients");
}

#[test]
fn a_metrics_tls_key_without_a_certificate_is_a_config_error_naming_the_key() {
    let out = Command::new(agent_binary())
        .args([
            "config",
            "check",
            "--set",
            "metrics.tls_key=/etc/nodeward/m.key",
        ])
        .output()
        .expect("run nodeward config check");
    assert_eq!(out.status.code(), Some(64), "EX_USAGE");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("metrics.tls_key"), "{stderr}");
}
