//! Which live streams a drain waits for (`[drain]` in the config).
//!
//! The network sources list every stream of a container with its direction; the drain waits for
//! the ones the container serves (and those whose direction is unknown: it must not read ready
//! on a guess). Outbound connections — a container's own connections to its database or cache —
//! are listed as dependencies and waited for only with `drain.wait_for_outbound`. Host cgroups
//! and the agent's own are left out earlier, by the bridge: they are not streams at all.
//!
//! Viewers: a remote host a container served within `drain.viewer_idle` holds the drain too,
//! connected or not, so that an HLS/DASH player between two segment fetches (no connection at
//! that moment) still counts as watching.

use std::time::{Duration, SystemTime};

use crate::store::{LiveStream, StreamDirection, Viewer};

/// What the drain waits for, from `[drain]` ([`super::drain::DrainConfig::policy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPolicy {
    pub wait_for_outbound: bool,
    /// How long after its last connection closed a served host still counts as a viewer.
    pub viewer_idle: Duration,
}

impl Default for StreamPolicy {
    fn default() -> Self {
        Self {
            wait_for_outbound: false,
            viewer_idle: super::drain::config::DEFAULT_VIEWER_IDLE,
        }
    }
}

impl StreamPolicy {
    /// Whether `viewer` still counts at `now`: seen within `viewer_idle` (a clock step back
    /// that puts `last_seen` ahead of `now` counts as just seen).
    pub fn is_viewing(self, viewer: &Viewer, now: SystemTime) -> bool {
        now.duration_since(viewer.last_seen)
            .map_or(true, |idle| idle <= self.viewer_idle)
    }

    /// The viewers of `viewers` that still count at `now`.
    pub fn viewing(self, viewers: &[Viewer], now: SystemTime) -> impl Iterator<Item = &Viewer> {
        viewers.iter().filter(move |v| self.is_viewing(v, now))
    }

    /// Whether the drain waits for this stream to end.
    pub fn holds_drain(self, stream: &LiveStream) -> bool {
        match stream.direction {
            StreamDirection::Served | StreamDirection::Unknown => true,
            StreamDirection::Outbound => self.wait_for_outbound,
        }
    }

    /// How many of `streams` the drain waits for.
    pub fn held(self, streams: &[LiveStream]) -> u32 {
        let n = streams.iter().filter(|s| self.holds_drain(s)).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::SystemTime};

    use super::*;
    use crate::store::StreamProtocol;

    fn stream(direction: StreamDirection) -> LiveStream {
        let a: SocketAddr = "10.0.0.1:5432".parse().expect("addr");
        LiveStream {
            protocol: StreamProtocol::Tcp,
            direction,
            local: a,
            remote: a,
            started_at: SystemTime::UNIX_EPOCH,
            viewers: 0,
            viewer_reports: None,
        }
    }

    #[test]
    fn outbound_connections_hold_the_drain_only_when_configured() {
        let streams = [
            stream(StreamDirection::Served),
            stream(StreamDirection::Outbound),
            stream(StreamDirection::Unknown),
        ];
        assert_eq!(StreamPolicy::default().held(&streams), 2);
        let all = StreamPolicy {
            wait_for_outbound: true,
            ..StreamPolicy::default()
        };
        assert_eq!(all.held(&streams), 3);
    }

    #[test]
    fn a_served_host_is_a_viewer_until_viewer_idle_after_it_was_last_seen() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let policy = StreamPolicy {
            viewer_idle: Duration::from_secs(4),
            ..StreamPolicy::default()
        };
        let seen = |ago: u64| Viewer {
            addr: [10, 0, 0, 1].into(),
            last_seen: now - Duration::from_secs(ago),
        };
        assert!(policy.is_viewing(&seen(0), now));
        assert!(policy.is_viewing(&seen(4), now));
        assert!(!policy.is_viewing(&seen(5), now));
        let ahead = Viewer {
            last_seen: now + Duration::from_secs(3),
            ..seen(0)
        };
        assert!(policy.is_viewing(&ahead, now), "a clock step back");
        let all = [seen(1), seen(9), seen(2)];
        assert_eq!(policy.viewing(&all, now).count(), 2);
    }
}
