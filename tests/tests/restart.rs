//! An agent killed with SIGKILL and started again: the new one binds over the dead one's socket,
//! starts at UNKNOWN, rebuilds its verdict from fresh data (no condition carried over; the drain,
//! kept in its state file, is) and says so in its log. That no eBPF program or link outlives SIGKILL is proved in
//! `ebpf_chain.rs::sigkill_leaves_nothing_attached_and_restart_works`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use nodeward_tests::{agent_binary, require_root, wait_for};
use serde_json::Value;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("create the log file");
    Command::new(agent_binary())
        .arg("--config")
        .arg(config)
        .arg("run")
        .env_remove("NODEWARD_LOG")
        .env_remove("NOTIFY_SOCKET")
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("start nodeward")
}

/// `nodeward <args> --addr unix:<socket> --json`, parsed; `None` while the agent doesn't answer.
fn ask(socket: &Path, args: &[&str]) -> Option<Value> {
    let out = Command::new(agent_binary())
        .args(args)
        .arg("--addr")
        .arg(format!("unix:{}", socket.display()))
        .args(["--json", "--connect-timeout", "2s"])
        .env_remove("NODEWARD_LOG")
        .output()
        .expect("run the CLI");
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// The `DiskNearlyFull` condition on `/` once the verdict is degraded by it.
fn disk_condition(socket: &Path) -> Option<Value> {
    let status = ask(socket, &["status"])?;
    if status["health"]["verdict"] != "VERDICT_DEGRADED" {
        return None;
    }
    status["health"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "DiskNearlyFull" && c["subject"] == "/")
        .cloned()
}

/// The `health verdict` lines of a JSON log, in order: (previous, verdict).
fn verdict_lines(log: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "health verdict")
        .map(|v| {
            (
                v["previous"].as_str().unwrap_or("").to_owned(),
                v["verdict"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[test]
fn sigkill_then_restart_starts_unknown_and_rebuilds_from_fresh_data() {
    const TEST: &str = "sigkill_then_restart_starts_unknown_and_rebuilds_from_fresh_data";
    require_root!(TEST);
    let dir = Dir(std::env::temp_dir().join(format!("nodeward-restart-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let socket = dir.0.join("agent.sock");
    let config = dir.0.join("nodeward.toml");
    // A disk threshold every root filesystem is above, so the verdict is DEGRADED from real
    // data, and no hold or recovery time, so a fresh agent reaches it at its first evaluation.
    std::fs::write(
        &config,
        format!(
            "[log]\nformat = \"json\"\nfilter = \"info\"\n\
             [agent]\ntick = \"200ms\"\n\
             [gpu]\nenabled = false\n\
             [health]\ninterval = \"200ms\"\nhold = \"0s\"\nrecovery = \"0s\"\n\
             disk_used_warning_ratio = 0.000001\n\
             [api]\nunix_socket = \"{}\"\ntcp_listen = \"\"\n\
             [metrics]\nenabled = false\n",
            socket.display()
        ),
    )
    .expect("write config");

    let first_log = dir.0.join("first.log");
    let mut first = start(&config, &first_log);
    let before = wait_for(Duration::from_secs(30), || disk_condition(&socket))
        .expect("the first agent reports DiskNearlyFull on / within 30 s");
    let drain = ask(
        &socket,
        &[
            "drain",
            "start",
            "--by",
            "restart-test",
            "--reason",
            "rollout",
        ],
    )
    .expect("drain start answers");
    assert_ne!(
        drain["drain"]["state"], "DRAIN_STATE_NOT_DRAINING",
        "{drain}"
    );
    let draining = ask(&socket, &["status"]).expect("status answers");
    assert_ne!(
        draining["health"]["drain"]["state"], "DRAIN_STATE_NOT_DRAINING",
        "{draining}"
    );

    first.kill().expect("SIGKILL");
    first.wait().expect("reap");
    let killed_at = now_ms();
    assert!(
        socket.exists(),
        "SIGKILL leaves the socket file for the next agent to bind over"
    );

    let second_log = dir.0.join("second.log");
    let mut second = start(&config, &second_log);
    let after = wait_for(Duration::from_secs(30), || disk_condition(&socket))
        .expect("the restarted agent serves and reports DiskNearlyFull again within 30 s");
    let status = ask(&socket, &["status"]).expect("status answers");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(second.id() as i32, libc::SIGTERM) };
    let stopped = wait_for(Duration::from_secs(15), || second.try_wait().ok().flatten());

    assert_eq!(
        status["health"]["drain"]["state"], "DRAIN_STATE_DRAINING",
        "the drain is restored from its state file (drain_restart.rs covers it in full): {status}"
    );
    // An int64 is a string in protobuf's JSON mapping.
    let since = |c: &Value| {
        c["sinceUnixMs"]
            .as_str()
            .and_then(|s| s.parse::<i64>().ok())
            .expect("sinceUnixMs")
    };
    assert!(
        since(&after) >= killed_at && since(&after) > since(&before),
        "the condition was raised afresh by the new agent (before {}, killed at {killed_at}, after {})",
        since(&before),
        since(&after)
    );
    let lines = verdict_lines(&second_log);
    let log = std::fs::read_to_string(&second_log).unwrap_or_default();
    assert_eq!(
        lines.first().map(|(p, v)| (p.as_str(), v.as_str())),
        Some(("none", "Unknown")),
        "the restarted agent starts at UNKNOWN: {log}"
    );
    assert!(
        lines.contains(&("Unknown".to_owned(), "Degraded".to_owned())),
        "then moves to the verdict of its fresh data: {log}"
    );
    assert!(
        stopped.is_some_and(|s| s.success()),
        "the restarted agent stops cleanly on SIGTERM: {log}"
    );
}
