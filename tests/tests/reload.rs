//! SIGHUP reloads the config file: a bad value is logged naming the key while the agent keeps
//! running on the old config; a good change is applied (the log filter, live) or listed as
//! needing a restart.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use nodeward_tests::{agent_binary, wait_for};

/// Sources and listeners off: this is about the config, and needs neither root nor ports.
const BASE: &str = "[ebpf]\nenabled = false\n[gpu]\nenabled = false\n[tcp]\nenabled = false\n\
[api]\nenabled = false\n[metrics]\nenabled = false\n[containers]\nenabled = false\n";

struct Agent {
    child: Child,
    log: std::path::PathBuf,
}

impl Agent {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn hup(&self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
    }
    /// Waits for `what` to appear in the log more than `seen` times.
    fn wait_log(&self, what: &str, seen: usize) -> bool {
        wait_for(Duration::from_secs(20), || {
            (self.log().matches(what).count() > seen).then_some(())
        })
        .is_some()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sighup_keeps_the_old_config_on_a_bad_value_and_applies_a_good_one() {
    let dir = std::env::temp_dir().join(format!("nodeward-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("nodeward.toml");
    let log = dir.join("agent.log");
    std::fs::write(&config, format!("{BASE}[log]\nfilter = \"info\"\n")).expect("write config");
    let child = Command::new(agent_binary())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("NODEWARD_LOG")
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start nodeward");
    let mut agent = Agent { child, log };
    assert!(agent.wait_log("nodeward is running", 0), "{}", agent.log());

    // A bad value: logged with its key, and the agent carries on.
    std::fs::write(&config, format!("{BASE}[agent]\ntick = \"fast\"\n")).expect("rewrite");
    agent.hup();
    assert!(agent.wait_log("config reload failed", 0), "{}", agent.log());
    let text = agent.log();
    let line = text
        .lines()
        .find(|l| l.contains("config reload failed"))
        .expect("the failure line");
    assert!(
        line.contains("agent.tick") && line.contains("fast"),
        "{line}"
    );
    assert!(
        agent.child.try_wait().expect("try_wait").is_none(),
        "the agent exited after a bad reload:\n{text}"
    );

    // A good change: the filter applies at once (a debug line appears), the tick waits.
    std::fs::write(
        &config,
        format!("{BASE}[log]\nfilter = \"nodeward=debug\"\n[agent]\ntick = \"3s\"\n"),
    )
    .expect("rewrite");
    assert!(!agent.log().contains("log filter reloaded"));
    agent.hup();
    assert!(agent.wait_log("new config applied", 0), "{}", agent.log());
    let text = agent.log();
    let line = text
        .lines()
        .find(|l| l.contains("new config applied"))
        .expect("the applied line");
    assert!(line.contains("log.filter"), "{line}");
    assert!(line.contains("agent.tick"), "listed for a restart: {line}");
    assert!(
        text.contains("log filter reloaded"),
        "the debug line shows the new filter in force:\n{text}"
    );

    // SAFETY: as above.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let status = wait_for(Duration::from_secs(20), || {
        agent.child.try_wait().ok().flatten()
    });
    assert!(
        status.is_some_and(|s| s.success()),
        "clean stop after reloads: {status:?}\n{}",
        agent.log()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
