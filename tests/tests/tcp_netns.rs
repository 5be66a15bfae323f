//! The fallbacks, forced on this host. The cgroup-v1 one keys samples by the socket's network
//! namespace (its cookie, as `SO_NETNS_COOKIE` reports it) instead of its cgroup: two client
//! namespaces and a server namespace are each told apart by their own cookie. The no-eBPF one
//! polls sock_diag and is checked against a delay line and `ss -ti`.

use nodeward::sources::tcp::{snapshot::RttSample, Recorder};
use nodeward::store::{Window, DEFAULT_NETWORK_WINDOWS};
use std::{process::Stdio, time::Duration};

use nodeward::{
    config::PathsConfig,
    probe::Capabilities,
    sources::tcp::{plan, Attribution, Collector, TcpConfig},
};
use nodeward_tests::{
    net::{script, veth},
    pingpong::{prerequisites_without_delay_line, Proc},
    run, skip, wait_for, Cgroup, Netns,
};

/// The namespace's cookie, read from a socket made inside it; `None` before Linux 5.14.
fn netns_cookie(ns: &Netns) -> Option<u64> {
    let code = "import socket,sys; c=socket.socket().getsockopt(socket.SOL_SOCKET, 71, 8); \
                print(int.from_bytes(c, sys.byteorder))";
    let out = ns.command("python3").args(["-c", code]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn serve(ns: &Netns, cgroup: &Cgroup, addr: &str) -> Proc {
    let mut cmd = ns.command("python3");
    cmd.arg(script("pingpong.py")).args(["serve", addr, "5007"]);
    let child = Proc(cgroup.spawn(cmd.stdout(Stdio::null())));
    let up = wait_for(Duration::from_secs(10), || {
        run(ns.command("ss").args(["-tlnH"]))
            .contains(&format!("{addr}:5007"))
            .then_some(())
    });
    assert!(up.is_some(), "server on {addr} did not listen");
    child
}

fn client(ns: &Netns, cgroup: &Cgroup, addr: &str, conns: &str) {
    let mut cmd = ns.command("python3");
    cmd.arg(script("pingpong.py"))
        .args(["client", addr, "5007", conns, "20", "0", "0"])
        .stdout(Stdio::null());
    let status = cgroup.spawn(&mut cmd).wait().expect("client runs");
    assert!(status.success(), "client to {addr} failed: {status}");
}

#[test]
fn network_namespaces_are_told_apart_when_keyed_by_netns() {
    const TEST: &str = "network_namespaces_are_told_apart_when_keyed_by_netns";
    if prerequisites_without_delay_line(TEST).is_none() {
        return;
    }
    let caps = Capabilities::probe(&PathsConfig::default());
    let (root, plan) = match plan(&caps, Attribution::Netns) {
        Ok(p) => p,
        Err(e) => return skip(TEST, &format!("netns keying unavailable: {e}")),
    };
    let (server, a, b) = (Netns::new("srvns"), Netns::new("cla"), Netns::new("clb"));
    let (_, addr_a) = veth(&a, &server, 96);
    let (_, addr_b) = veth(&b, &server, 97);
    let cookies = (netns_cookie(&server), netns_cookie(&a), netns_cookie(&b));
    let (Some(cs), Some(ca), Some(cb)) = cookies else {
        return skip(TEST, "SO_NETNS_COOKIE is not supported (Linux 5.14+)");
    };
    let cgroup = Cgroup::new("netns");
    let mut collector = Collector::attach(
        &root,
        &TcpConfig::default(),
        &plan,
        Duration::from_secs(1),
        &DEFAULT_NETWORK_WINDOWS,
    )
    .expect("TCP programs load and attach");
    collector.tick().expect("baseline read");

    let _servers = (
        serve(&server, &cgroup, &addr_a),
        serve(&server, &cgroup, &addr_b),
    );
    client(&a, &cgroup, &addr_a, "2");
    client(&b, &cgroup, &addr_b, "3");
    let snap = collector.tick().expect("read");

    assert_eq!(snap.fidelity.path, Some(Recorder::Netns));
    for (cookie, addr, conns) in [(ca, &addr_a, 2), (cb, &addr_b, 3)] {
        let c = snap
            .container(cookie)
            .unwrap_or_else(|| panic!("no entry for namespace cookie {cookie}: {snap:#?}"));
        let w = c.window(Window::from_secs(10)).expect("10s window");
        assert_eq!(
            w.opened, conns,
            "connections opened from {addr}'s client namespace"
        );
        let peer = c
            .peers
            .iter()
            .find(|p| p.peer.to_string() == format!("{addr}:5007"));
        let samples = peer
            .and_then(|p| p.windows.first())
            .map_or(0, |w| w.samples);
        // One per request (20 per connection), plus at most one per connection for its FIN.
        assert!(
            (20 * conns..=21 * conns).contains(&samples),
            "samples from {addr}'s namespace: {samples}"
        );
    }
    let s = snap.container(cs).expect("server namespace");
    assert_eq!(
        s.window(Window::from_secs(10)).map(|w| w.opened),
        Some(5),
        "server namespace accepted all five"
    );
    assert!(
        snap.container(cgroup.id()).is_none(),
        "nothing may be keyed by cgroup in this mode"
    );
}

/// The no-eBPF fallback, forced: polling sock_diag in every namespace while a client sits
/// behind a 20 ms ± 5 ms delay line. Samples are the kernel's smoothed RTT, once per socket
/// per tick, so the p50 is compared loosely (10%) with the applied delays and with `ss -ti`.
#[test]
fn sock_diag_polling_follows_the_delay_line() {
    const TEST: &str = "sock_diag_polling_follows_the_delay_line";
    let Some(python) = nodeward_tests::pingpong::prerequisites(TEST) else {
        return;
    };
    let caps = Capabilities::probe(&PathsConfig::default());
    let (root, plan) = match plan(&caps, Attribution::SockDiag) {
        Ok(p) => p,
        Err(e) => return skip(TEST, &format!("sock_diag polling unavailable: {e}")),
    };
    let net = nodeward_tests::pingpong::network(98);
    let (server_cg, client_cg) = (Cgroup::new("srvdiag"), Cgroup::new("clidiag"));
    let mut collector = Collector::attach(
        &root,
        &TcpConfig::default(),
        &plan,
        Duration::from_millis(250),
        &DEFAULT_NETWORK_WINDOWS,
    )
    .expect("sock_diag collector starts");
    collector.tick().expect("baseline read");
    let _server = Proc(nodeward_tests::pingpong::start_server(
        &net,
        &server_cg,
        &python,
        &[5008],
    ));
    let line = nodeward_tests::net::DelayLine::start(
        &python,
        &net.client,
        5,
        &["-p", "tcp", "--dport", "5008"],
        20.0,
        5.0,
        0.0,
    );
    let (_client, mut out, ports) =
        nodeward_tests::pingpong::start_client(&net, &client_cg, &python, 5008, 4, 80, 30);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let waiter = {
        let done = done.clone();
        std::thread::spawn(move || {
            nodeward_tests::pingpong::wait_done(&mut out);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let mut snap = collector.tick().expect("read");
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(250));
        snap = collector.tick().expect("read");
    }
    let _ = waiter.join();
    let ss: Vec<_> = nodeward_tests::net::ss(&net.client)
        .into_iter()
        .filter(|s| ports.contains(&s.local_port))
        .collect();

    let c = snap.container(client_cg.id()).expect("client container");
    let w = c.window(Window::from_secs(10)).expect("10s window");
    let mut applied: Vec<f64> = line
        .applied()
        .iter()
        .filter(|a| a.dport == 5008 && a.len > 0)
        .filter_map(|a| a.delay_ms)
        .collect();
    applied.sort_by(f64::total_cmp);
    let truth = applied[applied.len() / 2];
    let ss_srtt = ss.iter().map(|s| s.srtt_ms).sum::<f64>() / ss.len().max(1) as f64;
    eprintln!(
        "sock_diag: p50 {:.2} ms over {} samples, truth {truth:.2} ms, ss srtt {ss_srtt:.2} ms, established {}",
        w.p50_rtt_us / 1e3,
        w.samples,
        c.established
    );
    assert_eq!(snap.fidelity.path, Some(Recorder::SockDiag));
    assert_eq!(snap.fidelity.rtt_sample, RttSample::Smoothed);
    assert_eq!(c.established, 4, "established connections seen by polling");
    assert!(
        w.samples >= 4,
        "at least one poll saw the sockets: {}",
        w.samples
    );
    let rel = |a: f64, b: f64| (a - b).abs() / b;
    assert!(
        rel(w.p50_rtt_us / 1e3, truth) <= 0.10,
        "p50 {} µs vs applied {truth} ms",
        w.p50_rtt_us
    );
    assert!(
        rel(w.p50_rtt_us / 1e3, ss_srtt) <= 0.10,
        "p50 {} µs vs ss {ss_srtt} ms",
        w.p50_rtt_us
    );
}
