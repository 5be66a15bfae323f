//! NVML failing mid-run (issue 10), against the fake NVML: a reading that starts failing
//! (`UNKNOWN`, `TIMEOUT`) and recovers, a device whose handle fails or that drops out of the
//! count, a GPU that falls off the bus (`GPU_IS_LOST`) while another keeps reporting, and the
//! whole library failing (`nvmlDeviceGetCount` errors) until it is initialised again. The
//! ground truth is the script: `@count N` sections say exactly from which poll on a call
//! fails, and `record_calls` counts the library's init/shutdown/count calls.
//!
//! First the source as a library (each poll known exactly), then the agent binary end to end
//! (`nodeward run` with its API on a socket and `/metrics` on a port), asserting on what
//! `nodeward gpus --json`, `nodeward status --json` and `/metrics` report. No GPU and no root
//! needed; `cc` is (the test skips without it).

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use nodeward::sources::gpu::{GpuSnapshot, Reading, SourceStatus};
use nodeward::store::GpuReading;
use nodeward_tests::{
    agent_binary,
    fake_nvml::{device, fake, FakeNvml},
    wait_for,
};

/// Generous: the machines running the tests are shared and slow.
const WAIT: Duration = Duration::from_secs(60);

fn errors(s: &GpuSnapshot, index: u32, kind: &str) -> u64 {
    device(s, index)
        .nvml_errors_total
        .get(kind)
        .copied()
        .unwrap_or(0)
}

#[test]
fn a_failing_reading_is_counted_per_gpu_and_kind_and_missing_not_zero_then_recovers() {
    let Some(fake) = fake("transient", &[]) else {
        return;
    };
    // Gpu::open calls nvmlDeviceGetCount once (call 1); poll k is call k + 1. Polls 2 and 3
    // (calls 3, 4) fail on GPU 0's temperature (UNKNOWN) and GPU 1's power (TIMEOUT).
    fake.script(
        "devices = 2
         record_calls = 1
         all.temp = 50
         all.power = 100000
         @count 3
         dev.0.temp = ERR:999
         dev.1.power = ERR:10
         @count 5
         dev.0.temp = 51
         dev.1.power = 100001
        ",
    );
    let mut gpu = fake.open();
    let polls: Vec<GpuSnapshot> = (0..5).map(|_| gpu.poll()).collect();
    assert_eq!(fake.calls().count, 6, "one count per poll after the open");
    for (i, s) in polls.iter().enumerate() {
        assert_eq!(s.poll_error, None, "poll {}: {:?}", i + 1, s.poll_error);
        assert_eq!(s.status, SourceStatus::Running);
        assert_eq!(s.devices.len(), 2, "poll {}", i + 1);
    }
    let [p1, p2, p3, p4, p5] = &polls[..] else {
        unreachable!()
    };
    assert_eq!(device(p1, 0).temperature_celsius, Reading::Supported(50));
    assert!(device(p1, 0).nvml_errors_total.is_empty());
    for (n, s) in [(1, p2), (2, p3)] {
        let d0 = device(s, 0);
        assert!(
            matches!(d0.temperature_celsius, Reading::Error(_)),
            "{:?}",
            d0.temperature_celsius
        );
        // The other readings of the same GPU, and the other GPU, are untouched.
        assert_eq!(d0.power_draw_milliwatts, Reading::Supported(100_000));
        assert_eq!(device(s, 1).temperature_celsius, Reading::Supported(50));
        assert!(matches!(
            device(s, 1).power_draw_milliwatts,
            Reading::Error(_)
        ));
        assert_eq!(errors(s, 0, "unknown"), n);
        assert_eq!(errors(s, 1, "timeout"), n);
        assert_eq!(errors(s, 0, "timeout") + errors(s, 1, "unknown"), 0);
        assert!(!d0.lost && !device(s, 1).lost);
    }
    for s in [p4, p5] {
        assert_eq!(device(s, 0).temperature_celsius, Reading::Supported(51));
        assert_eq!(
            device(s, 1).power_draw_milliwatts,
            Reading::Supported(100_001)
        );
        // Counters keep their totals and stop growing.
        assert_eq!(errors(s, 0, "unknown"), 2);
        assert_eq!(errors(s, 1, "timeout"), 2);
    }
    // Where the store and the API see it: named unreadable, counted.
    let (store, provenance) = nodeward::bridge::resources::gpu_snapshot(p2);
    assert_eq!(store.gpus[0].unreadable, [GpuReading::Temperature]);
    assert_eq!(store.gpus[1].unreadable, [GpuReading::Power]);
    assert!(
        provenance.fidelity.contains("gpu0 temperature"),
        "{provenance:?}"
    );
    let (store, _) = nodeward::bridge::resources::gpu_snapshot(p4);
    assert!(store.gpus.iter().all(|g| g.unreadable.is_empty()));
}

#[test]
fn a_gpu_whose_handle_fails_or_that_leaves_the_count_comes_back() {
    let Some(fake) = fake("vanish", &[]) else {
        return;
    };
    // Poll 2: GPU 1's handle fails; poll 3: only one GPU is counted; poll 4: both again.
    fake.script(
        "devices = 2
         all.temp = 60
         dev.1.uuid = GPU-bbbb
         @count 3
         dev.1.handle = ERR:999
         @count 4
         devices = 1
         @count 5
         devices = 2
         dev.1.handle = 0
        ",
    );
    let mut gpu = fake.open();
    let p1 = gpu.poll();
    assert_eq!(device(&p1, 1).temperature_celsius, Reading::Supported(60));
    let p2 = gpu.poll();
    let d1 = device(&p2, 1);
    assert!(!d1.lost, "a failing handle is not a lost GPU");
    assert_eq!(d1.uuid, Reading::Supported("GPU-bbbb".to_owned()));
    assert!(matches!(d1.temperature_celsius, Reading::Error(_)));
    assert_eq!(errors(&p2, 1, "unknown"), 1);
    assert_eq!(device(&p2, 0).temperature_celsius, Reading::Supported(60));
    let p3 = gpu.poll();
    assert_eq!(
        p3.devices.len(),
        1,
        "GPU 1 left the count: {:?}",
        p3.devices
    );
    assert_eq!(p3.poll_error, None);
    let p4 = gpu.poll();
    assert_eq!(p4.devices.len(), 2);
    assert_eq!(device(&p4, 1).temperature_celsius, Reading::Supported(60));
    assert_eq!(
        errors(&p4, 1, "unknown"),
        1,
        "the count survives the absence"
    );
}

/// The next snapshot from `rx` for which `f` holds; panics after [`WAIT`].
async fn until(
    rx: &mut tokio::sync::watch::Receiver<GpuSnapshot>,
    what: &str,
    f: fn(&GpuSnapshot) -> bool,
) -> GpuSnapshot {
    tokio::time::timeout(WAIT, async {
        loop {
            rx.changed().await.expect("the source publishes");
            let s = rx.borrow_and_update().clone();
            if f(&s) {
                break s;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no snapshot where {what} within {WAIT:?}"))
}

#[test]
fn the_running_source_degrades_when_nvml_fails_as_a_whole_and_reinitialises_it() {
    let Some(fake) = fake("library", &[]) else {
        return;
    };
    let healthy = "devices = 2\nrecord_calls = 1\nall.temp = 45\n";
    fake.script(healthy);
    let mut config = fake.config();
    config.agent.tick = Duration::from_millis(100);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let source = nodeward::sources::gpu::Source::start(&config.gpu, &config.shared()).expect("source starts");
        let mut rx = source.subscribe();
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(source.run(cancel.clone()));
        until(&mut rx, "two GPUs are read", |s| s.devices.len() == 2).await;
        let before = fake.calls();
        assert_eq!((before.init, before.shutdown), (1, 0), "{before:?}");

        // The library fails as a whole: nvmlDeviceGetCount answers UNKNOWN.
        fake.script("devices = ERR:999\nrecord_calls = 1\n");
        let degraded = until(&mut rx, "the source is degraded", |s| {
            matches!(s.status, SourceStatus::Degraded(_))
        })
        .await;
        let SourceStatus::Degraded(reason) = &degraded.status else {
            unreachable!()
        };
        assert!(
            reason.contains("cannot count the GPUs") && reason.contains("re-initialising"),
            "{reason}"
        );
        assert!(degraded.devices.is_empty());
        assert!(degraded
            .count_errors_total
            .get("unknown")
            .is_some_and(|n| *n >= 1));
        // It shut NVML down and tries again (each try fails: the count still errors).
        until(&mut rx, "a re-initialisation was attempted", |s| {
            s.reinit_attempts_total >= 1
        })
        .await;
        let failing = fake.calls();
        assert!(failing.shutdown >= 1, "{failing:?}");
        assert!(failing.init >= 2, "{failing:?}");

        let fixed = std::time::Instant::now();
        fake.script(healthy);
        let back = until(&mut rx, "the source runs again", |s| {
            s.status == SourceStatus::Running && s.devices.len() == 2
        })
        .await;
        eprintln!(
            "figure: NVML back {:?} after the script was fixed; {} re-initialisation(s), calls {:?}",
            fixed.elapsed(),
            back.reinit_attempts_total,
            fake.calls()
        );
        assert_eq!(device(&back, 0).temperature_celsius, Reading::Supported(45));
        assert!(back.reinit_attempts_total >= 1);
        // The count errors survive the new NVML instance.
        assert!(back
            .count_errors_total
            .get("unknown")
            .is_some_and(|n| *n >= 1));
        let after = fake.calls();
        assert!(after.init > failing.init || after.init >= 2, "{after:?}");

        cancel.cancel();
        let result = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the source stops within 10 s of cancellation")
            .expect("the task did not panic");
        assert_eq!(result, Ok(()));
    });
}

// ---- the agent binary ----

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// `nodeward run` on the fake NVML with its API on a socket and `/metrics` on a port.
struct Agent {
    child: Child,
    port: u16,
    socket: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(fake: &FakeNvml) -> Self {
        let port = free_port();
        let socket = fake.dir.join("agent.sock");
        let log = fake.dir.join("agent.log");
        let child = Command::new(agent_binary())
            .args(["run", "--config", "/dev/null"])
            .args(["--set", "ebpf.enabled=false", "--set", "agent.tick=200ms"])
            .args(["--set", "api.tcp_listen="])
            .args(["--set", &format!("api.unix_socket={}", socket.display())])
            .args(["--set", &format!("metrics.listen=127.0.0.1:{port}")])
            .args(["--set", &format!("gpu.library={}", fake.library_str())])
            .env("NODEWARD_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create agent log"))
            .spawn()
            .expect("start nodeward run");
        let mut agent = Self {
            child,
            port,
            socket,
            log,
        };
        let up = wait_for(WAIT, || {
            agent.alive();
            // Events watched: the event thread has made its one nvmlDeviceGetCount call, so
            // from now on only polls make them (what `@count` in the tests relies on).
            agent.scrape().filter(|m| {
                m.contains("nodeward_gpu_devices 2") && m.contains("nodeward_gpu_events_watched 1")
            })
        });
        assert!(
            up.is_some(),
            "no GPU metrics within {WAIT:?}:\n{}",
            agent.log()
        );
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics if the agent has exited: no fault may end it.
    fn alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the agent exited ({status}):\n{}", self.log());
        }
    }

    fn scrape(&self) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).ok()?;
        let (head, body) = raw.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    }

    /// `nodeward <command> --json` against this agent's socket (protobuf's JSON mapping).
    fn ask(&mut self, command: &str) -> serde_json::Value {
        self.alive();
        let out = Command::new(agent_binary())
            .args([command, "--json", "--addr"])
            .arg(format!("unix:{}", self.socket.display()))
            .env_remove("NODEWARD_LOG")
            .output()
            .expect("run the CLI");
        assert!(
            out.status.success(),
            "nodeward {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON")
    }

    /// Waits until `f` holds on a fresh scrape; panics with the last one if it never does.
    fn metrics_until(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let got = wait_for(WAIT, || {
            self.alive();
            last = self.scrape().unwrap_or_default();
            f(&last).then(|| last.clone())
        });
        got.unwrap_or_else(|| panic!("metrics never showed {what}:\n{last}"))
    }

    fn stop(mut self) {
        self.alive();
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) },
            0
        );
        let status = wait_for(Duration::from_secs(15), || {
            self.child.try_wait().ok().flatten()
        })
        .expect("the agent stops after SIGTERM");
        assert!(status.success(), "exit {status}:\n{}", self.log());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the one sample of `series` (name and labels exactly), if present.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A uint64 from `--json`: a string in protobuf's JSON mapping.
fn count(v: &serde_json::Value) -> Option<u64> {
    v.as_str()?.parse().ok()
}

const UUID0: &str = "GPU-fake0000-0000-0000-0000-000000000000";
const UUID1: &str = "GPU-fake0000-0000-0000-0000-000000000001";

fn gpu_series(name: &str, gpu: u32, uuid: &str) -> String {
    format!("{name}{{gpu=\"{gpu}\",uuid=\"{uuid}\"}}")
}

#[test]
fn the_agent_counts_a_failing_reading_reports_it_missing_and_recovers() {
    let Some(fake) = fake("agent-transient", &[]) else {
        return;
    };
    let base = "devices = 2\nrecord_calls = 1\nall.temp = 40\nall.power = 100000\n";
    fake.script(base);
    let mut agent = Agent::start(&fake);
    let temp0 = gpu_series("nodeward_gpu_temperature_celsius", 0, UUID0);
    let errors0 =
        format!("nodeward_gpu_nvml_errors_total{{gpu=\"0\",uuid=\"{UUID0}\",error=\"unknown\"}}");
    // Exactly 5 polls fail on GPU 0's temperature, starting a few polls from now; after the
    // start-up, only polls call nvmlDeviceGetCount.
    let from = fake.calls().count + 3;
    fake.script(&format!(
        "{base}@count {from}\ndev.0.temp = ERR:999\n@count {}\ndev.0.temp = 41\n",
        from + 5
    ));
    let during = agent.metrics_until("the failing temperature counted", |m| {
        sample(m, &errors0).is_some()
    });
    // Missing, not 0; the other GPU still reports it.
    assert_eq!(sample(&during, &temp0), None, "{during}");
    assert_eq!(
        sample(
            &during,
            &gpu_series("nodeward_gpu_temperature_celsius", 1, UUID1)
        ),
        Some(40.0)
    );
    let gpus = agent.ask("gpus");
    assert_eq!(gpus["available"], true, "{gpus}");
    let g0 = &gpus["gpus"][0];
    if g0["unreadable"] == serde_json::json!(["temperature"]) {
        assert!(
            count(&g0["nvmlErrorsTotal"]["unknown"]) >= Some(1),
            "{gpus}"
        );
    } else {
        // The API was asked after the errors stopped: the count must then be complete.
        assert_eq!(count(&g0["nvmlErrorsTotal"]["unknown"]), Some(5), "{gpus}");
    }
    let after = agent.metrics_until("the temperature back", |m| sample(m, &temp0) == Some(41.0));
    assert_eq!(
        sample(&after, &errors0),
        Some(5.0),
        "one error per failing poll"
    );
    eprintln!("figure: 5 polls scripted to fail, 5 errors counted, temperature back at 41");
    // Further polls count nothing more.
    let later = fake.calls().count + 3;
    wait_for(WAIT, || (fake.calls().count >= later).then_some(()))
        .expect("the agent keeps polling");
    let settled = agent.scrape().expect("scrape");
    assert_eq!(sample(&settled, &errors0), Some(5.0));
    let gpus = agent.ask("gpus");
    assert_eq!(gpus["gpus"][0]["temperatureCelsius"], 41.0, "{gpus}");
    // An empty list is left out of the JSON mapping.
    assert_eq!(gpus["gpus"][0].get("unreadable"), None, "{gpus}");
    assert_eq!(
        count(&gpus["gpus"][0]["nvmlErrorsTotal"]["unknown"]),
        Some(5),
        "{gpus}"
    );
    agent.stop();
}

#[test]
fn the_agent_names_a_gpu_that_fell_off_the_bus_and_keeps_serving_the_other() {
    let Some(fake) = fake("agent-lost", &[]) else {
        return;
    };
    let base = "devices = 2\nall.temp = 40\n";
    fake.script(base);
    let mut agent = Agent::start(&fake);
    let lost_at = std::time::Instant::now();
    fake.script(&format!("{base}dev.1.lost = 1\n"));
    let m = agent.metrics_until("GPU 1 lost", |m| {
        sample(m, &gpu_series("nodeward_gpu_lost", 1, UUID1)) == Some(1.0)
    });
    assert_eq!(
        sample(&m, &gpu_series("nodeward_gpu_lost", 0, UUID0)),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &m,
            &gpu_series("nodeward_gpu_temperature_celsius", 0, UUID0)
        ),
        Some(40.0)
    );
    assert!(
        sample(
            &m,
            &format!(
                "nodeward_gpu_nvml_errors_total{{gpu=\"1\",uuid=\"{UUID1}\",error=\"gpu_lost\"}}"
            )
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );
    // The health engine's lost-GPU condition fires, naming GPU 1 by its UUID.
    let status = wait_for(WAIT, || {
        let s = agent.ask("status");
        s["health"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "GpuLost"))
            .then_some(s)
    })
    .expect("a GpuLost condition");
    eprintln!(
        "figure: GpuLost condition in the API {:?} after GPU 1 was lost",
        lost_at.elapsed()
    );
    let conditions = status["health"]["conditions"].as_array().expect("list");
    let lost: Vec<_> = conditions
        .iter()
        .filter(|c| c["type"] == "GpuLost")
        .collect();
    assert_eq!(lost.len(), 1, "{status}");
    assert_eq!(lost[0]["subject"], UUID1, "{status}");
    assert_eq!(status["health"]["verdict"], "VERDICT_UNHEALTHY", "{status}");
    let gpus = agent.ask("gpus");
    assert_eq!(gpus["gpus"][1]["lost"], true, "{gpus}");
    // false is left out of the JSON mapping.
    assert_eq!(gpus["gpus"][0].get("lost"), None, "{gpus}");
    assert_eq!(gpus["gpus"][0]["temperatureCelsius"], 40.0, "{gpus}");
    agent.stop();
}

#[test]
fn the_agent_reports_nvml_failing_as_a_whole_then_available_again() {
    let Some(fake) = fake("agent-library", &[]) else {
        return;
    };
    let base = "devices = 2\nrecord_calls = 1\nall.temp = 40\n";
    fake.script(base);
    let mut agent = Agent::start(&fake);
    // SourceLost is for a source the health engine saw reporting: wait until an evaluation has
    // taken the GPU source's first report in, or the failure below can beat it.
    let seen = wait_for(WAIT, || {
        let status = agent.ask("status");
        let sources = status["health"]["sources"].as_array().cloned()?;
        sources
            .iter()
            .any(|s| s["name"] == "gpu" && s["state"] == "SOURCE_STATE_REPORTING")
            .then_some(())
    });
    assert!(
        seen.is_some(),
        "the health engine never saw the GPU source report"
    );
    let started = fake.calls();
    fake.script("devices = ERR:999\nrecord_calls = 1\n");
    let m = agent.metrics_until("the source degraded and re-initialising", |m| {
        sample(m, "nodeward_gpu_source_degraded") == Some(1.0)
            && sample(m, "nodeward_gpu_nvml_reinit_attempts_total") >= Some(1.0)
    });
    assert!(
        sample(&m, "nodeward_gpu_nvml_count_errors_total") >= Some(1.0),
        "{m}"
    );
    assert_eq!(sample(&m, "nodeward_gpu_devices"), Some(0.0), "{m}");
    let status = agent.ask("status");
    let gpu_source = status["health"]["sources"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "gpu"))
        .cloned()
        .unwrap_or_else(|| panic!("no gpu source in {status}"));
    let reason = gpu_source["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("GPU source degraded") && reason.contains("re-initialising"),
        "{gpu_source}"
    );
    // false is left out of the JSON mapping.
    assert_eq!(agent.ask("gpus").get("available"), None);
    // A source that reported and then fell away is a warning, not silently dropped.
    let lost = status["health"]["conditions"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| c["type"] == "SourceLost" && c["subject"] == "gpu")
        })
        .cloned()
        .unwrap_or_else(|| panic!("no SourceLost for gpu in {status}"));
    assert!(
        lost["message"]
            .as_str()
            .unwrap_or_default()
            .contains("GPU source degraded"),
        "{lost}"
    );
    assert_eq!(status["health"]["verdict"], "VERDICT_DEGRADED", "{status}");
    let failing = fake.calls();
    assert!(failing.shutdown > started.shutdown, "{failing:?}");
    assert!(failing.init > started.init, "{failing:?}");

    let fixed = std::time::Instant::now();
    fake.script(base);
    let back = agent.metrics_until("the GPUs back", |m| {
        sample(m, "nodeward_gpu_source_degraded") == Some(0.0)
            && sample(m, "nodeward_gpu_devices") == Some(2.0)
    });
    eprintln!(
        "figure: agent's GPU source back {:?} after the script was fixed; reinit attempts {:?}, \
         count errors {:?}, calls {:?}",
        fixed.elapsed(),
        sample(&back, "nodeward_gpu_nvml_reinit_attempts_total"),
        sample(&back, "nodeward_gpu_nvml_count_errors_total"),
        fake.calls()
    );
    let gpus = wait_for(WAIT, || {
        let g = agent.ask("gpus");
        (g["available"] == true).then_some(g)
    })
    .expect("the API lists the GPUs again");
    assert_eq!(gpus["gpus"].as_array().map(Vec::len), Some(2), "{gpus}");
    assert!(
        agent.log().contains("GPU source recovered"),
        "{}",
        agent.log()
    );
    agent.stop();
}
