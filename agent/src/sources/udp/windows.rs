//! Per-container windows from per-tick deltas of the kernel's cumulative counters.
//!
//! Each tick, the difference between this read and the previous one is computed per stream
//! and per flow (an entry that is new, or whose counters went down because it was evicted and
//! re-created, contributes its whole value: never a negative rate) and added up per container.
//! Windows are sums over the ticks that fall inside them.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use agent_ebpf::rtp::{RtpKey, RtpState, UdpFlowKey, UdpFlowStats};

use super::model::WindowStats;
use crate::store::{NetworkTotals, Window};

/// What one tick added for one container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickDelta {
    pub udp_packets: u64,
    pub udp_bytes: u64,
    pub ipdv_sum_ns: u64,
    pub ipdv_count: u64,
    pub rtp_received: u64,
    pub rtp_expected: u64,
    pub rtp_reordered: u64,
    pub jitter_sum_ns: u64,
    pub jitter_samples: u64,
    /// Highest current jitter of a live stream at this tick.
    pub jitter_now_max_ns: u64,
}

impl std::ops::AddAssign<&TickDelta> for TickDelta {
    /// Sums ticks into a window; the jitter of a live stream is the highest seen, not a sum.
    /// Destructured so that a new field cannot be forgotten.
    fn add_assign(&mut self, d: &TickDelta) {
        let TickDelta {
            udp_packets,
            udp_bytes,
            ipdv_sum_ns,
            ipdv_count,
            rtp_received,
            rtp_expected,
            rtp_reordered,
            jitter_sum_ns,
            jitter_samples,
            jitter_now_max_ns,
        } = *d;
        self.udp_packets += udp_packets;
        self.udp_bytes += udp_bytes;
        self.ipdv_sum_ns += ipdv_sum_ns;
        self.ipdv_count += ipdv_count;
        self.rtp_received += rtp_received;
        self.rtp_expected += rtp_expected;
        self.rtp_reordered += rtp_reordered;
        self.jitter_sum_ns += jitter_sum_ns;
        self.jitter_samples += jitter_samples;
        self.jitter_now_max_ns = self.jitter_now_max_ns.max(jitter_now_max_ns);
    }
}

fn delta(cur: u64, prev: Option<u64>) -> u64 {
    match prev {
        Some(p) if cur >= p => cur - p,
        // New, or reset by eviction and re-creation: all of it is new.
        _ => cur,
    }
}

/// Computes the per-container deltas between two reads.
#[derive(Debug, Default)]
pub struct Differ {
    prev_flows: HashMap<UdpFlowKey, UdpFlowStats>,
    prev_streams: HashMap<RtpKey, RtpState>,
}

impl Differ {
    pub fn tick(
        &mut self,
        flows: &[(UdpFlowKey, UdpFlowStats)],
        streams: &[(RtpKey, RtpState)],
        live_stream: impl Fn(&RtpState) -> bool,
    ) -> HashMap<u64, TickDelta> {
        let mut out: HashMap<u64, TickDelta> = HashMap::new();
        for (k, f) in flows {
            let p = self.prev_flows.get(k);
            let d = out.entry(k.cgroup_id).or_default();
            d.udp_packets += delta(f.packets, p.map(|p| p.packets));
            d.udp_bytes += delta(f.bytes, p.map(|p| p.bytes));
            d.ipdv_sum_ns += delta(f.ipdv_sum_ns, p.map(|p| p.ipdv_sum_ns));
            d.ipdv_count += delta(f.ipdv_count, p.map(|p| p.ipdv_count));
        }
        for (k, s) in streams {
            if s.confirmed == 0 {
                continue;
            }
            let p = self.prev_streams.get(k).filter(|p| p.confirmed == 1);
            let d = out.entry(k.flow.cgroup_id).or_default();
            d.rtp_received += delta(s.received, p.map(|p| p.received));
            d.rtp_expected += delta(s.expected(), p.map(RtpState::expected));
            d.rtp_reordered += delta(s.reordered, p.map(|p| p.reordered));
            d.jitter_sum_ns += delta(s.jitter_sum_ns, p.map(|p| p.jitter_sum_ns));
            d.jitter_samples += delta(s.jitter_samples, p.map(|p| p.jitter_samples));
            if live_stream(s) && s.jitter_samples > 0 {
                d.jitter_now_max_ns = d.jitter_now_max_ns.max(s.jitter_ns());
            }
        }
        self.prev_flows = flows.iter().copied().collect();
        self.prev_streams = streams.iter().copied().collect();
        out
    }
}

/// One container's RTP counters since the agent started, carried across restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub received: u64,
    pub expected: u64,
    /// The highest `expected - received` seen: duplicates make the difference shrink at
    /// times, and a counter must not go backwards.
    pub lost: u64,
    /// Order of the last change (the source's tick number), to forget the idlest first.
    pub last_active: u64,
}

impl Totals {
    /// Seeds the totals from what an earlier run of the source published.
    pub fn carried(t: &NetworkTotals) -> Self {
        Self {
            received: t.rtp_packets,
            expected: t.rtp_packets + t.rtp_lost,
            lost: t.rtp_lost,
            last_active: 0,
        }
    }

    /// Adds one tick's delta; false when the tick carried no RTP.
    pub fn add(&mut self, d: &TickDelta, tick: u64) -> bool {
        if d.rtp_received == 0 && d.rtp_expected == 0 {
            return false;
        }
        self.received += d.rtp_received;
        self.expected += d.rtp_expected;
        self.lost = self.lost.max(self.expected.saturating_sub(self.received));
        self.last_active = tick;
        true
    }

    pub fn network(&self) -> NetworkTotals {
        NetworkTotals {
            rtp_packets: self.received,
            rtp_lost: self.lost,
            ..NetworkTotals::default()
        }
    }
}

/// The ticks of one container that fall inside the longest window.
#[derive(Debug, Default)]
pub struct History {
    ticks: VecDeque<(Instant, TickDelta)>,
}

impl History {
    /// Adds a tick and forgets those older than `keep` (the longest window).
    pub fn push(&mut self, at: Instant, d: TickDelta, keep: Duration) {
        self.ticks.push_back((at, d));
        while self
            .ticks
            .front()
            .is_some_and(|(t, _)| at.saturating_duration_since(*t) > keep)
        {
            self.ticks.pop_front();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ticks.is_empty()
    }

    /// Totals for each of `windows` ending at `now`.
    pub fn windows(&self, now: Instant, windows: &[Window]) -> Vec<WindowStats> {
        windows.iter().map(|w| self.window(now, *w)).collect()
    }

    fn window(&self, now: Instant, window: Window) -> WindowStats {
        let len = window.duration();
        let mut t = TickDelta::default();
        for (_, d) in self
            .ticks
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) < len)
        {
            t += d;
        }
        let lost = t.rtp_expected.saturating_sub(t.rtp_received);
        let secs = |ns: u64| ns as f64 / 1e9;
        WindowStats {
            window,
            udp_packets: t.udp_packets,
            udp_bytes: t.udp_bytes,
            rtp_received: t.rtp_received,
            rtp_expected: t.rtp_expected,
            rtp_lost: lost,
            rtp_loss_ratio: (t.rtp_expected > 0).then(|| lost as f64 / t.rtp_expected as f64),
            rtp_reordered: t.rtp_reordered,
            mean_jitter_seconds: (t.jitter_samples > 0)
                .then(|| secs(t.jitter_sum_ns) / t.jitter_samples as f64),
            max_jitter_seconds: (t.jitter_samples > 0).then(|| secs(t.jitter_now_max_ns)),
            mean_ipdv_seconds: (t.ipdv_count > 0)
                .then(|| secs(t.ipdv_sum_ns) / t.ipdv_count as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(cg: u64, packets: u64) -> (UdpFlowKey, UdpFlowStats) {
        (
            UdpFlowKey {
                cgroup_id: cg,
                ..UdpFlowKey::default()
            },
            UdpFlowStats {
                packets,
                bytes: packets * 100,
                ..UdpFlowStats::default()
            },
        )
    }

    #[test]
    fn deltas_never_go_negative_when_a_flow_is_recreated() {
        let mut d = Differ::default();
        let t1 = d.tick(&[flow(1, 100)], &[], |_| true);
        assert_eq!(t1[&1].udp_packets, 100);
        let t2 = d.tick(&[flow(1, 150)], &[], |_| true);
        assert_eq!(t2[&1].udp_packets, 50);
        // Evicted and re-created with a fresh counter: 7 new packets, not -143.
        let t3 = d.tick(&[flow(1, 7)], &[], |_| true);
        assert_eq!(t3[&1].udp_packets, 7);
    }

    #[test]
    fn rtp_totals_never_go_back_when_duplicates_cover_a_loss_and_survive_a_restart() {
        let tick = |received, expected| TickDelta {
            rtp_received: received,
            rtp_expected: expected,
            ..TickDelta::default()
        };
        let mut t = Totals::default();
        assert!(t.add(&tick(90, 100), 1));
        assert_eq!((t.received, t.lost), (90, 10));
        // Late duplicates: more received than expected this tick; the loss count stays.
        assert!(t.add(&tick(15, 10), 2));
        assert_eq!((t.received, t.lost), (105, 10));
        assert!(!t.add(&tick(0, 0), 3), "a tick without RTP changes nothing");
        assert!(t.add(&tick(50, 60), 4));
        assert_eq!((t.received, t.lost), (155, 15));

        let mut restarted = Totals::carried(&t.network());
        assert!(restarted.add(&tick(10, 12), 1));
        let n = restarted.network();
        assert_eq!((n.rtp_packets, n.rtp_lost), (165, 17));
    }

    #[test]
    fn windows_sum_only_their_ticks() {
        let mut h = History::default();
        let start = Instant::now();
        let windows = crate::store::DEFAULT_NETWORK_WINDOWS;
        let keep = windows[2].duration();
        for i in 0..400u64 {
            let d = TickDelta {
                udp_packets: 1,
                rtp_expected: 10,
                rtp_received: if i % 10 == 0 { 9 } else { 10 },
                ..TickDelta::default()
            };
            h.push(start + Duration::from_secs(i), d, keep);
        }
        let now = start + Duration::from_secs(399);
        let w = h.windows(now, &windows);
        assert_eq!(w[0].udp_packets, 10, "10 s window");
        assert_eq!(w[1].udp_packets, 60, "1 min window");
        assert_eq!(w[2].udp_packets, 300, "5 min window");
        assert_eq!(w[2].rtp_lost, 30);
        assert!((w[2].rtp_loss_ratio.expect("expected > 0") - 0.01).abs() < 1e-12);
        assert_eq!(
            w[0].mean_jitter_seconds, None,
            "no jitter samples, no jitter"
        );
    }
}
