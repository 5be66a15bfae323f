//! The command line. `nodeward` with no subcommand is `nodeward run`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "nodeward", version, about = "Node health agent: container network latency and jitter, cgroup, node and GPU health")]
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
    },
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (defaults, file, environment and flags merged).
    Show,
    /// Check the configuration and exit 0 if it is valid, 64 if not.
    Check,
}
