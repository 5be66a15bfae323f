//! Command-line arguments of the client subcommands (`status`, `watch`, `containers`, `gpus`,
//! `drain`), kept here so `cli.rs` only names them.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Subcommand};

/// Where and how to reach the agent.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// Agent address: `unix:/path/to.sock` (or an absolute path), `http://host:port`, or
    /// `https://host:port` [default: the configured api.unix_socket].
    #[arg(long, value_name = "ADDR")]
    pub addr: Option<String>,
    /// Print JSON (one object per reply; one per line for `watch`) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// With https://: PEM CA that signed the agent's certificate.
    #[arg(long, value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
    /// With https://: PEM client certificate (for agents that require one).
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// With https://: PEM key of --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// With https://: the server name to verify [default: the host of --addr].
    #[arg(long, value_name = "NAME")]
    pub tls_domain: Option<String>,
    /// Give up connecting after this long.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Heartbeat interval to ask for, in seconds (0 = the agent's default).
    #[arg(long, default_value_t = 0)]
    pub heartbeat: u32,
    /// Stop after this many messages (0 = never).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
}

#[derive(Debug, Clone, Args)]
pub struct ContainersArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Only this pod.
    #[arg(long)]
    pub pod: Option<String>,
    /// Only this namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Only pods whose labels match this selector, as `kubectl -l` takes it (`app=web`,
    /// `tier!=db`, `env in (a,b)`, `env notin (c)`, `canary`, `!canary`; repeatable, all
    /// must hold).
    #[arg(long = "label", short = 'l', value_name = "SELECTOR")]
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum DrainCommand {
    /// Ask the agent to drain: it reports DRAINING and counts the live streams left.
    Start {
        #[command(flatten)]
        conn: Conn,
        /// Who asks [default: nodeward-cli/<user>].
        #[arg(long = "by", value_name = "NAME")]
        requested_by: Option<String>,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        /// How long to wait for live streams, e.g. `10m` [default: the agent's api.drain_default_deadline].
        #[arg(long, value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
    },
    /// Show the drain state and the live streams left per container.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// End the drain.
    Cancel {
        #[command(flatten)]
        conn: Conn,
        /// Who asks [default: nodeward-cli/<user>].
        #[arg(long = "by", value_name = "NAME")]
        requested_by: Option<String>,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
}
