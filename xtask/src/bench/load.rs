//! The load soak of issue 10: the release agent serves 100 unary gRPC callers and 1,000
//! `WatchNodeHealth` streams while a container (a cgroup of its own, in a network namespace of
//! its own) carries TCP request/response traffic paced at 30,000 exchanges (60,000 RTT
//! samples) a second, for 10 minutes (30 s with `--quick`). The traffic and the callers are
//! `nodeward-bench rr` and `load-api` (`tests/src/bin/nodeward-bench/load.rs`); the same load, bounded, is the test `tests/tests/load.rs`, which asserts what this only reports.

use std::{
    io::{Read as _, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::{
    agent::Agent,
    bench_bin,
    scenarios::{row, ALL_PROGRAMS},
    Plan, Row,
};

pub const DESCRIPTION: &str = "\
- **Load soak** (issue 10): the release agent (GPU off, `api.watch_heartbeat = 1s`, \
the longest of `network.windows` longer than the run so that its longest window holds every sample) serves \
`nodeward-bench load-api`: 100 unary callers, each on its own connection (half on the \
Unix socket, half on the TCP listener), each calling 10 times a second in turn `GetNodeHealth`, \
`ListContainers`, `GetDrainStatus`, `ListGpus` and `GetContainerNetwork`, and 1,000 \
`WatchNodeHealth` streams over 10 connections, each counting its messages; meanwhile \
`nodeward-bench rr`, in a cgroup and a network namespace of its own, runs 8 loopback \
TCP connections paced at 30,000 request/response exchanges a second in all, counting the \
exchanges it completes. Each exchange gives the kernel 2 RTT measurements (the response ACKs \
the request, the next request ACKs the response), both in the load container. Rows: the RTT \
samples the generator produced (2 per exchange) and those the agent counted for the container \
(its longest window, read after the run), per second of the run; samples counted plus those \
its drop counters (`nodeward_tcp_drops_total`, reasons that lose a sample) say it lost, over \
2 per exchange (≥ 1: no sample lost without being counted); calls answered and their latency; \
failed calls; Watch streams that lived the whole run and their fewest messages; the agent's \
CPU and its peak RSS (VmHWM) against the memory limit of the DaemonSet \
(`packaging/kubernetes/30-daemonset.yaml`); its largest RSS in the first and in the last \
minute (10 s with `--quick`; baseline columns: first). The TCP source keeps one record per tick \
of its longest window, and that window is longer than the run here, so resident memory grows \
by that record (about 18 KB a second under this load) for the whole run: a bounded growth, not a \
leak: with the default 5-minute window, the same load for 15 minutes took the agent from 45 MiB \
at 1 minute to 56.0 MiB at 6 and 56.4 MiB at 15. One round of 10 minutes \
(30 s with `--quick`).";

const SCENARIO: &str = "Load soak";
const RR_RATE: u32 = 30_000;
const STREAMS: u32 = 1_000;

/// The soak's length: 10 minutes, or 30 s with `--quick`.
fn soak_seconds(plan: Plan) -> u64 {
    if plan.rounds <= 2 {
        30
    } else {
        600
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn v2_root() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() {
        unified.to_path_buf()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

/// A network namespace and a cgroup for the traffic, removed when dropped.
struct Container {
    netns: String,
    cgroup: PathBuf,
    root: PathBuf,
}

impl Container {
    fn new() -> anyhow::Result<Self> {
        let netns = format!("nodeward-bench-load-{}", std::process::id());
        let root = v2_root();
        let cgroup = root.join(&netns);
        let ok = |c: &mut Command| -> anyhow::Result<()> {
            let s = c.status().with_context(|| format!("{c:?}"))?;
            if !s.success() {
                bail!("{c:?} failed: {s}");
            }
            Ok(())
        };
        ok(Command::new("ip").args(["netns", "add", &netns]))?;
        let me = Self {
            netns,
            cgroup,
            root,
        };
        ok(Command::new("ip").args(["-n", &me.netns, "link", "set", "lo", "up"]))?;
        std::fs::create_dir(&me.cgroup)
            .with_context(|| format!("create {}", me.cgroup.display()))?;
        Ok(me)
    }

    /// The id the agent's API gives the cgroup: its path below the v2 root.
    fn id(&self) -> String {
        format!("/{}", self.netns)
    }

    /// Starts `bin args` inside the namespace, moved into the cgroup before it runs.
    fn spawn(&self, bin: &Path, args: &[String]) -> anyhow::Result<Child> {
        let procs = std::ffi::CString::new(
            self.cgroup
                .join("cgroup.procs")
                .as_os_str()
                .as_encoded_bytes(),
        )?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(bin)
            .args(args)
            .stdout(Stdio::piped());
        // SAFETY: between fork and exec; only system calls (open, write, close: async-signal-
        // safe, nothing allocated) on memory prepared before.
        unsafe {
            cmd.pre_exec(move || {
                use rustix::fs::{Mode, OFlags};
                let fd =
                    rustix::fs::open(&*procs, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
                match rustix::io::write(&fd, b"0\n")? {
                    2 => Ok(()),
                    _ => Err(std::io::ErrorKind::WriteZero.into()),
                }
            });
        }
        cmd.spawn().context("start nodeward-bench rr")
    }

    /// `Tcp:` counters of the namespace (`/proc/net/snmp` read inside it).
    fn tcp_counter(&self, name: &str) -> Option<f64> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns, "cat", "/proc/net/snmp"])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next()?, tcp.next()?);
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.parse().ok())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Ok(pids) = std::fs::read_to_string(self.cgroup.join("cgroup.procs")) {
            for pid in pids.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                let _ = crate::send_signal(pid, rustix::process::Signal::Kill);
                let _ = std::fs::write(self.root.join("cgroup.procs"), format!("{pid}\n"));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.cgroup).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// The memory limit of the agent's container in the DaemonSet manifest, in bytes.
fn daemonset_memory_limit(yaml: &str) -> Option<f64> {
    let mut limits_at = None;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if t == "limits:" {
            limits_at = Some(indent);
        } else if limits_at.is_some_and(|at| indent <= at) {
            limits_at = None;
        } else if let Some(v) = t.strip_prefix("memory:").filter(|_| limits_at.is_some()) {
            let v = v.trim().trim_matches('"');
            let units = [("Ki", 1024.0), ("Mi", 1_048_576.0), ("Gi", 1_073_741_824.0)];
            return units
                .iter()
                .find_map(|(s, m)| {
                    v.strip_suffix(s)
                        .and_then(|n| n.parse::<f64>().ok())
                        .map(|n| n * m)
                })
                .or_else(|| v.parse().ok());
        }
    }
    None
}

fn scrape(port: u16) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// The samples the agent reports for `id` in its longest window (`nodeward containers`).
fn samples_of(bin: &Path, socket: &str, id: &str) -> f64 {
    let Ok(out) = Command::new(bin)
        .args(["containers", "--json", "--addr", &format!("unix:{socket}")])
        .output()
    else {
        return f64::NAN;
    };
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .map_or(f64::NAN, |v| samples_in(&v, id))
}

/// `samples` of `id`'s longest window in a `ListContainersResponse` as `--json` prints it.
fn samples_in(v: &serde_json::Value, id: &str) -> f64 {
    v["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["id"] == id))
        .and_then(|c| c["network"]["windows"].as_array())
        .and_then(|ws| ws.iter().max_by_key(|w| w["windowSeconds"].as_u64()))
        // A uint64 is a string in protobuf's JSON mapping, and left out when 0.
        .and_then(|w| match &w["samples"] {
            serde_json::Value::Null => Some(0.0),
            s => s.as_str()?.parse().ok(),
        })
        .unwrap_or(f64::NAN)
}

fn report(child: Child, what: &str) -> anyhow::Result<serde_json::Value> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{what} failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("{what} report: {last}"))
}

pub fn soak(root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    let seconds = soak_seconds(plan);
    let yaml = std::fs::read_to_string(root.join("packaging/kubernetes/30-daemonset.yaml"))?;
    let ceiling = daemonset_memory_limit(&yaml).context("no memory limit in the DaemonSet")?;
    let (api_port, metrics_port) = (free_port()?, free_port()?);
    let window = format!(
        "network.windows=[\"10s\", \"1m\", \"{}s\"]",
        (seconds + 120).max(300)
    );
    let agent = Agent::start(
        agent_bin,
        &[
            "--set",
            "gpu.enabled=false",
            "--set",
            "api.watch_heartbeat=1s",
            "--set",
            &window,
            "--set",
            &format!("api.tcp_listen=127.0.0.1:{api_port}"),
            "--set",
            &format!("metrics.listen=127.0.0.1:{metrics_port}"),
        ],
        ALL_PROGRAMS,
    )?;
    let container = Container::new()?;
    let rr = container.spawn(
        &bench_bin(agent_bin),
        &[
            "rr".to_owned(),
            "--rate".to_owned(),
            RR_RATE.to_string(),
            "--connections".to_owned(),
            "8".to_owned(),
            "--duration".to_owned(),
            format!("{}s", seconds + 10),
        ],
    )?;
    // The callers start once the agent knows the container, so GetContainerNetwork has one.
    let deadline = Instant::now() + Duration::from_secs(30);
    // NaN (no answer yet) and 0 both mean: not yet.
    while samples_of(agent_bin, &agent.socket, &container.id()).partial_cmp(&0.0)
        != Some(std::cmp::Ordering::Greater)
    {
        if Instant::now() > deadline {
            bail!("the agent never reported the load container");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (cpu0, t0) = (agent.cpu_seconds(), Instant::now());
    let mut api = Command::new(bench_bin(agent_bin))
        .args(["load-api", "--addr", &format!("unix:{}", agent.socket)])
        .args(["--addr", &format!("http://127.0.0.1:{api_port}")])
        .args(["--callers", "100", "--rate", "10"])
        .args([
            "--streams",
            &STREAMS.to_string(),
            "--watch-connections",
            "10",
        ])
        .args(["--container", &container.id()])
        .args(["--duration", &format!("{seconds}s")])
        .stdout(Stdio::piped())
        .spawn()
        .context("start nodeward-bench load-api")?;
    let minute = Duration::from_secs(60.min(seconds / 3));
    let mut rss: Vec<(Duration, f64)> = Vec::new();
    while api.try_wait()?.is_none() {
        rss.push((t0.elapsed(), agent.rss_bytes() / 1_048_576.0));
        std::thread::sleep(Duration::from_secs(1));
    }
    let cpu = (agent.cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64();
    let api = report(api, "nodeward-bench load-api")?;
    let rr = report(rr, "nodeward-bench rr")?;
    // The last samples reach the windows within a tick or two.
    let mut counted = f64::NAN;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_secs(2));
        let n = samples_of(agent_bin, &agent.socket, &container.id());
        if n == counted {
            break;
        }
        counted = n;
    }
    let metrics = scrape(metrics_port)?;
    let lost: f64 = ["no_cgroup", "stats_full", "flow_insert_failed"]
        .iter()
        .map(|r| {
            series(
                &metrics,
                &format!("nodeward_tcp_drops_total{{reason=\"{r}\"}}"),
            )
        })
        .sum();
    let peak = agent.peak_rss_bytes() / 1_048_576.0;
    let in_segs = container.tcp_counter("InSegs");
    agent.stop()?;

    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let (exchanges, rr_seconds) = (f(&rr, "exchanges"), f(&rr, "seconds"));
    let produced = 2.0 * exchanges;
    crate::say(&format!(
        "  load: {exchanges} exchanges in {rr_seconds:.0} s, {counted} samples counted, {lost} lost, \
         namespace InSegs {in_segs:?}; {} calls, {} errors, {} of {STREAMS} streams lived the run",
        f(&api, "calls"),
        f(&api, "errors"),
        f(&api, "streams_opened") - f(&api, "streams_failed"),
    ));
    let first: Vec<f64> = rss
        .iter()
        .filter(|(t, _)| *t <= minute)
        .map(|r| r.1)
        .collect();
    let end = rss.last().map_or(Duration::ZERO, |r| r.0);
    let last: Vec<f64> = rss
        .iter()
        .filter(|(t, _)| *t + minute >= end)
        .map(|r| r.1)
        .collect();
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    let scenario = format!("{SCENARIO}, {} s", seconds);
    let mut accounted = row(
        &scenario,
        "RTT samples counted + counted as lost, over 2 per exchange",
        "",
        vec![],
        vec![(counted + lost) / produced],
    );
    accounted.target = Some(("≥ 1".to_owned(), (counted + lost) / produced >= 1.0));
    let mut errors = row(
        &scenario,
        "failed unary calls",
        "",
        vec![],
        vec![f(&api, "errors")],
    );
    errors.target = Some(("0".to_owned(), f(&api, "errors") == 0.0));
    let lived = f(&api, "streams_opened") - f(&api, "streams_failed");
    let mut streams = row(
        &scenario,
        "`WatchNodeHealth` streams that lived the whole run",
        "",
        vec![],
        vec![lived],
    );
    streams.target = Some((format!("{STREAMS}"), lived == f64::from(STREAMS)));
    let mut mem = row(
        &scenario,
        "agent peak RSS (VmHWM)",
        "MiB",
        vec![],
        vec![peak],
    );
    mem.target = Some((
        format!("< {:.0} MiB (DaemonSet limit)", ceiling / 1_048_576.0),
        peak * 1_048_576.0 < ceiling,
    ));
    Ok(vec![
        row(
            &scenario,
            "RTT samples the generator produced (2 per exchange)",
            "/s",
            vec![],
            vec![produced / rr_seconds],
        ),
        row(
            &scenario,
            "RTT samples the agent counted for the load container",
            "/s",
            vec![],
            vec![counted / rr_seconds],
        ),
        accounted,
        row(
            &scenario,
            "unary calls answered (100 callers, 10/s each asked)",
            "/s",
            vec![],
            vec![f(&api, "calls_per_second")],
        ),
        row(
            &scenario,
            "unary call p99",
            "ms",
            vec![],
            vec![f(&api, "p99_ms")],
        ),
        errors,
        streams,
        row(
            &scenario,
            "fewest messages a Watch stream received (heartbeat 1 s)",
            "",
            vec![],
            vec![f(&api, "messages_min")],
        ),
        row(&scenario, "agent CPU", "s/s", vec![], vec![cpu]),
        mem,
        row(
            &scenario,
            &format!(
                "agent RSS, largest in the first {} s (baseline columns) and in the last {0} s",
                minute.as_secs()
            ),
            "MiB",
            vec![max(&first)],
            vec![max(&last)],
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_from_the_longest_window_as_a_string_or_absent_for_0() {
        // As `nodeward containers --json` prints it: a uint64 is a string, 0 is left out.
        let v: serde_json::Value = serde_json::from_str(
            r#"{"containers": [
                {"id": "a", "network": {"windows": [
                    {"windowSeconds": 10, "samples": "7"},
                    {"windowSeconds": 300, "samples": "1234"},
                    {"windowSeconds": 60, "samples": "99"}]}},
                {"id": "b", "network": {"windows": [{"windowSeconds": 60}]}}]}"#,
        )
        .expect("JSON");
        assert_eq!(samples_in(&v, "a"), 1234.0);
        assert_eq!(samples_in(&v, "b"), 0.0);
        assert!(samples_in(&v, "c").is_nan());
    }

    #[test]
    fn the_memory_limit_is_the_one_under_limits() {
        let yaml = "resources:\n  requests:\n    memory: 64Mi\n  limits:\n    cpu: \"1\"\n    memory: 256Mi\n";
        assert_eq!(daemonset_memory_limit(yaml), Some(256.0 * 1_048_576.0));
        assert_eq!(daemonset_memory_limit("requests:\n  memory: 64Mi\n"), None);
    }
}
