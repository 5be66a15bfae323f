//! The collector (kernel maps or sock_diag polls → sliding windows → snapshot) and the daemon
//! task around it.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    chain, diag, ensure_cgroup2, own, seed, window, Plan, Recorder, TcpConfig, TcpError,
    TcpSnapshot,
};
use crate::{ebpf::tcp, probe::Capabilities, sources::Shared, store::Window};

/// Where the counters come from.
#[derive(Debug)]
enum Input {
    Ebpf(tcp::Reader),
    Diag(Box<diag::Poller>),
}

/// The collector without the task around it: attach, then call [`Collector::tick`]. The
/// integration tests drive it directly.
#[derive(Debug)]
pub struct Collector {
    input: Input,
    tracker: window::Tracker,
    paths: crate::sources::cgroup_path::CgroupPaths,
    /// Paths of the chain that failed before this one attached, each as `path: reason`.
    fell_back_from: Vec<String>,
    /// The agent's own cgroup, looked up where the ids are cgroup ids.
    own: Option<own::OwnCgroup>,
    /// Connections older than the programs, on the eBPF paths keyed by cgroup.
    seed: Option<seed::Seed>,
    /// `tcp.rtt_method` as resolved for this kernel and path (`kernel`, `segment` or `srtt`).
    rtt_method: super::RttMethod,
}

/// The programs and map sizes a path needs.
fn programs(config: &TcpConfig, plan: &Plan, rtt_method: super::RttMethod) -> tcp::Attach {
    // The tagging program(s) record each socket's cgroup; sock_ops reads it.
    let (sock_create, egress) = match plan.recorder {
        Recorder::SockCreate => (true, false),
        Recorder::SockCreateAndEgress => (true, true),
        Recorder::ListenAndEgress | Recorder::Egress => (false, true),
        Recorder::Netns | Recorder::SockDiag => (false, false),
    };
    tcp::Attach {
        sock_create,
        tag_at_listen: plan.recorder == Recorder::ListenAndEgress,
        egress,
        key_by_netns: plan.recorder.ids() == super::Ids::NetnsCookie,
        count_foreign_context: plan.count_foreign_context,
        rtt_method: rtt_method.program_value(),
        max_cgroups: config.max_cgroups,
        max_flows: config.max_flows,
    }
}

/// Lines of a load error kept in the log and the fidelity: its first lines (the error, the
/// start of the verifier log) and its last (where the verifier states the reason).
const ERROR_HEAD: usize = 3;
const ERROR_TAIL: usize = 4;

/// A load or attach error cut to what a log line can carry: the first and last lines of a
/// verifier log, joined with ` | `.
fn brief(e: &TcpError) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.len() <= ERROR_HEAD + ERROR_TAIL {
        return lines.join(" | ");
    }
    let mut out = lines[..ERROR_HEAD].to_vec();
    out.push("…");
    out.extend(&lines[lines.len() - ERROR_TAIL..]);
    out.join(" | ")
}

impl Collector {
    /// Attaches one path's programs; the tracker keeps `windows` (`network.windows`).
    pub fn attach(
        cgroup_root: &std::path::Path,
        config: &TcpConfig,
        plan: &Plan,
        tick: Duration,
        windows: &[Window],
    ) -> Result<Self, TcpError> {
        if plan.mount_cgroup2 {
            ensure_cgroup2(cgroup_root)?;
        }
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|e| format!("unknown ({e})"), |s| s.trim().to_owned());
        let rtt_method = config.rtt_method.resolve(&release, plan.recorder)?;
        let input = if plan.recorder == Recorder::SockDiag {
            Input::Diag(Box::new(diag::Poller::open(&plan.proc_root, config)?))
        } else {
            Input::Ebpf(tcp::Reader::attach(
                cgroup_root,
                &programs(config, plan, rtt_method),
            )?)
        };
        let tracker = window::Tracker::new(window::Limits {
            windows: windows.iter().map(|w| (*w, w.ticks(tick))).collect(),
            max_peers: usize::try_from(config.max_peers).unwrap_or(usize::MAX),
            recorder: plan.recorder,
            max_totals: usize::try_from(config.max_cgroups).unwrap_or(usize::MAX),
        });
        Ok(Self {
            input,
            tracker,
            // Namespace cookies are not cgroup inodes: nothing to resolve.
            paths: crate::sources::cgroup_path::CgroupPaths::new(
                (plan.recorder != Recorder::Netns).then(|| cgroup_root.to_path_buf()),
            ),
            fell_back_from: Vec::new(),
            own: (plan.recorder.ids() == super::Ids::CgroupV2).then(own::OwnCgroup::default),
            seed: (plan.recorder.ids() == super::Ids::CgroupV2
                && plan.recorder != Recorder::SockDiag)
                .then(|| seed::Seed::new(plan.proc_root.clone(), cgroup_root.to_path_buf())),
            rtt_method,
        })
    }

    /// Attaches the first path of `chain` that loads and attaches. A path that fails is
    /// logged at WARN (path, program, error) and everything it attached is dropped before
    /// the next is tried; the failures are kept for the snapshot's fidelity. The last
    /// failure is returned when every path fails.
    pub fn attach_chain(
        chain: Vec<(std::path::PathBuf, Plan)>,
        config: &TcpConfig,
        tick: Duration,
        windows: &[Window],
    ) -> Result<(Self, std::path::PathBuf, Plan), TcpError> {
        let mut failed = Vec::new();
        let mut last = None;
        let total = chain.len();
        for (i, (root, plan)) in chain.into_iter().enumerate() {
            match Self::attach(&root, config, &plan, tick, windows) {
                Ok(mut collector) => {
                    collector.fell_back_from = failed;
                    return Ok((collector, root, plan));
                }
                Err(e) => {
                    let reason = brief(&e);
                    let program = e.program().unwrap_or("-");
                    if i + 1 < total {
                        tracing::warn!(path = plan.path(), program, error = %reason, "TCP hook path failed to load or attach; its programs are dropped and the next path of the chain is tried");
                    }
                    failed.push(format!("{} failed ({reason})", plan.path()));
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(TcpError::Missing("a hook path to try")))
    }

    /// Carries the totals of the run before this one (its last snapshot) forward.
    pub fn carry(&mut self, prior: &TcpSnapshot) {
        self.tracker.carry(prior);
    }

    /// The paths that failed before this one attached, each with its reason.
    pub fn fell_back_from(&self) -> &[String] {
        &self.fell_back_from
    }

    /// Entries in the kernel maps (flows, cgroups, histogram) and the tracker's own sizes.
    pub fn footprint(&self) -> Result<(tcp::MapUsage, window::TrackerFootprint), TcpError> {
        let usage = match &self.input {
            Input::Ebpf(r) => r.usage()?,
            Input::Diag(p) => p.usage(),
        };
        Ok((usage, self.tracker.footprint()))
    }

    /// Reads the maps once, advances the windows, and returns the new snapshot.
    pub fn tick(&mut self) -> Result<TcpSnapshot, TcpError> {
        let raw = match &mut self.input {
            Input::Ebpf(r) => r.read()?,
            Input::Diag(p) => p.read(crate::ebpf::monotonic_ns()),
        };
        // Before the own-cgroup probe opens its connection, so that it is not taken for an
        // old one.
        if let Some(seed) = &mut self.seed {
            seed.fill(&raw);
        }
        let own_cgroup_id = self.own.as_mut().and_then(|o| o.observe(&raw));
        let live: Vec<u64> = raw.stats.iter().map(|s| s.0).collect();
        self.paths.next_tick(&live);
        let paths = &mut self.paths;
        let seeded = self.seed.iter().flat_map(seed::Seed::flows);
        let (mut snapshot, cleanup) = self
            .tracker
            .update_with(raw, seeded, &mut |id| paths.resolve(id));
        snapshot
            .fidelity
            .fell_back_from
            .clone_from(&self.fell_back_from);
        snapshot.fidelity.rtt_method = Some(self.rtt_method);
        snapshot.own_cgroup_id = own_cgroup_id;
        match &mut self.input {
            Input::Ebpf(r) => r.clean(&cleanup)?,
            Input::Diag(p) => p.clean(&cleanup),
        }
        Ok(snapshot)
    }
}

pub struct Source {
    collector: Collector,
    tick: Duration,
    tx: watch::Sender<Arc<TcpSnapshot>>,
}

impl Source {
    /// Attaches the programs, or says why this node cannot run them. The receiver always
    /// holds the latest snapshot.
    pub fn start(
        config: &TcpConfig,
        shared: &Shared,
        caps: &Capabilities,
    ) -> Result<(Self, watch::Receiver<Arc<TcpSnapshot>>), TcpError> {
        // With eBPF turned off by config, only the sock_diag poller may run.
        let attribution = if shared.ebpf {
            config.attribution
        } else {
            super::Attribution::SockDiag
        };
        // `auto`: the chosen path, then its fallbacks; a configured path alone.
        let mut paths = chain(caps, attribution)?;
        for (_, plan) in &mut paths {
            plan.proc_root.clone_from(&shared.paths.proc_root);
        }
        let (collector, root, plan) =
            Collector::attach_chain(paths, config, shared.tick, &shared.windows)?;
        tracing::info!(path = plan.path(), cgroup_root = %root.display(), fell_back_from = ?collector.fell_back_from(), "TCP latency source started");
        let (tx, rx) = watch::channel(Arc::new(TcpSnapshot::default()));
        Ok((
            Self {
                collector,
                tick: shared.tick,
                tx,
            },
            rx,
        ))
    }

    /// Publishes into `tx` instead of the channel `start` made, so that a restarted source
    /// feeds the readers of the one before it, and carries forward the totals of the last
    /// snapshot there so that they stay monotonic across the restart.
    pub fn publish_into(mut self, tx: watch::Sender<Arc<TcpSnapshot>>) -> Self {
        let prior = Arc::clone(&tx.borrow());
        self.collector.carry(&prior);
        Self { tx, ..self }
    }

    /// Reads on every tick until cancelled; the programs are detached when this returns.
    ///
    /// Each tick runs on a thread of the source's own, never on a runtime worker: at 100,000
    /// connections a tick takes seconds (the flow map's read and the tracker's work per
    /// flow). On a worker, the task it wakes by publishing (the bridge) waited in that
    /// worker's LIFO slot, which no other worker steals, and a tick that overran its period
    /// found the next one due at once, so the source ticked on without yielding and the drain's
    /// count stayed on one early snapshot for minutes. One thread rather than the blocking
    /// pool, whose threads take turns: the tracker's memory then stays in one allocator arena
    /// instead of growing a peak in each (the agent's peak at 100,000 connections: 430 MiB
    /// on the pool, docs/BENCHMARKS.md, issue 15).
    pub async fn run(self, cancel: CancellationToken) -> Result<(), String> {
        let Self {
            mut collector,
            tick: period,
            tx,
        } = self;
        type Reply = tokio::sync::oneshot::Sender<Result<TcpSnapshot, TcpError>>;
        let (requests, asked) = std::sync::mpsc::channel::<Reply>();
        let thread = std::thread::Builder::new()
            .name("nodeward-tcp".to_owned())
            .spawn(move || {
                // Ends when the task drops its sender; dropping the collector detaches.
                for reply in asked {
                    let _ = reply.send(collector.tick());
                }
            })
            .map_err(|e| format!("start the TCP tick thread: {e}"))?;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                _ = tick.tick() => {
                    let (reply, answer) = tokio::sync::oneshot::channel();
                    if requests.send(reply).is_err() {
                        break Err("the TCP tick thread ended".to_owned());
                    }
                    let snapshot = match answer.await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => break Err(e.to_string()),
                        Err(_) => break Err("the TCP tick thread ended mid-tick".to_owned()),
                    };
                    tracing::debug!(containers = snapshot.containers.len(), sample = %snapshot.fidelity.rtt_sample, "tcp tick");
                    tx.send_replace(Arc::new(snapshot));
                }
            }
        };
        drop(requests);
        // The programs stay attached until the thread has dropped the collector.
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|e| format!("TCP tick thread: {e}"))?
            .map_err(|_| "the TCP tick thread panicked".to_owned())?;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_verifier_log_is_cut_to_its_first_and_last_lines_on_one_line() {
        let log: String = (0..30).map(|i| format!("{i}: insn\n")).collect();
        let e = TcpError::Load(crate::ebpf::LoadError::Refused {
            name: tcp::SOCK_CREATE,
            reason: format!("verifier said:\n{log}"),
        });
        assert_eq!(e.program(), Some(tcp::SOCK_CREATE));
        assert_eq!(
            brief(&e),
            "program `nodeward_sock_create`: verifier said: | 0: insn | 1: insn | … | 26: insn \
             | 27: insn | 28: insn | 29: insn"
        );
        let short = TcpError::Missing("x");
        assert_eq!(short.program(), None);
        assert!(!brief(&short).contains('…'));
    }
}
