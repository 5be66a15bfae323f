//! gRPC request validation: any request either becomes a domain value within the documented
//! limits or is refused with `INVALID_ARGUMENT` naming the field; none panics.

use std::{collections::HashMap, time::Duration};

use nodeward::api::{
    pb,
    requests::{self, ContainerFilter, DrainAsk, MAX_ID, MAX_LABELS, MAX_NAME, MAX_REASON},
};
use proptest::prelude::*;
use tonic::Code;

use crate::cases;

/// Strings around the limits, in bytes and in characters (multi-byte text is counted by char).
fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,8}",
        (0..max + 3).prop_map(|n| "x".repeat(n)),
        (0..max + 3).prop_map(|n| "é".repeat(n)),
        Just(String::new()),
        Just("   ".to_owned()),
    ]
}

fn invalid(s: &tonic::Status, field: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(s.code(), Code::InvalidArgument);
    prop_assert!(
        s.message().contains(field),
        "{} does not name {field}",
        s.message()
    );
    Ok(())
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn list_containers_filters_are_bounded(
        pod_name in text(MAX_NAME),
        pod_namespace in text(MAX_NAME),
        labels in prop::collection::hash_map(text(MAX_NAME), text(MAX_NAME), 0..MAX_LABELS + 3),
    ) {
        let req = pb::ListContainersRequest {
            pod_name: pod_name.clone(),
            pod_namespace: pod_namespace.clone(),
            label_selector: labels.clone(),
            ..Default::default()
        };
        match ContainerFilter::try_from(req) {
            Ok(f) => {
                prop_assert!(f.pod_name.chars().count() <= MAX_NAME);
                prop_assert!(f.pod_namespace.chars().count() <= MAX_NAME);
                prop_assert!(f.labels.len() <= MAX_LABELS);
                prop_assert!(f.labels.iter().all(|(k, v)| !k.is_empty()
                    && k.chars().count() <= MAX_NAME && v.chars().count() <= MAX_NAME));
                prop_assert_eq!((f.pod_name, f.pod_namespace), (pod_name, pod_namespace));
                prop_assert_eq!(f.labels.len(), labels.len());
            }
            Err(s) => {
                prop_assert_eq!(s.code(), Code::InvalidArgument);
                let too_long = |s: &str| s.chars().count() > MAX_NAME;
                let should_fail = too_long(&pod_name) || too_long(&pod_namespace)
                    || labels.len() > MAX_LABELS
                    || labels.iter().any(|(k, v)| k.is_empty() || too_long(k) || too_long(v));
                prop_assert!(should_fail, "refused a valid filter: {}", s.message());
            }
        }
    }

    #[test]
    fn container_id_is_required_and_bounded(id in text(MAX_ID)) {
        let n = id.chars().count();
        match requests::container_id(pb::GetContainerNetworkRequest { container_id: id.clone() }) {
            Ok(got) => prop_assert!(got == id && n > 0 && n <= MAX_ID),
            Err(s) => {
                invalid(&s, "container_id")?;
                prop_assert!(n == 0 || n > MAX_ID);
            }
        }
    }

    #[test]
    fn heartbeat_is_default_or_one_second_to_an_hour(seconds in any::<u32>()) {
        let req = pb::WatchNodeHealthRequest { heartbeat_seconds: seconds };
        let default = Duration::from_secs(15);
        match requests::heartbeat(&req, default) {
            Ok(d) if seconds == 0 => prop_assert_eq!(d, default),
            Ok(d) => prop_assert!(seconds <= 3600 && d == Duration::from_secs(u64::from(seconds))),
            Err(s) => {
                invalid(&s, "heartbeat_seconds")?;
                prop_assert!(seconds > 3600);
            }
        }
    }

    #[test]
    fn drain_requests_need_a_requester_and_a_sane_deadline(
        requested_by in text(MAX_ID),
        reason in text(MAX_REASON),
        deadline_seconds in prop_oneof![any::<i64>(), -2i64..700_000],
    ) {
        let begin = pb::BeginDrainRequest {
            requested_by: requested_by.clone(),
            reason: reason.clone(),
            deadline_seconds,
        };
        let cancel = pb::CancelDrainRequest { requested_by: requested_by.clone(), reason: reason.clone() };
        let requester_ok = !requested_by.trim().is_empty()
            && requested_by.chars().count() <= MAX_ID
            && reason.chars().count() <= MAX_REASON;
        prop_assert_eq!(DrainAsk::try_from(cancel).is_ok(), requester_ok);
        match DrainAsk::try_from(begin) {
            Ok(ask) => {
                prop_assert!(requester_ok && deadline_seconds >= 0);
                let want = (deadline_seconds > 0).then(|| Duration::from_secs(deadline_seconds.unsigned_abs()));
                prop_assert_eq!(ask.deadline, want);
            }
            Err(s) => {
                prop_assert_eq!(s.code(), Code::InvalidArgument);
                if requester_ok {
                    invalid(&s, "deadline_seconds")?;
                }
            }
        }
    }
}

#[test]
fn the_label_limit_is_exact() {
    let labels = |n: usize| -> HashMap<String, String> {
        (0..n).map(|i| (format!("k{i}"), "v".to_owned())).collect()
    };
    let req = |n| pb::ListContainersRequest {
        label_selector: labels(n),
        ..Default::default()
    };
    assert!(ContainerFilter::try_from(req(MAX_LABELS)).is_ok());
    assert!(ContainerFilter::try_from(req(MAX_LABELS + 1)).is_err());
}
