//! The load case of issue 10, as two subcommands that the load test (`tests/tests/load.rs`) and
//! `cargo xtask bench` (scenario `load`) drive:
//!
//! - `rr`: TCP request/response over loopback between N client and N server threads of
//!   this one process, so that both ends of every connection sit in the caller's cgroup (the
//!   test starts it in a cgroup of its own). Each completed exchange (request written, whole
//!   response read) is counted: the ground truth for the RTT samples the agent must account
//!   for. Paced to a total rate, or as fast as it goes. With `--listen` it is only the echo
//!   server, and with `--connect` only the clients, so that the two ends can run in different
//!   processes, cgroups and network namespaces (`cargo xtask bench`'s veth scenario).
//! - `load-api`: C unary callers, each on its own connection, cycling through the read
//!   RPCs (`GetNodeHealth`, `ListContainers`, `GetDrainStatus`, `ListGpus` and, given a
//!   container, `GetContainerNetwork`), paced per caller; and S `WatchNodeHealth` streams over a
//!   few shared connections, each counting its messages and heartbeats. Any failed call, and any
//!   stream that fails or ends before the run does, is counted and sampled in the report.
//!
//! Each prints one JSON object at the end. Nothing here asserts anything: the callers do.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use clap::Args;
use serde::Serialize;

use nodeward::{
    api::pb::{self, node_health_client::NodeHealthClient},
    client::ClientError,
};

use crate::{conn, fail, print, runtime};

#[derive(Debug, Clone, Args)]
pub struct RrArgs {
    /// Persistent connections (each with its own client and server thread).
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Exchanges per second over all connections; 0 = as fast as they go.
    #[arg(long, default_value_t = 25_000.0)]
    pub rate: f64,
    /// How long to exchange.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Bytes in each request and response.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Only serve: echo on this address, accepting any number of connections, until stdin
    /// closes. Prints `{"listening": ADDR}` once bound.
    #[arg(long, conflicts_with = "connect")]
    pub listen: Option<SocketAddr>,
    /// Only the clients: exchange with the echo server at this address (another process's
    /// `--listen`) instead of one of this process's own.
    #[arg(long)]
    pub connect: Option<SocketAddr>,
}

#[derive(Serialize)]
struct RrReport {
    connections: usize,
    /// Exchanges completed: request sent and the whole response read.
    exchanges: u64,
    seconds: f64,
    exchanges_per_second: f64,
    /// Connections that failed (I/O error), with the first errors.
    errors: usize,
    error_samples: Vec<String>,
}

/// Reads and echoes fixed-size messages until the peer closes.
fn echo(mut c: TcpStream, size: usize) {
    let _ = c.set_nodelay(true);
    let mut buf = vec![0u8; size];
    while c.read_exact(&mut buf).is_ok() {
        if c.write_all(&buf).is_err() {
            return;
        }
    }
}

fn exchange_loop(
    server: SocketAddr,
    size: usize,
    period: Option<Duration>,
    started: Instant,
    deadline: Instant,
    done: &AtomicU64,
) -> std::io::Result<()> {
    let mut c = TcpStream::connect(server)?;
    c.set_nodelay(true)?;
    let req = vec![7u8; size];
    let mut resp = vec![0u8; size];
    let mut n: u32 = 0;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if let Some(p) = period {
            // Paced from the start, not from the last answer: a late answer is caught up on
            // instead of lowering the rate.
            let due = started + p * n;
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        c.write_all(&req)?;
        c.read_exact(&mut resp)?;
        done.fetch_add(1, Ordering::Relaxed);
        n = n.saturating_add(1);
    }
    // A clean close: the server sees EOF and closes its side too.
    c.shutdown(std::net::Shutdown::Write)?;
    let _ = c.read(&mut resp);
    Ok(())
}

pub fn rr(args: &RrArgs) -> ExitCode {
    if let Some(addr) = args.listen {
        return match serve(addr, args.size.max(1)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("echo server on {addr}: {e}")),
        };
    }
    match run_rr(args) {
        Ok(r) => print(&r),
        Err(e) => fail(e),
    }
}

/// The echo server alone: a thread per connection, until stdin closes.
fn serve(addr: SocketAddr, size: usize) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}",
        serde_json::json!({ "listening": listener.local_addr()? })
    )?;
    out.flush()?;
    drop(out);
    std::thread::spawn(move || {
        for c in listener.incoming() {
            match c {
                Ok(c) => {
                    std::thread::spawn(move || echo(c, size));
                }
                Err(e) => eprintln!("nodeward-bench: accept: {e}"),
            }
        }
    });
    // Whoever started us closes stdin (or dies) to stop us.
    for line in std::io::stdin().lock().lines() {
        line?;
    }
    Ok(())
}

fn run_rr(args: &RrArgs) -> Result<RrReport, String> {
    let conns = args.connections.max(1);
    let size = args.size.max(1);
    let (server_addr, server) = if let Some(addr) = args.connect {
        (addr, None)
    } else {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind the echo server: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let server = std::thread::spawn(move || {
            let mut threads = Vec::new();
            for c in listener.incoming().take(conns) {
                match c {
                    Ok(c) => threads.push(std::thread::spawn(move || echo(c, size))),
                    Err(e) => eprintln!("nodeward: accept: {e}"),
                }
            }
            for t in threads {
                let _ = t.join();
            }
        });
        (addr, Some(server))
    };
    #[expect(clippy::cast_precision_loss, reason = "a handful of connections")]
    let period = (args.rate > 0.0).then(|| Duration::from_secs_f64(conns as f64 / args.rate));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + args.duration;
    let clients: Vec<_> = (0..conns)
        .map(|_| {
            let done = done.clone();
            std::thread::spawn(move || {
                exchange_loop(server_addr, size, period, started, deadline, &done)
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let mut error_samples = Vec::new();
    let mut errors = 0;
    for c in clients {
        match c.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                errors += 1;
                error_samples.push(e);
            }
            Err(_) => {
                errors += 1;
                error_samples.push("client thread panicked".to_owned());
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    if let Some(server) = server {
        if errors > 0 {
            // A client that failed leaves its server thread waiting: do not wait for it.
            drop(server);
        } else {
            let _ = server.join();
        }
    }
    let exchanges = done.load(Ordering::Relaxed);
    error_samples.truncate(5);
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let exchanges_per_second = exchanges as f64 / seconds;
    Ok(RrReport {
        connections: conns,
        exchanges,
        seconds,
        exchanges_per_second,
        errors,
        error_samples,
    })
}

#[derive(Debug, Clone, Args)]
pub struct LoadApiArgs {
    /// Agent addresses (repeat the flag to spread callers and streams over the Unix socket and
    /// the TCP listener, round robin).
    #[arg(long, required = true)]
    pub addr: Vec<String>,
    /// Concurrent unary callers, each on its own connection.
    #[arg(long, default_value_t = 100)]
    pub callers: usize,
    /// Calls per second per caller; 0 = each calls again as soon as it has its answer.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// `WatchNodeHealth` streams held for the whole run.
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// Connections the streams share (HTTP/2 multiplexes them).
    #[arg(long, default_value_t = 10)]
    pub watch_connections: usize,
    /// A container id to add `GetContainerNetwork` to the callers' mix.
    #[arg(long)]
    pub container: Option<String>,
    /// How long the calls go on and the streams are held, once all are open.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

#[derive(Serialize, Default)]
struct LoadApiReport {
    callers: usize,
    calls: u64,
    calls_by_rpc: BTreeMap<&'static str, u64>,
    /// Unary calls that returned an error status (or could not be made).
    errors: u64,
    error_samples: Vec<String>,
    calls_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    streams: usize,
    /// Streams that delivered their first message.
    streams_opened: usize,
    /// Streams that failed or ended before the run did (or never opened).
    streams_failed: usize,
    stream_error_samples: Vec<String>,
    /// Messages per stream (the first state, changes and heartbeats).
    messages_total: u64,
    messages_min: u64,
    messages_max: u64,
    /// Heartbeats (`heartbeat: true`) the stream with the fewest received.
    heartbeats_min: u64,
    seconds: f64,
    seconds_to_open: f64,
}

/// Lets this process hold more descriptors than the usual soft limit of 1,024 (the hard limit
/// stays).
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let r = getrlimit(Resource::Nofile);
    if r.current < r.maximum {
        // Raising the soft limit up to the hard one is always allowed.
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: r.maximum,
                maximum: r.maximum,
            },
        );
    }
}

type Client = NodeHealthClient<tonic::transport::Channel>;

const RPCS: [&str; 5] = [
    "GetNodeHealth",
    "ListContainers",
    "GetDrainStatus",
    "ListGpus",
    "GetContainerNetwork",
];

async fn call(c: &mut Client, rpc: usize, container: &str) -> Result<(), tonic::Status> {
    match rpc {
        0 => c
            .get_node_health(pb::GetNodeHealthRequest {})
            .await
            .map(drop),
        1 => c
            .list_containers(pb::ListContainersRequest::default())
            .await
            .map(drop),
        2 => c
            .get_drain_status(pb::GetDrainStatusRequest {})
            .await
            .map(drop),
        3 => c.list_gpus(pb::ListGpusRequest {}).await.map(drop),
        _ => c
            .get_container_network(pb::GetContainerNetworkRequest {
                container_id: container.to_owned(),
            })
            .await
            .map(drop),
    }
}

#[derive(Default)]
struct CallerResult {
    latencies_ms: Vec<f64>,
    by_rpc: [u64; RPCS.len()],
    errors: u64,
    error_samples: Vec<String>,
}

async fn caller(
    mut c: Client,
    index: usize,
    period: Option<Duration>,
    deadline: tokio::time::Instant,
    container: Option<Arc<str>>,
) -> CallerResult {
    let mut r = CallerResult::default();
    let kinds = if container.is_some() { 5 } else { 4 };
    let mut tick = period.map(|p| {
        // Spread the callers over the period so that they do not call in bursts.
        #[expect(clippy::cast_precision_loss, reason = "small indices")]
        let offset = p.mul_f64((index % 100) as f64 / 100.0);
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + offset, p);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut i = index;
    while tokio::time::Instant::now() < deadline {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let rpc = i % kinds;
        i += 1;
        let t = Instant::now();
        match call(&mut c, rpc, container.as_deref().unwrap_or_default()).await {
            Ok(()) => {
                r.latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
                r.by_rpc[rpc] += 1;
            }
            Err(e) => {
                r.errors += 1;
                if r.error_samples.len() < 3 {
                    r.error_samples.push(format!("{}: {e}", RPCS[rpc]));
                }
            }
        }
    }
    r
}

#[derive(Default)]
struct StreamResult {
    opened: bool,
    failed: Option<String>,
    messages: u64,
    heartbeats: u64,
}

/// Holds one opened stream until `deadline`, counting what it receives.
async fn hold(
    mut s: tonic::Streaming<pb::WatchNodeHealthResponse>,
    mut r: StreamResult,
    deadline: tokio::time::Instant,
) -> StreamResult {
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return r,
            m = s.message() => match m {
                Ok(Some(m)) => {
                    r.messages += 1;
                    r.heartbeats += u64::from(m.heartbeat);
                }
                Ok(None) => {
                    r.failed = Some(format!("ended by the agent after {} messages", r.messages));
                    return r;
                }
                Err(e) => {
                    r.failed = Some(format!("failed after {} messages: {e}", r.messages));
                    return r;
                }
            },
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an index into a slice"
    )]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

pub fn load_api(default_socket: &std::path::Path, args: &LoadApiArgs) -> ExitCode {
    raise_nofile();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    let socket = default_socket.to_path_buf();
    let result = rt.block_on(async {
        let addr = |i: usize| args.addr[i % args.addr.len()].clone();
        let mut callers = Vec::with_capacity(args.callers);
        for i in 0..args.callers {
            callers.push(nodeward::client::connect(&conn(&addr(i)), &socket).await?);
        }
        let mut watchers = Vec::new();
        for i in 0..args.watch_connections.max(1) {
            watchers.push(nodeward::client::connect(&conn(&addr(i)), &socket).await?);
        }
        // Open every stream (its first message is the current state) before the clock starts.
        let opening = Instant::now();
        let mut pending = tokio::task::JoinSet::new();
        for i in 0..args.streams {
            let mut c = watchers[i % watchers.len()].clone();
            pending.spawn(async move {
                let mut r = StreamResult::default();
                let req = pb::WatchNodeHealthRequest {
                    heartbeat_seconds: 0,
                };
                match c.watch_node_health(req).await {
                    Ok(s) => {
                        let mut s = s.into_inner();
                        match s.message().await {
                            Ok(Some(m)) => {
                                r.opened = true;
                                r.messages = 1;
                                r.heartbeats = u64::from(m.heartbeat);
                                return (Some(s), r);
                            }
                            Ok(None) => r.failed = Some("ended before its first message".into()),
                            Err(e) => r.failed = Some(format!("first message: {e}")),
                        }
                    }
                    Err(e) => r.failed = Some(format!("open: {e}")),
                }
                (None, r)
            });
        }
        let mut opened = Vec::new();
        let mut not_opened = Vec::new();
        while let Some(j) = pending.join_next().await {
            match j {
                Ok((Some(s), r)) => opened.push((s, r)),
                Ok((None, r)) => not_opened.push(r),
                Err(e) => not_opened.push(StreamResult {
                    failed: Some(format!("task: {e}")),
                    ..StreamResult::default()
                }),
            }
        }
        let seconds_to_open = opening.elapsed().as_secs_f64();

        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + args.duration;
        let mut streams = tokio::task::JoinSet::new();
        for (s, r) in opened {
            streams.spawn(hold(s, r, deadline));
        }
        let period = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
        let container: Option<Arc<str>> = args.container.as_deref().map(Arc::from);
        let mut calls = tokio::task::JoinSet::new();
        for (i, c) in callers.into_iter().enumerate() {
            calls.spawn(caller(c, i, period, deadline, container.clone()));
        }

        let mut report = LoadApiReport {
            callers: args.callers,
            streams: args.streams,
            seconds_to_open,
            messages_min: u64::MAX,
            heartbeats_min: u64::MAX,
            ..LoadApiReport::default()
        };
        let mut latencies = Vec::new();
        while let Some(j) = calls.join_next().await {
            let r = j.map_err(|e| ClientError::Usage(e.to_string()))?;
            latencies.extend(r.latencies_ms);
            for (k, n) in r.by_rpc.iter().enumerate() {
                if *n > 0 {
                    *report.calls_by_rpc.entry(RPCS[k]).or_default() += n;
                }
            }
            report.errors += r.errors;
            for e in r.error_samples {
                if report.error_samples.len() < 10 {
                    report.error_samples.push(e);
                }
            }
        }
        let mut results = not_opened;
        while let Some(j) = streams.join_next().await {
            results.push(j.unwrap_or_else(|e| StreamResult {
                failed: Some(format!("task: {e}")),
                ..StreamResult::default()
            }));
        }
        report.seconds = started.elapsed().as_secs_f64();
        for r in &results {
            report.streams_opened += usize::from(r.opened);
            report.messages_total += r.messages;
            report.messages_min = report.messages_min.min(r.messages);
            report.messages_max = report.messages_max.max(r.messages);
            report.heartbeats_min = report.heartbeats_min.min(r.heartbeats);
            if let Some(e) = &r.failed {
                report.streams_failed += 1;
                if report.stream_error_samples.len() < 10 {
                    report.stream_error_samples.push(e.clone());
                }
            }
        }
        if results.is_empty() {
            report.messages_min = 0;
            report.heartbeats_min = 0;
        }
        latencies.sort_by(f64::total_cmp);
        report.calls = latencies.len() as u64;
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let per_second = latencies.len() as f64 / report.seconds;
        report.calls_per_second = per_second;
        report.p50_ms = percentile(&latencies, 0.5);
        report.p99_ms = percentile(&latencies, 0.99);
        report.max_ms = percentile(&latencies, 1.0);
        Ok::<_, ClientError>(report)
    });
    match result {
        Ok(r) => print(&r),
        Err(e) => fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_sorted_slice() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn rr_counts_every_exchange_it_completes() {
        let args = RrArgs {
            connections: 2,
            rate: 2_000.0,
            duration: Duration::from_millis(300),
            size: 16,
            listen: None,
            connect: None,
        };
        let r = run_rr(&args).expect("runs");
        assert_eq!((r.errors, r.connections), (0, 2), "{:?}", r.error_samples);
        // Paced at 2,000/s for 0.3 s: about 600, fewer on a loaded machine, never more.
        assert!(r.exchanges > 0 && r.exchanges <= 602, "{}", r.exchanges);
    }

    #[test]
    fn rr_with_connect_uses_the_given_server_and_counts_what_it_echoed() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let echoed = Arc::new(AtomicU64::new(0));
        let seen = echoed.clone();
        std::thread::spawn(move || {
            for c in listener.incoming().take(2) {
                let mut c = c.expect("accept");
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16];
                    while c.read_exact(&mut buf).is_ok() && c.write_all(&buf).is_ok() {
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        let args = RrArgs {
            connections: 2,
            rate: 2_000.0,
            duration: Duration::from_millis(300),
            size: 16,
            listen: None,
            connect: Some(addr),
        };
        let r = run_rr(&args).expect("runs");
        assert_eq!(r.errors, 0, "{:?}", r.error_samples);
        // Every exchange the client counted was answered by this server, none by one of its own.
        assert!(r.exchanges > 0);
        assert_eq!(r.exchanges, echoed.load(Ordering::Relaxed));
    }
}
