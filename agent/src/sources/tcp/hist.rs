//! Log-linear RTT histograms in user space: merging the kernel's per-CPU sparse buckets and
//! reading percentiles from them.
//!
//! The bucket layout is `agent_ebpf::tcp` (16 sub-buckets per power of two), shared with the
//! kernel. A percentile is found by rank and interpolated linearly inside its bucket, so its
//! error is bounded by the bucket width (at most 1/16 of the value, usually far less).

use std::collections::BTreeMap;

use agent_ebpf::tcp::bucket_bounds;

/// Counts by bucket index; sparse, because a container's RTTs usually span a few buckets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    buckets: BTreeMap<u32, u64>,
    total: u64,
}

impl Histogram {
    pub fn add(&mut self, bucket: u32, count: u64) {
        if count == 0 {
            return;
        }
        *self.buckets.entry(bucket).or_insert(0) += count;
        self.total += count;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (&b, &c) in &other.buckets {
            self.add(b, c);
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.buckets.iter().map(|(&b, &c)| (b, c))
    }

    /// The value (µs) below which a fraction `q` (0..=1) of the samples lie, or `None` when
    /// empty. The samples of a bucket are taken as spread evenly over its range.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let rank = q * self.total as f64;
        let mut below = 0u64;
        for (&b, &c) in &self.buckets {
            #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
            let (below_f, c_f) = (below as f64, c as f64);
            if below_f + c_f >= rank {
                let (lo, hi) = bucket_bounds(b);
                #[expect(clippy::cast_precision_loss, reason = "bounds below 2^27")]
                let (lo, hi) = (lo as f64, hi as f64);
                let frac = ((rank - below_f) / c_f).clamp(0.0, 1.0);
                return Some(lo + frac * (hi - lo));
            }
            below += c;
        }
        self.max()
    }

    /// Lower edge of the lowest non-empty bucket (µs).
    pub fn min(&self) -> Option<f64> {
        #[expect(clippy::cast_precision_loss, reason = "bounds below 2^27")]
        self.buckets
            .keys()
            .next()
            .map(|&b| bucket_bounds(b).0 as f64)
    }

    /// Upper edge of the highest non-empty bucket (µs).
    pub fn max(&self) -> Option<f64> {
        #[expect(clippy::cast_precision_loss, reason = "bounds below 2^27")]
        self.buckets
            .keys()
            .next_back()
            .map(|&b| bucket_bounds(b).1 as f64)
    }
}

#[cfg(test)]
mod tests {
    use agent_ebpf::tcp::bucket_of;

    use super::*;

    fn histogram_of(samples: &[u64]) -> Histogram {
        let mut h = Histogram::default();
        for &s in samples {
            h.add(bucket_of(s), 1);
        }
        h
    }

    fn exact_quantile(sorted: &[u64], q: f64) -> f64 {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
        #[expect(clippy::cast_precision_loss)]
        let v = sorted[i] as f64;
        v
    }

    /// A deterministic generator (xorshift) so the test needs no crate and never flakes.
    struct Rng(u64);
    impl Rng {
        fn next_f64(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            #[expect(clippy::cast_precision_loss)]
            let v = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
            v
        }
    }

    fn assert_quantiles_within(samples: &mut [u64], tolerance: f64) {
        let h = histogram_of(samples);
        samples.sort_unstable();
        for q in [0.5, 0.9, 0.99] {
            let est = h.quantile(q).expect("non-empty");
            let truth = exact_quantile(samples, q);
            let err = (est - truth).abs() / truth;
            assert!(
                err <= tolerance,
                "q{q}: estimate {est:.1} vs exact {truth:.1} ({:.2}% off)",
                err * 100.0
            );
        }
    }

    #[test]
    fn percentiles_of_a_uniform_20ms_plus_minus_5ms_are_within_three_percent() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let mut samples: Vec<u64> = (0..100_000)
            .map(|_| (15_000.0 + 10_000.0 * rng.next_f64()) as u64)
            .collect();
        assert_quantiles_within(&mut samples, 0.03);
    }

    #[test]
    fn percentiles_of_a_log_normal_spanning_10us_to_10s_are_within_three_percent() {
        let mut rng = Rng(42);
        // exp(uniform over ln(10 µs)..ln(10 s)): every decade equally likely.
        let (lo, hi) = (10f64.ln(), 10_000_000f64.ln());
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let mut samples: Vec<u64> = (0..200_000)
            .map(|_| (lo + (hi - lo) * rng.next_f64()).exp() as u64)
            .collect();
        assert_quantiles_within(&mut samples, 0.03);
    }

    #[test]
    fn a_single_value_is_bracketed_by_min_and_max() {
        let h = histogram_of(&[20_000; 10]);
        let (min, max) = (h.min().expect("min"), h.max().expect("max"));
        assert!(min <= 20_000.0 && 20_000.0 < max && max - min <= 20_000.0 / 16.0);
        let p50 = h.quantile(0.5).expect("p50");
        assert!((p50 - 20_000.0).abs() / 20_000.0 < 0.035);
    }

    #[test]
    fn empty_histogram_has_no_percentiles() {
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn merging_adds_counts() {
        let mut a = histogram_of(&[100, 200]);
        a.merge(&histogram_of(&[100]));
        assert_eq!(a.total(), 3);
        assert_eq!(
            a.iter().find(|(b, _)| *b == bucket_of(100)).map(|(_, c)| c),
            Some(2)
        );
    }
}
