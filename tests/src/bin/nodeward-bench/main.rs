//! `nodeward-bench`: the load generators and measuring clients that `cargo xtask bench` and the
//! load test (`tests/tests/load.rs`) drive. They link the agent's library (its scanner, its
//! gRPC client, the tests' fake cgroupfs) but live here, in the tests crate, so that none of
//! them ships in the `nodeward` binary.
//!
//! It reads the agent's configuration like `nodeward` does (`--config`, `--set`, environment),
//! so `scan` scans with the agent's settings and the clients default to the agent's socket.
//! Every subcommand prints one JSON object. Nothing here asserts a timing.

mod collector;
mod drain;
mod flowmap;
mod hold;
mod identity;
mod load;
mod seed;

use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use nodeward::{client::Conn, config, EXIT_SOFTWARE, EXIT_USAGE};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "nodeward-bench",
    about = "Load generators and measuring clients for nodeward's benchmarks and load test"
)]
struct Cli {
    #[command(flatten)]
    config: nodeward::cli::ConfigArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// CPU time of one cgroup scan of a fake cgroupfs.
    Scan(collector::ScanArgs),
    /// `GetNodeHealth` latency with concurrent callers.
    Api(collector::ApiArgs),
    /// Hold many `WatchNodeHealth` streams open.
    Watch(collector::WatchArgs),
    /// TCP request/response on loopback, counting exchanges.
    Rr(load::RrArgs),
    /// Unary callers and Watch streams at once.
    LoadApi(load::LoadApiArgs),
    /// What pod identity from a (stand-in) container runtime costs the agent.
    Identity(identity::IdentityArgs),
    /// The TCP source's start-up seed with many connections open.
    Seed(seed::SeedArgs),
    /// `GetDrainStatus` latency with many live streams.
    DrainStatus(drain::DrainArgs),
    /// Hold loopback connections open until stdin closes (for `seed` and `drain-status`).
    Hold(hold::HoldArgs),
    /// CPU time of reading a large flow map, walked and in batches.
    FlowMap(flowmap::FlowMapArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let source = config::Source {
        explicit_path: cli.config.config.as_deref(),
        flags: &cli.config.set,
    };
    let config = match config::load(&source, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nodeward-bench: invalid configuration: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let socket = &config.api.unix_socket;
    match cli.command {
        Command::Scan(args) => collector::scan(&config, &args),
        Command::Api(args) => collector::api(socket, &args),
        Command::Watch(args) => collector::watch(socket, &args),
        Command::Rr(args) => load::rr(&args),
        Command::LoadApi(args) => load::load_api(socket, &args),
        Command::Identity(args) => identity::identity(&args),
        Command::Seed(args) => seed::seed(&args),
        Command::DrainStatus(args) => drain::drain(socket, &args),
        Command::Hold(args) => hold::hold(&args),
        Command::FlowMap(args) => flowmap::flow_map(&args),
    }
}

fn print(v: &impl Serialize) -> ExitCode {
    match serde_json::to_string(v) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("nodeward-bench: {e}");
    ExitCode::from(EXIT_SOFTWARE)
}

/// How the clients reach the agent: `addr` as for `nodeward status --addr`.
fn conn(addr: &str) -> Conn {
    Conn {
        addr: Some(addr.to_owned()),
        json: true,
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
        tls_domain: None,
        connect_timeout: Duration::from_secs(10),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
