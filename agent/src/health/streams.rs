//! Which live streams a drain waits for (`[drain]` in the config).
//!
//! The network sources list every stream of a container with its direction; the drain waits for
//! the ones the container serves (and those whose direction is unknown: it must not read ready
//! on a guess). Outbound connections — a container's own connections to its database or cache —
//! are listed as dependencies and waited for only with `drain.wait_for_outbound`. Host cgroups
//! and the agent's own are left out earlier, by the bridge: they are not streams at all.

use crate::store::{LiveStream, StreamDirection};

/// What the drain waits for, from `[drain]` ([`super::drain::DrainConfig::policy`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamPolicy {
    pub wait_for_outbound: bool,
}

impl StreamPolicy {
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
        };
        assert_eq!(all.held(&streams), 3);
    }
}
