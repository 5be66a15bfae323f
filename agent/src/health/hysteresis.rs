//! Hold and recovery times: a cause becomes a firing condition only after it has lasted the
//! hold time, and a fired condition clears only after its cause has stayed away for the
//! (longer) recovery time. Keyed by (rule, subject), so one container's trouble does not hide
//! another's.

use std::{collections::BTreeMap, time::SystemTime};

use super::{rules::Observation, Condition, ConditionStatus};
use crate::store::clock::elapsed;

#[derive(Debug, Clone)]
struct Tracked {
    last: Observation,
    status: ConditionStatus,
    since: SystemTime,
    last_transition: SystemTime,
    /// When the cause was last absent-after-present (start of recovery).
    gone_at: Option<SystemTime>,
}

/// Remembers every live condition between evaluations.
#[derive(Debug, Default)]
pub struct Tracker {
    live: BTreeMap<(&'static str, String), Tracked>,
}

impl Tracker {
    /// Folds this evaluation's observations in and returns every live condition.
    pub fn update(
        &mut self,
        observations: Vec<Observation>,
        now: SystemTime,
        hold: std::time::Duration,
        recovery: std::time::Duration,
    ) -> Vec<Condition> {
        let mut seen = std::collections::BTreeSet::new();
        for obs in observations {
            let key = (obs.kind, obs.subject.clone());
            seen.insert(key.clone());
            let fire_now = obs.immediate || hold.is_zero();
            match self.live.get_mut(&key) {
                None => {
                    let status = if fire_now {
                        ConditionStatus::Firing
                    } else {
                        ConditionStatus::Pending
                    };
                    self.live.insert(
                        key,
                        Tracked {
                            last: obs,
                            status,
                            since: now,
                            last_transition: now,
                            gone_at: None,
                        },
                    );
                }
                Some(t) => {
                    t.last = obs;
                    t.gone_at = None;
                    let next = match t.status {
                        ConditionStatus::Pending if fire_now || elapsed(t.since, now) >= hold => {
                            ConditionStatus::Firing
                        }
                        ConditionStatus::Pending => ConditionStatus::Pending,
                        ConditionStatus::Firing | ConditionStatus::Recovering => {
                            ConditionStatus::Firing
                        }
                    };
                    if next != t.status {
                        t.status = next;
                        t.last_transition = now;
                    }
                }
            }
        }
        self.live.retain(|key, t| {
            if seen.contains(key) {
                return true;
            }
            match t.status {
                // A cause that went away before its hold time never counted.
                ConditionStatus::Pending => false,
                ConditionStatus::Firing => {
                    t.status = ConditionStatus::Recovering;
                    t.last_transition = now;
                    t.gone_at = Some(now);
                    !recovery.is_zero()
                }
                ConditionStatus::Recovering => {
                    let gone = t.gone_at.unwrap_or(now);
                    elapsed(gone, now) < recovery
                }
            }
        });
        self.live
            .values()
            .map(|t| Condition {
                kind: t.last.kind.to_owned(),
                status: t.status,
                severity: t.last.severity,
                reason: t.last.reason.to_owned(),
                message: t.last.message.clone(),
                subject: t.last.subject.clone(),
                evidence: t.last.evidence.clone(),
                since: t.since,
                last_transition: t.last_transition,
            })
            .collect()
    }
}
