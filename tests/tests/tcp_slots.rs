//! The TCP programs' per-cgroup slots (`agent_ebpf::tcp::slot`): with more cgroups than
//! slots, the ones left without a slot are counted as dropped and never written into another
//! cgroup's counters; the slots of cgroups idle past the longest window are given back and
//! serve new cgroups, whose counts are exact.

use std::{process::Stdio, time::Duration};

use nodeward::{
    config::PathsConfig,
    probe::Capabilities,
    sources::tcp::{plan, Attribution, Collector, TcpConfig, TcpSnapshot},
    store::Window,
};
use nodeward_tests::{
    net::script,
    pingpong::{network, prerequisites_without_delay_line, start_server, Net, Proc},
    skip, Cgroup,
};

const SLOTS: u32 = 16;
const PORT: u16 = 5006;

/// Connections the client of cgroup `i` opens: 1, 2 or 3, so that counts that strayed from
/// one cgroup to another would show.
fn conns(i: usize) -> u64 {
    (i % 3 + 1) as u64
}

/// Runs one client in `cgroup`: `n` connections, 3 request/response rounds on each, closed.
fn run_client(net: &Net, cgroup: &Cgroup, python: &str, n: u64) {
    let mut cmd = net.client.command(python);
    cmd.arg(script("pingpong.py"))
        .args(["client", &net.server_ip, &PORT.to_string()])
        .args([n.to_string(), "3".into(), "0".into(), "0".into()])
        .stdout(Stdio::null());
    let status = Proc(cgroup.spawn(&mut cmd))
        .0
        .wait()
        .expect("wait for client");
    assert!(status.success(), "client in {}: {status}", cgroup.id());
}

/// (opened, closed) of `cgroup` since the collector attached.
fn opened_closed(snap: &TcpSnapshot, cgroup: &Cgroup) -> (u64, u64) {
    snap.container(cgroup.id()).map_or((0, 0), |c| {
        (
            c.totals.tcp_connections_opened,
            c.totals.tcp_connections_closed,
        )
    })
}

#[test]
fn a_full_slot_table_is_counted_and_idle_cgroups_give_their_slots_back() {
    const TEST: &str = "a_full_slot_table_is_counted_and_idle_cgroups_give_their_slots_back";
    let Some(python) = prerequisites_without_delay_line(TEST) else {
        return;
    };
    let config = TcpConfig {
        max_cgroups: SLOTS,
        ..TcpConfig::default()
    };
    let caps = Capabilities::probe(&PathsConfig::default());
    let (root, plan) = match plan(&caps, Attribution::Auto) {
        Ok(p) => p,
        Err(e) => return skip(TEST, &format!("TCP programs unavailable: {e}")),
    };
    if plan.path().contains("netns") {
        return skip(
            TEST,
            "cgroup v1 host: connections are keyed by network namespace",
        );
    }
    // One short window: a cgroup is idle past it after a few ticks.
    let windows = [Window::from_secs(2)];
    let mut collector = Collector::attach(&root, &config, &plan, Duration::from_secs(1), &windows)
        .expect("TCP programs load and attach");
    collector.tick().expect("baseline read");
    let net = network(96);
    let server_cg = Cgroup::new("slotsrv");
    let _server = Proc(start_server(&net, &server_cg, &python, &[PORT]));

    // More client cgroups than slots (the server's cgroup holds one too).
    let first: Vec<Cgroup> = (0..SLOTS as usize + 8)
        .map(|i| Cgroup::new(&format!("slot{i}")))
        .collect();
    for (i, cg) in first.iter().enumerate() {
        run_client(&net, cg, &python, conns(i));
    }
    std::thread::sleep(Duration::from_millis(300));
    let snap = collector.tick().expect("read");
    let mut counted = 0;
    for (i, cg) in first.iter().enumerate() {
        let got = opened_closed(&snap, cg);
        // All or nothing: a cgroup that got no slot has nothing counted, and none has counts
        // of another.
        assert!(
            got == (0, 0) || got == (conns(i), conns(i)),
            "cgroup {i}: opened/closed {got:?}, it made {} connections",
            conns(i)
        );
        if got != (0, 0) {
            counted += 1;
        }
    }
    eprintln!(
        "{counted} of {} client cgroups counted with {SLOTS} slots; drops {:?}",
        first.len(),
        snap.drops
    );
    assert!(
        counted < first.len(),
        "every cgroup counted with {SLOTS} slots"
    );
    assert!(counted > 0, "no client cgroup counted");
    assert!(
        snap.drops.stats_full > 0,
        "the full slot table was not counted"
    );

    // Idle past the window with nothing open: their slots are freed.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        collector.tick().expect("read");
        let (maps, _) = collector.footprint().expect("footprint");
        if maps.cgroups <= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slots still held after 30 s: {} cgroups",
            maps.cgroups
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // New cgroups get the freed slots, with exact counts.
    let second: Vec<Cgroup> = (0..8).map(|i| Cgroup::new(&format!("reslot{i}"))).collect();
    for (i, cg) in second.iter().enumerate() {
        run_client(&net, cg, &python, conns(i));
    }
    std::thread::sleep(Duration::from_millis(300));
    let snap = collector.tick().expect("read");
    for (i, cg) in second.iter().enumerate() {
        assert_eq!(
            opened_closed(&snap, cg),
            (conns(i), conns(i)),
            "cgroup {i} after the slots were freed"
        );
        let rtt = &snap
            .container(cg.id())
            .expect("counted cgroup in the snapshot")
            .totals
            .rtt;
        assert!(rtt.count > 0, "cgroup {i}: no RTT sample in its histogram");
    }
}
