//! The eBPF chain end to end: the daemon loads and attaches its embedded programs, and detaches
//! everything when told to stop or killed. (What the programs count, per cgroup, against real
//! traffic is `tcp_latency.rs`, `udp_rtp.rs` and `nodeward probe --verify`.)

use std::{
    process::{Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use nodeward_tests::{
    agent_binary, bpf_objects_of, bpftool_has, require_root, send_signal, skip, wait_for,
};
use rustix::process::Signal;

/// Tests in this file count the agent's programs in the kernel; they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// `nodeward run` attaches its programs, and after SIGTERM exits 0 with none of them (nor their
/// links) left in the kernel, as `bpftool` sees it.
#[test]
fn sigterm_detaches_every_program() {
    const TEST: &str = "sigterm_detaches_every_program";
    require_root!(TEST);
    if Command::new("bpftool").arg("version").output().is_err() {
        return skip(TEST, "bpftool is not installed");
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());

    let mut agent = Command::new(agent_binary())
        .args([
            "run",
            "--set",
            "agent.tick=200ms",
            "--set",
            "agent.shutdown_timeout=5s",
        ])
        .env("NODEWARD_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nodeward");
    let pid = agent.id();
    let (progs, links) = wait_for(Duration::from_secs(20), || {
        let (p, l) = bpf_objects_of(pid);
        (!p.is_empty()).then_some((p, l))
    })
    .expect("the agent loaded no eBPF program within 20 s");
    for id in &progs {
        assert!(
            bpftool_has("prog", *id),
            "bpftool sees program {id} while the agent runs"
        );
    }

    send_signal(pid, Signal::Term).expect("SIGTERM the agent");
    let status = wait_for(Duration::from_secs(10), || agent.try_wait().ok().flatten())
        .expect("agent exits within its shutdown deadline");
    let stderr = std::io::read_to_string(agent.stderr.take().expect("stderr")).unwrap_or_default();
    assert!(
        status.success(),
        "agent exit status {status}; log:\n{stderr}"
    );
    assert!(stderr.contains("SIGTERM received"), "log:\n{stderr}");

    // Program and link ids are freed asynchronously after the last reference goes.
    let leftover = wait_for(Duration::from_secs(5), || {
        let left: Vec<String> = progs
            .iter()
            .filter(|id| bpftool_has("prog", **id))
            .map(|id| format!("prog {id}"))
            .chain(
                links
                    .iter()
                    .filter(|id| bpftool_has("link", **id))
                    .map(|id| format!("link {id}")),
            )
            .collect();
        left.is_empty().then_some(())
    });
    assert!(
        leftover.is_some(),
        "programs or links left attached after SIGTERM: {progs:?} {links:?}"
    );
}

/// An agent killed with SIGKILL leaves no program or link behind (nothing is pinned; the
/// kernel frees them with the last file descriptor), and the next start attaches afresh.
#[test]
fn sigkill_leaves_nothing_attached_and_restart_works() {
    const TEST: &str = "sigkill_leaves_nothing_attached_and_restart_works";
    require_root!(TEST);
    if Command::new("bpftool").arg("version").output().is_err() {
        return skip(TEST, "bpftool is not installed");
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let start = || {
        Command::new(agent_binary())
            .args([
                "run",
                "--set",
                "agent.tick=200ms",
                "--set",
                "gpu.enabled=false",
            ])
            .env("NODEWARD_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nodeward")
    };
    let loaded = |pid: u32| {
        wait_for(Duration::from_secs(20), || {
            let (p, l) = bpf_objects_of(pid);
            (p.len() >= 3).then_some((p, l))
        })
        .expect("the agent loaded its programs within 20 s")
    };
    let mut first = start();
    let (progs, links) = loaded(first.id());
    first.kill().expect("SIGKILL");
    first.wait().expect("reap");
    let leftover = wait_for(Duration::from_secs(5), || {
        let any = progs.iter().any(|id| bpftool_has("prog", *id))
            || links.iter().any(|id| bpftool_has("link", *id));
        (!any).then_some(())
    });
    assert!(
        leftover.is_some(),
        "programs or links outlived SIGKILL: {progs:?} {links:?}"
    );

    let mut second = start();
    let (again, _) = loaded(second.id());
    assert!(
        again.is_disjoint(&progs),
        "the restart loaded fresh programs"
    );
    send_signal(second.id(), Signal::Term).expect("SIGTERM the agent");
    let status = wait_for(Duration::from_secs(10), || second.try_wait().ok().flatten())
        .expect("the restarted agent stops on SIGTERM");
    assert!(status.success());
}
