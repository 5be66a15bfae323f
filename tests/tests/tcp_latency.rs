//! TCP latency, jitter, retransmits and attribution against ground truth: two network
//! namespaces joined by veth, each side's processes in a cgroup of their own, and an NFQUEUE
//! delay line (this kernel has no netem) holding the client's packets for a known time.
//!
//! Truth is what the delay line applied (it logs every packet's delay) and what the kernel
//! itself reports (`ss -ti`, `nstat`); never the agent's own output.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    sync::Mutex,
    time::Duration,
};

use nodeward::{
    config::PathsConfig,
    probe::Capabilities,
    sources::tcp::{plan, snapshot::WindowStats, Attribution, Collector, TcpConfig, TcpSnapshot},
};
use nodeward_tests::{
    cgroup_v2_root,
    net::{has_iptables, nstat_retrans, python_with_nfqueue, script, ss, veth, Applied, DelayLine},
    run, skip, wait_for, Cgroup, Netns,
};

/// The tests share two cores with everything else; running them one at a time keeps the delay
/// line's timing honest.
static SERIAL: Mutex<()> = Mutex::new(());

/// What every test here needs, or the reason it cannot run.
fn prerequisites(test: &str) -> Option<String> {
    if !nodeward_tests::is_root() {
        skip(test, "needs root (eBPF, cgroups, network namespaces)");
        return None;
    }
    if cgroup_v2_root().is_none() {
        skip(test, "no cgroup v2 hierarchy");
        return None;
    }
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
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Net {
    client: Netns,
    server: Netns,
    server_ip: String,
}

fn network(net: u8) -> Net {
    let client = Netns::new("tcpc");
    let server = Netns::new("tcps");
    let (_, server_ip) = veth(&client, &server, net);
    Net {
        client,
        server,
        server_ip,
    }
}

fn start_server(net: &Net, cgroup: &Cgroup, python: &str, ports: &[u16]) -> Child {
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
fn start_client(
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

fn wait_done(out: &mut BufReader<std::process::ChildStdout>) {
    let mut line = String::new();
    while out.read_line(&mut line).expect("read client") > 0 {
        if line.trim() == "done" {
            return;
        }
        line.clear();
    }
    panic!("client ended before finishing its rounds");
}

/// Attaches the TCP programs the way `attribution` asks; `None` (after a skip) when this
/// kernel cannot do it.
fn collector(test: &str, attribution: Attribution) -> Option<Collector> {
    let caps = Capabilities::probe(&PathsConfig::default());
    match plan(&caps, attribution) {
        Ok((root, plan)) => Some(
            Collector::attach(&root, &TcpConfig::default(), &plan, Duration::from_secs(1))
                .expect("TCP programs load and attach"),
        ),
        Err(e) => {
            skip(
                test,
                &format!("{attribution:?} attribution unavailable: {e}"),
            );
            None
        }
    }
}

fn window(snap: &TcpSnapshot, cgroup: &Cgroup) -> WindowStats {
    snap.container(cgroup.id())
        .and_then(|c| c.window("10s"))
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no 10s window for cgroup {}: {snap:#?}",
                cgroup.path.display()
            )
        })
}

/// Request delays the line applied towards `dport`, per client port, in order.
fn request_delays(applied: &[Applied], dport: u16) -> Vec<(u16, Vec<f64>)> {
    let mut by_port: Vec<(u16, Vec<f64>)> = Vec::new();
    for a in applied.iter().filter(|a| a.dport == dport && a.len > 0) {
        let Some(d) = a.delay_ms else { continue };
        match by_port.iter_mut().find(|(p, _)| *p == a.sport) {
            Some((_, v)) => v.push(d),
            None => by_port.push((a.sport, vec![d])),
        }
    }
    by_port
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// RFC 3550 jitter of each connection's delay sequence, averaged over samples, as the agent
/// defines it; and the plain mean |Δdelay|.
fn jitter_truth(per_conn: &[(u16, Vec<f64>)]) -> (f64, f64) {
    let (mut sum_j, mut sum_d, mut n) = (0.0, 0.0, 0.0);
    for (_, delays) in per_conn {
        let mut j = 0.0;
        for w in delays.windows(2) {
            let d = (w[1] - w[0]).abs();
            j += (d - j) / 16.0;
            sum_j += j;
            sum_d += d;
            n += 1.0;
        }
    }
    (sum_j / n, sum_d / n)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b
}

/// With 20 ms ± 5 ms one-way delay on the client's packets, the agent's p50 RTT for the
/// client's cgroup is within 5% of the applied delay's median, agrees with `ss -ti` for the
/// same sockets, and its jitter is within 20% of the jitter of the applied delays.
#[test]
fn rtt_and_jitter_match_the_delay_line_and_ss() {
    const TEST: &str = "rtt_and_jitter_match_the_delay_line_and_ss";
    let Some(python) = prerequisites(TEST) else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let net = network(91);
    let (server_cg, client_cg) = (Cgroup::new("srv"), Cgroup::new("cli"));
    let Some(mut collector) = collector(TEST, Attribution::Auto) else {
        return;
    };
    collector.tick().expect("baseline read");

    let _server = Proc(start_server(&net, &server_cg, &python, &[5001]));
    let line = DelayLine::start(
        &python,
        &net.client,
        1,
        &["-p", "tcp", "--dport", "5001"],
        20.0,
        5.0,
        0.0,
    );
    let (_client, mut out, ports) = start_client(&net, &client_cg, &python, 5001, 4, 60, 30);
    wait_done(&mut out);
    let ss_now: Vec<_> = ss(&net.client)
        .into_iter()
        .filter(|s| ports.contains(&s.local_port))
        .collect();
    let snap = collector.tick().expect("read");

    assert_eq!(
        ss_now.len(),
        ports.len(),
        "ss sees every client socket: {ss_now:?}"
    );
    let w = window(&snap, &client_cg);
    let truth = request_delays(&line.applied(), 5001);
    let truth_p50 = median(truth.iter().flat_map(|t| t.1.iter().copied()).collect());
    let ss_srtt = ss_now.iter().map(|s| s.srtt_ms).sum::<f64>() / ss_now.len() as f64;
    let (truth_jitter, truth_absdiff) = jitter_truth(&truth);
    eprintln!(
        "agent p50 {:.2} ms (min {:.2} p90 {:.2} p99 {:.2} max {:.2}, {} samples, {} raw), truth p50 {truth_p50:.2} ms, ss srtt {ss_srtt:.2} ms; \
         agent jitter {:.2} ms / mean |Δ| {:.2} ms / stddev {:.2} ms, truth jitter {truth_jitter:.2} / mean |Δ| {truth_absdiff:.2} ms",
        w.p50_rtt_us / 1e3, w.min_rtt_us / 1e3, w.p90_rtt_us / 1e3, w.p99_rtt_us / 1e3, w.max_rtt_us / 1e3, w.samples, w.raw_samples,
        w.jitter_us / 1e3, w.mean_abs_diff_us / 1e3, w.stddev_rtt_us / 1e3,
    );
    let c = snap.container(client_cg.id()).expect("client container");
    let peer = c
        .peers
        .iter()
        .find(|p| p.peer == format!("{}:5001", net.server_ip));
    let peer = peer.unwrap_or_else(|| panic!("server not among the client's peers: {:?}", c.peers));
    assert_eq!(
        (c.established, peer.established),
        (4, 4),
        "established connections, in total and to the server"
    );
    assert!(
        c.established_age_max_s > 1.0 && c.established_age_max_s < 120.0,
        "age of the oldest connection: {} s",
        c.established_age_max_s
    );
    assert_eq!(
        snap.fidelity.rtt_sample, "raw",
        "this kernel passes each measured RTT to sock_ops"
    );
    assert!(
        w.samples >= 4 * 60,
        "one sample per request at least: {}",
        w.samples
    );
    assert!(
        rel(w.p50_rtt_us / 1e3, truth_p50) <= 0.05,
        "p50 {} µs vs applied median {truth_p50} ms",
        w.p50_rtt_us
    );
    assert!(
        rel(w.p50_rtt_us / 1e3, ss_srtt) <= 0.10,
        "p50 {} µs vs ss srtt {ss_srtt} ms",
        w.p50_rtt_us
    );
    assert!(
        rel(w.jitter_us / 1e3, truth_jitter) <= 0.20,
        "jitter {} µs vs applied {truth_jitter} ms",
        w.jitter_us
    );
    assert!(
        rel(w.mean_abs_diff_us / 1e3, truth_absdiff) <= 0.20,
        "mean |Δ| {} µs vs applied {truth_absdiff} ms",
        w.mean_abs_diff_us
    );
}

/// Two client containers behind different delays (20 ± 5 ms and 6 ± 1.5 ms) talking to a
/// server container at the same time: each container's RTTs match its own delay line and none
/// of the other's samples leak in, although the clients sleep between requests and their ACKs
/// are processed in softirq while other tasks (the server, the delay line) run.
#[test]
fn two_containers_with_different_delays_are_told_apart() {
    told_apart(
        "two_containers_with_different_delays_are_told_apart",
        Attribution::SockCreate,
        92,
    );
}

/// The same with the 5.10 fallback: cgroups recorded from each socket's first egress packet,
/// so the server's accepted sockets start unattributed and are resolved later.
#[test]
fn two_containers_are_told_apart_with_egress_attribution() {
    told_apart(
        "two_containers_are_told_apart_with_egress_attribution",
        Attribution::Egress,
        94,
    );
}

fn told_apart(test: &str, attribution: Attribution, subnet: u8) {
    let Some(python) = prerequisites(test) else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let net = network(subnet);
    let (server_cg, slow_cg, fast_cg) =
        (Cgroup::new("srv"), Cgroup::new("slow"), Cgroup::new("fast"));
    let Some(mut collector) = collector(test, attribution) else {
        return;
    };
    collector.tick().expect("baseline read");

    let _server = Proc(start_server(&net, &server_cg, &python, &[5001, 5002]));
    let slow_line = DelayLine::start(
        &python,
        &net.client,
        2,
        &["-p", "tcp", "--dport", "5001"],
        20.0,
        5.0,
        0.0,
    );
    let fast_line = DelayLine::start(
        &python,
        &net.client,
        3,
        &["-p", "tcp", "--dport", "5002"],
        6.0,
        1.5,
        0.0,
    );
    let (_slow, mut slow_out, _) = start_client(&net, &slow_cg, &python, 5001, 2, 60, 30);
    let (_fast, mut fast_out, _) = start_client(&net, &fast_cg, &python, 5002, 2, 60, 30);
    wait_done(&mut slow_out);
    wait_done(&mut fast_out);
    let snap = collector.tick().expect("read");

    let (ws, wf, wsrv) = (
        window(&snap, &slow_cg),
        window(&snap, &fast_cg),
        window(&snap, &server_cg),
    );
    let truth_slow = median(
        request_delays(&slow_line.applied(), 5001)
            .into_iter()
            .flat_map(|t| t.1)
            .collect(),
    );
    let truth_fast = median(
        request_delays(&fast_line.applied(), 5002)
            .into_iter()
            .flat_map(|t| t.1)
            .collect(),
    );
    eprintln!(
        "slow: p50 {:.2} ms [{:.2}, {:.2}] truth {truth_slow:.2}; fast: p50 {:.2} ms [{:.2}, {:.2}] truth {truth_fast:.2}; \
         samples in a foreign task's context: slow {} of {}, fast {} of {}",
        ws.p50_rtt_us / 1e3, ws.min_rtt_us / 1e3, ws.max_rtt_us / 1e3,
        wf.p50_rtt_us / 1e3, wf.min_rtt_us / 1e3, wf.max_rtt_us / 1e3,
        ws.foreign_context_samples, ws.samples, wf.foreign_context_samples, wf.samples,
    );
    assert!(
        rel(ws.p50_rtt_us / 1e3, truth_slow) <= 0.05,
        "slow p50 {} µs vs {truth_slow} ms",
        ws.p50_rtt_us
    );
    // Scheduling noise on this two-core machine weighs more against a 6 ms delay.
    assert!(
        rel(wf.p50_rtt_us / 1e3, truth_fast) <= 0.10,
        "fast p50 {} µs vs {truth_fast} ms",
        wf.p50_rtt_us
    );
    assert!(
        ws.min_rtt_us >= 14_000.0,
        "a fast sample leaked into the slow container: min {} µs",
        ws.min_rtt_us
    );
    // Not the max: one late wake-up of a relay on this busy machine can stretch a fast sample.
    assert!(
        wf.p90_rtt_us <= 10_000.0,
        "slow samples leaked into the fast container: p90 {} µs",
        wf.p90_rtt_us
    );
    // The RTT callback is enabled at ESTABLISHED, so each container has exactly one sample
    // per request its own client made (2 connections × 60), none of the other's.
    assert_eq!(
        (ws.samples, wf.samples),
        (120, 120),
        "samples per container"
    );
    assert_eq!(
        (ws.opened, wf.opened, wsrv.opened),
        (2, 2, 4),
        "connections opened per container"
    );
    assert!(
        ws.foreign_context_samples + wf.foreign_context_samples > 0,
        "the test never processed an ACK in another task's context, so it proved nothing about softirq attribution"
    );
}

/// Dropping 10% of the client's data packets: the retransmits the agent counts for the client
/// container equal the kernel's own count (`nstat` TcpRetransSegs of the client's namespace,
/// which holds only these sockets), and at least one per dropped packet.
#[test]
fn retransmits_match_the_kernels_count() {
    const TEST: &str = "retransmits_match_the_kernels_count";
    let Some(python) = prerequisites(TEST) else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let net = network(93);
    let (server_cg, client_cg) = (Cgroup::new("srv"), Cgroup::new("cli"));
    let Some(mut collector) = collector(TEST, Attribution::Auto) else {
        return;
    };
    collector.tick().expect("baseline read");

    let _server = Proc(start_server(&net, &server_cg, &python, &[5003]));
    let line = DelayLine::start(
        &python,
        &net.client,
        4,
        &["-p", "tcp", "--dport", "5003"],
        2.0,
        0.5,
        0.1,
    );
    let before = nstat_retrans(&net.client);
    let (mut client, _out, _) = start_client(&net, &client_cg, &python, 5003, 2, 40, 0);
    let status = client.0.wait().expect("client runs to the end");
    assert!(status.success(), "client failed: {status}");
    let kernel = nstat_retrans(&net.client) - before;
    let snap = collector.tick().expect("read");

    let w = window(&snap, &client_cg);
    let dropped = line
        .applied()
        .iter()
        .filter(|a| a.delay_ms.is_none())
        .count() as u64;
    eprintln!(
        "dropped {dropped}, kernel retransmits {kernel}, agent {} of {} segments (rate {:.3}), closed {}",
        w.retrans, w.segs_out, w.retrans_rate, w.closed
    );
    assert!(
        dropped > 0,
        "the delay line dropped nothing; the test proves nothing"
    );
    assert!(kernel >= dropped, "kernel {kernel} < dropped {dropped}");
    assert!(
        w.retrans.abs_diff(kernel) <= 1,
        "agent {} vs kernel {kernel}",
        w.retrans
    );
    assert_eq!(w.closed, 2, "both connections seen closing");
    assert!(
        w.segs_out >= 2 * 40,
        "every request was a segment: {}",
        w.segs_out
    );
}

/// 10,000 short connections and 1,000 long-lived ones from one container, with small map
/// sizes: the kernel maps and the agent's own structures never pass their configured bounds,
/// and the connections that did not fit are reported as untracked, not lost.
#[test]
fn memory_stays_within_bounds_under_connection_churn() {
    const TEST: &str = "memory_stays_within_bounds_under_connection_churn";
    let Some(python) = prerequisites(TEST) else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let net = network(95);
    let (server_cg, client_cg) = (Cgroup::new("srv"), Cgroup::new("churn"));
    let config = TcpConfig {
        max_flows: 512,
        max_cgroups: 256,
        max_hist_entries: 1024,
        max_peers: 8,
        ..TcpConfig::default()
    };
    let caps = Capabilities::probe(&PathsConfig::default());
    let (root, plan) = match plan(&caps, Attribution::Auto) {
        Ok(p) => p,
        Err(e) => return skip(TEST, &format!("TCP programs unavailable: {e}")),
    };
    let mut collector = Collector::attach(&root, &config, &plan, Duration::from_secs(1))
        .expect("TCP programs load and attach");
    collector.tick().expect("baseline read");

    let _server = Proc(start_server(&net, &server_cg, &python, &[5005]));
    let mut cmd = net.client.command(&python);
    cmd.arg(script("pingpong.py"))
        .args(["churn", &net.server_ip, "5005", "1000", "10000", "60"])
        .stdout(Stdio::piped());
    let mut client = Proc(client_cg.spawn(&mut cmd));
    let stdout = client.0.stdout.take().expect("client stdout");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut out = BufReader::new(stdout);
            while out.read_line(&mut line).unwrap_or(0) > 0 {
                if line.trim() == "done" {
                    done.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                line.clear();
            }
        })
    };

    let mut worst = (0, 0, 0, 0, 0, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let snap = loop {
        let finished = done.load(std::sync::atomic::Ordering::SeqCst);
        let snap = collector.tick().expect("read");
        let (maps, tracker) = collector.footprint().expect("footprint");
        worst = (
            worst.0.max(maps.flows),
            worst.1.max(tracker.flows),
            worst.2.max(tracker.peers_per_cgroup_max),
            worst.3.max(maps.cgroups),
            worst.4.max(maps.hist),
            worst.5.max(tracker.ticks),
        );
        if finished || std::time::Instant::now() > deadline {
            break snap;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        done.load(std::sync::atomic::Ordering::SeqCst),
        "churn did not finish in 90 s"
    );
    let _ = reader.join();

    let c = snap.container(client_cg.id()).expect("client container");
    let s = snap.container(server_cg.id()).expect("server container");
    let (cw, sw) = (c.window("5m").expect("5m"), s.window("5m").expect("5m"));
    eprintln!(
        "client: opened {} closed {} established {} untracked {}; server: opened {} closed {} peers {}; \
         worst: kernel flows {}, tracked flows {}, peers/container {}, kernel cgroups {}, hist {}, ticks {}; drops {:?}",
        cw.opened, cw.closed, c.established, c.established_untracked, sw.opened, sw.closed, s.peers.len(),
        worst.0, worst.1, worst.2, worst.3, worst.4, worst.5, snap.drops,
    );
    assert_eq!(
        (cw.opened, cw.closed),
        (11_000, 10_000),
        "client opens and closes"
    );
    assert_eq!(
        c.established + c.established_untracked,
        1_000,
        "every long-lived connection accounted for"
    );
    assert!(
        c.established <= 512,
        "more established flows than the map holds: {}",
        c.established
    );
    assert!(
        worst.0 <= 512 && worst.1 <= 512,
        "flows past max_flows: {worst:?}"
    );
    assert!(worst.2 <= 8, "exact peers past max_peers: {worst:?}");
    assert!(
        s.peers.iter().any(|p| p.peer == "10.95.0.0/24"),
        "the server's many client ports were not folded into a prefix: {:?}",
        s.peers.iter().map(|p| &p.peer).collect::<Vec<_>>()
    );
    assert!(
        s.peers.len() <= 8 + 2,
        "server peers not folded into prefixes: {}",
        s.peers.len()
    );
    assert!(
        worst.3 <= 256 && worst.4 <= 1024 && worst.5 <= 300,
        "map or window past bounds: {worst:?}"
    );
}
