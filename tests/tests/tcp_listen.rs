//! Who serves an accepted connection is known before the server sends anything.
//!
//! A server process in cgroup A listens and accepts a connection from a client process in
//! cgroup B, and neither sends a byte. With listen tagging (`tcp.attribution = "listen"`, what
//! `auto` picks where sock_ops may read the current cgroup) the accepted connection is counted
//! for A as served, and the client's for B as outbound, at the first read — with no
//! `cgroup/sock_create` program held. The kernel's own view (`ss -ti`) shows the accepted
//! socket has sent no data.
//!
//! The namespace answers every SYN with a SYN cookie (`net.ipv4.tcp_syncookies = 2`, what a
//! listener under a SYN flood gets): such a SYN-ACK belongs to no socket, so the egress program
//! never sees it. Otherwise the kernel runs the egress program on a SYN-ACK with the listener
//! as its socket (`sk_to_full_sk` of the request socket), which tags the listener before its
//! first child is cloned: egress tagging alone then attributes accepted sockets at once too.
//! With cookies the egress-only path (5.10) shows A nothing until the server sends: the test
//! tells the paths apart, so it would catch listen tagging that did not work.

use std::{
    io::{BufRead as _, BufReader},
    process::{ChildStdout, Stdio},
    sync::Mutex,
    time::Duration,
};

use nodeward::{
    config::PathsConfig,
    probe::Capabilities,
    sources::tcp::{Attribution, RttMethod, TcpSnapshot},
    store::StreamDirection,
};
use nodeward_tests::{
    pingpong::{collector, prerequisites_without_delay_line, Proc},
    program_count, programs_held, run, wait_for, Cgroup, Netns,
};

/// One collector at a time: the programs this process holds are what the test checks.
static SERIAL: Mutex<()> = Mutex::new(());

/// Outside the ephemeral range (32768-60999).
const PORT: u16 = 24_818;

const SERVER: &str = r#"
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(8)
print("listening", flush=True)
c, _ = s.accept()
print("accepted", flush=True)
# Sends one byte when told to on stdin, then holds the connection.
sys.stdin.readline()
c.sendall(b"x")
print("sent", flush=True)
time.sleep(120)
"#;

const CLIENT: &str = r#"
import socket, sys, time
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("connected", flush=True)
time.sleep(120)
"#;

/// A python process in `cgroup` and `netns` running `code` with `PORT`; returns it with its
/// stdout once it printed `ready`.
fn start(
    netns: &Netns,
    cgroup: &Cgroup,
    python: &str,
    code: &str,
    ready: &str,
) -> (Proc, BufReader<ChildStdout>) {
    let mut cmd = netns.command(python);
    cmd.args(["-c", code, &PORT.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cgroup.spawn(&mut cmd);
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let proc = Proc(child);
    wait_line(&mut out, ready);
    (proc, out)
}

fn wait_line(out: &mut BufReader<ChildStdout>, want: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).expect("read the script's output");
        assert!(n > 0, "the script ended before printing {want:?}");
        if line.trim() == want {
            return;
        }
    }
}

fn holds(held: &[String], name: &str) -> bool {
    program_count(held, name) > 0
}

/// Established connections of `cgroup` in `snap` opened in `direction`.
fn established(snap: &TcpSnapshot, cgroup: &Cgroup, direction: StreamDirection) -> u64 {
    snap.container(cgroup.id())
        .map_or(0, |c| c.established_by.get(direction))
}

/// The accepted socket's line of `ss -tiH` in `netns` (local port `PORT`).
fn server_side_ss(netns: &Netns) -> String {
    run(netns.command("ss").args([
        "-tinH",
        "state",
        "established",
        "sport",
        "=",
        &format!(":{PORT}"),
    ]))
}

#[test]
fn an_accepted_connection_is_attributed_to_the_listeners_cgroup_before_the_server_sends() {
    served_before_sending(
        "an_accepted_connection_is_attributed_to_the_listeners_cgroup_before_the_server_sends",
        Attribution::Listen,
    );
}

/// The same where `tcp.attribution = "sock_create"` is forced: the listener's storage comes
/// from `socket()` instead of `listen()`.
#[test]
fn an_accepted_connection_is_attributed_before_the_server_sends_with_sock_create() {
    served_before_sending(
        "an_accepted_connection_is_attributed_before_the_server_sends_with_sock_create",
        Attribution::SockCreate,
    );
}

/// The egress-only path (5.10) has nothing to go by until the accepted socket sends: the
/// served connection is pending, then attributed to A at its first byte.
#[test]
fn with_egress_tagging_alone_an_accepted_connection_waits_for_its_first_packet() {
    served_before_sending(
        "with_egress_tagging_alone_an_accepted_connection_waits_for_its_first_packet",
        Attribution::Egress,
    );
}

fn served_before_sending(test: &str, attribution: Attribution) {
    let Some(python) = prerequisites_without_delay_line(test) else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let caps = Capabilities::probe(&PathsConfig::default());
    let Some(mut collector) = collector(test, attribution, RttMethod::Auto) else {
        return;
    };
    let held = programs_held(std::process::id());
    let (sock_create, egress, sock_ops) = (
        holds(&held, "nodeward_sock_create"),
        holds(&held, "nodeward_sock_tag_egress"),
        holds(&held, "nodeward_tcp_sockops"),
    );
    eprintln!(
        "{test}: kernel {}, programs held {held:?}",
        caps.kernel_release
    );
    assert!(sock_ops, "the sock_ops program is held: {held:?}");
    assert_eq!(
        sock_create,
        attribution == Attribution::SockCreate,
        "a cgroup/sock_create program is held only where sock_create is asked for: {held:?}"
    );
    assert_eq!(
        egress,
        attribution != Attribution::SockCreate,
        "the egress program: {held:?}"
    );
    collector.tick().expect("baseline read");

    let netns = Netns::new("listen");
    run(netns
        .command("sysctl")
        .args(["-qw", "net.ipv4.tcp_syncookies=2"]));
    let (server_cg, client_cg) = (Cgroup::new("listener"), Cgroup::new("dialer"));
    let (mut server, mut server_out) = start(&netns, &server_cg, &python, SERVER, "listening");
    let (_client, _client_out) = start(&netns, &client_cg, &python, CLIENT, "connected");
    wait_line(&mut server_out, "accepted");

    // The kernel's word that the accepted socket sent no data (ss prints these only when
    // non-zero).
    let ss = server_side_ss(&netns);
    assert!(
        ss.contains(&format!(":{PORT}")) && !ss.contains("bytes_sent:"),
        "the accepted socket has sent nothing: {ss}"
    );

    let snap = collector.tick().expect("read");
    let (served, outbound) = (
        established(&snap, &server_cg, StreamDirection::Served),
        established(&snap, &client_cg, StreamDirection::Outbound),
    );
    eprintln!(
        "{test}: path {:?}; before the server sent: served by the listener's cgroup {served}, \
         outbound from the client's {outbound}; ss: {}",
        snap.fidelity.path,
        ss.trim()
    );
    assert_eq!(outbound, 1, "the client's SYN tags its socket: {snap:#?}");
    assert_eq!(
        established(&snap, &client_cg, StreamDirection::Served),
        0,
        "nothing served is counted for the client's cgroup: {snap:#?}"
    );
    if attribution == Attribution::Egress {
        assert_eq!(
            served, 0,
            "egress tagging alone cannot know the accepted socket before it sends: {snap:#?}"
        );
    } else {
        assert_eq!(
            served, 1,
            "the accepted connection counts for the listener's cgroup before it sent anything: \
             {snap:#?}"
        );
        let opened = snap
            .container(server_cg.id())
            .and_then(|c| c.windows.first())
            .map_or(0, |w| w.opened);
        assert_eq!(opened, 1, "its open is counted for the listener's cgroup");
    }

    // Once the server sends, every path knows it.
    {
        use std::io::Write as _;
        let stdin = server.0.stdin.as_mut().expect("piped stdin");
        stdin.write_all(b"go\n").expect("tell the server to send");
        stdin.flush().expect("flush");
    }
    wait_line(&mut server_out, "sent");
    let served = wait_for(Duration::from_secs(30), || {
        let snap = collector.tick().ok()?;
        let n = established(&snap, &server_cg, StreamDirection::Served);
        (n == 1).then_some(n)
    });
    assert_eq!(
        served,
        Some(1),
        "after its first byte the accepted connection is the listener's"
    );
}
