//! The store: the latest snapshot of every source, and nothing else.
//!
//! This is the seam between the sources (which collect) and the health engine and the API (which
//! only read). Each source replaces its whole snapshot on every tick with [`Store::publish_network`]
//! and friends; readers take a cheap, consistent [`Snapshot`] (a few `Arc` clones under a short
//! read lock) and never block a source for longer than that. A source that cannot run on this
//! node says so once with [`Store::mark_unavailable`], so the verdict does not wait for it.
//!
//! The types in [`types`] are plain data in base units (microseconds, bytes, ratios) so that any
//! collector can be mapped into them; they know nothing about eBPF, cgroup files or NVML.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::SystemTime,
};

pub mod clock;
pub mod diagnostics;
pub mod mig;
pub mod rtcp;
pub mod types;

pub use clock::{Clock, ManualClock, SystemClock};
pub use diagnostics::{NetworkDiagnostics, TcpDrops, UdpCounters, UdpDiagnostics};
pub use mig::GpuMigDevice;
pub use rtcp::{ViewerReport, ViewerReports, WindowLoss};
pub use types::*;

/// The sources the health engine knows about.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Per-container TCP RTT, jitter, retransmits and live streams (eBPF).
    Network,
    /// Per-container cgroup statistics.
    Cgroup,
    /// Node-wide statistics (PSI, memory, disks, clock).
    Node,
    /// NVIDIA GPUs (NVML).
    Gpu,
}

impl SourceKind {
    pub const ALL: [SourceKind; 4] = [Self::Network, Self::Cgroup, Self::Node, Self::Gpu];

    pub fn name(self) -> &'static str {
        match self {
            Self::Network => "network",
            Self::Cgroup => "cgroup",
            Self::Node => "node",
            Self::Gpu => "gpu",
        }
    }
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a source produced its data: the hook it used and what that means for fidelity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Provenance {
    /// The hook or interface, e.g. `"tracepoint tcp:tcp_probe"`, `"cgroup v2"`, `"NVML 12.4"`.
    pub hook: String,
    /// Fidelity in words, e.g. `"full"` or `"no per-peer breakdown (no BTF)"`.
    pub fidelity: String,
}

/// What the store knows about one enabled source.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceStatus {
    /// Enabled; has not reported yet.
    Pending,
    /// Could not start here (no GPU, not root, ...). The verdict does not wait for it.
    Unavailable { reason: String },
    /// Has reported; `at` is the time of the latest report.
    Reporting {
        at: SystemTime,
        provenance: Provenance,
    },
}

/// One consistent view of everything the sources last reported. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Enabled sources and their state. A source absent here is disabled.
    pub sources: BTreeMap<SourceKind, SourceStatus>,
    pub network: Option<Arc<NetworkSnapshot>>,
    pub cgroups: Option<Arc<CgroupSnapshot>>,
    pub node: Option<Arc<NodeStats>>,
    pub gpus: Option<Arc<GpuSnapshot>>,
    /// The eBPF network sources' own counters (drops, packets seen).
    pub network_diagnostics: Option<Arc<NetworkDiagnostics>>,
    /// Container identity (pod, namespace, labels) by container id, from whichever source knows it.
    pub containers: Option<Arc<BTreeMap<String, ContainerMeta>>>,
    /// Each supervised source task's restarts and last failure, by task name (`ebpf/tcp`, ...).
    pub tasks: BTreeMap<&'static str, crate::task::TaskHealth>,
}

impl Snapshot {
    /// Whether the source has published data in this run (kept when it later becomes
    /// unavailable, so a source that reported and fell away can be told from one that never ran).
    pub fn has_published(&self, kind: SourceKind) -> bool {
        match kind {
            SourceKind::Network => self.network.is_some(),
            SourceKind::Cgroup => self.cgroups.is_some(),
            SourceKind::Node => self.node.is_some(),
            SourceKind::Gpu => self.gpus.is_some(),
        }
    }

    /// Time of the source's latest report, if it reported.
    pub fn reported_at(&self, kind: SourceKind) -> Option<SystemTime> {
        match self.sources.get(&kind) {
            Some(SourceStatus::Reporting { at, .. }) => Some(*at),
            _ => None,
        }
    }
}

/// The shared store. Clone the `Arc` to share it between sources, the engine and the API.
#[derive(Debug, Default)]
pub struct Store {
    inner: RwLock<Snapshot>,
}

impl Store {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Declares a source enabled: the verdict stays UNKNOWN until it has reported once or
    /// declared itself unavailable. Call before the source's first report (the daemon does it
    /// when it starts the source). Registering twice keeps the existing state.
    pub fn register(&self, kind: SourceKind) {
        self.write(|s| {
            s.sources.entry(kind).or_insert(SourceStatus::Pending);
        });
    }

    /// Declares a source unable to run on this node, with the reason.
    pub fn mark_unavailable(&self, kind: SourceKind, reason: impl Into<String>) {
        let reason = reason.into();
        self.write(|s| {
            s.sources.insert(kind, SourceStatus::Unavailable { reason });
        });
    }

    pub fn publish_network(&self, at: SystemTime, provenance: Provenance, data: NetworkSnapshot) {
        self.write(|s| {
            s.network = Some(Arc::new(data));
            s.sources.insert(
                SourceKind::Network,
                SourceStatus::Reporting { at, provenance },
            );
        });
    }

    pub fn publish_cgroups(&self, at: SystemTime, provenance: Provenance, data: CgroupSnapshot) {
        self.write(|s| {
            s.cgroups = Some(Arc::new(data));
            s.sources.insert(
                SourceKind::Cgroup,
                SourceStatus::Reporting { at, provenance },
            );
        });
    }

    pub fn publish_node(&self, at: SystemTime, provenance: Provenance, data: NodeStats) {
        self.write(|s| {
            s.node = Some(Arc::new(data));
            s.sources
                .insert(SourceKind::Node, SourceStatus::Reporting { at, provenance });
        });
    }

    pub fn publish_gpus(&self, at: SystemTime, provenance: Provenance, data: GpuSnapshot) {
        self.write(|s| {
            s.gpus = Some(Arc::new(data));
            s.sources
                .insert(SourceKind::Gpu, SourceStatus::Reporting { at, provenance });
        });
    }

    /// The GPU source runs but NVML fails as a whole: the source is unavailable with the
    /// reason, and what it can still say (its own counters, no devices) replaces its data, in
    /// one update so that no reader sees the one without the other.
    pub fn publish_gpus_unavailable(&self, reason: impl Into<String>, data: GpuSnapshot) {
        let reason = reason.into();
        self.write(|s| {
            s.gpus = Some(Arc::new(data));
            s.sources
                .insert(SourceKind::Gpu, SourceStatus::Unavailable { reason });
        });
    }

    /// Replaces the eBPF network sources' own counters.
    pub fn publish_network_diagnostics(&self, data: NetworkDiagnostics) {
        self.write(|s| s.network_diagnostics = Some(Arc::new(data)));
    }

    /// Replaces the container identity table (container id → pod, namespace, labels).
    pub fn publish_container_meta(&self, meta: BTreeMap<String, ContainerMeta>) {
        self.write(|s| s.containers = Some(Arc::new(meta)));
    }

    /// Replaces what the supervisor last said about task `name`.
    pub fn publish_task(&self, name: &'static str, health: crate::task::TaskHealth) {
        self.write(|s| {
            s.tasks.insert(name, health);
        });
    }

    /// A consistent copy of the current state.
    pub fn snapshot(&self) -> Snapshot {
        match self.inner.read() {
            Ok(g) => g.clone(),
            // A writer panicked mid-update; each update replaces whole fields, so the data is
            // still consistent and readers keep going.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn write(&self, f: impl FnOnce(&mut Snapshot)) {
        match self.inner.write() {
            Ok(mut g) => f(&mut g),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn registered_source_is_pending_until_it_reports() {
        let store = Store::new();
        store.register(SourceKind::Node);
        assert_eq!(
            store.snapshot().sources.get(&SourceKind::Node),
            Some(&SourceStatus::Pending)
        );
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        store.publish_node(at, Provenance::default(), NodeStats::default());
        assert_eq!(store.snapshot().reported_at(SourceKind::Node), Some(at));
        store.register(SourceKind::Node);
        assert_eq!(
            store.snapshot().reported_at(SourceKind::Node),
            Some(at),
            "re-register keeps state"
        );
    }

    #[test]
    fn snapshot_is_not_changed_by_later_publishes() {
        let store = Store::new();
        let t = SystemTime::UNIX_EPOCH;
        store.publish_gpus(t, Provenance::default(), GpuSnapshot::default());
        let before = store.snapshot();
        store.publish_gpus(
            t,
            Provenance::default(),
            GpuSnapshot {
                gpus: vec![GpuDevice::default()],
                ..GpuSnapshot::default()
            },
        );
        assert_eq!(before.gpus.as_ref().map(|g| g.gpus.len()), Some(0));
        assert_eq!(
            store.snapshot().gpus.as_ref().map(|g| g.gpus.len()),
            Some(1)
        );
    }

    #[test]
    fn a_degraded_gpu_source_is_unavailable_with_its_own_state_in_one_update() {
        let store = Store::new();
        store.publish_gpus(
            SystemTime::UNIX_EPOCH,
            Provenance::default(),
            GpuSnapshot {
                gpus: vec![GpuDevice::default()],
                ..GpuSnapshot::default()
            },
        );
        let degraded = GpuSnapshot {
            source: GpuSourceState {
                degraded: true,
                reinit_attempts_total: 2,
                ..GpuSourceState::default()
            },
            ..GpuSnapshot::default()
        };
        store.publish_gpus_unavailable("NVML failed", degraded.clone());
        let s = store.snapshot();
        assert_eq!(s.gpus.as_deref(), Some(&degraded));
        assert!(matches!(
            s.sources.get(&SourceKind::Gpu),
            Some(SourceStatus::Unavailable { reason }) if reason == "NVML failed"
        ));
    }
}
