//! `tcp.attribution = "auto"` falls back at run time when the kernel refuses a program of the
//! chosen path. No kernel here rejects one, so fault injection (the `fault-injection` feature
//! the tests build with; `NODEWARD_FAULT_INJECT=reject:<program>`, or
//! `reject:nodeward_tcp_sockops/tag_at_listen` for sock_ops in its listen tagging variant, see
//! `agent/src/fault.rs`)
//! makes the load of the named program fail before the kernel is asked. The real agent must
//! then come up on the next path of the chain, say so in its log (WARN naming the program) and
//! in the network source's fidelity, deliver RTT samples of connections this test makes (the
//! ground truth), and hold no program of the path it left: the eBPF programs it holds are read
//! from `/proc/<pid>/fdinfo` and named by `bpftool`. A path named in the config is not auto: it
//! is reported unavailable.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use nodeward::api::pb;
use nodeward_tests::{
    agent_binary,
    api::{conn, eventually, TempDir},
    cgroup_v2_root, is_root, program_count, programs_held, skip, Cgroup,
};

/// Each step's time limit: many ticks, so a slow shared machine is no failure.
const STEP: Duration = Duration::from_secs(60);

const SOCK_CREATE: &str = "nodeward_sock_create";
const TAG_EGRESS: &str = "nodeward_sock_tag_egress";
const SOCK_OPS: &str = "nodeward_tcp_sockops";
/// The fault that refuses the sock_ops program in its listen tagging variant only.
const LISTEN_TAGGING: &str = "nodeward_tcp_sockops/tag_at_listen";

type Client = pb::node_health_client::NodeHealthClient<tonic::transport::Channel>;

/// `nodeward run` (built with the `fault-injection` feature) with `fault` armed, its API on a
/// socket of its own and its log in a file.
struct Agent {
    child: tokio::process::Child,
    client: Client,
    log: PathBuf,
    _dir: TempDir,
}

impl Agent {
    async fn start(stem: &str, fault: &str) -> Self {
        Self::start_with(stem, fault, &[]).await
    }

    async fn start_with(stem: &str, fault: &str, extra: &[&str]) -> Self {
        let dir = TempDir::new(stem);
        let socket = dir.0.join("agent.sock");
        let log = dir.0.join("agent.log");
        let child = tokio::process::Command::new(agent_binary())
            .args(["run", "--config", "/dev/null"])
            .args(["--set", "api.tcp_listen=", "--set", "metrics.enabled=false"])
            .args(["--set", "agent.tick=200ms", "--set", "gpu.enabled=false"])
            .args(["--set", "udp.enabled=false"])
            .args(extra.iter().flat_map(|kv| ["--set", kv]))
            .arg("--set")
            .arg(format!("api.unix_socket={}", socket.display()))
            .env("NODEWARD_FAULT_INJECT", fault)
            .env("NODEWARD_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("start nodeward run");
        let addr = format!("unix:{}", socket.display());
        let client = eventually(STEP, || {
            let (addr, socket) = (addr.clone(), socket.clone());
            async move { nodeward::client::connect(&conn(&addr), &socket).await.ok() }
        })
        .await;
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        let agent = Self {
            child,
            client: client
                .unwrap_or_else(|| panic!("the daemon never answered on its socket:\n{log_text}")),
            log,
            _dir: dir,
        };
        assert!(
            agent.log_text().contains("fault injection armed"),
            "the agent did not arm the fault (built without the fault-injection feature?):\n{}",
            agent.log_text()
        );
        agent
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("the agent runs")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The network source's report once its fidelity names a fallback.
    async fn network_source(&self) -> pb::SourceReport {
        eventually(STEP, || {
            let mut c = self.client.clone();
            async move {
                c.get_node_health(pb::GetNodeHealthRequest {})
                    .await
                    .ok()?
                    .into_inner()
                    .health?
                    .sources
                    .into_iter()
                    .find(|s| s.name == "network" && s.fidelity.contains("fell back to"))
            }
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "the network source never reported a fallback:\n{}",
                self.log_text()
            )
        })
    }

    async fn stop(mut self) -> String {
        let pid = i32::try_from(self.pid()).expect("pid fits");
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let exit = tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("exits in time")
            .expect("wait");
        let log = self.log_text();
        assert!(exit.success(), "clean exit: {exit:?}\n{log}");
        log
    }
}

/// How many of the programs `pid` holds are (sock_create, the egress tagger, sock_ops), with
/// the names held.
fn tcp_programs_held(pid: u32) -> ((usize, usize, usize), Vec<String>) {
    let held = programs_held(pid);
    let n = |name| program_count(&held, name);
    ((n(SOCK_CREATE), n(TAG_EGRESS), n(SOCK_OPS)), held)
}

/// The API's container key of `cgroup` (its path under the v2 root).
fn cgroup_key(cgroup: &Cgroup, v2_root: &std::path::Path) -> String {
    format!(
        "/{}",
        cgroup
            .path
            .strip_prefix(v2_root)
            .expect("under the v2 root")
            .display()
    )
}

/// The WARN lines that name `program` as the cause of a fallback.
fn fallback_warnings<'a>(log: &'a str, program: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains("WARN") && l.contains("next path of the chain"))
        .filter(|l| l.contains(program))
        .collect()
}

/// The network namespace cookie of this process (`SO_NETNS_COOKIE`, Linux ≥ 5.14).
fn own_netns_cookie() -> Option<u64> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
    let mut cookie = 0u64;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).ok()?;
    // SAFETY: a valid socket, and an out-pointer of the length given.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            71, // SO_NETNS_COOKIE
            std::ptr::from_mut(&mut cookie).cast(),
            &raw mut len,
        )
    };
    (rc == 0).then_some(cookie)
}

fn prerequisites(test: &str) -> Option<PathBuf> {
    if !is_root() {
        skip(test, "needs root (eBPF, cgroups)");
        return None;
    }
    let Some(root) = cgroup_v2_root() else {
        skip(test, "no cgroup v2 hierarchy");
        return None;
    };
    if std::process::Command::new("bpftool")
        .arg("version")
        .output()
        .is_err()
    {
        skip(test, "bpftool is not installed");
        return None;
    }
    Some(root)
}

/// An echo server (std, in a thread) and a client process in `cgroup` that keeps talking to
/// it: the client's socket is created in the cgroup, so its RTT samples are the cgroup's.
struct Traffic {
    client: std::process::Child,
}

impl Traffic {
    fn start(cgroup: &Cgroup) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut conn = conn;
                    let mut reader = conn.try_clone().expect("clone");
                    let _ = std::io::copy(&mut reader, &mut conn);
                });
            }
        });
        // One connection, 4 bytes each way every 20 ms, until killed.
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port}; while true; do printf ping >&3; \
             head -c 4 <&3 >/dev/null; sleep 0.02; done"
        );
        let client = cgroup.spawn(
            std::process::Command::new("bash")
                .args(["-c", &script])
                .stdout(Stdio::null()),
        );
        Self { client }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        let _ = self.client.kill();
        let _ = self.client.wait();
    }
}

/// RTT samples in the 10 s window of `key`, once there are some.
async fn samples_of(agent: &Agent, key: &str) -> u64 {
    let found = eventually(STEP, || {
        let (mut c, key) = (agent.client.clone(), key.to_owned());
        async move {
            let n = c
                .get_container_network(pb::GetContainerNetworkRequest { container_id: key })
                .await
                .ok()?
                .into_inner()
                .network?;
            n.windows
                .iter()
                .find(|w| w.window_seconds == 10 && w.samples > 0)
                .map(|w| w.samples)
        }
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "{key} never showed RTT samples through the API:\n{}",
            agent.log_text()
        )
    })
}

/// Whether the probe lets sock_ops read the current cgroup, so that `auto` starts with listen
/// tagging.
fn listen_tagging_first() -> bool {
    let caps = nodeward::probe::Capabilities::probe(&nodeward::config::PathsConfig::default());
    caps.helpers
        .get("sock_ops/get_current_cgroup_id")
        .is_some_and(|f| f.available)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_listen_tagging_falls_back_to_sock_create_beside_egress_and_still_reports() {
    const TEST: &str = "tcp_fallback_listen_rejected";
    let Some(v2_root) = prerequisites(TEST) else {
        return;
    };
    if !listen_tagging_first() {
        return skip(TEST, "sock_ops may not call bpf_get_current_cgroup_id here: auto never starts with listen tagging");
    }
    let agent = Agent::start("tcp-fallback-listen", &format!("reject:{LISTEN_TAGGING}")).await;
    let source = agent.network_source().await;
    assert_eq!(
        source.hook, "tcp: sock_ops+sock_create+cgroup_skb_egress",
        "{source:?}"
    );
    assert!(
        source
            .fidelity
            .contains("sock_ops+listen_cb+cgroup_skb_egress failed")
            && source.fidelity.contains(SOCK_OPS),
        "the fidelity names the path left and the program: {}",
        source.fidelity
    );
    let log = agent.log_text();
    let warned = fallback_warnings(&log, SOCK_OPS);
    assert!(
        !warned.is_empty() && warned.iter().all(|l| l.contains("sock_ops+listen_cb")),
        "a WARN names the path and {SOCK_OPS}:\n{log}"
    );
    // The sock_create path's three programs, and nothing left of the first attempt.
    let (counts, held) = tcp_programs_held(agent.pid());
    assert_eq!(counts, (1, 1, 1), "programs held: {held:?}");
    let cgroup = Cgroup::new("tcp-fallback-listen");
    let key = cgroup_key(&cgroup, &v2_root);
    let traffic = Traffic::start(&cgroup);
    let samples = samples_of(&agent, &key).await;
    drop(traffic);
    agent.stop().await;
    eprintln!(
        "{TEST}: path {}, programs held {held:?}, {samples} RTT samples of {key} in the 10 s \
         window",
        source.hook
    );
}

/// With listen tagging refused too (where `auto` would start with it), and sock_create
/// refused, `auto` lands on egress tagging alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_sock_create_program_falls_back_to_the_egress_path_and_still_reports() {
    const TEST: &str = "tcp_fallback_sock_create_rejected";
    let Some(v2_root) = prerequisites(TEST) else {
        return;
    };
    let started = Instant::now();
    let agent = Agent::start(
        "tcp-fallback-egress",
        &format!("reject:{LISTEN_TAGGING},reject:{SOCK_CREATE}"),
    )
    .await;
    let source = agent.network_source().await;
    assert_eq!(source.hook, "tcp: sock_ops+cgroup_skb_egress", "{source:?}");
    assert!(
        source
            .fidelity
            .contains("sock_ops+sock_create+cgroup_skb_egress failed")
            && source.fidelity.contains(SOCK_CREATE),
        "the fidelity names the path left and the program: {}",
        source.fidelity
    );
    let log = agent.log_text();
    let warned = fallback_warnings(&log, SOCK_CREATE);
    assert!(
        !warned.is_empty() && warned.iter().all(|l| l.contains("sock_ops+sock_create")),
        "a WARN names the path and {SOCK_CREATE}:\n{log}"
    );
    assert!(
        fallback_warnings(&log, TAG_EGRESS).is_empty(),
        "the egress program was never the cause:\n{log}"
    );

    // Only the egress path's programs are held: the first attempt's egress program, loaded
    // before sock_create was refused, was dropped with it.
    let (counts, held) = tcp_programs_held(agent.pid());
    assert_eq!(counts, (0, 1, 1), "programs held: {held:?}");

    let cgroup = Cgroup::new("tcp-fallback");
    let key = cgroup_key(&cgroup, &v2_root);
    let traffic = Traffic::start(&cgroup);
    let samples = samples_of(&agent, &key).await;
    drop(traffic);
    let log = agent.stop().await;
    eprintln!(
        "{TEST}: path {}, {} fallback WARN line(s), programs held {held:?}, {samples} RTT \
         samples of {key} in the 10 s window, {:.1} s in all",
        source.hook,
        fallback_warnings(&log, SOCK_CREATE).len(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sock_create_and_egress_both_rejected_auto_lands_on_netns_cookies_and_still_reports() {
    const TEST: &str = "tcp_fallback_both_rejected";
    if prerequisites(TEST).is_none() {
        return;
    }
    let Some(cookie) = own_netns_cookie() else {
        return skip(TEST, "SO_NETNS_COOKIE is not supported (Linux < 5.14)");
    };
    let started = Instant::now();
    let agent = Agent::start(
        "tcp-fallback-netns",
        &format!("reject:{SOCK_CREATE},reject:{TAG_EGRESS}"),
    )
    .await;
    let source = agent.network_source().await;
    let log = agent.log_text();
    // The probe on this kernel allows netns cookies; a kernel without them lands on sock_diag.
    assert_eq!(
        source.hook, "tcp: sock_ops+netns_cookie",
        "{source:?}\n{log}"
    );
    for left in [
        "sock_ops+sock_create+cgroup_skb_egress failed",
        "sock_ops+sock_create failed",
        "sock_ops+cgroup_skb_egress failed",
    ] {
        assert!(
            source.fidelity.contains(left),
            "the fidelity names {left}: {}",
            source.fidelity
        );
    }
    assert!(
        !fallback_warnings(&log, SOCK_CREATE).is_empty()
            && !fallback_warnings(&log, TAG_EGRESS).is_empty(),
        "WARNs name both programs:\n{log}"
    );
    let (counts, held) = tcp_programs_held(agent.pid());
    assert_eq!(counts, (0, 0, 1), "programs held: {held:?}");

    // Keyed by namespace: the child cgroup's connection counts under this namespace's cookie.
    let cgroup = Cgroup::new("tcp-fallback-netns");
    let traffic = Traffic::start(&cgroup);
    let key = format!("netns-cookie:{cookie}");
    let samples = samples_of(&agent, &key).await;
    drop(traffic);
    let log = agent.stop().await;
    eprintln!(
        "{TEST}: path {}, {} + {} fallback WARN lines (sock_create, egress), programs held \
         {held:?}, {samples} RTT samples of {key} in the 10 s window, {:.1} s in all",
        source.hook,
        fallback_warnings(&log, SOCK_CREATE).len(),
        fallback_warnings(&log, TAG_EGRESS).len(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_path_whose_program_is_rejected_is_reported_unavailable_without_fallback() {
    const TEST: &str = "tcp_fallback_forced_path_rejected";
    if prerequisites(TEST).is_none() {
        return;
    }
    let agent = Agent::start_with(
        "tcp-fallback-forced",
        &format!("reject:{SOCK_CREATE}"),
        &["tcp.attribution=sock_create"],
    )
    .await;
    let source = eventually(STEP, || {
        let mut c = agent.client.clone();
        async move {
            c.get_node_health(pb::GetNodeHealthRequest {})
                .await
                .ok()?
                .into_inner()
                .health?
                .sources
                .into_iter()
                .find(|s| s.name == "network" && s.reason.contains(SOCK_CREATE))
        }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "no network source names the rejected program as its reason:\n{}",
            agent.log_text()
        )
    });
    assert_eq!(
        source.state,
        pb::SourceState::Unavailable as i32,
        "{source:?}"
    );
    let log = agent.log_text();
    assert!(
        fallback_warnings(&log, SOCK_CREATE).is_empty(),
        "a configured path never falls back:\n{log}"
    );
    let (counts, held) = tcp_programs_held(agent.pid());
    assert_eq!(counts, (0, 0, 0), "programs held: {held:?}");
    agent.stop().await;
    eprintln!("{TEST}: network source unavailable: {}", source.reason);
}
