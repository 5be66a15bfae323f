//! One scan: discover the workloads, read each one's cgroup stats and the node's, and update
//! the rates. [`Scanner`] holds what lives between scans (rate history, the reusable read
//! buffer); the daemon's task, the integration tests and the benchmark all drive it directly.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use super::read::{CgroupStats, CpuRoot, Reader};
use crate::{
    containers::{CgroupDirs, Container, Discovery, Inventory, InventoryBuilder, Layout, Procs},
    sources::{
        node::{self, NodeConfig, NodeStats},
        rates::{RateTable, Rates},
    },
};

/// Rates over [`crate::sources::rates::WINDOWS`] (10 s, 1 min, 5 min), in that order.
pub type Windowed = [Option<f64>; 3];

/// A workload's rates.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WorkloadRates {
    /// CPU seconds per second (cores in use), total, user and system.
    pub cpu: Windowed,
    pub cpu_user: Windowed,
    pub cpu_system: Windowed,
    /// Seconds throttled per second.
    pub throttled: Windowed,
    /// Share of CFS periods in which the workload was throttled (0-1), where it has a quota.
    pub throttled_periods_ratio: Windowed,
    /// Bytes per second over all devices.
    pub io_read_bytes: Windowed,
    pub io_write_bytes: Windowed,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workload {
    #[serde(flatten)]
    pub container: Container,
    pub stats: CgroupStats,
    pub rates: WorkloadRates,
}

/// The node's rates.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NodeRates {
    /// CPU seconds per second spent busy (not idle, not iowait), all cores together.
    pub cpu_busy: Windowed,
    /// Bytes per second over whole disks (partitions are not counted twice).
    pub disk_read_bytes: Windowed,
    pub disk_write_bytes: Windowed,
    /// Bytes per second over every interface but `lo`.
    pub net_rx_bytes: Windowed,
    pub net_tx_bytes: Windowed,
    /// Packets dropped or in error per second, both directions, every interface but `lo`.
    pub net_drops_errors: Windowed,
}

/// Everything one scan found.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub taken_at: SystemTime,
    /// Wall time the scan took.
    pub scan_duration: Duration,
    pub layout: Option<Layout>,
    #[serde(skip)]
    pub inventory: Arc<Inventory>,
    pub workloads: Vec<Workload>,
    pub node: Option<NodeStats>,
    pub node_rates: NodeRates,
    /// Workloads found in the walk whose cgroup was gone by the time its stats were read.
    pub vanished: usize,
    /// Workloads whose CPU counter had not moved since their last full read: only that counter
    /// was read, their other figures are from the last full read (at most [`FULL_READ_EVERY`]
    /// old).
    pub quiet: usize,
    /// Cgroup files that held something unparsable, since the agent started.
    pub parse_errors: u64,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            taken_at: SystemTime::UNIX_EPOCH,
            scan_duration: Duration::ZERO,
            layout: None,
            inventory: Arc::default(),
            workloads: Vec::new(),
            node: None,
            node_rates: NodeRates::default(),
            vanished: 0,
            quiet: 0,
            parse_errors: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cgroup layout: {0}")]
    Layout(#[from] crate::containers::LayoutError),
}

/// How old a quiet workload's figures may get: past this, it is read in full whatever its CPU
/// counter says. A workload that used no CPU in a tick ran no task in it, so it made no new
/// allocations, forks or I/O of its own; what can still move meanwhile (reclaim of its memory
/// by kswapd, writeback of its dirty pages, PSI of tasks blocked without running) is read at
/// this pace, which is the span of the shortest rate window and of PSI's `avg10`.
pub const FULL_READ_EVERY: Duration = Duration::from_secs(10);

/// A workload's last full read.
#[derive(Debug)]
struct Held {
    stats: CgroupStats,
    read_at: Instant,
    /// The scan that last found the workload, to forget the ones that went away.
    seen: u64,
    /// Its processes, read at the first scan after the full read: they stand while the
    /// workload stays quiet (a process that forks, exits or execs uses CPU).
    procs: Option<Procs>,
}

#[derive(Debug)]
pub struct Scanner {
    layout: Option<Layout>,
    proc_root: PathBuf,
    node: Option<NodeConfig>,
    reader: Reader,
    /// Where the quiet check finds each workload's CPU counter; `None`: every read is full.
    cpu_root: Option<CpuRoot>,
    rates: RateTable<String, 8>,
    node_rates: Rates<6>,
    held: HashMap<String, Held>,
    discovery: Discovery,
    full_read_every: Duration,
    scans: u64,
}

impl Scanner {
    /// Fails only when containers are enabled and the cgroup root holds no hierarchy.
    pub fn new(
        containers: &crate::containers::ContainersConfig,
        node: &NodeConfig,
        paths: &crate::paths::PathsConfig,
    ) -> Result<Self, ScanError> {
        let layout = if containers.enabled {
            Some(Layout::detect(&paths.cgroup_root)?)
        } else {
            None
        };
        let cpu_root = layout.as_ref().and_then(CpuRoot::open);
        Ok(Self {
            layout,
            proc_root: paths.proc_root.clone(),
            node: node.enabled.then(|| node.clone()),
            reader: Reader::default(),
            cpu_root,
            rates: RateTable::default(),
            node_rates: Rates::default(),
            held: HashMap::new(),
            discovery: Discovery::new(),
            full_read_every: FULL_READ_EVERY,
            scans: 0,
        })
    }

    /// Another bound than [`FULL_READ_EVERY`]; zero reads every file of every workload on
    /// every scan (the benchmark's baseline).
    #[must_use]
    pub fn with_full_read_every(mut self, every: Duration) -> Self {
        self.full_read_every = every;
        self
    }

    /// Walks the hierarchies on every scan instead of when they changed (the benchmark's
    /// baseline).
    #[must_use]
    pub fn walking_every_scan(mut self) -> Self {
        self.discovery = Discovery::walking_every_scan();
        self
    }

    /// How many times the hierarchies were walked so far.
    pub fn walks(&self) -> u64 {
        self.discovery.walks()
    }

    pub fn layout(&self) -> Option<&Layout> {
        self.layout.as_ref()
    }

    pub fn scan(&mut self, now: Instant) -> Snapshot {
        let started = Instant::now();
        let mut snap = Snapshot {
            taken_at: SystemTime::now(),
            layout: self.layout.clone(),
            ..Snapshot::default()
        };
        self.scans += 1;
        if let Some(layout) = self.layout.clone() {
            let mut inventory = InventoryBuilder::new(&self.proc_root);
            let v2_controllers = matches!(layout, Layout::V2 { .. });
            let found = self.discovery.workloads(&layout, now);
            // The counters are stamped with the moment their reads begin, on the caller's
            // clock: a scan that walks the tree reads later after its tick than one that does
            // not, and a rate over two scans must not count that difference as usage.
            let read_at = now + started.elapsed();
            for f in found.iter() {
                let dirs = layout.dirs(&f.path);
                let Some((stats, quiet)) = self.stats_of(&f.path, &dirs, v2_controllers, now)
                else {
                    snap.vanished += 1;
                    let procs = inventory.read_procs(&dirs);
                    inventory.push(f, &dirs, procs);
                    continue;
                };
                let procs = self.procs_of(&inventory, &f.path, &dirs, quiet);
                let c = inventory.push(f, &dirs, procs).clone();
                snap.quiet += usize::from(quiet);
                let (read, write) = stats.io.iter().fold((0u64, 0u64), |(r, w), d| {
                    (
                        r.saturating_add(d.read_bytes),
                        w.saturating_add(d.write_bytes),
                    )
                });
                let io_known = !stats.io.is_empty();
                let cpu = &stats.cpu;
                let r = self.rates.update(
                    c.path.clone(),
                    c.cgroup_id.unwrap_or(0),
                    read_at,
                    [
                        cpu.usage_ns,
                        cpu.user_ns,
                        cpu.system_ns,
                        cpu.throttled_ns,
                        io_known.then_some(read),
                        io_known.then_some(write),
                        cpu.nr_periods,
                        cpu.nr_throttled,
                    ],
                );
                let per_sec_ns = |i| r.rates(i).map(|v| v.map(|v| v / 1e9));
                let rates = WorkloadRates {
                    cpu: per_sec_ns(0),
                    cpu_user: per_sec_ns(1),
                    cpu_system: per_sec_ns(2),
                    throttled: per_sec_ns(3),
                    io_read_bytes: r.rates(4),
                    io_write_bytes: r.rates(5),
                    throttled_periods_ratio: {
                        let (periods, throttled) = (r.rates(6), r.rates(7));
                        [0, 1, 2].map(|i| match (periods[i], throttled[i]) {
                            (Some(p), Some(t)) if p > 0.0 => Some((t / p).min(1.0)),
                            _ => None,
                        })
                    },
                };
                snap.workloads.push(Workload {
                    container: c,
                    stats,
                    rates,
                });
            }
            self.rates.retain_updated();
            let scan = self.scans;
            self.held.retain(|_, h| h.seen == scan);
            snap.inventory = Arc::new(inventory.finish());
        }
        if let Some(cfg) = &self.node {
            let n = node::collect(&self.proc_root, cfg);
            self.node_rates
                .push(now + started.elapsed(), node_counters(&n));
            let r = &self.node_rates;
            snap.node_rates = NodeRates {
                cpu_busy: r.rates(0).map(|v| v.map(|v| v / 1e9)),
                disk_read_bytes: r.rates(1),
                disk_write_bytes: r.rates(2),
                net_rx_bytes: r.rates(3),
                net_tx_bytes: r.rates(4),
                net_drops_errors: r.rates(5),
            };
            snap.node = Some(n);
        }
        snap.parse_errors = self.reader.parse_errors;
        snap.scan_duration = started.elapsed();
        snap
    }
}

impl Scanner {
    /// A workload's stats, and whether they are its last full read (its CPU counter had not
    /// moved and that read is younger than `full_read_every`). `None`: the cgroup is gone.
    fn stats_of(
        &mut self,
        path: &str,
        dirs: &CgroupDirs,
        v2_controllers: bool,
        now: Instant,
    ) -> Option<(CgroupStats, bool)> {
        if let (Some(h), Some(root)) = (self.held.get_mut(path), &self.cpu_root) {
            let fresh = now.saturating_duration_since(h.read_at) < self.full_read_every;
            if fresh
                && h.stats.cpu.usage_ns.is_some()
                && self.reader.cpu_usage_ns(root, path) == h.stats.cpu.usage_ns
            {
                h.seen = self.scans;
                return Some((h.stats.clone(), true));
            }
        }
        let stats = self.reader.read(dirs, v2_controllers)?;
        let held = Held {
            stats: stats.clone(),
            read_at: now,
            seen: self.scans,
            procs: None,
        };
        match self.held.get_mut(path) {
            Some(h) => *h = held,
            None => {
                self.held.insert(path.to_owned(), held);
            }
        }
        Some((stats, false))
    }
}

impl Scanner {
    /// A workload's processes: those read after its last full read while it stays quiet, else
    /// read now (and kept for the quiet scans that follow).
    fn procs_of(
        &mut self,
        inventory: &InventoryBuilder,
        path: &str,
        dirs: &CgroupDirs,
        quiet: bool,
    ) -> Procs {
        let held = self.held.get_mut(path);
        if let (true, Some(Some(p))) = (quiet, held.as_ref().map(|h| &h.procs)) {
            return p.clone();
        }
        let procs = inventory.read_procs(dirs);
        if let Some(h) = held {
            h.procs = Some(procs.clone());
        }
        procs
    }
}

fn node_counters(n: &NodeStats) -> [Option<u64>; 6] {
    let disks: Vec<_> = n
        .disks
        .iter()
        .filter(|d| !is_partition(&d.name, n.disks.iter().map(|d| d.name.as_str())))
        .collect();
    let nics: Vec<_> = n.nics.iter().filter(|i| i.name != "lo").collect();
    let some_sum = |v: &mut dyn Iterator<Item = u64>| Some(v.fold(0u64, u64::saturating_add));
    [
        n.cpu.map(|c| c.busy_ns),
        some_sum(&mut disks.iter().map(|d| d.read_bytes)),
        some_sum(&mut disks.iter().map(|d| d.write_bytes)),
        some_sum(&mut nics.iter().map(|i| i.rx_bytes)),
        some_sum(&mut nics.iter().map(|i| i.tx_bytes)),
        some_sum(
            &mut nics
                .iter()
                .map(|i| i.rx_dropped + i.rx_errors + i.tx_dropped + i.tx_errors),
        ),
    ]
}

/// `vda1` of `vda`, `nvme0n1p1` of `nvme0n1`: a partition's sectors are already in its disk's.
fn is_partition<'a>(name: &str, mut all: impl Iterator<Item = &'a str>) -> bool {
    all.any(|disk| {
        name.len() > disk.len()
            && name.starts_with(disk)
            && name[disk.len()..]
                .trim_start_matches('p')
                .bytes()
                .all(|b| b.is_ascii_digit())
    })
}

#[cfg(test)]
#[path = "scan_tests.rs"]
mod tests;
