//! Path RTT, not the peer's think time: a request/response server in a container of its own
//! behind the tests' 20 ms ± 5 ms one-way delay line, its clients pausing between requests.
//!
//! The server's RTT measurements end at the ACK its client sends with its next request (or
//! when its delayed-ACK timer fires), so they hold the client's pause; the server's own
//! `ss -ti` shows the inflated figure. The agent's path RTT for the server's container must
//! instead match what the client's kernel measures for the same path (`ss -ti` on the client
//! sockets), and a bulk sender's figures must be what they were before the filter (its path
//! mean equals the mean of every measurement the kernel took).

use std::{
    io::{BufRead as _, BufReader},
    process::{ChildStdout, Stdio},
    sync::Mutex,
    time::Duration,
};

use nodeward::sources::tcp::{Attribution, RttMethod};
use nodeward_tests::{
    net::{script, ss, Applied, DelayLine},
    pingpong::{collector, network, prerequisites, start_server, window, Net, Proc},
    run, wait_for, Cgroup,
};

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `think.py` with `args` in the client namespace and cgroup; returns it with its local
/// ports once it printed "connected".
fn start_think(
    net: &Net,
    cgroup: &Cgroup,
    python: &str,
    args: &[String],
) -> (Proc, BufReader<ChildStdout>, Vec<u16>) {
    let mut cmd = net.client.command(python);
    cmd.arg(script("think.py"))
        .args(args)
        .stdout(Stdio::piped());
    let mut child = cgroup.spawn(&mut cmd);
    let mut out = BufReader::new(child.stdout.take().expect("client stdout"));
    let mut ports = Vec::new();
    let mut line = String::new();
    while out.read_line(&mut line).expect("read client") > 0 && line.trim() != "connected" {
        ports.push(
            line.trim()
                .parse()
                .expect("the client prints its local ports"),
        );
        line.clear();
    }
    (Proc(child), out, ports)
}

fn wait_done(out: &mut BufReader<ChildStdout>) {
    let mut line = String::new();
    while out.read_line(&mut line).expect("read client") > 0 {
        if line.trim() == "done" {
            return;
        }
        line.clear();
    }
    panic!("client ended before it was done");
}

fn median(mut v: Vec<f64>) -> f64 {
    assert!(!v.is_empty(), "no values");
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b
}

/// Delays the line applied to packets carrying data towards `dport`.
fn data_delays(applied: &[Applied], dport: u16) -> Vec<f64> {
    applied
        .iter()
        .filter(|a| a.dport == dport && a.len > 0)
        .filter_map(|a| a.delay_ms)
        .collect()
}

/// Connections to the server, each in a thread of its own, pausing `pause_ms` between a reply
/// and the next request.
const CONNS: u32 = 32;

fn server_path_rtt_excludes_the_clients_pause(
    test: &str,
    method: RttMethod,
    pause_ms: u32,
    subnet: u8,
    queue: u16,
) {
    let Some(python) = prerequisites(test) else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let net = network(subnet);
    let (server_cg, client_cg) = (Cgroup::new("thsrv"), Cgroup::new("thcli"));
    let Some(mut collector) = collector(test, Attribution::Auto, method) else {
        return;
    };
    collector.tick().expect("baseline read");
    let port = 5101;
    let _server = Proc(start_server(&net, &server_cg, &python, &[port]));
    // On the server's INPUT path, after every hook of the clients (`segment` stamps at their
    // egress hook, which a line on their OUTPUT path would come before).
    let line = DelayLine::inbound(
        &python,
        &net.server,
        queue,
        &["-p", "tcp", "--dport", &port.to_string()],
        20.0,
        5.0,
        0.0,
    );
    let rounds = if pause_ms > 100 { 12 } else { 24 };
    let args: Vec<String> = [
        "client".to_owned(),
        net.server_ip.clone(),
        port.to_string(),
        CONNS.to_string(),
        rounds.to_string(),
        pause_ms.to_string(),
        "30".to_owned(),
    ]
    .into();
    let (_client, mut out, ports) = start_think(&net, &client_cg, &python, &args);
    wait_done(&mut out);
    let client_ss: Vec<_> = ss(&net.client)
        .into_iter()
        .filter(|s| ports.contains(&s.local_port))
        .collect();
    let server_ss: Vec<_> = ss(&net.server)
        .into_iter()
        .filter(|s| s.local_port == port)
        .collect();
    let snap = collector.tick().expect("read");

    assert_eq!(client_ss.len(), ports.len(), "ss sees every client socket");
    // The median over the sockets: one late wake-up of the delay line at the end lifts the
    // srtt of the few sockets it held.
    let client_rtt = median(client_ss.iter().map(|s| s.srtt_ms).collect());
    let server_srtt =
        server_ss.iter().map(|s| s.srtt_ms).sum::<f64>() / server_ss.len().max(1) as f64;
    let (srv, cli) = (window(&snap, &server_cg), window(&snap, &client_cg));
    let truth = median(data_delays(&line.applied(), port));
    eprintln!(
        "{test}: server path p50 {:.2} ms (min {:.2} p90 {:.2}; {} path of {} measurements, measured mean {:.2} ms, \
         jitter {:.2} ms); client ss rtt {client_rtt:.2} ms, server ss rtt {server_srtt:.2} ms; \
         client p50 {:.2} ms ({} path of {}), applied median {truth:.2} ms; fidelity {}",
        srv.p50_rtt_us / 1e3, srv.min_rtt_us / 1e3, srv.p90_rtt_us / 1e3, srv.path_samples, srv.samples,
        srv.measured_mean_rtt_us / 1e3, srv.jitter_rfc3550_us / 1e3,
        cli.p50_rtt_us / 1e3, cli.path_samples, cli.samples, snap.fidelity.rtt_meaning(),
    );
    // A 30 ms pause is in the server's measurements (its ACK rides on the next request):
    // otherwise the test proves nothing. After 150 ms the clients on 6.18 ack a reply at
    // once (measured: server mean 23.8 ms against the clients' 23.3 ms), so that case checks
    // only that those immediate ACKs still give the path.
    if pause_ms < 40 {
        assert!(
            srv.measured_mean_rtt_us / 1e3 > client_rtt + f64::from(pause_ms) / 2.0,
            "the server's measurements ({} µs mean) do not hold the clients' pause",
            srv.measured_mean_rtt_us
        );
    }
    if method != RttMethod::Auto {
        assert_eq!(
            snap.fidelity.rtt_method,
            Some(method),
            "the fidelity names the forced method"
        );
    }
    assert!(
        srv.samples >= u64::from(CONNS) * (rounds - 1),
        "one measurement per reply at least: {}",
        srv.samples
    );
    assert!(
        srv.path_samples >= u64::from(CONNS),
        "a path sample per connection (its handshake) at least: {}",
        srv.path_samples
    );
    assert!(
        rel(srv.p50_rtt_us / 1e3, client_rtt) <= 0.10,
        "server path p50 {} µs vs the clients' ss rtt {client_rtt} ms",
        srv.p50_rtt_us
    );
    // The clients' own figures are unchanged: their requests are answered at once.
    assert!(
        rel(cli.p50_rtt_us / 1e3, truth) <= 0.05,
        "client p50 {} µs vs applied median {truth} ms",
        cli.p50_rtt_us
    );
    // Its measurements are path samples but for those that ended at a pure ACK the server
    // sent before its reply (after a long idle, 6.18 acks at once): a pure ACK that completes
    // the flight may be a delayed one, and is left out.
    assert!(
        cli.path_samples * 10 >= cli.samples * 8,
        "most client measurements are path samples: {} of {}",
        cli.path_samples,
        cli.samples
    );
}

/// Clients pausing 30 ms: the server's samples end at the next request, which carries the ACK.
#[test]
fn a_servers_path_rtt_leaves_out_a_30ms_client_pause() {
    server_path_rtt_excludes_the_clients_pause(
        "a_servers_path_rtt_leaves_out_a_30ms_client_pause",
        RttMethod::Auto,
        30,
        95,
        11,
    );
}

/// The 30 ms pause with `tcp.rtt_method = "segment"` (the programs time the segments
/// themselves, as `auto` does before 6.10): the server's timed replies also end at the next
/// request, and must be left out the same way.
#[test]
fn a_servers_path_rtt_leaves_out_a_30ms_client_pause_with_the_segment_method() {
    server_path_rtt_excludes_the_clients_pause(
        "a_servers_path_rtt_leaves_out_a_30ms_client_pause_with_the_segment_method",
        RttMethod::Segment,
        30,
        87,
        14,
    );
}

/// Clients pausing 150 ms: the server's samples end at the clients' ACK (on 6.18 sent at once
/// after such a pause; kernels that delay it send it when the delayed-ACK timer fires).
#[test]
fn a_servers_path_rtt_leaves_out_a_150ms_client_pause() {
    server_path_rtt_excludes_the_clients_pause(
        "a_servers_path_rtt_leaves_out_a_150ms_client_pause",
        RttMethod::Auto,
        150,
        96,
        12,
    );
}

/// A bulk sender behind the same line: nearly every ACK leaves data in flight, so its path
/// figures are the kernel's measurements, as before the filter.
#[test]
fn a_bulk_senders_figures_are_unchanged() {
    const TEST: &str = "a_bulk_senders_figures_are_unchanged";
    let Some(python) = prerequisites(TEST) else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let net = network(97);
    let (server_cg, client_cg) = (Cgroup::new("bksrv"), Cgroup::new("bkcli"));
    let Some(mut collector) = collector(TEST, Attribution::Auto, RttMethod::Auto) else {
        return;
    };
    collector.tick().expect("baseline read");
    let port = 5102;
    let mut sink = net.server.command(&python);
    sink.arg(script("think.py"))
        .args(["sink", &net.server_ip, &port.to_string()])
        .stdout(Stdio::null());
    let _sink = Proc(server_cg.spawn(&mut sink));
    let listening = wait_for(Duration::from_secs(10), || {
        run(net.server.command("ss").args(["-tlnH"]))
            .contains(&format!(":{port} "))
            .then_some(())
    });
    assert!(listening.is_some(), "sink did not listen");
    let line = DelayLine::start(
        &python,
        &net.client,
        13,
        &["-p", "tcp", "--dport", &port.to_string()],
        20.0,
        5.0,
        0.0,
    );
    let args: Vec<String> = [
        "bulk".to_owned(),
        net.server_ip.clone(),
        port.to_string(),
        "4".to_owned(),
        "30".to_owned(),
    ]
    .into();
    let (_client, mut out, _) = start_think(&net, &client_cg, &python, &args);
    wait_done(&mut out);
    let snap = collector.tick().expect("read");
    let w = window(&snap, &client_cg);
    let truth = median(data_delays(&line.applied(), port));
    eprintln!(
        "{TEST}: path p50 {:.2} ms, mean {:.2} ms over {} path samples; measured mean {:.2} ms over {}; \
         applied median {truth:.2} ms",
        w.p50_rtt_us / 1e3,
        w.mean_rtt_us / 1e3,
        w.path_samples,
        w.measured_mean_rtt_us / 1e3,
        w.samples
    );
    assert!(
        w.samples >= 100,
        "a bulk transfer's worth of samples: {}",
        w.samples
    );
    assert!(
        w.path_samples * 100 >= w.samples * 95,
        "nearly every bulk measurement is a path sample: {} of {}",
        w.path_samples,
        w.samples
    );
    assert!(
        rel(w.mean_rtt_us, w.measured_mean_rtt_us) <= 0.05,
        "path mean {} µs vs the mean of every measurement {} µs",
        w.mean_rtt_us,
        w.measured_mean_rtt_us
    );
    assert!(
        w.p50_rtt_us / 1e3 >= truth * 0.95,
        "p50 {} µs below the applied median {truth} ms",
        w.p50_rtt_us
    );
}
