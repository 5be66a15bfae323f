//! The agent binary with the GPU source: `nodeward gpu-check` against the fake NVML and
//! without any, the daemon running on without NVML and logging a GPU that falls off the bus,
//! and a bad `[gpu]` setting rejected at start-up. No GPU and no root needed.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use nodeward_tests::{agent_binary, fake_nvml::fake, wait_for};

/// Runs `nodeward gpu-check` with extra `--set` flags.
fn gpu_check(library: &str, json: bool) -> std::process::Output {
    let mut cmd = Command::new(agent_binary());
    cmd.args([
        "gpu-check",
        "--events",
        "200ms",
        "--set",
        &format!("gpu.library={library}"),
    ]);
    if json {
        cmd.arg("--json");
    }
    cmd.env_remove("NODEWARD_LOG")
        .output()
        .expect("run nodeward gpu-check")
}

#[test]
fn gpu_check_prints_what_it_read_or_why_it_could_not() {
    let Some(fake) = fake("check", &[]) else {
        return;
    };
    fake.script("dev.0.name = NVIDIA T4\ndev.0.temp = 47\ndev.0.power = NS\n");
    let out = gpu_check(&fake.library_str(), true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(json["devices"][0]["name"]["supported"], "NVIDIA T4");
    assert_eq!(json["devices"][0]["temperature_celsius"]["supported"], 47);
    assert_eq!(json["devices"][0]["power_draw_milliwatts"], "not_supported");

    let out = gpu_check("/nonexistent/libnvidia-ml.so.1", false);
    assert_eq!(out.status.code(), Some(69), "EX_UNAVAILABLE");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("GPU source unavailable: cannot load the NVML library"),
        "{stderr}"
    );
}

/// Starts `nodeward run` (eBPF off, so no root is needed) with its log in `log`.
fn start_agent(library: &str, log: &Path) -> std::process::Child {
    let log_file = std::fs::File::create(log).expect("create log file");
    Command::new(agent_binary())
        .args([
            "run",
            "--set",
            "ebpf.enabled=false",
            "--set",
            "agent.tick=200ms",
        ])
        .args(["--set", &format!("gpu.library={library}")])
        .env("NODEWARD_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("start nodeward")
}

fn stop_agent(mut agent: std::process::Child, log: &Path) -> String {
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_for(Duration::from_secs(10), || agent.try_wait().ok().flatten())
        .expect("the agent exits within its shutdown deadline");
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(status.success(), "exit status {status}; log:\n{text}");
    text
}

#[test]
fn the_agent_keeps_running_without_nvml_and_runs_the_gpu_source_with_it() {
    let Some(fake) = fake("daemon", &[]) else {
        return;
    };
    fake.script("devices = 2\nall.temp = 40\n");
    let log = fake.dir.join("agent.log");

    let agent = start_agent("/nonexistent/libnvidia-ml.so.1", &log);
    let logged = wait_for(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("nodeward is running").then_some(text)
    })
    .expect("the agent starts without NVML");
    assert!(
        logged.contains("GPU source unavailable: cannot load the NVML library"),
        "{logged}"
    );
    stop_agent(agent, &log);

    let agent = start_agent(&fake.library_str(), &log);
    let logged = wait_for(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("nodeward is running").then_some(text)
    })
    .expect("the agent starts with the fake NVML");
    assert!(
        logged.contains("\"gpu\""),
        "the gpu source is listed as started:\n{logged}"
    );
    // Let it poll a few times, then lose a GPU: the agent logs it and keeps running.
    std::thread::sleep(Duration::from_millis(500));
    fake.script("devices = 2\nall.temp = 40\ndev.1.lost = 1\n");
    let lost = wait_for(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("GPU has fallen off the bus").then_some(())
    });
    let text = stop_agent(agent, &log);
    assert!(lost.is_some(), "a lost GPU was not logged:\n{text}");
    assert!(text.contains("SIGTERM received"), "{text}");
}

#[test]
fn a_bad_gpu_setting_is_a_config_error_naming_the_key() {
    let out = Command::new(agent_binary())
        .args(["config", "check", "--set", "gpu.poll_interval=1ms"])
        .output()
        .expect("run nodeward config check");
    assert_eq!(out.status.code(), Some(64), "EX_USAGE");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gpu.poll_interval"), "{stderr}");
}
