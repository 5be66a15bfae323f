//! One node's line of the fleet table, its order (worst first) and its JSON form.

use std::fmt::Write as _;

use serde::Serialize;

use super::targets::{Absent, Target};
use crate::api::pb;

/// A node's verdict as the fleet sees it. The order is the table's: worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FleetVerdict {
    /// The agent did not answer (connection refused, TLS refused, timed out).
    Unreachable,
    Unhealthy,
    Degraded,
    /// The agent answered but cannot tell yet (not every source has reported).
    Unknown,
    Healthy,
}

impl FleetVerdict {
    fn from_pb(v: i32) -> Self {
        match pb::Verdict::try_from(v) {
            Ok(pb::Verdict::Healthy) => Self::Healthy,
            Ok(pb::Verdict::Degraded) => Self::Degraded,
            Ok(pb::Verdict::Unhealthy) => Self::Unhealthy,
            Ok(pb::Verdict::Unknown | pb::Verdict::Unspecified) | Err(_) => Self::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unreachable => "UNREACHABLE",
            Self::Unhealthy => "UNHEALTHY",
            Self::Degraded => "DEGRADED",
            Self::Unknown => "UNKNOWN",
            Self::Healthy => "HEALTHY",
        }
    }
}

/// A condition behind the verdict (the report's `causes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    #[serde(rename = "type")]
    pub kind: String,
    pub reason: String,
    pub subject: String,
    pub message: String,
}

/// One node. Field names are the `--json` output's, documented in docs/fleet.md.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// The node name the agent reports; for an agent that did not answer, the name the list
    /// gives, else its address.
    pub node: String,
    /// The kubeconfig context the node was found in, when several were asked (absent from
    /// the JSON otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// `host:port` it was asked at ("" for a node without an agent to ask).
    pub address: String,
    pub verdict: FleetVerdict,
    pub reasons: Vec<Reason>,
    /// Why the verdict is UNKNOWN, as the agent says ("" otherwise).
    pub unknown_reason: String,
    pub draining: bool,
    pub ready_to_drain: bool,
    pub live_streams: u32,
    pub viewers: u32,
    pub containers: usize,
    /// Why the agent did not answer (`null` when it did).
    pub error: Option<String>,
}

impl Row {
    pub fn answered(
        target: &Target,
        health: &pb::GetNodeHealthResponse,
        drain: &pb::GetDrainStatusResponse,
        containers: &pb::ListContainersResponse,
    ) -> Self {
        let report = health.health.clone().unwrap_or_default();
        let node = if report.node.is_empty() {
            target.label()
        } else {
            report.node.clone()
        };
        Self {
            node,
            context: target.context.clone(),
            address: target.address(),
            verdict: FleetVerdict::from_pb(report.verdict),
            reasons: report
                .causes
                .iter()
                .map(|c| Reason {
                    kind: c.r#type.clone(),
                    reason: c.reason.clone(),
                    subject: c.subject.clone(),
                    message: c.message.clone(),
                })
                .collect(),
            unknown_reason: report.unknown_reason.clone(),
            draining: report
                .drain
                .as_ref()
                .is_some_and(|d| d.state == pb::DrainState::Draining as i32),
            ready_to_drain: drain.ready_to_drain,
            live_streams: drain.live_streams,
            viewers: drain.viewers,
            containers: containers.containers.len(),
            error: None,
        }
    }

    pub fn unreachable(target: &Target, error: String) -> Self {
        Self::without_answer(
            target.label(),
            target.context.clone(),
            target.address(),
            error,
        )
    }

    /// A node without an agent to ask (or a context that did not answer): `UNREACHABLE`, with
    /// why.
    pub fn absent(absent: &Absent) -> Self {
        Self::without_answer(
            absent.node.clone(),
            absent.context.clone(),
            String::new(),
            absent.error.clone(),
        )
    }

    /// An `UNREACHABLE` row: nothing the agent would have said, only why it did not.
    fn without_answer(
        node: String,
        context: Option<String>,
        address: String,
        error: String,
    ) -> Self {
        Self {
            node,
            context,
            address,
            verdict: FleetVerdict::Unreachable,
            reasons: Vec::new(),
            unknown_reason: String::new(),
            draining: false,
            ready_to_drain: false,
            live_streams: 0,
            viewers: 0,
            containers: 0,
            error: Some(error),
        }
    }

    /// The REASONS cell: the causes' `type(subject)`, the unknown reason, or the error.
    fn reasons_cell(&self) -> String {
        if let Some(e) = &self.error {
            return e.clone();
        }
        if !self.reasons.is_empty() {
            let all: Vec<String> = self
                .reasons
                .iter()
                .map(|r| {
                    if r.subject.is_empty() || r.subject == "node" {
                        r.kind.clone()
                    } else {
                        format!("{}({})", r.kind, r.subject)
                    }
                })
                .collect();
            return all.join(", ");
        }
        if self.unknown_reason.is_empty() {
            "-".to_owned()
        } else {
            self.unknown_reason.clone()
        }
    }

    fn drain_cell(&self) -> String {
        if self.error.is_some() {
            return "-".to_owned();
        }
        let state = match (self.draining, self.ready_to_drain) {
            (false, _) => "no",
            (true, false) => "draining",
            (true, true) => "drained",
        };
        format!("{state}/{}", self.live_streams)
    }
}

/// Worst verdict first, then by node name.
pub fn sort(rows: &mut [Row]) {
    rows.sort_by(|a, b| a.verdict.cmp(&b.verdict).then_with(|| a.node.cmp(&b.node)));
}

/// The table: [CONTEXT,] NODE, VERDICT, DRAINING/STREAMS, CONTAINERS, REASONS (last, as it is
/// the widest). CONTEXT only when some row has one (several contexts were asked).
pub fn table(rows: &[Row]) -> String {
    let with_context = rows.iter().any(|r| r.context.is_some());
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut c = Vec::with_capacity(6);
            if with_context {
                c.push(r.context.clone().unwrap_or_else(|| "-".to_owned()));
            }
            c.push(if r.node.is_empty() {
                "-".to_owned()
            } else {
                r.node.clone()
            });
            c.push(r.verdict.as_str().to_owned());
            c.push(r.drain_cell());
            c.push(if r.error.is_some() {
                "-".to_owned()
            } else {
                r.containers.to_string()
            });
            c.push(r.reasons_cell());
            c
        })
        .collect();
    let mut head: Vec<String> = Vec::new();
    if with_context {
        head.push("CONTEXT".to_owned());
    }
    head.extend(
        [
            "NODE",
            "VERDICT",
            "DRAINING/STREAMS",
            "CONTAINERS",
            "REASONS",
        ]
        .map(str::to_owned),
    );
    let mut width: Vec<usize> = head.iter().map(String::len).collect();
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&head).chain(&cells) {
        let last = row.len() - 1;
        for (i, (c, w)) in row.iter().zip(&width).enumerate() {
            if i == last {
                out.push_str(c);
            } else {
                let _ = write!(out, "{c:<w$}  ");
            }
        }
        out.push('\n');
    }
    out
}

/// A summary line: how many nodes of each verdict.
pub fn summary(rows: &[Row]) -> String {
    let count = |v: FleetVerdict| rows.iter().filter(|r| r.verdict == v).count();
    let parts: Vec<String> = [
        FleetVerdict::Unreachable,
        FleetVerdict::Unhealthy,
        FleetVerdict::Degraded,
        FleetVerdict::Unknown,
        FleetVerdict::Healthy,
    ]
    .into_iter()
    .filter(|v| count(*v) > 0)
    .map(|v| format!("{} {}", count(v), v.as_str().to_lowercase()))
    .collect();
    format!("{} nodes: {}", rows.len(), parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(node: &str) -> Target {
        Target {
            host: "10.0.0.1".into(),
            port: 1,
            node: Some(node.into()),
            context: None,
        }
    }

    fn answered(node: &str, verdict: pb::Verdict, causes: &[&str]) -> Row {
        let health = pb::GetNodeHealthResponse {
            health: Some(pb::NodeHealthReport {
                node: node.into(),
                verdict: verdict as i32,
                causes: causes
                    .iter()
                    .map(|t| pb::Condition {
                        r#type: (*t).into(),
                        subject: "node".into(),
                        ..Default::default()
                    })
                    .collect(),
                drain: Some(pb::DrainInfo {
                    state: pb::DrainState::Draining as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            node_stats: None,
        };
        let drain = pb::GetDrainStatusResponse {
            live_streams: 3,
            ..Default::default()
        };
        let containers = pb::ListContainersResponse {
            containers: vec![pb::Container::default(); 2],
        };
        Row::answered(&target("listed"), &health, &drain, &containers)
    }

    #[test]
    fn rows_sort_worst_first_and_unreachable_rows_stay() {
        let mut rows = vec![
            answered("b", pb::Verdict::Healthy, &[]),
            answered("a", pb::Verdict::Healthy, &[]),
            answered("c", pb::Verdict::Degraded, &["ContainerRttHigh"]),
            Row::unreachable(&target("d"), "connection refused".into()),
            answered("e", pb::Verdict::Unknown, &[]),
            answered("f", pb::Verdict::Unhealthy, &["GpuXidCritical"]),
        ];
        sort(&mut rows);
        let order: Vec<&str> = rows.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(order, ["d", "f", "c", "e", "a", "b"]);
        let text = table(&rows);
        let d = text.lines().nth(1).expect("ok");
        assert!(
            d.contains("UNREACHABLE") && d.contains("connection refused"),
            "{text}"
        );
        assert!(text.lines().nth(2).expect("ok").contains("GpuXidCritical"));
        assert_eq!(
            summary(&rows),
            "6 nodes: 1 unreachable, 1 unhealthy, 1 degraded, 1 unknown, 2 healthy"
        );
    }

    #[test]
    fn an_answer_fills_the_row_from_the_agent_not_the_list() {
        let r = answered("reported", pb::Verdict::Healthy, &[]);
        assert_eq!(r.node, "reported");
        assert!(r.draining);
        assert_eq!((r.live_streams, r.containers), (3, 2));
        assert_eq!(r.drain_cell(), "draining/3");
    }

    #[test]
    fn a_context_column_and_field_appear_only_when_rows_have_contexts() {
        let plain = vec![Row::unreachable(&target("d"), "refused".into())];
        assert!(table(&plain).starts_with("NODE "), "{}", table(&plain));
        let mut t = target("d");
        t.context = Some("west".into());
        let rows = vec![
            Row::unreachable(&t, "refused".into()),
            Row::absent(&Absent {
                node: String::new(),
                context: Some("east".into()),
                error: "context east: connection refused".into(),
            }),
        ];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("CONTEXT  NODE "), "{text}");
        assert!(lines[1].starts_with("west     d "), "{text}");
        assert!(
            lines[2].starts_with("east     -     UNREACHABLE")
                && lines[2].ends_with("context east: connection refused"),
            "{text}"
        );
        let v = serde_json::to_value(&rows[0]).expect("ok");
        assert_eq!(v["context"], "west");
    }

    #[test]
    fn json_field_names_are_stable() {
        let r = Row::unreachable(&target("d"), "refused".into());
        let v = serde_json::to_value(&r).expect("ok");
        let keys: Vec<&String> = v.as_object().expect("ok").keys().collect();
        assert_eq!(
            keys,
            [
                "address",
                "containers",
                "draining",
                "error",
                "live_streams",
                "node",
                "ready_to_drain",
                "reasons",
                "unknown_reason",
                "verdict",
                "viewers"
            ]
        );
        assert_eq!(v["verdict"], "UNREACHABLE");
    }
}
