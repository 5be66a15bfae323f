//! The path container traffic really takes: two network namespaces joined by a veth pair, the
//! echo server (`nodeward-bench rr --listen`) in one and the load generator (`nodeward-bench rr
//! --connect`) in the other, each process in a cgroup of its own under the cgroup v2 root, so
//! the agent sees them as two containers. Everything is made by the benchmark and removed when
//! its guard drops, on an error too.

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _};

use super::{
    bench_bin,
    scenarios::{rr_rows, Exchanges},
    Plan, Row,
};

/// Addresses on the veth pair: a /30 of its own inside the namespaces, so nothing on the host
/// (routes, other helpers' namespaces) can collide with it.
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 7, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 7, 2);
/// Below the ephemeral range, inside the server's own namespace.
const PORT: u16 = 7_700;

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The cgroup v2 root, where `cgroup2` is mounted (`/sys/fs/cgroup`, or `…/unified` on a
/// hybrid host).
fn v2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .and_then(|f| f.get(1).map(PathBuf::from))
        .context("no cgroup v2 hierarchy mounted")
}

/// One side: a network namespace and the cgroup its process runs in.
struct Side {
    netns: String,
    cgroup: PathBuf,
}

/// The two namespaces, the veth pair between them, the two cgroups and the echo server.
/// Dropping it stops the server and removes them all.
pub struct VethPair {
    server: Side,
    client: Side,
    echo: Option<(Child, ChildStdin)>,
    bench: PathBuf,
}

impl VethPair {
    pub fn start(agent_bin: &Path) -> anyhow::Result<Self> {
        let id = std::process::id();
        let root = v2_root()?;
        let side = |role: &str| Side {
            netns: format!("nwb-{role}-{id}"),
            cgroup: root.join(format!("nodeward-bench-veth-{role}-{id}")),
        };
        // Built empty first, so that whatever the steps below made is removed by Drop when a
        // later step fails.
        let mut pair = Self {
            server: side("srv"),
            client: side("cli"),
            echo: None,
            bench: bench_bin(agent_bin),
        };
        for s in [&pair.server, &pair.client] {
            ip(&["netns", "add", &s.netns])?;
            ip(&["-n", &s.netns, "link", "set", "lo", "up"])?;
            std::fs::create_dir(&s.cgroup)
                .with_context(|| format!("create {}", s.cgroup.display()))?;
        }
        // Created inside the server's namespace, its peer moved to the client's: deleting the
        // namespaces deletes both ends, and nothing is ever in the host's namespace.
        let (srv_if, cli_if) = (format!("nwbs{id}"), format!("nwbc{id}"));
        ip(&[
            "-n",
            &pair.server.netns,
            "link",
            "add",
            &srv_if,
            "type",
            "veth",
            "peer",
            "name",
            &cli_if,
            "netns",
            &pair.client.netns,
        ])?;
        for (s, dev, addr) in [
            (&pair.server, &srv_if, SERVER_IP),
            (&pair.client, &cli_if, CLIENT_IP),
        ] {
            ip(&[
                "-n",
                &s.netns,
                "addr",
                "add",
                &format!("{addr}/30"),
                "dev",
                dev,
            ])?;
            ip(&["-n", &s.netns, "link", "set", dev, "up"])?;
        }
        let mut child = pair
            .spawn(
                &pair.server,
                &["rr", "--listen", &pair.server_addr().to_string()],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the echo server in its namespace")?;
        let stdin = child.stdin.take().context("echo server stdin")?;
        let stdout = child.stdout.take().context("echo server stdout")?;
        pair.echo = Some((child, stdin));
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("read the echo server's first line")?;
        let said: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if said["listening"].as_str().is_none() {
            bail!("the echo server did not start listening (it said {line:?})");
        }
        Ok(pair)
    }

    pub fn server_addr(&self) -> SocketAddr {
        SocketAddr::from((SERVER_IP, PORT))
    }

    /// `nodeward-bench ARGS` in `side`'s cgroup and namespace: the shell joins the cgroup (a
    /// child inherits it through `exec`) before `ip netns exec`, whose private `/sys` has no
    /// cgroup mounts.
    fn spawn(&self, side: &Side, args: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && shift && exec ip netns exec "$@""#)
            .arg("sh")
            .arg(&side.cgroup)
            .arg(&side.netns)
            .arg(&self.bench)
            .args(args);
        c
    }

    /// Four persistent connections from the client's namespace exchanging 64-byte requests and
    /// responses with the server for `length`, as fast as they go.
    pub fn exchange(&self, length: Duration) -> anyhow::Result<Exchanges> {
        let out = self
            .spawn(
                &self.client,
                &[
                    "rr",
                    "--connect",
                    &self.server_addr().to_string(),
                    "--connections",
                    "4",
                    "--rate",
                    "0",
                    "--size",
                    "64",
                    "--duration",
                    &format!("{}ms", length.as_millis()),
                ],
            )
            .stdin(Stdio::null())
            .output()
            .context("run the load generator in its namespace")?;
        if !out.status.success() {
            bail!(
                "nodeward-bench rr --connect failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("nodeward-bench rr JSON")?;
        if v["errors"].as_u64() != Some(0) {
            bail!(
                "the load generator's connections failed: {}",
                v["error_samples"]
            );
        }
        Ok(Exchanges {
            count: v["exchanges"].as_u64().context("no exchanges")?,
            seconds: v["seconds"].as_f64().context("no seconds")?,
        })
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        if let Some((mut child, stdin)) = self.echo.take() {
            // Closing stdin stops it; the kill is for a server that does not.
            drop(stdin);
            for _ in 0..40 {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for s in [&self.server, &self.client] {
            // Deleting a namespace deletes the veth end inside it.
            let _ = ip(&["netns", "delete", &s.netns]);
            // Empty by now: the processes in it have exited.
            let _ = std::fs::remove_dir(&s.cgroup);
        }
    }
}

pub const DESCRIPTION: &str = "\
- **TCP request/response (veth)**: the request/response load above on the path container \
traffic takes: two network namespaces made for the run and joined by a veth pair, the echo \
server (`nodeward-bench rr --listen`) in one and the load generator (`nodeward-bench rr \
--connect`, four persistent connections, 64-byte requests and responses, as fast as they go) in \
the other, each process in a cgroup of its own under the cgroup v2 root, so the agent attributes \
them as two containers. The namespaces, the veth pair and the cgroups are removed at the end of \
the scenario, after a failure too. Rows as for loopback: transactions/s without and with the \
agent (target: ratio ≥ 0.97), each program's ns per run, the agent's CPU.";

pub fn tcp_rr(_root: &Path, agent_bin: &Path, plan: Plan) -> anyhow::Result<Vec<Row>> {
    const SCENARIO: &str = "TCP request/response (veth)";
    let pair = VethPair::start(agent_bin)?;
    let length = Duration::from_secs(plan.seconds);
    rr_rows(SCENARIO, agent_bin, plan, || {
        pair.exchange(length).map(Exchanges::per_second)
    })
}
