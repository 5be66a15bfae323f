//! What the fleet tests and the fleet benchmark share: certificates made by the real
//! `nodeward certs`, agents serving gRPC over mutual TLS (each in its own network namespace,
//! reached over a veth pair from the root namespace, or on a loopback port), and runs of
//! `nodeward fleet`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use nodeward::api::pb;

use crate::{agent_binary, api::eventually, run, text, Netns};

pub type Client = pb::node_health_client::NodeHealthClient<tonic::transport::Channel>;

/// The client certificate's name: the identity the agents let drain (`cn:fleet-ops`).
pub const OPERATOR: &str = "fleet-ops";

/// A directory of certificates made by `nodeward certs` (the command users run).
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    /// A new CA in `dir` and the operator's client certificate.
    pub fn new(dir: &Path) -> Self {
        let certs = Self {
            dir: dir.to_path_buf(),
        };
        certs.certs(&["ca"]);
        certs.certs(&["client", OPERATOR]);
        certs
    }

    /// Runs `nodeward certs ARGS --dir DIR` and panics with its output if it fails.
    pub fn certs(&self, args: &[&str]) -> Output {
        let out = Command::new(agent_binary())
            .arg("certs")
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .expect("run nodeward certs");
        assert!(
            out.status.success(),
            "nodeward certs {args:?}: {}",
            text(&out)
        );
        out
    }

    /// A node certificate for `node`, also valid for `ip`.
    pub fn node(&self, node: &str, ip: &str) {
        self.certs(&["node", node, "--ip", ip]);
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// `--ca`, `--cert`, `--key` for a `nodeward fleet` run as the client `client`.
    pub fn client_args(&self, client: &str) -> Vec<String> {
        vec![
            "--ca".into(),
            self.path("ca.crt").display().to_string(),
            "--cert".into(),
            self.path(&format!("{client}.crt")).display().to_string(),
            "--key".into(),
            self.path(&format!("{client}.key")).display().to_string(),
        ]
    }
}

/// One agent: `nodeward run` with gRPC on `tcp` behind mutual TLS (the CA of `certs` signs its
/// clients) and on a Unix socket the test asks it over, independently of the fleet client.
pub struct FleetAgent {
    pub node: String,
    pub tcp: SocketAddr,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Child,
    pub netns: Option<Netns>,
}

impl FleetAgent {
    /// Starts the agent (in `netns` when given) with its files under `dir`; `extra` are more
    /// `--set` overrides. Returns at once: see [`FleetAgent::client`].
    pub fn start(
        dir: &Path,
        certs: &Certs,
        node: &str,
        tcp: SocketAddr,
        netns: Option<Netns>,
        extra: &[String],
    ) -> Self {
        let own = dir.join(node);
        std::fs::create_dir_all(&own).expect("agent dir");
        let socket = own.join("agent.sock");
        let log = own.join("agent.log");
        let file = std::fs::File::create(&log).expect("log file");
        let bin = agent_binary();
        // nsenter, not `ip netns exec`: that one mounts a sysfs of the namespace over /sys,
        // which hides the host's cgroup hierarchy from the agent.
        let mut cmd = match &netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{}", ns.name)).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let crt = certs.path(&format!("{node}.crt"));
        let key = certs.path(&format!("{node}.key"));
        let mut set = vec![
            format!("api.node_name={node}"),
            format!("api.unix_socket={}", socket.display()),
            format!("api.tcp_listen={tcp}"),
            format!("api.tls_cert={}", crt.display()),
            format!("api.tls_key={}", key.display()),
            format!("api.tls_client_ca={}", certs.path("ca.crt").display()),
            format!("api.drain_allowed_identities=[\"cn:{OPERATOR}\"]"),
            "metrics.enabled=false".into(),
            "gpu.enabled=false".into(),
            "udp.enabled=false".into(),
            "agent.tick=500ms".into(),
            "health.interval=250ms".into(),
            "log.format=json".into(),
        ];
        set.extend(extra.iter().cloned());
        cmd.args(["run", "--config", "/dev/null"]);
        for kv in &set {
            cmd.args(["--set", kv]);
        }
        let child = cmd
            .env("NODEWARD_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file)
            .spawn()
            .expect("start nodeward run");
        Self {
            node: node.to_owned(),
            tcp,
            socket,
            log,
            child,
            netns,
        }
    }

    /// A client on the agent's Unix socket, once it answers there.
    pub async fn client(&self) -> Client {
        let addr = format!("unix:{}", self.socket.display());
        let socket = self.socket.clone();
        eventually(Duration::from_secs(90), || {
            let (addr, socket) = (addr.clone(), socket.clone());
            async move {
                let mut c = nodeward::client::connect(&crate::api::conn(&addr), &socket)
                    .await
                    .ok()?;
                c.get_node_health(pb::GetNodeHealthRequest {}).await.ok()?;
                Some(c)
            }
        })
        .await
        .unwrap_or_else(|| panic!("{} answers on its socket\n{}", self.node, self.log_text()))
    }

    /// The `host:port node` line of a targets file.
    /// The agent's own answer on its Unix socket: (node name, verdict as `fleet` names it).
    pub async fn own_view(&self) -> (String, String) {
        let r = self
            .client()
            .await
            .get_node_health(pb::GetNodeHealthRequest {})
            .await
            .expect("GetNodeHealth")
            .into_inner()
            .health
            .expect("a report");
        (r.node, verdict_name(r.verdict))
    }

    pub fn target_line(&self) -> String {
        format!("{} {}", self.tcp, self.node)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: the node is gone without a word.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for FleetAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A network namespace reached from the root one over a veth pair: `10.<a>.<b>.1` on the
/// root side, `10.<a>.<b>.2` inside (returned).
pub fn reachable_netns(stem: &str, a: u8, b: u8) -> (Netns, String) {
    let ns = Netns::new(stem);
    // Interface names are at most 15 bytes and unique on the host: pid and index.
    let id = format!("{}{a}x{b}", std::process::id() % 10_000);
    let (host, inner) = (format!("nfh{id}"), format!("nfn{id}"));
    run(Command::new("ip").args([
        "link", "add", &host, "type", "veth", "peer", "name", &inner, "netns", &ns.name,
    ]));
    run(Command::new("ip").args(["addr", "add", &format!("10.{a}.{b}.1/24"), "dev", &host]));
    run(Command::new("ip").args(["link", "set", &host, "up"]));
    run(Command::new("ip").args([
        "-n",
        &ns.name,
        "addr",
        "add",
        &format!("10.{a}.{b}.2/24"),
        "dev",
        &inner,
    ]));
    run(Command::new("ip").args(["-n", &ns.name, "link", "set", &inner, "up"]));
    (ns, format!("10.{a}.{b}.2"))
}

/// `nodeward fleet ARGS`, its output.
pub fn fleet(args: &[String]) -> Output {
    Command::new(agent_binary())
        .arg("fleet")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run nodeward fleet")
}

/// The rows of `fleet status --json`: one JSON object a line.
pub fn rows(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The verdict as `fleet` names it (`HEALTHY`), from the agent's own enum.
pub fn verdict_name(v: i32) -> String {
    let full = pb::Verdict::try_from(v).map_or("?", |v| v.as_str_name());
    full.strip_prefix("VERDICT_").unwrap_or(full).to_owned()
}
