//! `GetDrainStatus` with many live streams, for `cargo xtask bench` (scenario `drain status`):
//! holder processes (`hold.rs`) bind their listeners inside a cgroup made for the run under
//! the cgroup v2 root (a "container" to the agent: the accepted sockets are attributed to the
//! listener's cgroup), move back out and connect N loopback clients to them; this process
//! begins a drain, waits until the agent counts every accepted connection as a live stream, and then calls `GetDrainStatus` again and
//! again on one connection, timing each call.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Args;
use nodeward::{api::pb, client::ClientError};
use serde::Serialize;

use crate::{conn, fail, hold::Holders, print, runtime};

#[derive(Debug, Clone, Args)]
pub struct DrainArgs {
    /// Agent address, as for the client subcommands.
    #[arg(long)]
    pub addr: String,
    /// Connections accepted in the cgroup (the live streams).
    #[arg(long, default_value_t = 50_000)]
    pub connections: usize,
    /// `GetDrainStatus` calls to time.
    #[arg(long, default_value_t = 200)]
    pub calls: usize,
    /// How long to wait for the agent to count every stream.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// The agent's process id: its CPU time is read over `hold` once every stream is counted.
    #[arg(long)]
    pub agent_pid: Option<u32>,
    /// How long to read the agent's CPU time while it holds the streams (no calls meanwhile).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
}

#[derive(Serialize)]
struct DrainReport {
    connections: usize,
    /// Live streams the agent reported when the timed calls began.
    live_streams: u32,
    /// Seconds from the last connection until the agent counted them all.
    counted_after_seconds: f64,
    /// Each call's latency, in ms.
    latency_ms: Vec<f64>,
    /// Encoded size of the last reply, in bytes.
    reply_bytes: usize,
    /// The agent's CPU time per second of `hold`, while it held the streams and nobody called
    /// (mostly its TCP source's ticks over the flow map); absent without `--agent-pid`.
    agent_cpu_per_second: Option<f64>,
}

/// The cgroup v2 root, where `cgroup2` is mounted.
fn v2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .and_then(|f| f.get(1).map(PathBuf::from))
}

pub fn drain(default_socket: &Path, args: &DrainArgs) -> ExitCode {
    let Some(root) = v2_root() else {
        return fail("no cgroup v2 hierarchy");
    };
    let pod = root.join(format!("nodeward-bench-drain-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&pod) {
        return fail(format!("create {}: {e}", pod.display()));
    }
    let result = Holders::start(args.connections, Some(&pod))
        .map_err(|e| e.to_string())
        .and_then(|held| {
            let r = measure(default_socket, args).map_err(|e| e.to_string());
            drop(held);
            r
        });
    let _ = std::fs::remove_dir(&pod);
    match result {
        Ok(report) => print(&report),
        Err(e) => fail(e),
    }
}

fn measure(default_socket: &Path, args: &DrainArgs) -> Result<DrainReport, ClientError> {
    let opened = Instant::now();
    let rt = runtime().map_err(|e| ClientError::Usage(e.to_string()))?;
    rt.block_on(async {
        let mut c = nodeward::client::connect(&conn(&args.addr), default_socket).await?;
        c.begin_drain(pb::BeginDrainRequest {
            requested_by: "nodeward-bench".to_owned(),
            reason: "GetDrainStatus benchmark".to_owned(),
            deadline_seconds: 3_600,
        })
        .await?;
        let want = u32::try_from(args.connections).unwrap_or(u32::MAX);
        let mut live = 0;
        while opened.elapsed() < args.wait {
            live = c
                .get_drain_status(pb::GetDrainStatusRequest {})
                .await?
                .into_inner()
                .live_streams;
            if live >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let counted_after_seconds = opened.elapsed().as_secs_f64();
        let agent_cpu_per_second = match args.agent_pid {
            Some(pid) => {
                let (t, cpu) = (Instant::now(), nodeward_tests::process_cpu_seconds(pid));
                tokio::time::sleep(args.hold).await;
                Some((nodeward_tests::process_cpu_seconds(pid) - cpu) / t.elapsed().as_secs_f64())
            }
            None => None,
        };
        let mut latency_ms = Vec::with_capacity(args.calls);
        let mut reply_bytes = 0;
        for _ in 0..args.calls {
            let t = Instant::now();
            let reply = c.get_drain_status(pb::GetDrainStatusRequest {}).await?;
            latency_ms.push(t.elapsed().as_secs_f64() * 1e3);
            reply_bytes = prost::Message::encoded_len(reply.get_ref());
        }
        c.cancel_drain(pb::CancelDrainRequest {
            requested_by: "nodeward-bench".to_owned(),
            reason: "benchmark done".to_owned(),
        })
        .await?;
        Ok(DrainReport {
            connections: args.connections,
            live_streams: live,
            counted_after_seconds,
            latency_ms,
            reply_bytes,
            agent_cpu_per_second,
        })
    })
}
