//! What the agent writes to its log while it serves TLS clients, at the most verbose level
//! (`trace` for every crate: tonic, h2, hyper, rustls included): never key material, never the
//! content of a request beyond the drain audit fields (who, which identity, why), and every
//! refused drain call named with the caller's identity.

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    time::Duration,
};

use nodeward_tests::{agent_binary, pki::Pki, wait_for};

/// A marker that appears only inside request messages (a container filter), never in config.
const FILTER_MARKER: &str = "ns-marker-6c1d9e";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

#[test]
fn trace_logs_carry_no_key_material_and_no_request_bodies() {
    let pki = Pki::new("log-hygiene");
    let controller = pki.client("rollout");
    let intruder = pki.client("intruder");
    let port = free_port();
    let config = pki.path("nodeward.toml");
    std::fs::write(
        &config,
        format!(
            "[log]\nformat = \"json\"\n\
             [ebpf]\nenabled = false\n\
             [gpu]\nenabled = false\n\
             [metrics]\nenabled = false\n\
             [api]\nunix_socket = \"\"\ntcp_listen = \"127.0.0.1:{port}\"\n\
             tls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n\
             drain_allowed_identities = [\"cn:rollout\"]\n\
             [drain]\nstate_file = \"{}\"\n",
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
            pki.path("ca.pem").display(),
            // Not the default /run/nodeward/drain.json, which every other agent of the tests
            // without a socket of its own would restore this drain from.
            pki.path("drain.json").display(),
        ),
    )
    .expect("write config");
    let log_path = pki.path("agent.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut agent = Command::new(agent_binary())
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("NODEWARD_LOG", "trace")
        .env_remove("NOTIFY_SOCKET")
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("start nodeward");

    let addr = format!("https://127.0.0.1:{port}");
    let cli = |cert: Option<&str>, args: &[&str]| {
        let mut c = Command::new(agent_binary());
        c.args(args)
            .args(["--addr", &addr, "--tls-domain", "localhost", "--tls-ca"])
            .arg(pki.path("ca.pem"))
            .env_remove("NODEWARD_LOG")
            .stdin(Stdio::null());
        if let Some(name) = cert {
            c.arg("--tls-cert")
                .arg(pki.path(&format!("{name}.pem")))
                .arg("--tls-key")
                .arg(pki.path(&format!("{name}.key")));
        }
        c.output().expect("run the CLI")
    };
    let served = wait_for(Duration::from_secs(30), || {
        cli(Some(&controller), &["status", "--json"])
            .status
            .success()
            .then_some(())
    });
    let containers = cli(
        Some(&controller),
        &["containers", "--json", "--namespace", FILTER_MARKER],
    );
    let refused = cli(
        Some(&intruder),
        &[
            "drain",
            "start",
            "--by",
            "someone",
            "--reason",
            "not allowed",
        ],
    );
    let no_cert = cli(None, &["status", "--json"]);
    let drained = cli(
        Some(&controller),
        &[
            "drain",
            "start",
            "--by",
            "rollout-42",
            "--reason",
            "kernel update",
        ],
    );
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let stopped = wait_for(Duration::from_secs(15), || agent.try_wait().ok().flatten());
    let text = std::fs::read_to_string(&log_path).expect("read the log");
    let tail: String = text.lines().rev().take(40).collect::<Vec<_>>().join("\n");

    assert!(
        served.is_some(),
        "the agent served TLS within 30 s:\n{tail}"
    );
    assert!(
        containers.status.success(),
        "{}",
        String::from_utf8_lossy(&containers.stderr)
    );
    assert!(!refused.status.success(), "cn:intruder may not drain");
    assert!(
        !no_cert.status.success(),
        "a client certificate is required"
    );
    assert!(
        drained.status.success(),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    assert!(stopped.is_some(), "the agent stops on SIGTERM:\n{tail}");
    assert!(
        text.lines().count() > 50,
        "trace logging was on (got {} lines)",
        text.lines().count()
    );

    // Key material: no PEM armour of a key, no line of any key's base64 body.
    assert!(!text.contains("PRIVATE KEY"), "a PEM key header was logged");
    for key in [
        "server.key",
        &format!("{controller}.key"),
        &format!("{intruder}.key"),
    ] {
        let pem = std::fs::read_to_string(pki.path(key)).expect("read key");
        for line in pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        {
            assert!(!text.contains(line), "a line of {key} was logged: {line}");
        }
    }
    // Request contents: the filter a client sent is not logged.
    assert!(
        !text.contains(FILTER_MARKER),
        "a request's container filter was logged"
    );
    // The drain audit trail: the accepted call with who, identity and why; the refused one with
    // the caller's identity.
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let requested = lines
        .iter()
        .find(|l| l["message"] == "drain requested")
        .unwrap_or_else(|| panic!("no `drain requested` line:\n{tail}"));
    assert_eq!(requested["identity"], "cn:rollout", "{requested}");
    assert_eq!(requested["requested_by"], "rollout-42", "{requested}");
    assert_eq!(requested["reason"], "kernel update", "{requested}");
    let refusal = lines
        .iter()
        .find(|l| l["message"] == "drain call refused")
        .unwrap_or_else(|| panic!("no `drain call refused` line:\n{tail}"));
    assert_eq!(refusal["identity"], "cn:intruder", "{refusal}");
}
