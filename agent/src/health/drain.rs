//! The drain handshake's state: who asked for a drain, why, and until when to wait for live
//! streams. Idempotent so that several controllers can call it: a second `begin` joins the drain
//! in progress (its deadline is kept), a `cancel` without a drain is not an error.
//!
//! The state outlives the agent ([`state`]): every change is written to the state file, and
//! [`DrainController::open`] restores it at start, with the same deadline, requesters and
//! start time. A state file that cannot be read is moved aside, logged at ERROR and reported as
//! a `DrainState` condition, and the node is then held as *draining and not ready, with no
//! known deadline* until a caller cancels the drain or begins a new one: the agent never says
//! "not draining" or "ready" from a state it could not read.
//!
//! Deadlines are checked on the monotonic clock ([`Clock::monotonic`]) within a run, so a step
//! of the wall clock cannot end or extend a drain. Across a restart the wall-clock deadline in
//! the file is all there is: the time left is taken as `deadline - now` at start, never more
//! than the drain's original length (a clock stepped back cannot stretch it), and a deadline
//! already behind the wall clock is passed.
//!
//! Bounded: the first `drain.max_requesters` callers are listed, later joins are counted.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

use super::streams::{ListedStream, StreamPolicy};
use crate::store::{clock::elapsed, Clock, FeedState, Snapshot, SourceStatus, Viewer};

pub mod config;
pub mod state;

pub use config::DrainConfig;

/// The longest deadline a caller may ask for: 7 days, in seconds.
pub const MAX_DEADLINE_SECONDS: i64 = 7 * 24 * 3600;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    pub requested_by: String,
    pub identity: String,
    pub reason: String,
    pub at: SystemTime,
}

/// A drain in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drain {
    /// The first callers, first first (at most `drain.max_requesters`).
    pub requesters: Vec<Requester>,
    /// Joins by callers who were not listed because the list was full.
    pub requesters_not_kept: u64,
    pub started: SystemTime,
    /// When the drain may proceed with streams left; `None` when the state could not be read
    /// (then it never may, until a caller decides).
    pub deadline: Option<SystemTime>,
    /// Set when this drain stands in for a state file that could not be read: why, and where
    /// the file was moved.
    pub problem: Option<String>,
}

/// Live streams of one container, for the drain status.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerStreams {
    pub container_id: String,
    pub established_connections: u32,
    /// Of `streams`, those the drain waits for ([`StreamPolicy::holds_drain`]), counted
    /// exactly.
    pub live_streams: u32,
    /// The oldest of them, dependencies (outbound) included, as many as the reply's budget
    /// left, each saying whether it holds the drain.
    pub streams: Vec<ListedStream>,
    /// Remote hosts it served within `drain.viewer_idle` ([`StreamPolicy::is_viewing`]),
    /// counted exactly.
    pub viewers: u32,
    /// The most recent of them, as many as the reply's viewer budget left.
    pub viewer_list: Vec<Viewer>,
}

/// The drain's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainProgress {
    pub drain: Option<Drain>,
    /// Containers with at least one live stream or dependency.
    pub containers: Vec<ContainerStreams>,
    /// Streams the drain waits for on the node, summed over `containers` (exact, whatever
    /// was listed).
    pub live_streams: u32,
    /// Viewers on the node, summed over `containers` (exact, whatever was listed).
    pub viewers: u32,
    /// Whether some streams or viewers were left out of `containers` (`drain.max_streams_listed`).
    pub truncated: bool,
    /// Whether every enabled network feed has reported since it started, is fresh and can see,
    /// so that the counts mean something.
    pub streams_known: bool,
    pub ready: bool,
    pub ready_reason: String,
    pub evaluated_at: SystemTime,
}

/// A problem with the drain state that the health report shows as a `DrainState` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateProblem {
    /// `Unreadable` or `NotSaved`.
    pub reason: &'static str,
    pub message: String,
    pub since: SystemTime,
}

/// What the controller needs besides the clock.
#[derive(Debug, Clone)]
pub struct DrainSettings {
    pub max_requesters: usize,
    pub max_streams_listed: usize,
    /// `health.source_stale_after`: a network report older than this does not count.
    pub stale_after: Duration,
    /// Where the state is kept; `None` keeps it in memory only (tests).
    pub state_file: Option<PathBuf>,
    /// Which streams the drain waits for (`drain.wait_for_outbound`, `drain.viewer_idle`).
    pub policy: StreamPolicy,
    /// `drain.exclude_containers`: container ids or pod names (exact) whose streams and viewers
    /// never hold the drain and are not listed.
    pub exclude_containers: Vec<String>,
}

impl Default for DrainSettings {
    fn default() -> Self {
        let c = DrainConfig::default();
        Self {
            max_requesters: c.max_requesters,
            max_streams_listed: c.max_streams_listed,
            stale_after: super::HealthConfig::default().source_stale_after,
            state_file: None,
            policy: c.policy(),
            exclude_containers: c.exclude_containers,
        }
    }
}

/// The drain and the monotonic reading at which its deadline passes.
#[derive(Debug, Clone)]
struct Held {
    drain: Drain,
    /// `None`: no deadline (an unreadable state).
    deadline_mono: Option<Duration>,
}

#[derive(Debug, Default)]
struct State {
    held: Option<Held>,
    /// The last save failed (and why); cleared by the next save that works.
    save_error: Option<StateProblem>,
}

/// Holds the drain state; cheap to clone. Changes are announced on a watch channel so health
/// messages show DRAINING at once, not at the next tick.
#[derive(Debug, Clone)]
pub struct DrainController {
    state: Arc<Mutex<State>>,
    changes: watch::Sender<u64>,
    clock: Arc<dyn Clock>,
    settings: Arc<DrainSettings>,
}

impl DrainController {
    /// A controller that keeps its state in memory only, with default bounds.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self::with_settings(clock, DrainSettings::default())
    }

    /// A controller that keeps its state in memory only (unless `settings.state_file` is set,
    /// in which case changes are saved there but nothing is restored: see [`Self::open`]).
    pub fn with_settings(clock: Arc<dyn Clock>, settings: DrainSettings) -> Self {
        Self {
            state: Arc::new(Mutex::new(State::default())),
            changes: watch::Sender::new(0),
            clock,
            settings: Arc::new(DrainSettings {
                max_requesters: settings.max_requesters.max(1),
                ..settings
            }),
        }
    }

    /// A controller that restores the drain kept in `settings.state_file` (see the module's
    /// doc for an unreadable file and for the deadline across the restart).
    pub fn open(clock: Arc<dyn Clock>, settings: DrainSettings) -> Self {
        let c = Self::with_settings(clock, settings);
        let Some(path) = c.settings.state_file.clone() else {
            return c;
        };
        let (now, mono) = (c.clock.now(), c.clock.monotonic());
        let held = match state::load(&path, now) {
            state::Loaded::Idle => None,
            state::Loaded::Draining(drain) => {
                let deadline = drain.deadline.unwrap_or(now);
                let length = elapsed(drain.started, deadline);
                let left = elapsed(now, deadline).min(length);
                tracing::info!(
                    path = %path.display(),
                    requesters = drain.requesters.len(),
                    left = %humantime::format_duration(Duration::from_secs(left.as_secs())),
                    "drain restored from the state file"
                );
                Some(Held {
                    drain,
                    deadline_mono: Some(mono + left),
                })
            }
            state::Loaded::Unreadable { reason, moved_to } => {
                let moved = moved_to.map_or_else(
                    || "it could not be moved aside".to_owned(),
                    |p| format!("moved to {}", p.display()),
                );
                tracing::error!(
                    path = %path.display(),
                    error = %reason,
                    moved,
                    "the drain state file cannot be read; the node is held as draining and not \
                     ready until a caller cancels the drain or begins a new one"
                );
                Some(Held {
                    drain: Drain {
                        requesters: Vec::new(),
                        requesters_not_kept: 0,
                        started: now,
                        deadline: None,
                        problem: Some(format!(
                            "the drain state file {} could not be read ({reason}); {moved}",
                            path.display()
                        )),
                    },
                    deadline_mono: None,
                })
            }
        };
        c.lock().held = held;
        c
    }

    /// Ticks once per change of the drain state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn current(&self) -> Option<Drain> {
        self.lock().held.as_ref().map(|h| h.drain.clone())
    }

    /// The `DrainState` conditions: an unreadable state at start, a failed save.
    pub fn problems(&self) -> Vec<StateProblem> {
        let g = self.lock();
        let unreadable = g.held.as_ref().and_then(|h| {
            h.drain.problem.as_ref().map(|p| StateProblem {
                reason: "Unreadable",
                message: format!(
                    "{p}; the node is held as draining and not ready until a caller cancels \
                     the drain or begins a new one"
                ),
                since: h.drain.started,
            })
        });
        unreadable.into_iter().chain(g.save_error.clone()).collect()
    }

    /// Starts a drain, or joins the one in progress. Returns the drain and whether one was
    /// already in progress. A drain held for an unreadable state is replaced by this one.
    pub fn begin(&self, requester: Requester, deadline: Duration) -> (Drain, bool) {
        let (now, mono) = (self.clock.now(), self.clock.monotonic());
        let requester = Requester {
            at: now,
            ..requester
        };
        let mut g = self.lock();
        let (out, changed) = match g.held.as_mut() {
            Some(h) if h.drain.problem.is_none() => {
                let d = &mut h.drain;
                let known = d.requesters.iter().any(|r| {
                    r.requested_by == requester.requested_by && r.identity == requester.identity
                });
                let changed = if known {
                    false
                } else if d.requesters.len() < self.settings.max_requesters {
                    d.requesters.push(requester);
                    true
                } else {
                    // Counted, not saved at once: the count is written with the next change,
                    // so that a flood of joins costs no disk writes.
                    d.requesters_not_kept += 1;
                    false
                };
                ((d.clone(), true), changed)
            }
            replaced => {
                let already = replaced.is_some();
                let d = Drain {
                    requesters: vec![requester],
                    requesters_not_kept: 0,
                    started: now,
                    deadline: Some(now + deadline),
                    problem: None,
                };
                g.held = Some(Held {
                    drain: d.clone(),
                    deadline_mono: Some(mono + deadline),
                });
                ((d, already), true)
            }
        };
        if changed {
            self.save(&mut g);
        }
        drop(g);
        self.changes.send_modify(|n| *n += 1);
        out
    }

    /// Ends the drain; returns whether one was in progress.
    pub fn cancel(&self) -> bool {
        let mut g = self.lock();
        let was = g.held.take().is_some();
        if was {
            self.save(&mut g);
        }
        drop(g);
        if was {
            self.changes.send_modify(|n| *n += 1);
        }
        was
    }

    /// Writes the state file (under the lock, so that writes land in the order of changes).
    fn save(&self, g: &mut State) {
        let Some(path) = &self.settings.state_file else {
            return;
        };
        let bytes = state::render(g.held.as_ref().map(|h| &h.drain));
        match state::save(path, &bytes) {
            Ok(()) => g.save_error = None,
            Err(e) => {
                tracing::error!(error = %e, "the drain state could not be saved; a restart of the agent would lose this change");
                g.save_error = Some(StateProblem {
                    reason: "NotSaved",
                    message: format!(
                        "{e}; a restart of the agent would not restore the current drain state"
                    ),
                    since: self.clock.now(),
                });
            }
        }
    }

    /// The drain's progress against the live streams in `snapshot`.
    pub fn progress(&self, snapshot: &Snapshot) -> DrainProgress {
        let (now, mono) = (self.clock.now(), self.clock.monotonic());
        let held = self.lock().held.clone();
        let unknown = self.unknown_streams(snapshot, now);
        let streams_known = unknown.is_none();
        let policy = &self.settings.policy;
        let mut budget = self.settings.max_streams_listed;
        let mut viewer_budget = self.settings.max_streams_listed;
        let mut truncated = false;
        let containers: Vec<ContainerStreams> = snapshot
            .network
            .iter()
            .flat_map(|net| net.containers.iter())
            .filter(|(id, _)| !self.excluded(snapshot, id))
            .filter_map(|(id, c)| {
                let viewing: Vec<&Viewer> = policy.viewing(&c.viewers, now).collect();
                if c.streams.is_empty() && viewing.is_empty() {
                    return None;
                }
                let listed = c.streams.len().min(budget);
                budget -= listed;
                let viewers_listed = viewing.len().min(viewer_budget);
                viewer_budget -= viewers_listed;
                truncated |= listed < c.streams.len() || viewers_listed < viewing.len();
                Some(ContainerStreams {
                    container_id: id.clone(),
                    established_connections: c.established_connections,
                    live_streams: policy.held(&c.streams),
                    streams: c.streams[..listed]
                        .iter()
                        .map(|s| policy.listed(s))
                        .collect(),
                    viewers: u32::try_from(viewing.len()).unwrap_or(u32::MAX),
                    viewer_list: viewing[..viewers_listed].iter().map(|v| **v).collect(),
                })
            })
            .collect();
        let live_streams = containers
            .iter()
            .fold(0u32, |n, c| n.saturating_add(c.live_streams));
        let viewers = containers
            .iter()
            .fold(0u32, |n, c| n.saturating_add(c.viewers));
        let (ready, ready_reason) = match &held {
            None => (false, "not draining".to_owned()),
            Some(Held {
                drain: Drain {
                    problem: Some(p), ..
                },
                ..
            }) => (
                false,
                format!("{p}: not ready until a caller cancels the drain or begins a new one"),
            ),
            Some(h) if h.deadline_mono.is_some_and(|d| mono >= d) => {
                (true, "the drain deadline passed".to_owned())
            }
            Some(_) if !streams_known => (
                false,
                format!(
                    "live streams are unknown ({}); waiting for the deadline",
                    unknown.unwrap_or_default()
                ),
            ),
            Some(_) if live_streams == 0 && viewers == 0 => {
                (true, "no live streams or viewers remain".to_owned())
            }
            Some(h) => (
                false,
                format!(
                    "{live_streams} live stream(s) and {viewers} viewer(s) in {} container(s); \
                     deadline in {}",
                    containers
                        .iter()
                        .filter(|c| c.live_streams > 0 || c.viewers > 0)
                        .count(),
                    humantime::format_duration(Duration::from_secs(
                        h.deadline_mono
                            .map_or(Duration::ZERO, |d| d.saturating_sub(mono))
                            .as_secs()
                    ))
                ),
            ),
        };
        DrainProgress {
            drain: held.map(|h| h.drain),
            containers,
            live_streams,
            viewers,
            truncated,
            streams_known,
            ready,
            ready_reason,
            evaluated_at: now,
        }
    }

    /// Why the stream counts cannot be trusted, or `None` when they can: the network source
    /// must report, be fresh, and every feed behind it must have reported in its current run
    /// (not restarting, not waiting for its first report, not blind).
    fn unknown_streams(&self, snapshot: &Snapshot, now: SystemTime) -> Option<String> {
        use crate::store::SourceKind;
        match snapshot.sources.get(&SourceKind::Network) {
            None => return Some("no network source is enabled".to_owned()),
            Some(SourceStatus::Pending) => {
                return Some("the network source has not reported".to_owned())
            }
            Some(SourceStatus::Unavailable { reason }) => {
                return Some(format!("the network source is unavailable: {reason}"))
            }
            Some(SourceStatus::Reporting { at, .. }) => {
                if elapsed(*at, now) > self.settings.stale_after {
                    return Some(format!(
                        "no network report for more than {}",
                        humantime::format_duration(self.settings.stale_after)
                    ));
                }
            }
        }
        let Some(net) = &snapshot.network else {
            return Some("the network source has not reported".to_owned());
        };
        if net.feeds.is_empty() {
            return Some("the network report does not say which feeds it covers".to_owned());
        }
        let why: Vec<String> = net
            .feeds
            .iter()
            .filter_map(|(name, feed)| match feed {
                FeedState::Waiting => Some(format!("{name} has not reported since it started")),
                FeedState::Blind { reason } => Some(format!("{name} cannot see: {reason}")),
                FeedState::Reporting { run } => match snapshot.tasks.get(name) {
                    Some(t) if !t.up => Some(format!("{name} is restarting")),
                    Some(t) if t.restarts != *run => {
                        Some(format!("{name} has not reported since its restart"))
                    }
                    _ => None,
                },
            })
            .collect();
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// Whether `drain.exclude_containers` names the container, by id or by its pod's name.
    fn excluded(&self, snapshot: &Snapshot, id: &str) -> bool {
        let ex = &self.settings.exclude_containers;
        if ex.is_empty() {
            return false;
        }
        let pod = snapshot
            .containers
            .as_deref()
            .and_then(|m| m.get(id))
            .map(|m| m.pod_name.as_str())
            .filter(|p| !p.is_empty());
        ex.iter().any(|e| e == id || Some(e.as_str()) == pod)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests;
