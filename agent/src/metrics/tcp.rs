//! TCP: what the eBPF programs could not record. The per-container RTT numbers come from the
//! store's network snapshot (`network.rs`); this adds the kernel-side drop counters from the
//! store's network diagnostics, so that a sample the agent lost is always counted somewhere a
//! dashboard (or the load test) can read.

use super::{Kind, Metrics};
use crate::store::TcpDrops;

const DROPS: &str = "nodeward_tcp_drops_total";
const DROPS_HELP: &str =
    "Events the TCP eBPF programs could not record, by reason, since they were loaded. \
A sample is lost (counted in no container) for no_cgroup (socket without a recorded cgroup), \
stats_full (no free cgroup slot: tcp.max_cgroups cgroups hold one) and flow_insert_failed (flow map \
insert failed; also counts connections left untracked); for hist_full (the sock_diag fallback's \
histogram full) the sample is counted but its RTT is missing from the percentiles; for flow_evicted the sample is counted and the evicted flow rebuilt.";

/// Writes the TCP programs' drop counters.
pub fn encode(d: &TcpDrops, m: &mut Metrics) {
    m.declare(DROPS, Kind::Counter, DROPS_HELP);
    for (reason, n) in [
        ("no_cgroup", d.no_cgroup),
        ("stats_full", d.stats_full),
        ("flow_insert_failed", d.flow_insert_failed),
        ("hist_full", d.hist_full),
        ("flow_evicted", d.flow_evicted),
    ] {
        #[expect(clippy::cast_precision_loss, reason = "a counter far below 2^52")]
        m.counter(DROPS, DROPS_HELP, &[("reason", reason)], n as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_drop_reason_is_a_counter_sample() {
        let drops = TcpDrops {
            hist_full: 1,
            stats_full: 2,
            flow_insert_failed: 3,
            no_cgroup: 4,
            flow_evicted: 5,
        };
        let mut m = Metrics::new();
        encode(&drops, &mut m);
        let text = m.render();
        assert!(
            text.contains("# TYPE nodeward_tcp_drops_total counter"),
            "{text}"
        );
        for (reason, n) in [
            ("hist_full", 1),
            ("stats_full", 2),
            ("flow_insert_failed", 3),
            ("no_cgroup", 4),
            ("flow_evicted", 5),
        ] {
            let line = format!("nodeward_tcp_drops_total{{reason=\"{reason}\"}} {n}\n");
            assert!(text.contains(&line), "missing {line:?} in {text}");
        }
    }
}
