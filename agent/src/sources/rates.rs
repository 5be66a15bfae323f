//! Rates of monotonic counters (CPU seconds per second, bytes per second) over fixed windows,
//! for every source that reports counters.
//!
//! Each window keeps a handful of samples spaced a tenth of the window apart, plus the latest,
//! so memory stays bounded (about a dozen samples per window) whatever the tick. A rate is
//! taken between the latest sample and the oldest kept one, over the time that really passed
//! between them (between one window and 1.1 windows once enough history exists, less while a
//! series is young). A counter that goes backwards (a container restarted under the same name,
//! a cgroup recreated) starts a new baseline: rates are never negative.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    time::{Duration, Instant},
};

/// The windows every rate is reported over: 10 s, 1 min, 5 min.
pub const WINDOWS: [Duration; 3] = [
    Duration::from_secs(10),
    Duration::from_secs(60),
    Duration::from_secs(300),
];

/// Samples per window: the spacing between kept samples is the window divided by this.
const SAMPLES_PER_WINDOW: u32 = 10;

#[derive(Debug, Clone)]
struct Sample<const N: usize> {
    at: Instant,
    values: [Option<u64>; N],
}

#[derive(Debug, Clone)]
struct Tier<const N: usize> {
    window: Duration,
    spacing: Duration,
    samples: VecDeque<Sample<N>>,
}

impl<const N: usize> Tier<N> {
    fn push(&mut self, sample: Sample<N>) {
        let len = self.samples.len();
        // Replace the latest unless the one before it is a full spacing older: the newest
        // sample is always kept, older ones only at the spacing.
        if len >= 2 && sample.at.duration_since(self.samples[len - 2].at) < self.spacing {
            self.samples[len - 1] = sample;
        } else {
            self.samples.push_back(sample);
        }
        let Some(now) = self.samples.back().map(|s| s.at) else {
            return;
        };
        while self.samples.len() > 2 && now.duration_since(self.samples[1].at) >= self.window {
            self.samples.pop_front();
        }
    }

    fn rate(&self, counter: usize) -> Option<f64> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let dt = last.at.duration_since(first.at).as_secs_f64();
        let (a, b) = (
            first.values.get(counter)?.as_ref()?,
            last.values.get(counter)?.as_ref()?,
        );
        (dt > 0.0 && b >= a).then(|| (b - a) as f64 / dt)
    }
}

/// `N` counters sampled together (one workload's CPU, IO, ...), with their rates per window.
#[derive(Debug, Clone)]
pub struct Rates<const N: usize> {
    tiers: Vec<Tier<N>>,
    last: Option<[Option<u64>; N]>,
    resets: u64,
}

impl<const N: usize> Default for Rates<N> {
    fn default() -> Self {
        Self {
            tiers: WINDOWS
                .iter()
                .map(|&window| Tier {
                    window,
                    spacing: window / SAMPLES_PER_WINDOW,
                    samples: VecDeque::new(),
                })
                .collect(),
            last: None,
            resets: 0,
        }
    }
}

impl<const N: usize> Rates<N> {
    /// Records the counters' values at `at`. A counter lower than before discards the history
    /// of all of them: they reset together when a workload restarts.
    pub fn push(&mut self, at: Instant, values: [Option<u64>; N]) {
        if let Some(prev) = &self.last {
            let went_back = prev
                .iter()
                .zip(&values)
                .any(|(p, v)| matches!((p, v), (Some(p), Some(v)) if v < p));
            if went_back {
                self.reset();
            }
        }
        self.last = Some(values);
        for tier in &mut self.tiers {
            tier.push(Sample { at, values });
        }
    }

    /// Forgets the history: the next sample is a new baseline.
    pub fn reset(&mut self) {
        for tier in &mut self.tiers {
            tier.samples.clear();
        }
        self.resets += 1;
    }

    /// Counter `counter`'s increase per second over window `window` (an index into
    /// [`WINDOWS`]); `None` until two samples exist or where the counter is absent.
    pub fn rate(&self, window: usize, counter: usize) -> Option<f64> {
        self.tiers.get(window)?.rate(counter)
    }

    /// The rates of one counter over every window, in [`WINDOWS`] order.
    pub fn rates(&self, counter: usize) -> [Option<f64>; 3] {
        [0, 1, 2].map(|w| self.rate(w, counter))
    }

    /// How many times the counters went backwards and a new baseline was started.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Samples held, all windows together (bounded whatever the tick).
    pub fn held(&self) -> usize {
        self.tiers.iter().map(|t| t.samples.len()).sum()
    }
}

/// Rates for many keyed series (one per workload). A series whose identity `marker` changes
/// (the cgroup was recreated: a new inode) starts again; series not updated in a scan are
/// dropped by [`RateTable::retain_updated`].
#[derive(Debug, Clone)]
pub struct RateTable<K, const N: usize> {
    series: HashMap<K, (u64, u64, Rates<N>)>,
    generation: u64,
}

impl<K, const N: usize> Default for RateTable<K, N> {
    fn default() -> Self {
        Self {
            series: HashMap::new(),
            generation: 0,
        }
    }
}

impl<K: Eq + Hash, const N: usize> RateTable<K, N> {
    /// Records one series' counters and returns its rates.
    pub fn update(
        &mut self,
        key: K,
        marker: u64,
        at: Instant,
        values: [Option<u64>; N],
    ) -> &Rates<N> {
        let generation = self.generation;
        let entry = self
            .series
            .entry(key)
            .or_insert_with(|| (marker, generation, Rates::default()));
        if entry.0 != marker {
            entry.0 = marker;
            entry.2.reset();
        }
        entry.1 = generation;
        entry.2.push(at, values);
        &entry.2
    }

    /// Drops the series not updated since the last call, and begins a new scan.
    pub fn retain_updated(&mut self) {
        let generation = self.generation;
        self.series.retain(|_, (_, g, _)| *g == generation);
        self.generation += 1;
    }

    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }
}

#[cfg(test)]
#[path = "rates_tests.rs"]
mod tests;
