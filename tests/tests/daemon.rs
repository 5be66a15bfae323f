//! The daemon as a user meets it: exit code 64 on bad config, JSON logs, systemd's READY and
//! watchdog notifications, a clean stop on SIGINT, and a verdict with the API turned off.

use std::{
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::Duration,
};

use nodeward_tests::{agent_binary, wait_for};

fn agent() -> Command {
    let mut c = Command::new(agent_binary());
    c.env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("NODEWARD_LOG");
    c
}

#[test]
fn bad_config_file_exits_64_naming_key_value_and_allowed() {
    let dir = std::env::temp_dir().join(format!("nodeward-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("nodeward.toml");
    std::fs::write(&path, "[agent]\ntick = \"fast\"\n").expect("write config");
    let out = agent()
        .args(["--config"])
        .arg(&path)
        .arg("run")
        .output()
        .expect("run nodeward");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr: {stderr}");
    assert!(stderr.contains("agent.tick"), "{stderr}");
    assert!(stderr.contains("\"fast\""), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
}

#[test]
fn bad_environment_value_exits_64() {
    let out = agent()
        .env("NODEWARD_LOG_FORMAT", "xml")
        .args(["config", "check"])
        .output()
        .expect("run nodeward");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr: {stderr}");
    assert!(
        stderr.contains("log.format") && stderr.contains("NODEWARD_LOG_FORMAT"),
        "{stderr}"
    );
}

#[test]
fn config_show_prints_the_effective_config() {
    let out = agent()
        .args(["--set", "agent.tick=3s", "config", "show"])
        .output()
        .expect("run nodeward");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let value: toml_lite::Doc = toml_lite::parse(&text);
    assert_eq!(
        value.get("agent", "tick").as_deref(),
        Some("\"3s\""),
        "{text}"
    );
    assert_eq!(
        value.get("log", "format").as_deref(),
        Some("\"plain\""),
        "{text}"
    );
}

/// Just enough TOML reading for the test above, so it does not reuse the agent's own parser.
mod toml_lite {
    pub struct Doc(Vec<(String, String, String)>);
    pub fn parse(text: &str) -> Doc {
        let mut section = String::new();
        let mut out = Vec::new();
        for line in text.lines().map(str::trim) {
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_owned();
            } else if let Some((k, v)) = line.split_once('=') {
                out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        Doc(out)
    }
    impl Doc {
        pub fn get(&self, section: &str, key: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(s, k, _)| s == section && k == key)
                .map(|(_, _, v)| v.clone())
        }
    }
}

/// With `NOTIFY_SOCKET` and `WATCHDOG_USEC` set as systemd sets them, the agent sends READY=1
/// once running and then WATCHDOG=1 pings; on SIGINT it sends STOPPING=1 and exits 0. JSON logs
/// are one object per line.
/// A command-line tool whose reader has gone (`nodeward config show | head -0`) ends the way Unix
/// tools do, on SIGPIPE, rather than panicking on the failed write (it used to: exit 101 and a
/// backtrace).
#[test]
fn a_closed_stdout_ends_a_tool_quietly() {
    use std::os::unix::process::ExitStatusExt as _;
    let mut child = agent()
        .args(["config", "show"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nodeward config show");
    // Close the read end before the tool has printed anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait for nodeward");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}

#[test]
fn notifies_systemd_and_pings_watchdog() {
    let dir = std::env::temp_dir().join(format!("nodeward-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sock_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");

    // systemd sets WATCHDOG_PID to the main pid; `exec` keeps the shell's pid for the agent.
    let mut child = Command::new("sh")
        .args([
            "-c",
            "export WATCHDOG_PID=$$; exec \"$NODEWARD_BIN\" run --set ebpf.enabled=false --set log.format=json",
        ])
        .env("NODEWARD_BIN", agent_binary())
        .env_remove("NODEWARD_LOG")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nodeward under sh");

    let mut seen = Vec::new();
    let got = wait_for(Duration::from_secs(20), || {
        let mut buf = [0u8; 512];
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let ready = seen.iter().any(|m| m.lines().any(|l| l == "READY=1"));
        let pings = seen
            .iter()
            .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
            .count();
        (ready && pings >= 2).then_some(())
    });
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten());
    let mut buf = [0u8; 512];
    while let Ok(n) = sock.recv(&mut buf) {
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let stderr = std::io::read_to_string(child.stderr.take().expect("stderr")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);

    assert!(
        got.is_some(),
        "expected READY=1 and two WATCHDOG=1, got {seen:?}\n{stderr}"
    );
    assert!(
        status.expect("agent exits after SIGINT").success(),
        "{stderr}"
    );
    assert!(seen.iter().any(|m| m.contains("STOPPING=1")), "{seen:?}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log output");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
    }
}

/// One scrape of `/metrics` on 127.0.0.1:`port`, or `None` while it does not answer.
fn scrape(port: u16) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    raw.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// The health engine is the daemon's, not the API's: with the API off, the verdict is still
/// evaluated (it leaves UNKNOWN once the sources report) and `/metrics` shows it, with the
/// evaluator counted among the supervised tasks.
#[test]
fn the_verdict_is_evaluated_and_exported_with_the_api_disabled() {
    let dir = std::env::temp_dir().join(format!("nodeward-no-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("agent.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let mut child = agent()
        .args(["run", "--config", "/dev/null"])
        .args(["--set", "api.enabled=false", "--set", "ebpf.enabled=false"])
        .args(["--set", "tcp.enabled=false", "--set", "gpu.enabled=false"])
        .args([
            "--set",
            "agent.tick=200ms",
            "--set",
            "health.interval=100ms",
        ])
        .arg("--set")
        .arg(format!("api.unix_socket={}", socket.display()))
        .arg("--set")
        .arg(format!("metrics.listen=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nodeward run");
    let verdict = wait_for(Duration::from_secs(60), || {
        let text = scrape(port)?;
        // The state set: one series per state, 1 on the current one.
        let state = ["healthy", "degraded", "unhealthy"]
            .into_iter()
            .find(|state| {
                sample(
                    &text,
                    &format!("nodeward_health_verdict_state{{state=\"{state}\"}}"),
                ) == Some(1.0)
            })?;
        Some((state, text))
    });
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_for(Duration::from_secs(20), || child.try_wait().ok().flatten());
    let stderr = std::io::read_to_string(child.stderr.take().expect("stderr")).unwrap_or_default();
    let socket_existed = socket.exists();
    let _ = std::fs::remove_dir_all(&dir);

    let (verdict, text) =
        verdict.unwrap_or_else(|| panic!("no verdict other than UNKNOWN in /metrics:\n{stderr}"));
    assert_eq!(
        sample(&text, "nodeward_health_verdict_state{state=\"unknown\"}"),
        Some(0.0),
        "the verdict is {verdict}, so UNKNOWN is 0:\n{text}"
    );
    assert_eq!(
        sample(&text, "nodeward_task_up{task=\"health\"}"),
        Some(1.0),
        "the evaluator runs as a supervised task:\n{text}"
    );
    assert!(!socket_existed, "the API stayed off");
    assert!(stderr.contains("health verdict"), "{stderr}");
    assert!(status.expect("exits after SIGTERM").success(), "{stderr}");
}
