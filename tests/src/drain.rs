//! What the drain tests share: an agent run from the built binary with its socket (and so its
//! drain state file, `drain.json` next to the socket) in a directory that outlives it, so that
//! a test can SIGKILL it and start another on the same state; and a long-lived TCP connection
//! into a test cgroup that keeps exchanging data.

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use nodeward::api::pb;

use crate::{
    agent_binary,
    api::{conn, eventually},
    Cgroup,
};

pub type Client = pb::node_health_client::NodeHealthClient<tonic::transport::Channel>;

/// How long each step may take: many ticks, so a slow shared machine is no failure.
pub const STEP: Duration = Duration::from_secs(60);

/// `nodeward run` with its API on `<dir>/agent.sock`, its log in `<dir>/<name>.log`.
pub struct DrainAgent {
    pub child: Child,
    pub client: Client,
    pub log: PathBuf,
}

impl DrainAgent {
    /// Starts the agent with `extra` `--set` overrides and `env`, and waits for its socket.
    pub async fn start(dir: &Path, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let socket = dir.join("agent.sock");
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create the log file");
        let mut cmd = Command::new(agent_binary());
        cmd.args(["run", "--config", "/dev/null"])
            .args(["--set", "api.tcp_listen=", "--set", "metrics.enabled=false"])
            .args(["--set", "gpu.enabled=false", "--set", "agent.tick=500ms"])
            .args(["--set", "health.interval=250ms", "--set", "log.format=json"])
            .arg("--set")
            .arg(format!("api.unix_socket={}", socket.display()));
        for kv in extra {
            cmd.args(["--set", kv]);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .env("NODEWARD_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file)
            .spawn()
            .expect("start nodeward run");
        let client = connect(&socket).await;
        Self { child, client, log }
    }

    /// SIGKILL, as the OOM killer or a node's runtime would: nothing is flushed or cleaned.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn status(&self) -> pb::GetDrainStatusResponse {
        self.client
            .clone()
            .get_drain_status(pb::GetDrainStatusRequest {})
            .await
            .expect("GetDrainStatus")
            .into_inner()
    }

    pub async fn health(&self) -> pb::NodeHealthReport {
        self.client
            .clone()
            .get_node_health(pb::GetNodeHealthRequest {})
            .await
            .expect("GetNodeHealth")
            .into_inner()
            .health
            .expect("a report")
    }

    pub async fn begin(&self, by: &str, deadline_seconds: i64) -> pb::BeginDrainResponse {
        self.client
            .clone()
            .begin_drain(pb::BeginDrainRequest {
                requested_by: by.to_owned(),
                reason: "drain test".to_owned(),
                deadline_seconds,
            })
            .await
            .expect("BeginDrain")
            .into_inner()
    }

    /// Waits until `f` holds for a drain status, and returns that status.
    pub async fn wait_status(
        &self,
        what: &str,
        f: impl Fn(&pb::GetDrainStatusResponse) -> bool,
    ) -> pb::GetDrainStatusResponse {
        let f = &f;
        match eventually(STEP, || async move {
            let s = self.status().await;
            f(&s).then_some(s)
        })
        .await
        {
            Some(s) => s,
            None => panic!(
                "{what}: not within {STEP:?}; last status {:?}\nlog:\n{}",
                self.status().await,
                self.log_text()
            ),
        }
    }
}

impl Drop for DrainAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(socket: &Path) -> Client {
    let addr = format!("unix:{}", socket.display());
    eventually(STEP, || {
        let addr = addr.clone();
        async move {
            let mut c = nodeward::client::connect(&conn(&addr), socket).await.ok()?;
            c.get_node_health(pb::GetNodeHealthRequest {}).await.ok()?;
            Some(c)
        }
    })
    .await
    .expect("the agent answers on its socket")
}

/// The store key of a test cgroup: its path below the v2 root, `/`-prefixed.
pub fn key_of(cgroup: &Cgroup, v2_root: &Path) -> String {
    format!(
        "/{}",
        cgroup
            .path
            .strip_prefix(v2_root)
            .expect("test cgroup under the v2 root")
            .display()
    )
}

/// An echo server in a cgroup and one connection to it from the test, which a thread keeps
/// busy (a round trip every 50 ms) until dropped: a live stream served by the cgroup.
pub struct LiveConnection {
    server: Child,
    stop: Arc<AtomicBool>,
    pinger: Option<std::thread::JoinHandle<()>>,
    pub local: String,
    /// The port the cgroup's server accepted the connection on.
    pub served_port: u16,
}

impl LiveConnection {
    pub fn open(cgroup: &Cgroup) -> Self {
        let script = [
            "import socket",
            "s = socket.socket()",
            "s.bind(('127.0.0.1', 0))",
            "s.listen(1)",
            "print(s.getsockname()[1], flush=True)",
            "c, _ = s.accept()",
            "while True:",
            "    d = c.recv(4096)",
            "    if not d:",
            "        break",
            "    c.sendall(d)",
        ]
        .join("\n");
        let mut server = cgroup.spawn(
            Command::new("python3")
                .args(["-c", &script])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        );
        let mut line = String::new();
        let stdout = server.stdout.take().expect("server stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the server prints its port");
        let port: u16 = line.trim().parse().expect("port number");
        let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let local = conn.local_addr().expect("client address").to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let pinger = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let mut buf = [0u8; 4];
                if conn.write_all(b"ping").is_err() || conn.read_exact(&mut buf).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self {
            server,
            stop,
            pinger: Some(pinger),
            local,
            served_port: port,
        }
    }
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(p) = self.pinger.take() {
            let _ = p.join();
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Whether python3 is there (the echo server).
pub fn have_python() -> bool {
    Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
