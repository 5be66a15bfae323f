//! The command line. `nodeward` with no subcommand is `nodeward run`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "nodeward",
    version,
    about = "Node health agent: container network latency and jitter, cgroup, node and GPU health"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Args, Clone, Default)]
pub struct ConfigArgs {
    /// Config file [default: /etc/nodeward/nodeward.toml, if it exists].
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. `--set agent.tick=2s` (repeatable; beats file and environment).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (the default).
    Run,
    /// Probe the kernel's features and print what the agent can use on this node.
    Probe {
        /// Print JSON instead of the summary.
        #[arg(long)]
        json: bool,
        /// Also load every eBPF program, attach the hook paths chosen for this kernel (and each
        /// TCP fallback it supports), make loopback traffic from a child cgroup and check the
        /// kernel maps counted it (needs root). Exits 1 if a chosen path produces no data.
        #[arg(long)]
        verify: bool,
    },
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Read the GPUs once through NVML and print what was read (diagnostic).
    #[command(name = "gpu-check", hide = true)]
    GpuCheck {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// How long to watch for XID/ECC events between the two reads.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        events: std::time::Duration,
    },
    /// Show the node's health verdict, conditions, sources and drain state (asks the agent).
    Status(crate::client::Conn),
    /// Follow the node's health: the current state, then every change and heartbeats.
    Watch(crate::client::WatchArgs),
    /// List containers with their stats and network summary.
    Containers(crate::client::ContainersArgs),
    /// List the node's GPUs and their health.
    Gpus(crate::client::Conn),
    /// The drain handshake: start, follow and cancel a drain.
    #[command(subcommand)]
    Drain(crate::client::DrainCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (defaults, file, environment and flags merged).
    Show,
    /// Check the configuration and exit 0 if it is valid, 64 if not.
    Check,
}
