//! Request/response traffic between two namespaces (`scripts/pingpong.py`), for the TCP
//! latency tests: the network, the server, clients, and the prerequisites they share.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    time::Duration,
};

use nodeward::{
    config::PathsConfig,
    probe::Capabilities,
    sources::tcp::{
        plan, snapshot::WindowStats, Attribution, Collector, RttMethod, TcpConfig, TcpSnapshot,
    },
    store::{Window, DEFAULT_NETWORK_WINDOWS},
};

use crate::{
    cgroup_v2_root,
    net::{has_iptables, python_with_nfqueue, script, veth},
    run, skip, wait_for, Cgroup, Netns,
};

/// The TCP programs attached the way `attribution` asks, with `tcp.rtt_method = method` and a
/// 1 s tick; `None` (after a skip) when this kernel cannot run that path or that method.
pub fn collector(test: &str, attribution: Attribution, method: RttMethod) -> Option<Collector> {
    let caps = Capabilities::probe(&PathsConfig::default());
    let (root, plan) = match plan(&caps, attribution) {
        Ok(p) => p,
        Err(e) => {
            skip(
                test,
                &format!("{attribution:?} attribution unavailable: {e}"),
            );
            return None;
        }
    };
    if let Err(e) = method.resolve(&caps.kernel_release, plan.recorder) {
        skip(test, &e.to_string());
        return None;
    }
    let config = TcpConfig {
        rtt_method: method,
        ..TcpConfig::default()
    };
    Some(
        Collector::attach(
            &root,
            &config,
            &plan,
            Duration::from_secs(1),
            &DEFAULT_NETWORK_WINDOWS,
        )
        .expect("TCP programs load and attach"),
    )
}

/// The 10 s window of `cgroup` in `snap`; panics, showing the snapshot, when there is none.
pub fn window(snap: &TcpSnapshot, cgroup: &Cgroup) -> WindowStats {
    snap.container(cgroup.id())
        .and_then(|c| c.window(Window::from_secs(10)))
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no 10s window for cgroup {}: {snap:#?}",
                cgroup.path.display()
            )
        })
}

/// What every TCP test needs (root, cgroup v2, python3), or the reason it cannot run; returns
/// the interpreter.
pub fn prerequisites_without_delay_line(test: &str) -> Option<String> {
    if !crate::is_root() {
        skip(test, "needs root (eBPF, cgroups, network namespaces)");
        return None;
    }
    if cgroup_v2_root().is_none() {
        skip(test, "no cgroup v2 hierarchy");
        return None;
    }
    let has_python = std::process::Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_python {
        skip(test, "python3 is not installed");
        return None;
    }
    Some("python3".to_owned())
}

/// What the tests with a delay line need besides: iptables and a python3 with
/// `netfilterqueue`; returns that interpreter.
pub fn prerequisites(test: &str) -> Option<String> {
    prerequisites_without_delay_line(test)?;
    if !has_iptables() {
        skip(
            test,
            "iptables is not installed (apt-get install -y iptables)",
        );
        return None;
    }
    let Some(python) = python_with_nfqueue() else {
        skip(test, "no python3 with netfilterqueue (pip install NetfilterQueue; needs libnetfilter-queue-dev)");
        return None;
    };
    Some(python)
}

/// A child process killed and reaped when the test ends, pass or fail.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two namespaces joined by veth: clients on one side, servers on the other.
pub struct Net {
    pub client: Netns,
    pub server: Netns,
    pub server_ip: String,
}

pub fn network(net: u8) -> Net {
    let client = Netns::new("tcpc");
    let server = Netns::new("tcps");
    let (_, server_ip) = veth(&client, &server, net);
    Net {
        client,
        server,
        server_ip,
    }
}

pub fn start_server(net: &Net, cgroup: &Cgroup, python: &str, ports: &[u16]) -> Child {
    let mut cmd = net.server.command(python);
    cmd.arg(script("pingpong.py"))
        .arg("serve")
        .arg(&net.server_ip);
    cmd.args(ports.iter().map(u16::to_string));
    let child = cgroup.spawn(cmd.stdout(Stdio::null()));
    let listening = wait_for(Duration::from_secs(10), || {
        let out = run(net.server.command("ss").args(["-tlnH"]));
        ports
            .iter()
            .all(|p| out.contains(&format!(":{p} ")))
            .then_some(())
    });
    assert!(listening.is_some(), "server did not listen on {ports:?}");
    child
}

/// Starts a client; returns it with its local ports once all its connections are up.
pub fn start_client(
    net: &Net,
    cgroup: &Cgroup,
    python: &str,
    port: u16,
    conns: u32,
    rounds: u32,
    hold_s: u32,
) -> (Proc, BufReader<std::process::ChildStdout>, Vec<u16>) {
    let mut cmd = net.client.command(python);
    cmd.arg(script("pingpong.py"))
        .args([
            "client",
            &net.server_ip,
            &port.to_string(),
            &conns.to_string(),
            &rounds.to_string(),
            "10",
            &hold_s.to_string(),
        ])
        .stdout(Stdio::piped());
    let mut child = cgroup.spawn(&mut cmd);
    let mut out = BufReader::new(child.stdout.take().expect("client stdout"));
    let mut ports = Vec::new();
    let mut line = String::new();
    while out.read_line(&mut line).expect("read client") > 0 && line.trim() != "connected" {
        ports.push(line.trim().parse().expect("client prints its local ports"));
        line.clear();
    }
    (Proc(child), out, ports)
}

pub fn wait_done(out: &mut BufReader<std::process::ChildStdout>) {
    let mut line = String::new();
    while out.read_line(&mut line).expect("read client") > 0 {
        if line.trim() == "done" {
            return;
        }
        line.clear();
    }
    panic!("client ended before finishing its rounds");
}
