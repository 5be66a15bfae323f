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

use super::read::{CgroupStats, Reader};
use crate::{
    containers::{CgroupDirs, Container, Inventory, Layout},
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
}

#[derive(Debug)]
pub struct Scanner {
    layout: Option<Layout>,
    proc_root: PathBuf,
    node: Option<NodeConfig>,
    reader: Reader,
    rates: RateTable<String, 8>,
    node_rates: Rates<6>,
    held: HashMap<String, Held>,
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
        Ok(Self {
            layout,
            proc_root: paths.proc_root.clone(),
            node: node.enabled.then(|| node.clone()),
            reader: Reader::default(),
            rates: RateTable::default(),
            node_rates: Rates::default(),
            held: HashMap::new(),
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
            let inventory = Inventory::scan(&layout, &self.proc_root);
            let v2_controllers = matches!(layout, Layout::V2 { .. });
            for c in &inventory.containers {
                let dirs = layout.dirs(&c.path);
                let Some((stats, quiet)) = self.stats_of(&c.path, &dirs, v2_controllers, now)
                else {
                    snap.vanished += 1;
                    continue;
                };
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
                    now,
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
                    container: c.clone(),
                    stats,
                    rates,
                });
            }
            self.rates.retain_updated();
            let scan = self.scans;
            self.held.retain(|_, h| h.seen == scan);
            snap.inventory = Arc::new(inventory);
        }
        if let Some(cfg) = &self.node {
            let n = node::collect(&self.proc_root, cfg);
            self.node_rates.push(now, node_counters(&n));
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
        if let Some(h) = self.held.get_mut(path) {
            let fresh = now.saturating_duration_since(h.read_at) < self.full_read_every;
            if fresh
                && h.stats.cpu.usage_ns.is_some()
                && self.reader.cpu_usage_ns(dirs, v2_controllers) == h.stats.cpu.usage_ns
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
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::containers::fixture::{write_tree, Driver, FixtureLayout, TempDir};

    #[test]
    fn partitions_are_recognised_by_their_disk() {
        let all = ["vda", "vda1", "nvme0n1", "nvme0n1p2", "sdb"];
        assert!(is_partition("vda1", all.iter().copied()));
        assert!(is_partition("nvme0n1p2", all.iter().copied()));
        assert!(!is_partition("nvme0n1", all.iter().copied()));
        assert!(!is_partition("sdb", all.iter().copied()));
    }

    fn scanner(c: &Config) -> Result<Scanner, ScanError> {
        Scanner::new(&c.containers, &c.node, &c.paths)
    }

    fn config_for(root: &std::path::Path) -> Config {
        let mut c = Config::default();
        c.paths.cgroup_root = root.to_path_buf();
        c.paths.proc_root = root.join("proc");
        c.node.enabled = false;
        c
    }

    #[test]
    fn a_fixture_tree_scan_reports_injected_values_and_rates() {
        let dir = TempDir::new("nodeward-scan").expect("temp");
        let written =
            write_tree(&dir.path, FixtureLayout::V2, Driver::Systemd, 6, 1).expect("fixture");
        let mut s = scanner(&config_for(&dir.path)).expect("scanner");
        let t0 = Instant::now();
        let first = s.scan(t0);
        assert_eq!(first.workloads.len(), 7);
        // One CPU second more for container 0, two seconds later: 0.5 cores.
        let w = &written[0];
        let cpu_stat = dir.path.join(&w.path).join("cpu.stat");
        let usec = w.cpu_usage_ns / 1000;
        let (user, system) = (usec * 3 / 4 + 1_000_000, usec / 4);
        let usec = usec + 1_000_000;
        std::fs::write(
            &cpu_stat,
            format!("usage_usec {usec}\nuser_usec {user}\nsystem_usec {system}\n"),
        )
        .expect("write");
        let second = s.scan(t0 + Duration::from_secs(2));
        let got = second
            .workloads
            .iter()
            .find(|x| x.container.path == w.path)
            .expect("container 0");
        assert_eq!(got.stats.memory.current_bytes, Some(w.memory_bytes));
        assert_eq!(got.rates.cpu[0], Some(0.5));
        assert_eq!(got.rates.cpu_user[0], Some(0.5));
        assert_eq!(got.rates.cpu_system[0], Some(0.0));
        // The container restarts under the same name: counters start again near zero.
        std::fs::write(&cpu_stat, "usage_usec 10\nuser_usec 5\nsystem_usec 5\n").expect("write");
        let third = s.scan(t0 + Duration::from_secs(3));
        let got = third
            .workloads
            .iter()
            .find(|x| x.container.path == w.path)
            .expect("container 0");
        assert_eq!(
            got.rates.cpu, [None; 3],
            "a new baseline, not a negative rate"
        );
    }

    #[test]
    fn a_quiet_container_is_read_in_full_only_when_its_cpu_moves_or_its_read_ages() {
        let dir = TempDir::new("nodeward-scan-quiet").expect("temp");
        let written =
            write_tree(&dir.path, FixtureLayout::V2, Driver::Systemd, 3, 0).expect("fixture");
        let mut s = scanner(&config_for(&dir.path)).expect("scanner");
        let memory_of = |snap: &Snapshot, path: &str| {
            snap.workloads
                .iter()
                .find(|x| x.container.path == path)
                .and_then(|x| x.stats.memory.current_bytes)
        };
        let t0 = Instant::now();
        let first = s.scan(t0);
        assert_eq!((first.workloads.len(), first.quiet), (3, 0));
        let w = &written[0];
        let cgroup = dir.path.join(&w.path);
        std::fs::write(cgroup.join("memory.current"), "4096\n").expect("write");
        // No CPU used: the last full read stands, only the CPU counter was read.
        let second = s.scan(t0 + Duration::from_secs(1));
        assert_eq!(second.quiet, 3);
        assert_eq!(memory_of(&second, &w.path), Some(w.memory_bytes));
        // Once the read is FULL_READ_EVERY old, everything is read again.
        let third = s.scan(t0 + FULL_READ_EVERY);
        assert_eq!(third.quiet, 0);
        assert_eq!(memory_of(&third, &w.path), Some(4096));
        // CPU used: read in full at once.
        std::fs::write(cgroup.join("memory.current"), "8192\n").expect("write");
        let usec = w.cpu_usage_ns / 1000 + 1;
        std::fs::write(
            cgroup.join("cpu.stat"),
            format!("usage_usec {usec}\nuser_usec {usec}\nsystem_usec 0\n"),
        )
        .expect("write");
        let fourth = s.scan(t0 + FULL_READ_EVERY + Duration::from_secs(1));
        assert_eq!(fourth.quiet, 2);
        assert_eq!(memory_of(&fourth, &w.path), Some(8192));
        // A container that went away is forgotten, and one that comes back is read in full.
        let gone = &written[1];
        let saved = dir.path.join("saved");
        std::fs::rename(dir.path.join(&gone.path), &saved).expect("move away");
        let fifth = s.scan(t0 + FULL_READ_EVERY + Duration::from_secs(2));
        assert_eq!(fifth.workloads.len(), 2);
        std::fs::write(saved.join("memory.current"), "12288\n").expect("write");
        std::fs::rename(&saved, dir.path.join(&gone.path)).expect("move back");
        let sixth = s.scan(t0 + FULL_READ_EVERY + Duration::from_secs(3));
        assert_eq!(sixth.quiet, 2, "{:?}", sixth.workloads.len());
        assert_eq!(memory_of(&sixth, &gone.path), Some(12288));
    }

    #[test]
    fn quiet_containers_are_recognised_on_every_layout() {
        for layout in [FixtureLayout::V2, FixtureLayout::Hybrid, FixtureLayout::V1] {
            let dir = TempDir::new("nodeward-scan-quiet-layouts").expect("temp");
            write_tree(&dir.path, layout, Driver::Cgroupfs, 2, 0).expect("fixture");
            let mut s = scanner(&config_for(&dir.path)).expect("scanner");
            let t0 = Instant::now();
            let first = s.scan(t0);
            let second = s.scan(t0 + Duration::from_secs(1));
            let stats = |s: &Snapshot| s.workloads.iter().map(|w| w.stats.clone()).collect();
            let (a, b): (Vec<_>, Vec<_>) = (stats(&first), stats(&second));
            assert_eq!((first.quiet, second.quiet), (0, 2), "{layout:?}");
            assert_eq!(a, b, "{layout:?}: the figures of the last full read");
        }
    }

    #[test]
    fn a_snapshot_serialises_with_flat_identity_fields() {
        let dir = TempDir::new("nodeward-scan-json").expect("temp");
        let written =
            write_tree(&dir.path, FixtureLayout::Hybrid, Driver::Systemd, 1, 1).expect("fixture");
        let snap = scanner(&config_for(&dir.path))
            .expect("scanner")
            .scan(Instant::now());
        let v = serde_json::to_value(&snap).expect("snapshot serialises");
        let w = &v["workloads"][0];
        assert_eq!(w["kind"], "container");
        assert_eq!(w["pod_uid"], written[0].pod_uid.as_str());
        assert_eq!(w["qos"], "guaranteed");
        assert_eq!(w["runtime"], "containerd");
        assert_eq!(
            w["stats"]["memory"]["current_bytes"],
            written[0].memory_bytes
        );
        assert_eq!(v["workloads"][1]["kind"], "service");
        assert_eq!(v["layout"]["layout"], "hybrid");
    }

    #[test]
    fn a_container_removed_between_walk_and_read_is_skipped() {
        let dir = TempDir::new("nodeward-scan-gone").expect("temp");
        write_tree(&dir.path, FixtureLayout::V2, Driver::Cgroupfs, 2, 0).expect("fixture");
        let layout = Layout::detect(&dir.path).expect("layout");
        let inv = Inventory::scan(&layout, &dir.path);
        std::fs::remove_dir_all(dir.path.join(&inv.containers[0].path)).expect("remove");
        let mut reader = Reader::default();
        let read: Vec<_> = inv
            .containers
            .iter()
            .filter_map(|c| reader.read(&layout.dirs(&c.path), true))
            .collect();
        assert_eq!(read.len(), 1);
        assert_eq!(reader.parse_errors, 0, "a vanished cgroup is not an error");
    }

    #[test]
    fn a_missing_cgroup_root_is_an_error_only_when_containers_are_enabled() {
        let mut c = Config::default();
        c.paths.cgroup_root = PathBuf::from("/nonexistent/cgroup");
        assert!(scanner(&c).is_err());
        c.containers.enabled = false;
        assert!(scanner(&c).is_ok());
    }
}
