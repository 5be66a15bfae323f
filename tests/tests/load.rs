//! The load case of issue 10: the real daemon serves 100 unary gRPC callers and 1,000
//! `WatchNodeHealth` streams (over its Unix socket and its TCP listener) while a container on
//! the node carries TCP request/response traffic worth tens of thousands of RTT samples a
//! second. Proves, by counts rather than timings:
//!
//! - no unary call fails, and no Watch stream fails or ends early: each gets its first state
//!   and heartbeats (`api.watch_heartbeat = 1s`) for the whole run;
//! - the agent's resident memory (VmRSS sampled during the run, VmHWM at the end) stays under
//!   the memory limit the DaemonSet gives it (`packaging/kubernetes/30-daemonset.yaml`);
//! - no RTT sample is lost without being counted: the samples the agent reports for the load
//!   container, plus the samples its drop counters (`nodeward_tcp_drops_total`) say were lost,
//!   cover 2 per completed exchange (the generator's own count): the response ACKs the request
//!   (a sample on the client's socket) and the next request, or the closing FIN, ACKs the
//!   response (a sample on the server's); both ends sit in the load container. Segments the
//!   kernel retransmitted may carry no sample (Karn's rule) and are allowed for. The load runs
//!   in a network namespace of its own, so the kernel's own segment counters there
//!   (`/proc/net/snmp`) are an independent check on both figures: every exchange is two
//!   segments received, and every sample needs a segment received that ACKs new data.
//!
//! `NODEWARD_LOAD_SECONDS` sets the length of the run (default 40); `cargo xtask bench` runs
//! the same load for 10 minutes (scenario "load soak"; alone: `cargo xtask bench --only load`).

use std::{
    path::Path,
    process::Stdio,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use nodeward::api::pb;
use nodeward_tests::{
    agent_binary,
    api::{conn, eventually, TempDir},
    cgroup_v2_root, is_root, process_cpu_seconds, send_signal, skip, Cgroup, Netns,
};
use rustix::process::Signal;

const TEST: &str = "load_grpc_and_rtt_samples";
/// The load generators (`rr`, `load-api`), built by cargo with this package's tests.
const BENCH: &str = env!("CARGO_BIN_EXE_nodeward-bench");
/// Exchanges per second asked of the generator: 2 RTT samples each, so 60,000 samples/s when
/// the machine keeps up (the report says what it achieved).
const RR_RATE: u32 = 30_000;
const RR_CONNECTIONS: u32 = 8;
const CALLERS: u32 = 100;
const STREAMS: u32 = 1_000;

type Client = pb::node_health_client::NodeHealthClient<tonic::transport::Channel>;

/// The memory limit of the agent's container in the DaemonSet, in bytes: the first `memory:`
/// under `limits:`.
fn daemonset_memory_limit(yaml: &str) -> Option<u64> {
    let mut in_limits = None;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        if t == "limits:" {
            in_limits = Some(indent);
            continue;
        }
        let Some(at) = in_limits else { continue };
        if indent <= at {
            in_limits = None;
            continue;
        }
        if let Some(v) = t.strip_prefix("memory:") {
            return kubernetes_quantity(v.trim().trim_matches('"'));
        }
    }
    None
}

/// A Kubernetes memory quantity (`256Mi`, `1G`, `512000000`) in bytes.
fn kubernetes_quantity(q: &str) -> Option<u64> {
    const UNITS: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, mult) in UNITS {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().ok().map(|n| n * mult);
        }
    }
    q.parse().ok()
}

#[test]
fn the_daemonset_memory_limit_is_read_from_the_manifest() {
    let yaml = "spec:\n  resources:\n    requests:\n      memory: 64Mi\n    limits:\n      cpu: \"1\"\n      memory: 256Mi\n";
    assert_eq!(daemonset_memory_limit(yaml), Some(256 << 20));
    assert_eq!(kubernetes_quantity("1G"), Some(1_000_000_000));
    assert_eq!(kubernetes_quantity("2Gi"), Some(2 << 30));
    assert_eq!(kubernetes_quantity("fast"), None);
}

/// `key: value` of a `/proc/<pid>/status` line, in bytes.
fn status_bytes(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// The named counters of a `/proc/net/snmp` or `/proc/net/netstat` text (pairs of header and
/// value lines), as `Tcp:InSegs` etc.
fn snmp_counters(text: &str) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [head, values] = pair else { continue };
        let (Some((proto, names)), Some((_, values))) =
            (head.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(v) = v.parse() {
                out.insert(format!("{proto}:{n}"), v);
            }
        }
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One HTTP GET of `/metrics`, the body.
fn scrape(port: u16) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// The value of one sample line (`name{labels} value`) of a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// The samples the agent reports for `container` in its longest window.
async fn samples_of(client: &mut Client, container: &str) -> Option<u64> {
    let r = client
        .get_container_network(pb::GetContainerNetworkRequest {
            container_id: container.to_owned(),
        })
        .await
        .ok()?
        .into_inner();
    r.network?
        .windows
        .iter()
        .max_by_key(|w| w.window_seconds)
        .map(|w| w.samples)
}

fn last_json(out: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(out);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("JSON report expected ({e}): {text}"))
}

fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_grpc_and_rtt_samples() {
    if !is_root() {
        return skip(TEST, "needs root (eBPF, cgroups, network namespaces)");
    }
    let Some(v2_root) = cgroup_v2_root() else {
        return skip(TEST, "no cgroup v2 hierarchy");
    };
    let seconds: u64 = std::env::var("NODEWARD_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let manifest =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kubernetes/30-daemonset.yaml");
    let yaml = std::fs::read_to_string(&manifest).expect("read the DaemonSet manifest");
    let ceiling = daemonset_memory_limit(&yaml).expect("the DaemonSet sets a memory limit");

    let dir = TempDir::new("load");
    let socket = dir.0.join("agent.sock");
    let (api_port, metrics_port) = (free_port(), free_port());
    let log = dir.0.join("agent.log");
    let mut agent = tokio::process::Command::new(agent_binary())
        .args(["run", "--config", "/dev/null"])
        .args(["--set", &format!("api.unix_socket={}", socket.display())])
        .args(["--set", &format!("api.tcp_listen=127.0.0.1:{api_port}")])
        .args(["--set", &format!("metrics.listen=127.0.0.1:{metrics_port}")])
        .args([
            "--set",
            "gpu.enabled=false",
            "--set",
            "api.watch_heartbeat=1s",
        ])
        // The longest window holds every sample of the run, however long it is made.
        .args([
            "--set",
            &format!(
                "network.windows=[\"10s\", \"1m\", \"{}s\"]",
                (seconds + 180).clamp(300, 3600)
            ),
        ])
        .env("NODEWARD_LOG", "warn")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("agent log"))
        .kill_on_drop(true)
        .spawn()
        .expect("start nodeward run");
    let pid = agent.id().expect("agent pid");
    let unix = format!("unix:{}", socket.display());
    let mut client = eventually(Duration::from_secs(30), || {
        let (addr, socket) = (unix.clone(), socket.clone());
        async move { nodeward::client::connect(&conn(&addr), &socket).await.ok() }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the agent never answered on its socket:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let tcp_up = tokio::task::spawn_blocking(move || {
        nodeward_tests::wait_for(Duration::from_secs(30), || {
            scrape(metrics_port).filter(|t| t.contains("nodeward_source_up{source=\"ebpf/tcp\"}"))
        })
    })
    .await
    .expect("join");
    let Some(first_scrape) = tcp_up else {
        panic!("no /metrics with the TCP source on port {metrics_port}");
    };
    if sample(&first_scrape, "nodeward_source_up{source=\"ebpf/tcp\"}") != Some(1.0) {
        return skip(
            TEST,
            &format!(
                "the TCP source could not start here:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        );
    }
    let drops_before = sample(
        &first_scrape,
        "nodeward_tcp_drops_total{reason=\"no_cgroup\"}",
    );
    eprintln!(
        "agent up; memory ceiling {ceiling} bytes from {}; drops at start {drops_before:?}",
        manifest.display()
    );

    // The traffic: its own network namespace (exact kernel counters) and cgroup (a container).
    let ns = Netns::new("load");
    let cgroup = Cgroup::new("load");
    let container = format!(
        "/{}",
        cgroup
            .path
            .strip_prefix(&v2_root)
            .expect("under v2")
            .display()
    );
    let mut rr = ns.command(BENCH);
    rr.args(["rr", "--connections", &RR_CONNECTIONS.to_string()])
        .args(["--rate", &RR_RATE.to_string()])
        .args(["--duration", &format!("{}s", seconds + 10)])
        .stdout(Stdio::piped());
    let rr = cgroup.spawn(&mut rr);
    let rr = tokio::task::spawn_blocking(move || rr.wait_with_output());

    // Calls start once the container is known, so GetContainerNetwork is in the mix.
    let seen = eventually(Duration::from_secs(30), || {
        let (mut c, id) = (client.clone(), container.clone());
        async move { samples_of(&mut c, &id).await.filter(|&n| n > 0) }
    })
    .await;
    assert!(
        seen.is_some(),
        "the agent never reported the load container {container}"
    );

    // The agent's memory while it works.
    let stop = Arc::new(AtomicBool::new(false));
    let max_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, max_rss) = (stop.clone(), max_rss.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(b) = status_bytes(pid, "VmRSS:") {
                    max_rss.fetch_max(b, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let cpu0 = process_cpu_seconds(pid);
    let api_out = tokio::process::Command::new(BENCH)
        .arg("load-api")
        .args([
            "--addr",
            &unix,
            "--addr",
            &format!("http://127.0.0.1:{api_port}"),
        ])
        .args(["--callers", &CALLERS.to_string(), "--rate", "10"])
        .args([
            "--streams",
            &STREAMS.to_string(),
            "--watch-connections",
            "10",
        ])
        .args(["--container", &container])
        .args(["--duration", &format!("{seconds}s")])
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output();
    let api_out = tokio::time::timeout(Duration::from_secs(seconds + 180), api_out)
        .await
        .expect("load-api finishes")
        .expect("run nodeward-bench load-api");
    assert!(
        api_out.status.success(),
        "nodeward-bench load-api failed: {}",
        api_out.status
    );
    let api = last_json(&api_out.stdout);
    let rr_out = tokio::time::timeout(Duration::from_secs(seconds + 180), rr)
        .await
        .expect("rr finishes")
        .expect("join")
        .expect("run nodeward-bench rr");
    assert!(
        rr_out.status.success(),
        "nodeward-bench rr failed: {}",
        rr_out.status
    );
    let rr = last_json(&rr_out.stdout);
    let cpu = process_cpu_seconds(pid) - cpu0;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();

    // Every sample reaches the agent's windows within a tick or two: wait until the count
    // holds still for three seconds.
    let mut samples = 0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let n = samples_of(&mut client, &container).await.unwrap_or(0);
        if n == samples {
            break;
        }
        samples = n;
    }
    let metrics = scrape(metrics_port).expect("a final scrape");
    let drop = |reason: &str| {
        sample(
            &metrics,
            &format!("nodeward_tcp_drops_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or_else(|| panic!("nodeward_tcp_drops_total{{reason=\"{reason}\"}} is exported"))
            as u64
    };
    let lost = drop("no_cgroup") + drop("stats_full") + drop("flow_insert_failed");
    let kernel = {
        let mut text = nodeward_tests::run(ns.command("cat").args(["/proc/net/snmp"]));
        text.push_str(&nodeward_tests::run(
            ns.command("cat").args(["/proc/net/netstat"]),
        ));
        snmp_counters(&text)
    };
    let (in_segs, retrans) = (kernel["Tcp:InSegs"], kernel["Tcp:RetransSegs"]);
    let peak = status_bytes(pid, "VmHWM:").expect("VmHWM");
    let rss_max = max_rss.load(Ordering::Relaxed);

    let exchanges = u(&rr, "exchanges");
    let rr_seconds = rr["seconds"].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "load: {exchanges} exchanges in {rr_seconds:.1} s ({:.0} RTT samples/s expected, {:.0}/s counted) \
         over {RR_CONNECTIONS} connections; agent counted {samples} samples for {container}, drops \
         no_cgroup {} stats_full {} flow_insert_failed {} hist_full {} flow_evicted {}; kernel in the \
         namespace: InSegs {in_segs}, RetransSegs {retrans}, DelayedACKs {:?}; API: {} calls \
         ({:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, {} errors {}), {} streams opened, {} \
         failed {}, messages per stream {}..{}, heartbeats ≥ {}; agent CPU {:.2} s/s, RSS max \
         {:.1} MiB, VmHWM {:.1} MiB, ceiling {:.0} MiB",
        2.0 * exchanges as f64 / rr_seconds,
        samples as f64 / rr_seconds,
        drop("no_cgroup"),
        drop("stats_full"),
        drop("flow_insert_failed"),
        drop("hist_full"),
        drop("flow_evicted"),
        kernel.get("TcpExt:DelayedACKs"),
        u(&api, "calls"),
        api["calls_per_second"].as_f64().unwrap_or(f64::NAN),
        api["p50_ms"].as_f64().unwrap_or(f64::NAN),
        api["p99_ms"].as_f64().unwrap_or(f64::NAN),
        api["max_ms"].as_f64().unwrap_or(f64::NAN),
        u(&api, "errors"),
        api["error_samples"],
        u(&api, "streams_opened"),
        u(&api, "streams_failed"),
        api["stream_error_samples"],
        u(&api, "messages_min"),
        u(&api, "messages_max"),
        u(&api, "heartbeats_min"),
        cpu / rr_seconds,
        rss_max as f64 / 1_048_576.0,
        peak as f64 / 1_048_576.0,
        ceiling as f64 / 1_048_576.0,
    );

    // The generator's count is real: every exchange is two segments the kernel received.
    assert_eq!(
        u(&rr, "errors"),
        0,
        "the generator failed: {}",
        rr["error_samples"]
    );
    assert!(exchanges > 0, "no exchange completed");
    assert!(
        in_segs >= 2 * exchanges,
        "the namespace received {in_segs} segments, fewer than 2 × {exchanges} exchanges"
    );
    // No call failed and every stream lived the whole run.
    assert_eq!(
        u(&api, "errors"),
        0,
        "failed calls: {}",
        api["error_samples"]
    );
    assert!(u(&api, "calls") > 0, "no call was made");
    assert_eq!(
        u(&api, "streams_opened"),
        u64::from(STREAMS),
        "streams that got their first state"
    );
    assert_eq!(
        u(&api, "streams_failed"),
        0,
        "streams failed or ended early: {}",
        api["stream_error_samples"]
    );
    // The first state, then at least one heartbeat on every stream (1 s apart, for the whole
    // run: a stream the agent stopped serving would show none).
    assert!(u(&api, "heartbeats_min") >= 1, "a stream got no heartbeat");
    assert!(
        u(&api, "messages_min") >= 2,
        "a stream got only its first state"
    );
    // Memory under the DaemonSet's limit, during and at the peak.
    assert!(
        rss_max < ceiling && peak < ceiling,
        "RSS {rss_max} / VmHWM {peak} past {ceiling}"
    );
    // No sample lost without being counted.
    let expected = (2 * exchanges).saturating_sub(retrans);
    assert!(
        samples + lost >= expected,
        "samples counted {samples} + lost {lost} < 2 × {exchanges} exchanges − {retrans} retransmits"
    );
    assert!(
        samples <= in_segs,
        "more samples ({samples}) than segments the namespace received ({in_segs})"
    );

    send_signal(pid, Signal::Term).expect("SIGTERM the agent");
    let exit = tokio::time::timeout(Duration::from_secs(30), agent.wait())
        .await
        .expect("the agent stops within 30 s of SIGTERM")
        .expect("wait");
    assert!(exit.success(), "clean exit after the load: {exit}");
}
