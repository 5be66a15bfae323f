//! The command line. `nodeward` with no subcommand is `nodeward run`.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

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
    /// Many nodes at once: status, watch, or drain in batches (also the kubectl plugin
    /// `kubectl-nodeward`).
    #[command(subcommand)]
    Fleet(crate::client::fleet::FleetCommand),
    /// Make a CA, node (server) and client certificates for the gRPC API's mutual TLS.
    #[command(subcommand)]
    Certs(crate::client::certs::CertsCommand),
}

/// The name the binary answers to as a kubectl plugin: `kubectl nodeward ARGS` runs
/// `kubectl-nodeward ARGS`, which is `nodeward fleet ARGS`.
pub const KUBECTL_PLUGIN: &str = "kubectl-nodeward";

/// The command line, with `fleet` put in front when the binary was started as
/// `kubectl-nodeward` (a link to `nodeward`).
pub fn parse() -> Cli {
    Cli::parse_from(plugin_args(std::env::args_os()))
}

fn plugin_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.into_iter().collect();
    let as_plugin = args
        .first()
        .is_some_and(|a0| Path::new(a0).file_name() == Some(std::ffi::OsStr::new(KUBECTL_PLUGIN)));
    if as_plugin {
        args.insert(1, OsString::from("fleet"));
    }
    args
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (defaults, file, environment and flags merged).
    Show,
    /// Check the configuration and exit 0 if it is valid, 64 if not.
    Check,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn started_as_the_kubectl_plugin_the_binary_is_fleet() {
        let args = plugin_args(
            ["/usr/bin/kubectl-nodeward", "status", "--target", "h:1"].map(OsString::from),
        );
        let cli = Cli::parse_from(args);
        assert!(matches!(
            cli.command,
            Some(Command::Fleet(crate::client::fleet::FleetCommand::Status(
                _
            )))
        ));
        let args = plugin_args(["nodeward", "status"].map(OsString::from));
        assert!(matches!(
            Cli::parse_from(args).command,
            Some(Command::Status(_))
        ));
    }
}
