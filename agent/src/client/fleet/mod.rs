//! `nodeward fleet status|watch|drain`: many agents at once. Targets come from a static list
//! (`targets`), or, without one, from the API server of one or more kubeconfig contexts
//! (`kubeconfig`, `discover`): the DaemonSet's pods, each asked at its pod IP. Each agent is
//! asked over plain HTTP/2 (no `--ca`: agents on loopback) or mutual TLS, at most `--parallel`
//! at a time and each within `--timeout` (`query`); the answers make one table, worst verdict
//! first, with every node that did not answer — or that has no agent to ask — as an
//! `UNREACHABLE` row (`row`). `drain` drains nodes in batches of `--max-unavailable` (`drain`).
//!
//! Installed as `kubectl-nodeward`, the binary is this command: `kubectl nodeward status` is
//! `nodeward fleet status` (see `cli::parse`).

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Subcommand};

pub mod discover;
mod drain;
pub mod kubeconfig;
mod query;
mod row;
pub mod targets;

pub use discover::KubeDiscovery;
pub use kubeconfig::{Kubeconfig, KubeconfigError};
pub use query::{for_each, Dialer};
pub use row::{FleetVerdict, Row};
pub use targets::{Absent, Discovery, Found, StaticList, Target, TargetError};

/// Where the agents are and how to reach them.
#[derive(Debug, Clone, Args)]
pub struct FleetConn {
    /// An agent: `host:port` or `"host:port node-name"` (repeatable). Without --target and
    /// --targets, the agents are found through the API server (see --kubeconfig).
    #[arg(long = "target", value_name = "HOST:PORT [NODE]")]
    pub target: Vec<String>,
    /// A file of agents, one `host:port [node-name]` a line; `#` starts a comment (repeatable).
    #[arg(long = "targets", value_name = "FILE")]
    pub targets: Vec<PathBuf>,
    /// The kubeconfig to find the agents' pods with [default: the files of $KUBECONFIG,
    /// merged, else ~/.kube/config].
    #[arg(long, value_name = "FILE", conflicts_with_all = ["target", "targets"])]
    pub kubeconfig: Option<PathBuf>,
    /// A kubeconfig context to ask (repeatable, or a comma-separated list) [default: the
    /// current context].
    #[arg(
        long = "context",
        value_name = "NAME",
        value_delimiter = ',',
        conflicts_with_all = ["target", "targets", "all_contexts"]
    )]
    pub context: Vec<String>,
    /// Ask every context of the kubeconfig.
    #[arg(long, conflicts_with_all = ["target", "targets"])]
    pub all_contexts: bool,
    /// The namespace of the agents' pods.
    #[arg(short = 'n', long, default_value = discover::NAMESPACE,
          conflicts_with_all = ["target", "targets"])]
    pub namespace: String,
    /// The label selector of the agents' pods.
    #[arg(short = 'l', long, default_value = discover::SELECTOR,
          conflicts_with_all = ["target", "targets"])]
    pub selector: String,
    /// The agents' gRPC port [default: each pod's container port named `grpc`, else 50051].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..),
          conflicts_with_all = ["target", "targets"])]
    pub port: Option<u16>,
    /// PEM CA that signed the agents' certificates: turns TLS on (without it, plain HTTP/2,
    /// for agents on loopback only).
    #[arg(long, value_name = "PATH")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate to present (agents with `api.tls_client_ca` require one).
    #[arg(long, value_name = "PATH", requires = "key", requires = "ca")]
    pub cert: Option<PathBuf>,
    /// PEM key of --cert.
    #[arg(long, value_name = "PATH", requires = "cert")]
    pub key: Option<PathBuf>,
    /// The name every agent's certificate must carry [default: each target's node name from
    /// the list, else its host].
    #[arg(long, value_name = "NAME", requires = "ca")]
    pub server_name: Option<String>,
    /// Agents asked at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub parallel: u16,
    /// How long one agent may take to answer (connection, TLS and calls together).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// One JSON object per node and line instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum FleetCommand {
    /// Ask every agent once and print one table, worst verdict first.
    Status(FleetConn),
    /// Ask every agent every --interval and redraw the table.
    Watch {
        #[command(flatten)]
        conn: FleetConn,
        /// Time between two rounds.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Stop after this many rounds (0 = never).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Drain nodes in batches: each batch is drained (BeginDrain) and waited for until every
    /// node of it is ready (its live streams ended, or its deadline passed), then given back
    /// (CancelDrain) before the next batch begins.
    Drain(drain::DrainArgs),
}

/// The TLS files of `--ca`, `--cert`, `--key`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Targets(#[from] TargetError),
    #[error(transparent)]
    Kubeconfig(#[from] KubeconfigError),
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Drain(String),
    #[error("cannot print JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl FleetError {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Self::Targets(_) | Self::Kubeconfig(_) | Self::ReadFile { .. } | Self::Usage(_) => {
                crate::EXIT_USAGE
            }
            Self::Unavailable(_) => super::EXIT_UNAVAILABLE,
            Self::Drain(_) | Self::Json(_) => 1,
        })
    }
}

impl FleetConn {
    fn dialer(&self) -> Result<Dialer, FleetError> {
        let tls = self.ca.as_ref().map(|ca| TlsFiles {
            ca: ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        });
        Dialer::new(tls.as_ref(), self.server_name.clone(), self.timeout)
    }

    /// The static list when one is given, else discovery through the kubeconfig's contexts.
    fn source(&self) -> Result<Source, FleetError> {
        if !self.target.is_empty() || !self.targets.is_empty() {
            return Ok(Source::Static(StaticList {
                targets: self.target.clone(),
                files: self.targets.clone(),
            }));
        }
        let env = std::env::var("KUBECONFIG").ok();
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let config = Kubeconfig::load(self.kubeconfig.as_deref(), env.as_deref(), home.as_deref())?;
        Ok(Source::Kube(KubeDiscovery {
            contexts: config.select(&self.context, self.all_contexts)?,
            namespace: self.namespace.clone(),
            selector: self.selector.clone(),
            port: self.port,
            timeout: self.timeout,
        }))
    }
}

/// Where `--target`/`--targets` or the kubeconfig flags say the agents are.
#[derive(Debug)]
pub enum Source {
    Static(StaticList),
    Kube(KubeDiscovery),
}

impl Discovery for Source {
    async fn find(&self) -> Result<Found, FleetError> {
        match self {
            Self::Static(list) => list.find().await,
            Self::Kube(kube) => kube.find().await,
        }
    }
}

/// Every node's row, sorted worst first: the agents' answers, and the nodes found without one.
pub async fn rows(conn: &FleetConn, discovery: &impl Discovery) -> Result<Vec<Row>, FleetError> {
    let found = discovery.find().await?;
    let dialer = conn.dialer()?;
    let mut rows = query::ask_all(&dialer, &found.targets, usize::from(conn.parallel)).await;
    rows.extend(found.absent.iter().map(Row::absent));
    row::sort(&mut rows);
    Ok(rows)
}

fn print(rows: &[Row], json: bool) -> Result<(), FleetError> {
    if json {
        let mut out = String::new();
        for r in rows {
            out.push_str(&serde_json::to_string(r)?);
            out.push('\n');
        }
        print!("{out}");
    } else {
        print!("{}", row::table(rows));
        println!("{}", row::summary(rows));
    }
    Ok(())
}

pub async fn run(cmd: &FleetCommand) -> Result<(), FleetError> {
    match cmd {
        FleetCommand::Status(conn) => print(&rows(conn, &conn.source()?).await?, conn.json),
        FleetCommand::Watch {
            conn,
            interval,
            count,
        } => watch(conn, &conn.source()?, *interval, *count).await,
        FleetCommand::Drain(args) => drain::run(args, &args.conn.source()?).await,
    }
}

/// `fleet watch`: the table again every `interval`, `count` times (0: until interrupted). An
/// API server that does not answer (a control-plane upgrade, a network blip) does not end the
/// watch: the round says so on stderr and the next asks again. With `count`, a last round that
/// found no answer is the command's error (exit 69). Bad flags or files end it at once.
async fn watch(
    conn: &FleetConn,
    source: &impl Discovery,
    interval: Duration,
    count: u64,
) -> Result<(), FleetError> {
    let redraw = !conn.json && std::io::stdout().is_terminal();
    let mut n = 0u64;
    loop {
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        let last = match rows(conn, source).await {
            Ok(rows) => {
                if redraw {
                    // Home and clear, then the table: one screen that changes in place.
                    print!("\x1b[H\x1b[2J");
                }
                if !conn.json {
                    println!("{now}");
                }
                print(&rows, conn.json)?;
                Ok(())
            }
            Err(FleetError::Unavailable(e)) => {
                eprintln!(
                    "nodeward fleet: {now}: {e}; asking again in {}",
                    humantime::format_duration(interval)
                );
                Err(FleetError::Unavailable(e))
            }
            Err(e) => return Err(e),
        };
        n += 1;
        if count != 0 && n >= count {
            return last;
        }
        tokio::time::sleep(interval).await;
    }
}
