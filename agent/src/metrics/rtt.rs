//! The kernel's RTT histogram folded into Prometheus `le` buckets.
//!
//! The kernel counts RTT samples in log-linear buckets (16 per power of two,
//! `agent_ebpf::tcp::bucket_bounds`): far too many series to export per container. The
//! exported bounds are one per power of two from 32 µs to 2^23 µs (8.4 s): every one is a
//! kernel bucket edge, so each kernel bucket falls wholly below or above it and the folding
//! adds no error; 19 bounds plus `+Inf`, `_sum` and `_count` make 22 series per container that
//! has TCP traffic. That is the resolution of Prometheus' default buckets (a factor of 2 to 2.5
//! between bounds) over the range RTTs take: 32 µs (a few hops in one data centre; loopback
//! is below) to 8 s (a retransmission timeout grown by back-off). A quantile read with
//! `histogram_quantile()` is off by at most the width of the bucket it falls in — half its
//! upper bound; the agent's own percentiles (gRPC, CLI) keep the kernel's 1/16 resolution.
//!
//! One edge case: the kernel's buckets are half-open (`[lo, hi)`, integer microseconds), so the
//! `le="L"` bucket counts samples below `L` µs; a sample of exactly `L` µs lands in the next.

use crate::store::RttHistogram;

/// The smallest and largest exported bound, as powers of two in microseconds.
const FIRST_EXP: u32 = 5;
const LAST_EXP: u32 = 23;
const BOUNDS: usize = (LAST_EXP - FIRST_EXP + 1) as usize;

/// The exported upper bounds, in microseconds, ascending.
pub const LE_US: [u64; BOUNDS] = {
    let mut out = [0; BOUNDS];
    let mut i = 0;
    while i < BOUNDS {
        out[i] = 1 << (FIRST_EXP + i as u32);
        i += 1;
    }
    out
};

/// `(upper bound in seconds, samples below it)` for every exported bound: cumulative, as
/// Prometheus wants. `+Inf` is the histogram's `count`.
pub fn fold(h: &RttHistogram) -> [(f64, u64); BOUNDS] {
    let mut out = [(0.0, 0); BOUNDS];
    let mut buckets = h.buckets.iter().peekable();
    let mut below = 0u64;
    for (slot, le) in out.iter_mut().zip(LE_US) {
        // A kernel bucket whose exclusive upper bound is at most `le` holds only samples
        // below `le`; the next one starts at or above it.
        while let Some((upper, n)) = buckets.next_if(|(upper, _)| *upper <= le) {
            debug_assert!(*upper > 0);
            below = below.saturating_add(*n);
        }
        *slot = (le as f64 / 1e6, below);
    }
    out
}

#[cfg(test)]
mod tests {
    use agent_ebpf::tcp::{bucket_bounds, bucket_of, HIST_BUCKETS};

    use super::*;

    #[test]
    fn every_exported_bound_is_a_kernel_bucket_edge() {
        for le in LE_US {
            let (lo, _) = bucket_bounds(bucket_of(le));
            assert_eq!(lo, le, "{le} µs is inside a kernel bucket");
        }
        let (_, top) = bucket_bounds(HIST_BUCKETS - 1);
        assert!(*LE_US.last().expect("bounds") < top);
    }

    /// The kernel's histogram of `samples`, built with the kernel's own bucket function.
    fn kernel_histogram(samples: &[u64]) -> RttHistogram {
        let mut counts = std::collections::BTreeMap::new();
        for us in samples {
            *counts.entry(bucket_of(*us)).or_insert(0u64) += 1;
        }
        RttHistogram {
            buckets: counts
                .into_iter()
                .map(|(b, n)| (bucket_bounds(b).1, n))
                .collect(),
            count: samples.len() as u64,
            sum_us: samples.iter().sum(),
        }
    }

    #[test]
    fn folded_buckets_count_exactly_the_samples_below_each_bound() {
        // Samples on, next to and between the bounds, below the first and above the last.
        let mut samples = vec![0, 1, 15, 31, 32, 33, 47, 63, 64, 65, 1000, 1023, 1024, 1025];
        samples.extend([20_000, 24_999, 29_500, 32_767, 32_768, 8_388_607, 8_388_608]);
        samples.extend([9_000_000, 200_000_000]);
        let folded = fold(&kernel_histogram(&samples));
        for (le_s, below) in folded {
            let le_us = (le_s * 1e6).round() as u64;
            let truth = samples.iter().filter(|s| **s < le_us).count() as u64;
            assert_eq!(below, truth, "le {le_us} µs");
        }
        assert_eq!(folded[0].0, 32e-6);
        assert_eq!(folded[BOUNDS - 1], (8.388_608, samples.len() as u64 - 3));
    }

    #[test]
    fn an_empty_histogram_folds_to_zeros() {
        assert!(fold(&RttHistogram::default()).iter().all(|(_, n)| *n == 0));
    }
}
