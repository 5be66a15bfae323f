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
//!
//! Ports: `drain.exclude_ports` names served ports whose streams and viewers never hold a drain
//! (a metrics or health endpoint: its scraper would otherwise be a viewer for ever);
//! `drain.include_ports`, when not empty, names the only served ports that do. A connection of
//! unknown direction is judged by its local port: were it served, that is the port it was
//! served on; were it outbound, its ephemeral port is in no list of served ports.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::store::{LiveStream, Viewer};

/// What the drain waits for, from `[drain]` ([`super::drain::DrainConfig::policy`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPolicy {
    pub wait_for_outbound: bool,
    /// How long after its last connection closed a served host still counts as a viewer.
    pub viewer_idle: Duration,
    pub ports: PortFilter,
}

/// `drain.include_ports` and `drain.exclude_ports`, each sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortFilter {
    /// Empty: every port not excluded.
    include: Arc<[u16]>,
    exclude: Arc<[u16]>,
}

impl PortFilter {
    pub fn new(include: &[u16], exclude: &[u16]) -> Self {
        let sorted = |p: &[u16]| {
            let mut v = p.to_vec();
            v.sort_unstable();
            v.dedup();
            Arc::from(v)
        };
        Self {
            include: sorted(include),
            exclude: sorted(exclude),
        }
    }

    /// Whether streams and viewers served on `port` hold a drain.
    pub fn holds(&self, port: u16) -> bool {
        self.exclude.binary_search(&port).is_err()
            && (self.include.is_empty() || self.include.binary_search(&port).is_ok())
    }
}

impl Default for StreamPolicy {
    fn default() -> Self {
        Self {
            wait_for_outbound: false,
            viewer_idle: super::drain::config::DEFAULT_VIEWER_IDLE,
            ports: PortFilter::default(),
        }
    }
}

impl StreamPolicy {
    /// Whether `viewer` still counts at `now`: seen within `viewer_idle` (a clock step back
    /// that puts `last_seen` ahead of `now` counts as just seen), on a port that holds a drain.
    pub fn is_viewing(&self, viewer: &Viewer, now: SystemTime) -> bool {
        self.ports.holds(viewer.port)
            && now
                .duration_since(viewer.last_seen)
                .map_or(true, |idle| idle <= self.viewer_idle)
    }

    /// The viewers of `viewers` that still count at `now`.
    pub fn viewing<'a>(
        &'a self,
        viewers: &'a [Viewer],
        now: SystemTime,
    ) -> impl Iterator<Item = &'a Viewer> {
        viewers.iter().filter(move |v| self.is_viewing(v, now))
    }

    /// Whether the drain waits for this stream to end.
    pub fn holds_drain(&self, stream: &LiveStream) -> bool {
        match stream.served_port() {
            Some(port) => self.ports.holds(port),
            None => self.wait_for_outbound,
        }
    }

    /// `stream` as the drain status lists it, with whether it holds the drain.
    pub fn listed(&self, stream: &LiveStream) -> ListedStream {
        ListedStream {
            stream: stream.clone(),
            holds_drain: self.holds_drain(stream),
        }
    }

    /// How many of `streams` the drain waits for.
    pub fn held(&self, streams: &[LiveStream]) -> u32 {
        let n = streams.iter().filter(|s| self.holds_drain(s)).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// A stream in the drain status: listed whether or not the drain waits for it (a dependency,
/// a stream on an excluded port), and saying which.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedStream {
    pub stream: LiveStream,
    /// [`StreamPolicy::holds_drain`] of `stream`.
    pub holds_drain: bool,
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::SystemTime};

    use super::*;
    use crate::store::{StreamDirection, StreamKind, StreamProtocol};

    fn stream(direction: StreamDirection) -> LiveStream {
        let a: SocketAddr = "10.0.0.1:5432".parse().expect("addr");
        LiveStream {
            protocol: StreamProtocol::Tcp,
            kind: StreamKind::Tcp,
            direction,
            local: a,
            remote: a,
            started_at: SystemTime::UNIX_EPOCH,
            viewers: 0,
            bytes: None,
            viewer_reports: None,
        }
    }

    fn served_on(port: u16, direction: StreamDirection) -> LiveStream {
        LiveStream {
            local: SocketAddr::new([10, 0, 0, 1].into(), port),
            ..stream(direction)
        }
    }

    #[test]
    fn excluded_ports_never_hold_a_drain_and_included_ones_are_the_only_ones_that_do() {
        let policy = |include: &[u16], exclude: &[u16]| StreamPolicy {
            ports: PortFilter::new(include, exclude),
            ..StreamPolicy::default()
        };
        let metrics = served_on(9100, StreamDirection::Served);
        let rtmp = served_on(1935, StreamDirection::Served);
        let old = served_on(1935, StreamDirection::Unknown);
        let dependency = served_on(40_000, StreamDirection::Outbound);
        let all = policy(&[], &[]);
        assert!(all.holds_drain(&metrics) && all.holds_drain(&rtmp));
        let no_metrics = policy(&[], &[9100]);
        assert!(!no_metrics.holds_drain(&metrics));
        assert!(no_metrics.holds_drain(&rtmp) && no_metrics.holds_drain(&old));
        let only_rtmp = policy(&[1935, 443], &[]);
        assert!(!only_rtmp.holds_drain(&metrics));
        assert!(only_rtmp.holds_drain(&rtmp) && only_rtmp.holds_drain(&old));
        // Outbound connections go by `wait_for_outbound`, whatever their ephemeral port.
        assert!(!only_rtmp.holds_drain(&dependency));
        let outbound = StreamPolicy {
            wait_for_outbound: true,
            ..policy(&[], &[40_000])
        };
        assert!(outbound.holds_drain(&dependency));
        // A port in both lists is excluded (the config check refuses that anyway).
        assert!(!policy(&[1935], &[1935]).holds_drain(&rtmp));

        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let scraper = Viewer {
            addr: [10, 0, 0, 9].into(),
            port: 9100,
            last_seen: now,
        };
        assert!(all.is_viewing(&scraper, now));
        assert!(!no_metrics.is_viewing(&scraper, now));
        assert!(!only_rtmp.is_viewing(&scraper, now));
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
            port: 8080,
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
