//! `nodeward fleet drain NODE…`: nodes drained `--max-unavailable` at a time. Each batch is
//! begun (BeginDrain), followed (GetDrainStatus) until every node of it is ready, handed to
//! `--exec` if given (the work to do while the node is out of rotation), then given back
//! (CancelDrain) before the next batch begins, so that never more than N nodes are draining.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::IsTerminal as _,
    time::{Duration, SystemTime},
};

use clap::Args;
use tonic::transport::Channel;

use super::{
    query, row::FleetVerdict, targets::Absent, Dialer, Discovery, FleetConn, FleetError, Target,
};
use crate::api::pb::{self, node_health_client::NodeHealthClient};

#[derive(Debug, Clone, Args)]
pub struct DrainArgs {
    #[command(flatten)]
    pub conn: FleetConn,
    /// Nodes to drain, by the name their agent reports (or the list or the API gives);
    /// `CONTEXT/NODE` picks a node of one kubeconfig context where several have that name.
    #[arg(required = true, value_name = "NODE")]
    pub nodes: Vec<String>,
    /// Nodes draining at once: the batch size.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_unavailable: u16,
    /// How long each node waits for its live streams [default: the agent's
    /// api.drain_default_deadline].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub deadline: Option<Duration>,
    /// Who asks [default: nodeward-cli/<user>].
    #[arg(long = "by", value_name = "NAME")]
    pub requested_by: Option<String>,
    /// Why.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// A shell command run once per node when its batch is ready, before the batch is given
    /// back (`NODEWARD_NODE` and `NODEWARD_ADDRESS` are set); a failure stops the drain and
    /// leaves that batch draining.
    #[arg(long, value_name = "COMMAND")]
    pub exec: Option<String>,
    /// Leave every node draining at the end instead of giving each batch back (for nodes that
    /// leave the fleet); the batch size then bounds only how many wait for streams at once.
    #[arg(long)]
    pub keep_drained: bool,
    /// How often the drain status is asked.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub poll: Duration,
}

/// A node of the drain, connected.
struct Member {
    node: String,
    target: Target,
    client: NodeHealthClient<Channel>,
}

/// Matches the nodes asked for with the targets, by the name each agent reports (or the list
/// or the API gives), in the context `CONTEXT/NODE` names; refuses unknown, ambiguous,
/// repeated and unreachable nodes before anything is drained.
async fn resolve(
    args: &DrainArgs,
    targets: &[Target],
    absent: &[Absent],
    dialer: &Dialer,
) -> Result<Vec<(String, Target)>, FleetError> {
    let rows = query::ask_all(dialer, targets, usize::from(args.conn.parallel)).await;
    let mut out: Vec<(String, Target)> = Vec::new();
    for asked in &args.nodes {
        if out.iter().any(|(n, _)| n == asked) {
            return Err(FleetError::Usage(format!("{asked} is named twice")));
        }
        // Node names hold no '/': one in the argument separates a context.
        let (context, node) = match asked.split_once('/') {
            Some((c, n)) => (Some(c), n),
            None => (None, asked.as_str()),
        };
        let in_context = |c: &Option<String>| context.is_none() || c.as_deref() == context;
        let found: Vec<_> = rows
            .iter()
            .zip(targets)
            .filter(|(r, t)| {
                (r.node == node || t.node.as_deref() == Some(node)) && in_context(&t.context)
            })
            .collect();
        if found.len() > 1 {
            let contexts: Vec<&str> = found
                .iter()
                .filter_map(|(_, t)| t.context.as_deref())
                .collect();
            return Err(FleetError::Usage(format!(
                "{asked}: {} agents report this node name{}; name one as CONTEXT/NODE",
                found.len(),
                if contexts.is_empty() {
                    String::new()
                } else {
                    format!(" (in {})", contexts.join(", "))
                }
            )));
        }
        match found.first() {
            None => {
                if let Some(a) = absent
                    .iter()
                    .find(|a| a.node == node && in_context(&a.context))
                {
                    return Err(FleetError::Unavailable(format!("{asked}: {}", a.error)));
                }
                return Err(FleetError::Usage(format!(
                    "{asked}: no agent found reports this node name"
                )));
            }
            Some((r, _)) if r.verdict == FleetVerdict::Unreachable => {
                return Err(FleetError::Unavailable(format!(
                    "{asked} ({}): {}",
                    r.address,
                    r.error.as_deref().unwrap_or("unreachable")
                )))
            }
            Some((_, t)) => out.push((asked.clone(), (*t).clone())),
        }
    }
    Ok(out)
}

fn seconds(d: Option<Duration>) -> Result<i64, FleetError> {
    match d {
        None => Ok(0),
        Some(d) if d.as_secs() == 0 => Err(FleetError::Usage(
            "--deadline must be at least 1s".to_owned(),
        )),
        Some(d) => Ok(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
    }
}

/// One node's progress line.
fn progress(node: &str, status: &Result<pb::GetDrainStatusResponse, String>) -> String {
    let s = match status {
        Err(e) => return format!("{node}: cannot ask: {e}"),
        Ok(s) => s,
    };
    let mut line = if s.ready_to_drain {
        format!("{node}: ready")
    } else {
        format!("{node}: waiting")
    };
    let _ = write!(line, ", {} streams, {} viewers", s.live_streams, s.viewers);
    if let Some(d) = &s.drain {
        if d.deadline_unix_ms > 0 {
            let deadline =
                SystemTime::UNIX_EPOCH + Duration::from_millis(d.deadline_unix_ms.unsigned_abs());
            let _ = write!(
                line,
                ", deadline {}",
                humantime::format_rfc3339_seconds(deadline)
            );
        }
    }
    if !s.ready_reason.is_empty() {
        let _ = write!(line, " ({})", s.ready_reason);
    }
    for c in s
        .containers
        .iter()
        .filter(|c| c.live_streams > 0 || c.viewers > 0)
    {
        let pod = if c.pod_name.is_empty() {
            c.container_id.clone()
        } else {
            format!("{}/{}", c.pod_namespace, c.pod_name)
        };
        let _ = write!(
            line,
            "\n    {pod}: {} streams, {} viewers left",
            c.live_streams, c.viewers
        );
    }
    line
}

/// Follows a batch until every node is ready, printing progress: redrawn on a terminal, a
/// line per change otherwise.
async fn wait_ready(members: &[Member], args: &DrainArgs, header: &str) {
    let redraw = !args.conn.json && std::io::stdout().is_terminal();
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let mut ready = true;
        let mut screen = String::new();
        for m in members {
            let status = m
                .client
                .clone()
                .get_drain_status(pb::GetDrainStatusRequest {})
                .await
                .map(tonic::Response::into_inner)
                .map_err(|e| e.message().to_owned());
            ready &= status.as_ref().is_ok_and(|s| s.ready_to_drain);
            if args.conn.json {
                let v = match &status {
                    Ok(s) => serde_json::json!({
                        "node": m.node, "ready_to_drain": s.ready_to_drain,
                        "live_streams": s.live_streams, "viewers": s.viewers,
                        "deadline_unix_ms": s.drain.as_ref().map_or(0, |d| d.deadline_unix_ms),
                    }),
                    Err(e) => serde_json::json!({"node": m.node, "error": e}),
                };
                let text = v.to_string();
                if last.get(&m.node) != Some(&text) {
                    println!("{text}");
                    last.insert(m.node.clone(), text);
                }
                continue;
            }
            let line = progress(&m.node, &status);
            if redraw {
                screen.push_str(&line);
                screen.push('\n');
            } else if last.get(&m.node) != Some(&line) {
                println!("{line}");
                last.insert(m.node.clone(), line);
            }
        }
        if redraw {
            print!("\x1b[H\x1b[2J{header}\n{screen}");
        }
        if ready {
            return;
        }
        tokio::time::sleep(args.poll).await;
    }
}

async fn cancel(members: &[Member], by: &str, reason: &str) -> Vec<String> {
    let mut failed = Vec::new();
    for m in members {
        let req = pb::CancelDrainRequest {
            requested_by: by.to_owned(),
            reason: reason.to_owned(),
        };
        if let Err(e) = m.client.clone().cancel_drain(req).await {
            failed.push(format!("{}: {}", m.node, e.message()));
        }
    }
    failed
}

fn exec(command: &str, m: &Member) -> Result<(), FleetError> {
    let status = std::process::Command::new("sh")
        .args(["-c", command])
        .env("NODEWARD_NODE", &m.node)
        .env("NODEWARD_ADDRESS", m.target.address())
        .status()
        .map_err(|e| FleetError::Drain(format!("cannot run --exec: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(FleetError::Drain(format!(
            "--exec failed for {} ({status}); its batch is left draining",
            m.node
        )))
    }
}

pub async fn run(args: &DrainArgs, discovery: &impl Discovery) -> Result<(), FleetError> {
    let deadline_seconds = seconds(args.deadline)?;
    let found = discovery.find().await?;
    let dialer = args.conn.dialer()?;
    let nodes = resolve(args, &found.targets, &found.absent, &dialer).await?;
    let by = args
        .requested_by
        .clone()
        .unwrap_or_else(crate::client::default_requester);
    let batches: Vec<&[(String, Target)]> =
        nodes.chunks(usize::from(args.max_unavailable)).collect();
    for (i, batch) in batches.iter().enumerate() {
        let header = format!(
            "batch {}/{}: {}",
            i + 1,
            batches.len(),
            batch
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if !args.conn.json {
            println!("{header}");
        }
        let mut members = Vec::new();
        for (node, target) in batch.iter() {
            let client = dialer.connect(target).await.map_err(|e| {
                FleetError::Unavailable(format!("{node} ({}): {e}", target.address()))
            });
            let begun = match client {
                Ok(mut client) => client
                    .begin_drain(pb::BeginDrainRequest {
                        requested_by: by.clone(),
                        reason: args.reason.clone(),
                        deadline_seconds,
                    })
                    .await
                    .map(|_| client)
                    .map_err(|e| FleetError::Drain(format!("{node}: BeginDrain: {}", e.message()))),
                Err(e) => Err(e),
            };
            match begun {
                Ok(client) => members.push(Member {
                    node: node.clone(),
                    target: target.clone(),
                    client,
                }),
                Err(e) => {
                    // Give back what this batch already took, so a refusal leaves the fleet
                    // as it was.
                    let failed = cancel(&members, &by, "fleet drain stopped").await;
                    if failed.is_empty() {
                        return Err(e);
                    }
                    return Err(FleetError::Drain(format!(
                        "{e}; and could not give back: {}",
                        failed.join("; ")
                    )));
                }
            }
        }
        wait_ready(&members, args, &header).await;
        if let Some(command) = &args.exec {
            for m in &members {
                exec(command, m)?;
            }
        }
        if !args.keep_drained {
            let failed = cancel(&members, &by, "fleet drain: batch done").await;
            if !failed.is_empty() {
                return Err(FleetError::Drain(format!(
                    "could not end the drain of: {}",
                    failed.join("; ")
                )));
            }
        }
        if !args.conn.json {
            println!("batch {}/{} done", i + 1, batches.len());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lists_the_pods_that_hold_the_drain() {
        let s = pb::GetDrainStatusResponse {
            live_streams: 2,
            viewers: 1,
            containers: vec![
                pb::ContainerStreams {
                    pod_name: "web-0".into(),
                    pod_namespace: "live".into(),
                    live_streams: 2,
                    viewers: 1,
                    ..Default::default()
                },
                pb::ContainerStreams {
                    pod_name: "idle".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let text = progress("n1", &Ok(s));
        assert!(
            text.starts_with("n1: waiting, 2 streams, 1 viewers"),
            "{text}"
        );
        assert!(
            text.contains("live/web-0: 2 streams, 1 viewers left"),
            "{text}"
        );
        assert!(!text.contains("idle"), "{text}");
        assert_eq!(
            progress("n2", &Err("refused".into())),
            "n2: cannot ask: refused"
        );
    }

    #[test]
    fn a_zero_deadline_is_refused() {
        assert!(seconds(Some(Duration::ZERO)).is_err());
        assert_eq!(seconds(Some(Duration::from_secs(90))).expect("ok"), 90);
        assert_eq!(seconds(None).expect("ok"), 0);
    }
}
