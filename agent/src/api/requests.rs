//! Requests validated into domain values (`TryFrom`), with the `INVALID_ARGUMENT` message each
//! bad field gets. Limits keep one request from costing the agent much.

use std::{collections::BTreeMap, time::Duration};

use tonic::Status;

use super::{drain::MAX_DEADLINE_SECONDS, pb};

/// Longest pod name, namespace, label key or value accepted in a filter (Kubernetes' own limit
/// for names is 253).
pub const MAX_NAME: usize = 253;
/// Most labels in one selector.
pub const MAX_LABELS: usize = 32;
/// Longest container id, `requested_by`.
pub const MAX_ID: usize = 256;
/// Longest drain reason.
pub const MAX_REASON: usize = 1024;

fn too_long(field: &str, max: usize, got: usize) -> Status {
    Status::invalid_argument(format!(
        "{field} is {got} characters long; at most {max} are allowed"
    ))
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), Status> {
    let n = value.chars().count();
    if n > max {
        Err(too_long(field, max, n))
    } else {
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerFilter {
    pub pod_name: String,
    pub pod_namespace: String,
    pub labels: BTreeMap<String, String>,
    /// `selector`, parsed (`kubectl -l` syntax).
    pub selector: crate::containers::selector::Selector,
}

/// Longest `ListContainersRequest.selector`.
const MAX_SELECTOR: usize = 4096;

impl TryFrom<pb::ListContainersRequest> for ContainerFilter {
    type Error = Status;
    fn try_from(r: pb::ListContainersRequest) -> Result<Self, Status> {
        check_len("pod_name", &r.pod_name, MAX_NAME)?;
        check_len("pod_namespace", &r.pod_namespace, MAX_NAME)?;
        if r.label_selector.len() > MAX_LABELS {
            return Err(Status::invalid_argument(format!(
                "label_selector has {} entries; at most {MAX_LABELS} are allowed",
                r.label_selector.len()
            )));
        }
        for (k, v) in &r.label_selector {
            if k.is_empty() {
                return Err(Status::invalid_argument("label_selector has an empty key"));
            }
            check_len("a label_selector key", k, MAX_NAME)?;
            check_len("a label_selector value", v, MAX_NAME)?;
        }
        check_len("selector", &r.selector, MAX_SELECTOR)?;
        let selector = crate::containers::selector::Selector::parse(&r.selector)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Self {
            pod_name: r.pod_name,
            pod_namespace: r.pod_namespace,
            labels: r.label_selector.into_iter().collect(),
            selector,
        })
    }
}

/// A container id from `GetContainerNetwork`.
pub fn container_id(r: pb::GetContainerNetworkRequest) -> Result<String, Status> {
    if r.container_id.is_empty() {
        return Err(Status::invalid_argument("container_id is required"));
    }
    check_len("container_id", &r.container_id, MAX_ID)?;
    Ok(r.container_id)
}

/// The heartbeat a watcher asked for, or the server's default.
pub fn heartbeat(r: &pb::WatchNodeHealthRequest, default: Duration) -> Result<Duration, Status> {
    match r.heartbeat_seconds {
        0 => Ok(default),
        s @ 1..=3600 => Ok(Duration::from_secs(u64::from(s))),
        s => Err(Status::invalid_argument(format!(
            "heartbeat_seconds is {s}; it must be 0 (server default) or 1 to 3600"
        ))),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DrainAsk {
    pub requested_by: String,
    pub reason: String,
    /// `None`: the server's default.
    pub deadline: Option<Duration>,
}

/// Text that is logged as given: a newline or another control character in it could forge a
/// log line in the plain format, so it is refused rather than escaped (the caller learns, and
/// the drain record says exactly what was asked). U+2028/U+2029 end lines in some viewers.
fn check_printable(field: &str, value: &str) -> Result<(), Status> {
    match value
        .chars()
        .enumerate()
        .find(|(_, c)| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    {
        Some((at, c)) => Err(Status::invalid_argument(format!(
            "{field} contains the control character U+{:04X} at character {at}; newlines and \
             control characters are not allowed, as {field} is written to the log",
            u32::from(c)
        ))),
        None => Ok(()),
    }
}

fn requester(requested_by: &str, reason: &str) -> Result<(), Status> {
    if requested_by.trim().is_empty() {
        return Err(Status::invalid_argument(
            "requested_by is required (who asks, e.g. \"rollout-controller/cluster-a\")",
        ));
    }
    check_len("requested_by", requested_by, MAX_ID)?;
    check_len("reason", reason, MAX_REASON)?;
    check_printable("requested_by", requested_by)?;
    check_printable("reason", reason)
}

impl TryFrom<pb::BeginDrainRequest> for DrainAsk {
    type Error = Status;
    fn try_from(r: pb::BeginDrainRequest) -> Result<Self, Status> {
        requester(&r.requested_by, &r.reason)?;
        let deadline = match r.deadline_seconds {
            0 => None,
            s if s < 0 => {
                return Err(Status::invalid_argument(format!(
                    "deadline_seconds is {s}; it must not be negative (0 = server default)"
                )))
            }
            s if s > MAX_DEADLINE_SECONDS => {
                return Err(Status::invalid_argument(format!(
                    "deadline_seconds is {s}; at most {MAX_DEADLINE_SECONDS} (7 days) is allowed"
                )))
            }
            s => Some(Duration::from_secs(s.unsigned_abs())),
        };
        Ok(Self {
            requested_by: r.requested_by,
            reason: r.reason,
            deadline,
        })
    }
}

impl TryFrom<pb::CancelDrainRequest> for DrainAsk {
    type Error = Status;
    fn try_from(r: pb::CancelDrainRequest) -> Result<Self, Status> {
        requester(&r.requested_by, &r.reason)?;
        Ok(Self {
            requested_by: r.requested_by,
            reason: r.reason,
            deadline: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_and_huge_deadlines_are_invalid_zero_is_default() {
        let r = |s| pb::BeginDrainRequest {
            requested_by: "ctl".into(),
            reason: String::new(),
            deadline_seconds: s,
        };
        let e = DrainAsk::try_from(r(-5)).expect_err("negative");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("negative"), "{}", e.message());
        assert!(DrainAsk::try_from(r(MAX_DEADLINE_SECONDS + 1)).is_err());
        assert_eq!(DrainAsk::try_from(r(0)).expect("0 is fine").deadline, None);
        assert_eq!(
            DrainAsk::try_from(r(90)).expect("90 s").deadline,
            Some(Duration::from_secs(90))
        );
    }

    #[test]
    fn missing_requester_and_oversized_filters_are_invalid() {
        let e = DrainAsk::try_from(pb::CancelDrainRequest::default()).expect_err("no requester");
        assert!(e.message().contains("requested_by"), "{}", e.message());
        let mut req = pb::ListContainersRequest::default();
        for i in 0..=MAX_LABELS {
            req.label_selector.insert(format!("k{i}"), "v".into());
        }
        let e = ContainerFilter::try_from(req).expect_err("too many labels");
        assert!(e.message().contains("label_selector"), "{}", e.message());
        let req = pb::ListContainersRequest {
            pod_name: "x".repeat(MAX_NAME + 1),
            ..Default::default()
        };
        assert!(ContainerFilter::try_from(req)
            .expect_err("long")
            .message()
            .contains("pod_name"));
    }

    #[test]
    fn control_characters_in_requester_and_reason_are_invalid_and_named() {
        let begin = |by: &str, reason: &str| pb::BeginDrainRequest {
            requested_by: by.into(),
            reason: reason.into(),
            deadline_seconds: 0,
        };
        let forged = "ctl\n2026-12-07T07:00:00Z  INFO nodeward: drain cancelled";
        for (req, field, code) in [
            (begin(forged, ""), "requested_by", "U+000A"),
            (begin("ctl", "upgrade\r\nfake"), "reason", "U+000D"),
            (begin("ctl", "a\u{1b}[2Jb"), "reason", "U+001B"),
            (begin("ctl\u{0}", ""), "requested_by", "U+0000"),
            (begin("ctl", "tab\there"), "reason", "U+0009"),
            (begin("ctl", "line\u{2028}sep"), "reason", "U+2028"),
            (begin("ctl", "c1\u{85}next"), "reason", "U+0085"),
        ] {
            let e = DrainAsk::try_from(req).expect_err(code);
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(
                e.message().starts_with(field) && e.message().contains(code),
                "{field} {code}: {}",
                e.message()
            );
        }
        let cancel = pb::CancelDrainRequest {
            requested_by: "ctl".into(),
            reason: "done\nINFO forged".into(),
        };
        let e = DrainAsk::try_from(cancel).expect_err("cancel too");
        assert!(e.message().starts_with("reason"), "{}", e.message());

        let ok = DrainAsk::try_from(begin(
            "rollout-controller/cluster-a",
            "kernel 6.8 — ünïcode ok",
        ))
        .expect("printable text, Unicode included");
        assert_eq!(ok.reason, "kernel 6.8 — ünïcode ok");
        let e = DrainAsk::try_from(begin("ctl", &"r".repeat(MAX_REASON + 1)))
            .expect_err("reason is bounded");
        assert!(e.message().contains("reason"), "{}", e.message());
    }
}
