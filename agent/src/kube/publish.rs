//! The publishing task: the Node's conditions patched on change and on the heartbeat, an Event
//! per transition, retried with back-off while the API server does not answer.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use serde_json::{json, Value};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    conditions::{desired, rfc3339, Desired, Status},
    Client, ClientError, KubeConfig,
};
use crate::{health::hub::Published, task::TaskError};

/// The supervised task's name.
pub const NAME: &str = "kubernetes";

/// Events kept for sending while the API server does not answer; older ones are dropped first.
const EVENTS_KEPT: usize = 64;
/// The first wait after a failed call; doubled per failure up to `kubernetes.max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// What one run of the task needs.
#[derive(Debug, Clone)]
pub struct Publisher {
    pub client: Client,
    pub node: String,
    pub config: KubeConfig,
    pub published: watch::Receiver<Published>,
}

/// What the task knows of the Node's conditions between calls.
#[derive(Debug, Default)]
struct State {
    /// The last conditions the server accepted.
    sent: Option<Vec<Desired>>,
    sent_at: Option<Instant>,
    /// Each type's status and when it took it, as seen when patching (or as found on the Node).
    observed: BTreeMap<String, (Status, SystemTime)>,
    /// Whether the Node's own conditions were read (once per run, so a restarted agent keeps
    /// their transition times and sends no Event for a state the Node already shows).
    adopted: bool,
    events: Vec<Value>,
    /// Since when calls fail, for the log.
    failing_since: Option<SystemTime>,
}

/// Runs until `cancel`. Never returns an error for an API server that does not answer: it
/// retries; only a failure of its own (a panic) reaches the supervisor.
pub async fn run(mut p: Publisher, cancel: CancellationToken) -> Result<(), TaskError> {
    tracing::info!(node = %p.node, heartbeat = ?p.config.heartbeat, "publishing Node conditions");
    let mut state = State::default();
    let mut last_attempt: Option<Instant> = None;
    let mut retry_at: Option<Instant> = None;
    let mut failures: u32 = 0;
    let mut health_open = true;
    loop {
        let want = desired(&p.published.borrow_and_update(), &p.config.conditions);
        let now = Instant::now();
        let heartbeat_at = state.sent_at.map(|t| t + p.config.heartbeat);
        let due = match &state.sent {
            None => true,
            Some(sent) => {
                sent.len() != want.len()
                    || sent.iter().zip(&want).any(|(a, b)| b.changed_from(a))
                    || heartbeat_at.is_some_and(|t| now >= t)
            }
        };
        let mut wake = heartbeat_at;
        if due {
            let earliest = [last_attempt.map(|t| t + p.config.min_interval), retry_at]
                .into_iter()
                .flatten()
                .max();
            if earliest.is_none_or(|t| now >= t) {
                last_attempt = Some(now);
                match publish(&p, &mut state, &want).await {
                    Ok(()) => {
                        failures = 0;
                        retry_at = None;
                        if let Some(since) = state.failing_since.take() {
                            tracing::info!(
                                down_for = ?SystemTime::now().duration_since(since).unwrap_or_default(),
                                "Kubernetes API server answers again; Node conditions caught up"
                            );
                        }
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        let wait = backoff(failures, p.config.max_backoff)
                            .max(e.retry_after().unwrap_or_default());
                        retry_at = Some(Instant::now() + wait);
                        if state.failing_since.is_none() {
                            state.failing_since = Some(SystemTime::now());
                            tracing::warn!(error = %e, retry_in = ?wait, "cannot publish the Node conditions; retrying with back-off");
                        } else {
                            tracing::debug!(error = %e, retry_in = ?wait, "Node conditions still not published");
                        }
                    }
                }
                continue;
            }
            wake = earliest;
        }
        let sleep = async {
            match wake {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            changed = p.published.changed(), if health_open => {
                // The channel outlives the evaluator's restarts: closed means shutdown.
                health_open = changed.is_ok();
            }
            _ = sleep => {}
        }
    }
}

fn backoff(failures: u32, max: Duration) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(max)
}

/// One attempt: read the Node once per run, patch its status, send the Events waiting.
async fn publish(p: &Publisher, state: &mut State, want: &[Desired]) -> Result<(), ClientError> {
    let node_path = format!("/api/v1/nodes/{}", p.node);
    if !state.adopted {
        let node = p.client.get(&node_path).await?;
        adopt(state, &node, &p.config.conditions.all());
        state.adopted = true;
    }
    let now = SystemTime::now();
    for d in want {
        let before = state.observed.get(&d.type_).map(|(s, _)| *s);
        if before != Some(d.status) {
            state.observed.insert(d.type_.clone(), (d.status, now));
            // A first sight of a type (a new agent on this node) is an Event only for a problem.
            if p.config.events && (before.is_some() || d.status == Status::True) {
                if state.events.len() == EVENTS_KEPT {
                    state.events.remove(0);
                }
                state.events.push(event(p, d, now));
            }
        }
    }
    let heartbeat = rfc3339(now);
    let conditions: Vec<Value> = want
        .iter()
        .map(|d| {
            let since = state.observed.get(&d.type_).map_or(now, |(_, t)| *t);
            json!({
                "type": d.type_,
                "status": d.status.as_str(),
                "reason": d.reason,
                "message": d.message,
                "lastHeartbeatTime": heartbeat,
                "lastTransitionTime": rfc3339(since),
            })
        })
        .collect();
    // A strategic merge patch of the status subresource, without a resourceVersion: it merges
    // by `type` into whatever the Node holds, so it cannot conflict with the kubelet's writes.
    p.client
        .patch(
            &format!("{node_path}/status"),
            &json!({"status": {"conditions": conditions}}),
        )
        .await?;
    state.sent = Some(want.to_vec());
    state.sent_at = Some(Instant::now());
    let events_path = format!("/api/v1/namespaces/{}/events", p.config.event_namespace);
    while let Some(e) = state.events.first() {
        match p.client.post(&events_path, e).await {
            Ok(_) => {
                state.events.remove(0);
            }
            // The server refused this Event for good: sending it again would fail again.
            Err(err)
                if err.status().is_some_and(|s| {
                    s.is_client_error() && s != hyper::StatusCode::TOO_MANY_REQUESTS
                }) =>
            {
                tracing::warn!(error = %err, "an Event was refused; dropped");
                state.events.remove(0);
            }
            // Kept for the next attempt; the conditions themselves are on the Node.
            Err(err) => {
                tracing::debug!(error = %err, "Events not sent yet");
                break;
            }
        }
    }
    Ok(())
}

/// Takes the status and transition time of each of our conditions already on the Node.
fn adopt(state: &mut State, node: &Value, ours: &[&str]) {
    let Some(found) = node.pointer("/status/conditions").and_then(Value::as_array) else {
        return;
    };
    for c in found {
        let (Some(t), Some(status)) = (
            c.get("type").and_then(Value::as_str),
            c.get("status")
                .and_then(Value::as_str)
                .and_then(Status::parse),
        ) else {
            continue;
        };
        if !ours.contains(&t) {
            continue;
        }
        let since = c
            .get("lastTransitionTime")
            .and_then(Value::as_str)
            .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
            .unwrap_or_else(SystemTime::now);
        state.observed.insert(t.to_owned(), (status, since));
    }
}

/// A core/v1 Event on the Node for a condition's transition.
fn event(p: &Publisher, d: &Desired, at: SystemTime) -> Value {
    let (kind, reason) = match d.status {
        Status::True => ("Warning", d.reason.clone()),
        Status::Unknown => ("Warning", format!("{}Unknown", d.type_)),
        Status::False => ("Normal", format!("{}Cleared", d.type_)),
    };
    let time = rfc3339(at);
    json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": format!("{}.nodeward-", p.node), "namespace": p.config.event_namespace},
        // The kubelet names the Node by its name in `uid` too; the Node's events list finds
        // them by name and kind.
        "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": p.node, "uid": p.node},
        "reason": reason,
        "message": format!("{} is {} ({}): {}", d.type_, d.status.as_str(), d.reason, d.message),
        "type": kind,
        "source": {"component": "nodeward", "host": p.node},
        "reportingComponent": "nodeward",
        "reportingInstance": p.node,
        "firstTimestamp": time,
        "lastTimestamp": time,
        "count": 1,
    })
}
