//! XID errors and ECC events counted in a sliding window, so that a GPU that stops throwing
//! errors becomes healthy again by itself (a counter that never resets is a known pain of
//! other exporters), and the XIDs that mean "drain this node" are picked out.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

/// XID codes after which a node should be drained: the GPU needs a reset, or its memory or
/// links can no longer be trusted (NVIDIA's XID catalogue, "Xid Errors" in the GPU deployment
/// guide).
///
/// - 48: double-bit ECC error (DBE)
/// - 63: ECC page retirement or row-remapping recording event
/// - 64: ECC page retirement or row-remapper recording failure
/// - 74: NVLink error
/// - 79: GPU has fallen off the bus
/// - 92: high single-bit ECC error rate
/// - 94: contained ECC error (an application was hit; a reset is needed to recover the memory)
/// - 95: uncontained ECC error (every application on the GPU is affected)
/// - 119: GSP RPC timeout
/// - 120: GSP error
///
/// `gpu.drain_xids` in the config replaces this list.
pub const DRAIN_XIDS: &[u64] = &[48, 63, 64, 74, 79, 92, 94, 95, 119, 120];

/// What happened, for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuEvent {
    Xid(u64),
    /// A single-bit (corrected) ECC error.
    SingleBitEcc,
    /// A double-bit (uncorrected) ECC error.
    DoubleBitEcc,
}

/// Counts within the window for one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WindowCounts {
    /// XID code → occurrences in the window.
    pub xids: BTreeMap<u64, u32>,
    /// The XIDs in the window that are on the drain list, ascending.
    pub drain_xids: Vec<u64>,
    pub single_bit_ecc_events: u32,
    pub double_bit_ecc_events: u32,
}

/// Events per device (keyed by device index) over the last `window`.
#[derive(Debug)]
pub struct EventWindow {
    window: Duration,
    drain_xids: Vec<u64>,
    events: BTreeMap<u32, VecDeque<(Instant, GpuEvent)>>,
}

impl EventWindow {
    pub fn new(window: Duration, drain_xids: &[u64]) -> Self {
        Self {
            window,
            drain_xids: drain_xids.to_vec(),
            events: BTreeMap::new(),
        }
    }

    pub fn record(&mut self, device: u32, event: GpuEvent, now: Instant) {
        self.events
            .entry(device)
            .or_default()
            .push_back((now, event));
        self.expire(now);
    }

    /// Forgets what is older than the window.
    pub fn expire(&mut self, now: Instant) {
        for queue in self.events.values_mut() {
            while let Some((at, _)) = queue.front() {
                if now.saturating_duration_since(*at) > self.window {
                    queue.pop_front();
                } else {
                    break;
                }
            }
        }
        self.events.retain(|_, q| !q.is_empty());
    }

    /// The counts in the window ending at `now`, per device with any event.
    pub fn counts(&mut self, now: Instant) -> BTreeMap<u32, WindowCounts> {
        self.expire(now);
        let mut out = BTreeMap::new();
        for (device, queue) in &self.events {
            let mut c = WindowCounts::default();
            for (_, event) in queue {
                match event {
                    GpuEvent::Xid(x) => *c.xids.entry(*x).or_default() += 1,
                    GpuEvent::SingleBitEcc => c.single_bit_ecc_events += 1,
                    GpuEvent::DoubleBitEcc => c.double_bit_ecc_events += 1,
                }
            }
            c.drain_xids = c
                .xids
                .keys()
                .copied()
                .filter(|x| self.drain_xids.contains(x))
                .collect();
            out.insert(*device, c);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn counts_xids_per_device_and_flags_the_drain_ones() {
        let t0 = Instant::now();
        let mut w = EventWindow::new(10 * MIN, DRAIN_XIDS);
        w.record(0, GpuEvent::Xid(13), t0);
        w.record(0, GpuEvent::Xid(79), t0);
        w.record(0, GpuEvent::Xid(13), t0);
        w.record(1, GpuEvent::DoubleBitEcc, t0);
        let c = w.counts(t0);
        assert_eq!(c[&0].xids, BTreeMap::from([(13, 2), (79, 1)]));
        assert_eq!(c[&0].drain_xids, vec![79]);
        assert_eq!(c[&1].double_bit_ecc_events, 1);
        assert!(c[&1].xids.is_empty());
    }

    #[test]
    fn counts_clear_by_themselves_once_errors_stop() {
        let t0 = Instant::now();
        let mut w = EventWindow::new(10 * MIN, DRAIN_XIDS);
        w.record(2, GpuEvent::Xid(48), t0);
        w.record(2, GpuEvent::Xid(48), t0 + 5 * MIN);
        assert_eq!(w.counts(t0 + 9 * MIN)[&2].xids[&48], 2);
        // The first has aged out, the second not yet.
        assert_eq!(w.counts(t0 + 11 * MIN)[&2].xids[&48], 1);
        assert!(w.counts(t0 + 16 * MIN).is_empty());
    }

    #[test]
    fn the_drain_list_is_configurable() {
        let t0 = Instant::now();
        let mut w = EventWindow::new(MIN, &[13]);
        w.record(0, GpuEvent::Xid(13), t0);
        w.record(0, GpuEvent::Xid(79), t0);
        assert_eq!(w.counts(t0)[&0].drain_xids, vec![13]);
    }
}
