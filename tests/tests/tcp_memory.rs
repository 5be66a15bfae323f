//! Bounded memory under connection churn: 10,000 short connections and 1,000 long-lived ones
//! against small map sizes. Bounds are structural (entries in each map and each user-space
//! table), never timings or RSS, which this shared machine makes noisy.

use nodeward::store::{Window, DEFAULT_NETWORK_WINDOWS};
use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
    time::Duration,
};

use nodeward::{
    config::PathsConfig,
    probe::Capabilities,
    sources::tcp::{plan, Attribution, Collector, RttMethod, TcpConfig},
};
use nodeward_tests::{
    net::script,
    pingpong::{network, prerequisites_without_delay_line, start_server, Proc},
    skip, Cgroup,
};

/// 10,000 short connections and 1,000 long-lived ones from one container, with small map
/// sizes: the kernel maps and the agent's own structures never pass their configured bounds,
/// and the connections that did not fit are reported as untracked, not lost.
/// One test at a time: each attaches its own programs, and a collector's start-up seed counts
/// every connection on the host that its flow map lacks, so another test's connections open
/// at that moment would be this test's "old" flows (and break its bounds on tracked flows).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn memory_stays_within_bounds_under_connection_churn() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    const TEST: &str = "memory_stays_within_bounds_under_connection_churn";
    let Some(python) = prerequisites_without_delay_line(TEST) else {
        return;
    };
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
    let mut collector = Collector::attach(
        &root,
        &config,
        &plan,
        Duration::from_secs(1),
        &DEFAULT_NETWORK_WINDOWS,
    )
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
    let (cw, sw) = (
        c.window(Window::from_secs(300)).expect("5m"),
        s.window(Window::from_secs(300)).expect("5m"),
    );
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
        s.peers.iter().any(|p| p.peer.to_string() == "10.95.0.0/24"),
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

/// IPv6 connections over loopback in a namespace of their own: the client container's peer is
/// the server's IPv6 address and port, with one sample per request, and the server container
/// counts the accepted connections (no delay line needed).
#[test]
fn ipv6_connections_are_measured_per_peer() {
    ipv6_per_peer("ipv6_connections_are_measured_per_peer", RttMethod::Auto);
}

/// The same with `tcp.rtt_method = "segment"`: the egress program finds the TCP header after
/// the fixed IPv6 header and times each request.
#[test]
fn ipv6_requests_are_timed_with_the_segment_method() {
    ipv6_per_peer(
        "ipv6_requests_are_timed_with_the_segment_method",
        RttMethod::Segment,
    );
}

fn ipv6_per_peer(test: &str, method: RttMethod) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(python) = prerequisites_without_delay_line(test) else {
        return;
    };
    let caps = Capabilities::probe(&PathsConfig::default());
    let (root, plan) = match plan(&caps, Attribution::Auto) {
        Ok(p) => p,
        Err(e) => return skip(test, &format!("TCP programs unavailable: {e}")),
    };
    if let Err(e) = method.resolve(&caps.kernel_release, plan.recorder) {
        return skip(test, &e.to_string());
    }
    let ns = nodeward_tests::Netns::new("tcp6");
    let (server_cg, client_cg) = (Cgroup::new("srv6"), Cgroup::new("cli6"));
    let mut collector = Collector::attach(
        &root,
        &TcpConfig {
            rtt_method: method,
            ..TcpConfig::default()
        },
        &plan,
        Duration::from_secs(1),
        &DEFAULT_NETWORK_WINDOWS,
    )
    .expect("TCP programs load and attach");
    collector.tick().expect("baseline read");

    let mut serve = ns.command(&python);
    serve
        .arg(script("pingpong.py"))
        .args(["serve", "::1", "5006"]);
    let _server = Proc(server_cg.spawn(serve.stdout(Stdio::null())));
    let listening = nodeward_tests::wait_for(Duration::from_secs(10), || {
        let out = nodeward_tests::run(ns.command("ss").args(["-tlnH"]));
        out.contains("[::1]:5006").then_some(())
    });
    if listening.is_none() {
        return skip(test, "no IPv6 loopback in a new network namespace");
    }
    let mut cmd = ns.command(&python);
    cmd.arg(script("pingpong.py"))
        .args(["client", "::1", "5006", "2", "20", "0", "0"])
        .stdout(Stdio::null());
    let status = client_cg.spawn(&mut cmd).wait().expect("client runs");
    assert!(status.success(), "client failed: {status}");
    let snap = collector.tick().expect("read");

    let c = snap.container(client_cg.id()).expect("client container");
    let peer = c.peers.iter().find(|p| p.peer.to_string() == "[::1]:5006");
    let peer = peer.unwrap_or_else(|| panic!("no [::1]:5006 peer: {:?}", c.peers));
    let samples: u64 = peer.windows.first().map_or(0, |w| w.samples);
    // One per request, plus at most one per connection for the ACK of its FIN.
    assert!(
        (40..=42).contains(&samples),
        "one sample per request: {samples}"
    );
    let opened = snap
        .container(server_cg.id())
        .and_then(|s| s.window(Window::from_secs(10)))
        .map_or(0, |w| w.opened);
    assert_eq!(opened, 2, "the server container accepted both connections");
    if method != RttMethod::Auto {
        assert_eq!(snap.fidelity.rtt_method, Some(method));
    }
}

/// A server that was listening before the agent started: `sock_create` never saw its
/// listener, so its accepted connections inherit nothing; the egress program that `auto`
/// attaches beside it attributes them from their first packet.
#[test]
fn connections_of_a_listener_older_than_the_agent_are_attributed() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    const TEST: &str = "connections_of_a_listener_older_than_the_agent_are_attributed";
    let Some(python) = prerequisites_without_delay_line(TEST) else {
        return;
    };
    let caps = Capabilities::probe(&PathsConfig::default());
    let (root, plan) = match plan(&caps, Attribution::Auto) {
        Ok(p) => p,
        Err(e) => return skip(TEST, &format!("TCP programs unavailable: {e}")),
    };
    let net = network(99);
    let (server_cg, client_cg) = (Cgroup::new("oldsrv"), Cgroup::new("newcli"));
    let _server = Proc(start_server(&net, &server_cg, &python, &[5009]));
    let mut collector = Collector::attach(
        &root,
        &TcpConfig::default(),
        &plan,
        Duration::from_secs(1),
        &DEFAULT_NETWORK_WINDOWS,
    )
    .expect("TCP programs load and attach");
    collector.tick().expect("baseline read");

    let mut cmd = net.client.command(&python);
    cmd.arg(script("pingpong.py"))
        .args(["client", &net.server_ip, "5009", "2", "20", "0", "0"])
        .stdout(Stdio::null());
    let status = client_cg.spawn(&mut cmd).wait().expect("client runs");
    assert!(status.success(), "client failed: {status}");
    let snap = collector.tick().expect("read");

    let server = snap
        .container(server_cg.id())
        .and_then(|c| c.window(Window::from_secs(10)));
    let (opened, samples) = server.map_or((0, 0), |w| (w.opened, w.samples));
    eprintln!(
        "path {:?}, server opened {opened}, samples {samples}",
        snap.fidelity.path
    );
    if !plan.recorder.attaches_egress() {
        return skip(
            TEST,
            "this kernel has no cgroup_skb socket storage to tag old sockets",
        );
    }
    assert_eq!(opened, 2, "accepted connections of the old listener");
    assert!(samples >= 20, "their RTT samples: {samples}");
}
