//! Viewers' RTCP receiver reports, joined to the RTP streams a container sends.
//!
//! The kernel keeps the latest report block per (container, media SSRC, viewer). Each tick this
//! keeps a short history of each so that loss over a window can be told from the differences
//! of the cumulative counters, turns the jitter into time with the stream's clock rate, and
//! drops reports older than `udp.viewer_report_stale`: a viewer that stopped reporting is not
//! shown as if its last word were fresh.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use agent_ebpf::{
    rtcp::{cumulative_lost_signed, RtcpReport, RtcpReportKey},
    rtp::UdpFlowKey,
};

use super::addr;
use crate::store::{ViewerReport, ViewerReports, Window, WindowLoss};

/// One report as kept for the window.
#[derive(Debug, Clone, Copy)]
struct Sample {
    arrival_ns: u64,
    ext_highest_seq: u32,
    cumulative_lost: i64,
}

/// Reports kept across ticks.
#[derive(Debug, Default)]
pub struct Reports {
    history: HashMap<RtcpReportKey, VecDeque<Sample>>,
}

/// What one tick knows of the reports, ready to be joined to streams.
#[derive(Debug, Default)]
pub struct Fresh {
    by_stream: HashMap<(u64, u32), Vec<(RtcpReportKey, RtcpReport)>>,
}

impl Reports {
    /// Takes this tick's reports: records new ones, forgets those older than `stale` (returned,
    /// for removal from the kernel map) and those the kernel no longer holds.
    pub fn tick(
        &mut self,
        reports: &[(RtcpReportKey, RtcpReport)],
        now_ns: u64,
        stale: Duration,
        window: Window,
    ) -> (Fresh, Vec<RtcpReportKey>) {
        let stale_ns = u64::try_from(stale.as_nanos()).unwrap_or(u64::MAX);
        let keep_ns = u64::try_from(window.duration().as_nanos()).unwrap_or(u64::MAX);
        let mut fresh = Fresh::default();
        let mut gone = Vec::new();
        let mut seen = std::collections::HashSet::with_capacity(reports.len());
        for (k, r) in reports {
            if now_ns.saturating_sub(r.arrival_ns) > stale_ns {
                gone.push(*k);
                continue;
            }
            seen.insert(*k);
            let h = self.history.entry(*k).or_default();
            if h.back().is_none_or(|s| s.arrival_ns != r.arrival_ns) {
                h.push_back(Sample {
                    arrival_ns: r.arrival_ns,
                    ext_highest_seq: r.ext_highest_seq,
                    cumulative_lost: i64::from(cumulative_lost_signed(r.cumulative_lost)),
                });
            }
            // Keep the samples inside the window, and the last one before it as its start.
            while h.len() > 1 && now_ns.saturating_sub(h[1].arrival_ns) > keep_ns {
                h.pop_front();
            }
            fresh
                .by_stream
                .entry((k.cgroup_id, k.media_ssrc))
                .or_default()
                .push((*k, *r));
        }
        self.history.retain(|k, _| seen.contains(k));
        (fresh, gone)
    }

    /// Loss over `window` for one viewer, from the oldest sample kept to the latest.
    fn window_loss(&self, key: &RtcpReportKey, window: Window) -> Option<WindowLoss> {
        let h = self.history.get(key)?;
        let (first, last) = (h.front()?, h.back()?);
        if h.len() < 2 {
            return None;
        }
        Some(WindowLoss {
            window,
            lost: last.cumulative_lost - first.cumulative_lost,
            expected: u64::from(last.ext_highest_seq.wrapping_sub(first.ext_highest_seq)),
        })
    }

    /// The reports about the outbound stream `flow`/`ssrc`. `sole` says whether it is the
    /// container's only outbound stream with that SSRC: then every viewer's report about the
    /// SSRC is its own; otherwise (one SSRC forwarded to several viewers) only reports from
    /// the stream's remote address are.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site, each value distinct"
    )]
    pub fn for_stream(
        &self,
        fresh: &Fresh,
        flow: &UdpFlowKey,
        ssrc: u32,
        sole: bool,
        clock_rate: Option<u32>,
        now_ns: u64,
        now: SystemTime,
        window: Window,
    ) -> Option<ViewerReports> {
        let list = fresh.by_stream.get(&(flow.cgroup_id, ssrc))?;
        let reports: Vec<ViewerReport> = list
            .iter()
            .filter(|(_, r)| sole || r.remote_addr == flow.remote_addr)
            .map(|(k, r)| {
                let age = Duration::from_nanos(now_ns.saturating_sub(r.arrival_ns));
                ViewerReport {
                    reporter_ssrc: k.reporter_ssrc,
                    remote: SocketAddr::new(addr(&r.remote_addr, r.ip_version), r.remote_port),
                    local_port: r.local_port,
                    fraction_lost: f64::from(r.fraction_lost) / 256.0,
                    cumulative_lost: i64::from(cumulative_lost_signed(r.cumulative_lost)),
                    ext_highest_seq: r.ext_highest_seq,
                    jitter_units: r.jitter,
                    jitter: clock_rate.filter(|&c| c > 0).map(|c| {
                        Duration::from_nanos(u64::from(r.jitter) * 1_000_000_000 / u64::from(c))
                    }),
                    reported_at: now.checked_sub(age).unwrap_or(now),
                    window: self.window_loss(k, window),
                }
            })
            .collect();
        (!reports.is_empty()).then_some(ViewerReports {
            ssrc,
            clock_rate,
            reports,
        })
    }
}

#[cfg(test)]
#[path = "viewers_tests.rs"]
mod tests;
