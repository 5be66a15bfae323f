//! The daemon's cgroup source end to end: `nodeward run` pointed at a fixture cgroup tree scans
//! it on every tick, logs the one-line summary, and follows containers as they come and go.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use nodeward::containers::fixture::{write_tree, Driver, FixtureLayout, TempDir};
use nodeward_tests::{agent_binary, send_signal};
use rustix::process::Signal;

/// Waits for the next scan summary and returns its `workloads` count.
fn next_scan(lines: &mpsc::Receiver<String>) -> u64 {
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a scan summary within 10 s");
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["message"] == "cgroup and node scan" {
            return v["workloads"].as_u64().expect("workloads is a number");
        }
    }
}

#[test]
fn the_daemon_scans_a_fixture_tree_every_tick_and_follows_removals_and_additions() {
    let dir = TempDir::new("nodeward-daemon-fixture").expect("temp dir");
    let written = write_tree(&dir.path, FixtureLayout::V2, Driver::Systemd, 6, 2).expect("fixture");
    let mut agent = Command::new(agent_binary())
        .arg("run")
        .args(["--config", "/dev/null"])
        .args([
            "--set",
            &format!("paths.cgroup_root={}", dir.path.display()),
        ])
        .args([
            "--set",
            &format!("paths.proc_root={}", dir.path.join("proc").display()),
        ])
        .args([
            "--set",
            "agent.tick=200ms",
            "--set",
            "ebpf.enabled=false",
            "--set",
            "node.enabled=false",
        ])
        .args(["--set", "log.format=json"])
        .env("NODEWARD_LOG", "nodeward::sources::cgroup=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the agent");
    let stderr = agent.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    assert_eq!(next_scan(&rx), 8, "6 containers and 2 services");
    assert_eq!(next_scan(&rx), 8, "and again on the next tick");
    std::fs::remove_dir_all(dir.path.join(&written[0].path)).expect("remove a container");
    // The scan in flight may have listed it already; the one after cannot have.
    next_scan(&rx);
    assert_eq!(next_scan(&rx), 7, "the removed container is gone");
    // A container made after the agent's last walk of the tree (it walks again only when a
    // directory is made or removed in it): found as soon as a removal is.
    let pod = std::path::Path::new(&written[1].path)
        .parent()
        .expect("a container is in its pod");
    let added = pod.join(format!("cri-containerd-{:064x}.scope", 0xadd_u64));
    std::fs::create_dir(dir.path.join(added)).expect("make a container");
    next_scan(&rx);
    assert_eq!(next_scan(&rx), 8, "the new container is found");

    send_signal(agent.id(), Signal::Term).expect("SIGTERM the agent");
    let status = agent.wait().expect("agent exits");
    assert!(status.success(), "agent exit: {status}");
}
