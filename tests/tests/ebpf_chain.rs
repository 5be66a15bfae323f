//! The eBPF chain end to end: the embedded program loads, attaches to a real tracepoint, counts
//! real TCP traffic per cgroup, and the daemon detaches everything when told to stop.

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use agent_ebpf::tcp_state::{CLOSE, SYN_SENT};
use nodeward::{ebpf::TcpStateCounter, tracefs};
use nodeward_tests::{
    agent_binary, bpf_objects_of, bpftool_has, cgroup_v2_root, require_root, skip, wait_for,
    Cgroup,
};

/// Tests in this file load programs on the same tracepoint; they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn tracefs_or_skip(test: &str) -> Option<std::path::PathBuf> {
    match tracefs::locate_or_mount(std::path::Path::new("")) {
        Ok(p) => Some(p),
        Err(e) => {
            skip(test, &format!("no tracefs: {e}"));
            None
        }
    }
}

/// A process in a fresh cgroup opens N TCP connections to a loopback listener; the program
/// counts exactly N CLOSE→SYN_SENT transitions for that cgroup id, and none for an idle
/// sibling cgroup.
#[test]
fn counts_tcp_connects_per_cgroup() {
    const TEST: &str = "counts_tcp_connects_per_cgroup";
    require_root!(TEST);
    if cgroup_v2_root().is_none() {
        return skip(TEST, "no cgroup v2 hierarchy: eBPF cgroup ids need it");
    }
    let Some(tracefs) = tracefs_or_skip(TEST) else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());

    let busy = Cgroup::new("busy");
    let idle = Cgroup::new("idle");
    let counter = TcpStateCounter::attach(&tracefs).expect("program loads and attaches");

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().expect("local addr").port();
    let acceptor = std::thread::spawn(move || {
        for _ in 0..25 {
            let _ = listener.accept();
        }
    });

    let mut sleeper = idle.spawn(Command::new("sleep").arg("30"));
    let script = format!(
        "for i in $(seq 25); do exec 3<>/dev/tcp/127.0.0.1/{port} || exit 1; exec 3>&-; done"
    );
    let status = busy
        .spawn(Command::new("bash").args(["-c", &script]).stdin(Stdio::null()))
        .wait()
        .expect("wait for client");
    assert!(status.success(), "client failed: {status}");
    acceptor.join().expect("acceptor thread");

    let connects = counter
        .count_for(busy.id(), Some((CLOSE, SYN_SENT)))
        .expect("read map");
    assert_eq!(connects, 25, "every connect() from the busy cgroup is counted once");
    let idle_events = counter.count_for(idle.id(), None).expect("read map");
    assert_eq!(idle_events, 0, "nothing is attributed to the idle cgroup");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// `nodeward run` attaches its programs, and after SIGTERM exits 0 with none of them (nor their
/// links) left in the kernel, as `bpftool` sees it.
#[test]
fn sigterm_detaches_every_program() {
    const TEST: &str = "sigterm_detaches_every_program";
    require_root!(TEST);
    if tracefs_or_skip(TEST).is_none() {
        return;
    }
    if Command::new("bpftool").arg("version").output().is_err() {
        return skip(TEST, "bpftool is not installed");
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());

    let mut agent = Command::new(agent_binary())
        .args(["run", "--set", "agent.tick=200ms", "--set", "agent.shutdown_timeout=5s"])
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
        assert!(bpftool_has("prog", *id), "bpftool sees program {id} while the agent runs");
    }

    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let status = wait_for(Duration::from_secs(10), || agent.try_wait().ok().flatten())
        .expect("agent exits within its shutdown deadline");
    let stderr = std::io::read_to_string(agent.stderr.take().expect("stderr")).unwrap_or_default();
    assert!(status.success(), "agent exit status {status}; log:\n{stderr}");
    assert!(stderr.contains("SIGTERM received"), "log:\n{stderr}");

    // Program and link ids are freed asynchronously after the last reference goes.
    let leftover = wait_for(Duration::from_secs(5), || {
        let left: Vec<String> = progs
            .iter()
            .filter(|id| bpftool_has("prog", **id))
            .map(|id| format!("prog {id}"))
            .chain(links.iter().filter(|id| bpftool_has("link", **id)).map(|id| format!("link {id}")))
            .collect();
        left.is_empty().then_some(())
    });
    assert!(leftover.is_some(), "programs or links left attached after SIGTERM: {progs:?} {links:?}");
}
