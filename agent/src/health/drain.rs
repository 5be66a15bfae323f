//! The drain handshake's state: who asked for a drain, why, and until when to wait for live
//! streams. Idempotent so that several controllers can call it: a second `begin` joins the drain
//! in progress (its deadline is kept), a `cancel` without a drain is not an error.
//!
//! The drain state lives in memory: a restarted agent is not draining. The control plane is
//! expected to call `BeginDrain` again (it is idempotent) when it sees `DRAIN_STATE_NOT_DRAINING`.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

use super::streams::StreamPolicy;
use crate::store::{clock::elapsed, Clock, LiveStream, Snapshot};

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
    pub requesters: Vec<Requester>,
    pub started: SystemTime,
    pub deadline: SystemTime,
}

/// Live streams of one container, for the drain status.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerStreams {
    pub container_id: String,
    pub established_connections: u32,
    /// Of `streams`, those the drain waits for ([`StreamPolicy::holds_drain`]).
    pub live_streams: u32,
    /// Every stream, the container's dependencies (outbound) included.
    pub streams: Vec<LiveStream>,
}

/// The drain's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainProgress {
    pub drain: Option<Drain>,
    /// Containers with at least one live stream or dependency.
    pub containers: Vec<ContainerStreams>,
    /// Streams the drain waits for, summed over `containers`.
    pub live_streams: u32,
    /// Whether the network source has reported, so that the counts mean something.
    pub streams_known: bool,
    pub ready: bool,
    pub ready_reason: String,
    pub evaluated_at: SystemTime,
}

/// Holds the drain state; cheap to clone. Changes are announced on a watch channel so health
/// messages show DRAINING at once, not at the next tick.
#[derive(Debug, Clone)]
pub struct DrainController {
    state: Arc<Mutex<Option<Drain>>>,
    changes: watch::Sender<u64>,
    clock: Arc<dyn Clock>,
    policy: StreamPolicy,
}

impl DrainController {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            state: Arc::new(Mutex::new(None)),
            changes: watch::Sender::new(0),
            clock,
            policy: StreamPolicy::default(),
        }
    }

    /// Waits for the streams `policy` picks (by default: served ones, not dependencies).
    #[must_use]
    pub fn with_policy(self, policy: StreamPolicy) -> Self {
        Self { policy, ..self }
    }

    /// Ticks once per change of the drain state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn current(&self) -> Option<Drain> {
        self.lock().clone()
    }

    /// Starts a drain, or joins the one in progress. Returns the drain and whether one was
    /// already in progress.
    pub fn begin(&self, requester: Requester, deadline: Duration) -> (Drain, bool) {
        let now = self.clock.now();
        let mut g = self.lock();
        let out = match g.as_mut() {
            Some(d) => {
                if !d.requesters.iter().any(|r| {
                    r.requested_by == requester.requested_by && r.identity == requester.identity
                }) {
                    d.requesters.push(Requester {
                        at: now,
                        ..requester
                    });
                }
                (d.clone(), true)
            }
            None => {
                let d = Drain {
                    requesters: vec![Requester {
                        at: now,
                        ..requester
                    }],
                    started: now,
                    deadline: now + deadline,
                };
                *g = Some(d.clone());
                (d, false)
            }
        };
        drop(g);
        self.changes.send_modify(|n| *n += 1);
        out
    }

    /// Ends the drain; returns whether one was in progress.
    pub fn cancel(&self) -> bool {
        let was = self.lock().take().is_some();
        if was {
            self.changes.send_modify(|n| *n += 1);
        }
        was
    }

    /// The drain's progress against the live streams in `snapshot`.
    pub fn progress(&self, snapshot: &Snapshot) -> DrainProgress {
        let now = self.clock.now();
        let drain = self.current();
        let (containers, streams_known) = match &snapshot.network {
            Some(net) => (
                net.containers
                    .iter()
                    .filter(|(_, c)| !c.streams.is_empty())
                    .map(|(id, c)| ContainerStreams {
                        container_id: id.clone(),
                        established_connections: c.established_connections,
                        live_streams: self.policy.held(&c.streams),
                        streams: c.streams.clone(),
                    })
                    .collect::<Vec<_>>(),
                true,
            ),
            None => (Vec::new(), false),
        };
        let live_streams = containers.iter().map(|c| c.live_streams).sum();
        let (ready, ready_reason) = match &drain {
            None => (false, "not draining".to_owned()),
            Some(d) if now >= d.deadline => (true, "the drain deadline passed".to_owned()),
            Some(_) if !streams_known => (
                false,
                "live streams are unknown (the network source has not reported); waiting for the deadline".to_owned(),
            ),
            Some(_) if live_streams == 0 => (true, "no live streams remain".to_owned()),
            Some(d) => (
                false,
                format!(
                    "{live_streams} live stream(s) in {} container(s); deadline in {}",
                    containers.iter().filter(|c| c.live_streams > 0).count(),
                    humantime::format_duration(Duration::from_secs(elapsed(now, d.deadline).as_secs()))
                ),
            ),
        };
        DrainProgress {
            drain,
            containers,
            live_streams,
            streams_known,
            ready,
            ready_reason,
            evaluated_at: now,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Drain>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::SocketAddr};

    use super::*;
    use crate::store::{
        ContainerNetwork, ManualClock, NetworkSnapshot, Provenance, Store, StreamProtocol,
    };

    fn who(name: &str) -> Requester {
        Requester {
            requested_by: name.to_owned(),
            identity: "uid:0".to_owned(),
            reason: "rollout".to_owned(),
            at: SystemTime::UNIX_EPOCH,
        }
    }

    fn stream() -> LiveStream {
        let a: SocketAddr = "10.0.0.1:1935".parse().expect("addr");
        LiveStream {
            protocol: StreamProtocol::Tcp,
            direction: crate::store::StreamDirection::Served,
            local: a,
            remote: a,
            started_at: SystemTime::UNIX_EPOCH,
            viewers: 0,
        }
    }

    #[test]
    fn begin_is_idempotent_and_keeps_the_first_deadline() {
        let clock = Arc::new(ManualClock::new(SystemTime::UNIX_EPOCH));
        let d = DrainController::new(clock.clone());
        let (first, already) = d.begin(who("a"), Duration::from_secs(60));
        assert!(!already);
        clock.advance(Duration::from_secs(5));
        let (second, already) = d.begin(who("b"), Duration::from_secs(600));
        assert!(already);
        assert_eq!(second.deadline, first.deadline);
        assert_eq!(second.requesters.len(), 2);
        let (third, _) = d.begin(who("b"), Duration::from_secs(600));
        assert_eq!(
            third.requesters.len(),
            2,
            "the same caller twice is listed once"
        );
        assert!(d.cancel());
        assert!(!d.cancel(), "a second cancel finds no drain");
    }

    #[test]
    fn ready_when_streams_end_or_the_deadline_passes() {
        let clock = Arc::new(ManualClock::new(SystemTime::UNIX_EPOCH));
        let d = DrainController::new(clock.clone());
        let store = Store::new();
        assert!(!d.progress(&store.snapshot()).ready, "not draining");
        d.begin(who("a"), Duration::from_secs(60));
        let p = d.progress(&store.snapshot());
        assert!(
            !p.ready && !p.streams_known,
            "unknown streams wait for the deadline"
        );

        let mut containers = BTreeMap::new();
        containers.insert(
            "c".to_owned(),
            ContainerNetwork {
                streams: vec![stream(), stream()],
                ..Default::default()
            },
        );
        store.publish_network(
            clock.now(),
            Provenance::default(),
            NetworkSnapshot { containers },
        );
        let p = d.progress(&store.snapshot());
        assert_eq!((p.ready, p.live_streams, p.containers.len()), (false, 2, 1));

        store.publish_network(
            clock.now(),
            Provenance::default(),
            NetworkSnapshot::default(),
        );
        let p = d.progress(&store.snapshot());
        assert!(p.ready, "{}", p.ready_reason);

        let mut containers = BTreeMap::new();
        containers.insert(
            "c".to_owned(),
            ContainerNetwork {
                streams: vec![stream()],
                ..Default::default()
            },
        );
        store.publish_network(
            clock.now(),
            Provenance::default(),
            NetworkSnapshot { containers },
        );
        assert!(!d.progress(&store.snapshot()).ready);
        clock.advance(Duration::from_secs(60));
        let p = d.progress(&store.snapshot());
        assert!(
            p.ready && p.ready_reason.contains("deadline"),
            "{}",
            p.ready_reason
        );
    }
}
