//! What viewers report about an RTP stream a container serves, in their RTCP receiver reports
//! (RFC 3550 6.4): plain data, attached to the stream's [`LiveStream`](super::LiveStream).

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use super::Window;

/// The fresh reports of every viewer that reports on one outbound RTP stream.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewerReports {
    /// The stream's SSRC (what the reports are about).
    pub ssrc: u32,
    /// The clock rate (Hz) of the stream's payload type, which turns a report's jitter into
    /// time; `None` when unknown.
    pub clock_rate: Option<u32>,
    /// One per reporting viewer, latest report each; reports older than
    /// `udp.viewer_report_stale` are left out.
    pub reports: Vec<ViewerReport>,
}

impl ViewerReports {
    /// The worst latest fraction lost among the viewers.
    pub fn worst_fraction_lost(&self) -> Option<f64> {
        self.reports
            .iter()
            .map(|r| r.fraction_lost)
            .reduce(f64::max)
    }

    /// The worst jitter among the viewers.
    pub fn worst_jitter(&self) -> Option<Duration> {
        self.reports.iter().filter_map(|r| r.jitter).max()
    }
}

/// One viewer's latest report block about the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewerReport {
    /// The viewer's SSRC.
    pub reporter_ssrc: u32,
    /// Where its report came from.
    pub remote: SocketAddr,
    /// The container's port it arrived on: the RTP port (rtcp-mux) or RTP port + 1.
    pub local_port: u16,
    /// Fraction of packets lost since the viewer's previous report, 0..=1 (the 8-bit field /
    /// 256).
    pub fraction_lost: f64,
    /// Packets lost since the viewer started receiving (negative with duplicates).
    pub cumulative_lost: i64,
    /// Its extended highest sequence number received.
    pub ext_highest_seq: u32,
    /// Its interarrival jitter in RTP timestamp units, and as time with the stream's clock
    /// rate (`None` when the rate is unknown).
    pub jitter_units: u32,
    pub jitter: Option<Duration>,
    /// When the report arrived.
    pub reported_at: SystemTime,
    /// Loss over `window`, from the oldest of its reports inside the window to the latest;
    /// `None` until two reports are kept.
    pub window: Option<WindowLoss>,
}

/// Loss a viewer reported over a window: the difference of its cumulative lost and extended
/// highest sequence number between two reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLoss {
    pub window: Window,
    /// Packets lost (negative with duplicates).
    pub lost: i64,
    /// Packets expected (the advance of the extended highest sequence number).
    pub expected: u64,
}

impl WindowLoss {
    /// lost / expected, clamped to 0..=1; `None` when nothing was expected.
    pub fn fraction(&self) -> Option<f64> {
        (self.expected > 0).then(|| (self.lost.max(0) as f64 / self.expected as f64).min(1.0))
    }
}
