//! The health engine's verdict and firing conditions as Node conditions, in
//! node-problem-detector's style: a few condition types of nodeward's own, each `True` while its
//! problem is present, `False` when not, `Unknown` while the verdict is `Unknown`.
//!
//! | type (default name) | `True` when |
//! |---|---|
//! | `NodewardUnhealthy` | the verdict is `Unhealthy` (a drain is recommended); `False` with reason `Healthy` or `Degraded` otherwise |
//! | `LiveNetworkDegraded` | a container's RTT, jitter, retransmits or RTP loss condition counts |
//! | `GpuUnhealthy` | a GPU condition counts |
//! | `NodewardNodeProblem` | any other condition counts (pressure, OOM kills, disks, clock, sources) |
//! | `NodewardDraining` | a drain was begun and not cancelled |
//!
//! What makes a change (and so a patch before the heartbeat) is a condition's status, reason or
//! the set of (kind, subject) behind it; its message carries numbers that move every tick, so a
//! new message alone waits for the heartbeat.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::health::{hub::Published, Condition, Verdict};

/// The condition types' names (`[kubernetes.conditions]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConditionNames {
    pub verdict: String,
    pub network: String,
    pub gpu: String,
    pub node: String,
    pub draining: String,
}

impl Default for ConditionNames {
    fn default() -> Self {
        Self {
            verdict: "NodewardUnhealthy".to_owned(),
            network: "LiveNetworkDegraded".to_owned(),
            gpu: "GpuUnhealthy".to_owned(),
            node: "NodewardNodeProblem".to_owned(),
            draining: "NodewardDraining".to_owned(),
        }
    }
}

impl ConditionNames {
    pub fn all(&self) -> [&str; 5] {
        [
            &self.verdict,
            &self.network,
            &self.gpu,
            &self.node,
            &self.draining,
        ]
    }
}

/// A Node condition's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "True" => Some(Self::True),
            "False" => Some(Self::False),
            "Unknown" => Some(Self::Unknown),
            _ => None,
        }
    }
}

/// One condition as the agent wants it on the Node (times are added when patching).
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub type_: String,
    pub status: Status,
    /// One CamelCase word, as the API's conventions ask.
    pub reason: String,
    pub message: String,
    /// The health conditions behind it, (kind, subject): part of what makes a change.
    pub causes: Vec<(String, String)>,
}

impl Desired {
    /// Whether `other` differs in a way worth a patch before the heartbeat.
    pub fn changed_from(&self, other: &Self) -> bool {
        (self.status, &self.reason, &self.causes) != (other.status, &other.reason, &other.causes)
    }
}

/// Which Node condition a health condition's kind belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Network,
    Gpu,
    Node,
}

fn group(kind: &str) -> Group {
    match kind {
        "ContainerRttHigh"
        | "ContainerJitterHigh"
        | "ContainerRetransmitsHigh"
        | "ContainerRtpLossHigh" => Group::Network,
        "GpuLost"
        | "GpuXidCritical"
        | "GpuEccUncorrectable"
        | "GpuRowRemapFailed"
        | "GpuRowRemapPending"
        | "GpuHwSlowdown" => Group::Gpu,
        _ => Group::Node,
    }
}

/// How many causes a message lists before "and N more" (a condition's message is shown whole
/// by `kubectl describe node`).
const LISTED: usize = 5;

fn message_of(causes: &[&Condition]) -> String {
    let mut parts: Vec<String> = causes
        .iter()
        .take(LISTED)
        .map(|c| {
            if c.subject.is_empty() {
                format!("{}: {}", c.kind, c.message)
            } else {
                format!("{} ({}): {}", c.kind, c.subject, c.message)
            }
        })
        .collect();
    if causes.len() > LISTED {
        parts.push(format!("and {} more", causes.len() - LISTED));
    }
    parts.join("; ")
}

fn causes_of(causes: &[&Condition]) -> Vec<(String, String)> {
    causes
        .iter()
        .map(|c| (c.kind.clone(), c.subject.clone()))
        .collect()
}

/// The Node conditions for a published health state.
pub fn desired(published: &Published, names: &ConditionNames) -> Vec<Desired> {
    let report = &published.report;
    let causes: Vec<&Condition> = report.causes().collect();
    let unknown = report.verdict == Verdict::Unknown;
    let mut out = Vec::with_capacity(5);

    let (status, reason) = match report.verdict {
        Verdict::Unknown => (Status::Unknown, "VerdictUnknown"),
        Verdict::Healthy => (Status::False, "Healthy"),
        Verdict::Degraded => (Status::False, "Degraded"),
        Verdict::Unhealthy => (Status::True, "Unhealthy"),
    };
    out.push(Desired {
        type_: names.verdict.clone(),
        status,
        reason: reason.to_owned(),
        message: if unknown {
            format!("nodeward has no verdict yet: {}", report.unknown_reason)
        } else if causes.is_empty() {
            "nodeward: no condition counts against this node".to_owned()
        } else {
            message_of(&causes)
        },
        causes: causes_of(&causes),
    });

    for (g, name) in [
        (Group::Network, &names.network),
        (Group::Gpu, &names.gpu),
        (Group::Node, &names.node),
    ] {
        let mine: Vec<&Condition> = causes
            .iter()
            .copied()
            .filter(|c| group(&c.kind) == g)
            .collect();
        let (status, reason, message) = if unknown {
            (
                Status::Unknown,
                "VerdictUnknown".to_owned(),
                format!("nodeward has no verdict yet: {}", report.unknown_reason),
            )
        } else if let Some(first) = mine.first() {
            (Status::True, first.kind.clone(), message_of(&mine))
        } else {
            (
                Status::False,
                "NoProblem".to_owned(),
                "nodeward: no condition of this kind counts".to_owned(),
            )
        };
        out.push(Desired {
            type_: name.clone(),
            status,
            reason,
            message,
            causes: causes_of(&mine),
        });
    }

    out.push(match &published.drain {
        Some(drain) => Desired {
            type_: names.draining.clone(),
            status: Status::True,
            reason: "DrainRequested".to_owned(),
            message: drain_message(drain),
            causes: Vec::new(),
        },
        None => Desired {
            type_: names.draining.clone(),
            status: Status::False,
            reason: "NotDraining".to_owned(),
            message: "no drain was requested".to_owned(),
            causes: Vec::new(),
        },
    });
    out
}

fn drain_message(drain: &crate::health::drain::Drain) -> String {
    let by = drain
        .requesters
        .first()
        .map(|r| format!(" by {} ({})", r.requested_by, r.reason))
        .unwrap_or_default();
    let deadline = drain.deadline.map_or_else(
        || "no known deadline".to_owned(),
        |d| format!("deadline {}", rfc3339(d)),
    );
    format!("drain requested{by}; {deadline}")
}

/// A time as the API writes it (`2026-01-02T03:04:05Z`).
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests;
