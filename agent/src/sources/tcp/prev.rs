//! What the tracker keeps of each open flow between two reads: the cumulative counters it
//! takes differences of, and no more. A whole `FlowState` is 152 bytes; at 200,000 flows
//! (both ends of 100,000 loopback connections) the smaller record saves about 20 MiB of the
//! agent's resident memory (docs/BENCHMARKS.md, issue 15).

use agent_ebpf::FlowState;

/// One flow as the previous read saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct PrevFlow {
    /// Tells a flow evicted and re-created under the same cookie apart from the one kept.
    pub start_ns: u64,
    pub path_samples: u64,
    pub sum_rtt_us: u64,
    pub diffs: u64,
    pub sum_jitter16_us: u64,
    pub retrans: u64,
    pub segs_out: u64,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// The tracker's tick that last read the flow: one that no read holds any more is
    /// forgotten (evicted by the LRU map).
    pub seen_tick: u64,
}

impl PrevFlow {
    pub(super) fn of(flow: &FlowState, tick: u64) -> Self {
        Self {
            start_ns: flow.start_ns,
            path_samples: flow.path_samples,
            sum_rtt_us: flow.sum_rtt_us,
            diffs: flow.diffs,
            sum_jitter16_us: flow.sum_jitter16_us,
            retrans: flow.retrans,
            segs_out: flow.segs_out,
            bytes_acked: flow.bytes_acked,
            bytes_received: flow.bytes_received,
            seen_tick: tick,
        }
    }
}
