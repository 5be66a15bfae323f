//! The bridge from the sources to the store: one task that, whenever a source publishes a new
//! snapshot, maps it into the store's plain types, so that the health engine, the API and the
//! metrics all read one consistent view.
//!
//! Sources keep their own rich snapshots (watch channels, `sources::cgroup::latest()`); the
//! store keeps only what the verdict and the API need. Every mapping is a pure function in
//! [`network`] or [`resources`], tested on constructed snapshots; this file only registers the
//! sources and moves data when a channel changes.
//!
//! The store's `Network` kind is fed by two sources (TCP and UDP/RTP): it is registered when
//! either started, and marked unavailable only when neither could.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    containers::{proc_cgroup::ProcCgroup, Inventory},
    sources::{cgroup, gpu, tcp, udp, Feeds},
    store::{Provenance, SourceKind, Store},
    supervise::TaskResult,
    task::TaskHealth,
};

pub mod diagnostics;
pub mod key;
pub mod network;
pub mod resources;

pub const NAME: &str = "bridge";

/// What the bridge reads from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `containers.enabled`: per-container cgroup stats go into the store.
    pub containers: bool,
    /// `node.enabled`: node stats go into the store.
    pub node: bool,
    /// `udp.stream_min_duration`: a UDP flow younger than this is not a stream yet.
    pub udp_min_flow_age: Duration,
    /// `health.network_window`: the window the per-peer breakdown is taken over.
    pub peer_window: crate::store::Window,
    /// `drain.host_cgroups`: cgroups whose connections and flows are not streams.
    pub host_cgroups: Vec<String>,
}

/// Declares every enabled source in the store, and those that could not start as unavailable,
/// so that the verdict waits for exactly the sources that will report.
pub fn register(store: &Store, config: &Settings, feeds: &Feeds) {
    let started = |name: &str| feeds.started.contains(&name);
    let why_not = |name: &str| {
        feeds
            .unavailable
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(n, r)| format!("{n}: {r}"))
    };
    if started(tcp::NAME) || started(udp::NAME) {
        store.register(SourceKind::Network);
    } else {
        let reasons: Vec<String> = [tcp::NAME, udp::NAME]
            .into_iter()
            .filter_map(why_not)
            .collect();
        if !reasons.is_empty() {
            store.mark_unavailable(SourceKind::Network, reasons.join("; "));
        }
    }
    let cgroup_kinds = [
        (SourceKind::Cgroup, config.containers),
        (SourceKind::Node, config.node),
    ];
    for (kind, _) in cgroup_kinds.into_iter().filter(|(_, enabled)| *enabled) {
        match why_not(cgroup::NAME) {
            Some(reason) if !started(cgroup::NAME) => store.mark_unavailable(kind, reason),
            _ => store.register(kind),
        }
    }
    if started(gpu::NAME) {
        store.register(SourceKind::Gpu);
    } else if let Some(reason) = why_not(gpu::NAME) {
        store.mark_unavailable(SourceKind::Gpu, reason);
    }
}

/// Spawns the task that keeps the store up to date, once the sources are [`register`]ed.
pub fn spawn(
    config: &Settings,
    feeds: &Feeds,
    store: &Arc<Store>,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<TaskResult>,
) {
    let bridge = Bridge {
        store: store.clone(),
        tcp: feeds.tcp.clone(),
        udp: feeds.udp.clone(),
        gpu: feeds.gpu.clone(),
        cgroup: feeds.started.contains(&cgroup::NAME).then(cgroup::latest),
        publish_cgroups: config.containers,
        publish_node: config.node,
        udp_min_flow_age: config.udp_min_flow_age,
        peer_window: config.peer_window,
        own_cgroup_path: own_cgroup_path(),
        host_cgroups: config.host_cgroups.clone(),
        network_notes: [tcp::NAME, udp::NAME]
            .into_iter()
            .filter_map(|n| feeds.unavailable.iter().find(|(u, _)| *u == n))
            .map(|(n, r)| format!("{n} unavailable: {r}"))
            .collect(),
    };
    let cancel = cancel.clone();
    let (supervised, store, c) = (feeds.supervised.clone(), store.clone(), cancel.clone());
    tasks.spawn(async move {
        bridge.run(cancel).await;
        (NAME, Ok(()))
    });
    tasks.spawn(async move {
        publish_tasks(&store, supervised, c).await;
        (NAME, Ok(()))
    });
}

/// Copies each supervised task's health into the store whenever its supervisor changes it
/// (a failure, a restart), for the health rules and the API.
async fn publish_tasks(
    store: &Store,
    supervised: Vec<(&'static str, watch::Receiver<TaskHealth>)>,
    cancel: CancellationToken,
) {
    use tokio_stream::StreamExt as _;
    // A watch stream yields the current value first, then every change.
    let mut changes: tokio_stream::StreamMap<_, _> = supervised
        .into_iter()
        .map(|(name, rx)| (name, tokio_stream::wrappers::WatchStream::new(rx)))
        .collect();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            // `None` once every supervisor ended: the branch is then off until shutdown.
            Some((name, health)) = changes.next() => store.publish_task(name, health),
        }
    }
}

/// The agent's own cgroup v2 path, `/`-prefixed as the eBPF sources report paths.
fn own_cgroup_path() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let p = ProcCgroup::parse(&text).unified?;
    Some(format!("/{}", p.trim_start_matches('/')))
}

struct Bridge {
    store: Arc<Store>,
    tcp: Option<watch::Receiver<Arc<tcp::TcpSnapshot>>>,
    udp: Option<watch::Receiver<udp::model::UdpSnapshot>>,
    gpu: Option<watch::Receiver<gpu::GpuSnapshot>>,
    cgroup: Option<watch::Receiver<Arc<cgroup::Snapshot>>>,
    publish_cgroups: bool,
    publish_node: bool,
    udp_min_flow_age: std::time::Duration,
    peer_window: crate::store::Window,
    own_cgroup_path: Option<String>,
    host_cgroups: Vec<String>,
    network_notes: Vec<String>,
}

/// Waits for the next value; never returns for an absent or closed channel (its source ended,
/// which the daemon sees on its own task).
async fn changed<T>(rx: &mut Option<watch::Receiver<T>>) {
    match rx {
        Some(r) => {
            if r.changed().await.is_err() {
                *rx = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

impl Bridge {
    async fn run(mut self, cancel: CancellationToken) {
        // The channels' current values may already be real snapshots (a source that ticked
        // before this task subscribed): publish them once, skipping placeholders.
        self.publish_resources();
        self.publish_gpu();
        self.publish_network();
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = changed(&mut self.cgroup) => self.publish_resources(),
                () = changed(&mut self.gpu) => self.publish_gpu(),
                () = changed(&mut self.tcp) => self.publish_network(),
                () = changed(&mut self.udp) => self.publish_network(),
            }
        }
    }

    fn inventory(&self) -> Arc<Inventory> {
        self.cgroup
            .as_ref()
            .map(|rx| rx.borrow().inventory.clone())
            .unwrap_or_default()
    }

    fn publish_resources(&mut self) {
        let Some(rx) = self.cgroup.as_mut() else {
            return;
        };
        let scan = rx.borrow_and_update().clone();
        if scan.taken_at == SystemTime::UNIX_EPOCH {
            return;
        }
        if self.publish_cgroups {
            self.store.publish_cgroups(
                scan.taken_at,
                resources::cgroup_provenance(&scan),
                resources::cgroup_snapshot(&scan),
            );
        }
        if self.publish_node {
            if let Some(n) = &scan.node {
                self.store.publish_node(
                    scan.taken_at,
                    resources::node_provenance(n),
                    resources::node_stats(n),
                );
            }
        }
        self.publish_meta(&scan.inventory);
    }

    /// The identity table: the inventory's workloads plus the containers only the network
    /// sources know, so that every id the API lists resolves.
    fn publish_meta(&self, inventory: &Inventory) {
        let mut meta: BTreeMap<_, _> = key::container_meta(inventory);
        let tcp = self.tcp.as_ref().map(|r| r.borrow().clone());
        let udp = self.udp.as_ref().map(|r| r.borrow().clone());
        network::network_meta(tcp.as_deref(), udp.as_ref(), inventory, &mut meta);
        self.store.publish_container_meta(meta);
    }

    fn publish_gpu(&mut self) {
        let Some(rx) = self.gpu.as_mut() else {
            return;
        };
        let snap = rx.borrow_and_update().clone();
        match &snap.status {
            gpu::SourceStatus::Unavailable(reason) => {
                self.store.mark_unavailable(SourceKind::Gpu, reason.clone());
            }
            // NVML failed as a whole and is being re-initialised: nothing it would say can be
            // trusted, so the source is shown unavailable with the reason until it answers.
            // Its own counters (re-initialisations, failed counts) still reach /metrics.
            gpu::SourceStatus::Degraded(reason) => {
                let (data, _) = resources::gpu_snapshot(&snap);
                self.store
                    .publish_gpus_unavailable(format!("GPU source degraded: {reason}"), data);
            }
            gpu::SourceStatus::Running if resources::gpu_polled(&snap) => {
                let (data, provenance) = resources::gpu_snapshot(&snap);
                self.store.publish_gpus(snap.taken_at, provenance, data);
            }
            _ => {}
        }
    }

    fn publish_network(&mut self) {
        let tcp = self.tcp.as_mut().map(|r| r.borrow_and_update().clone());
        let udp = self.udp.as_mut().map(|r| r.borrow_and_update().clone());
        // Placeholders before a source's first tick: a TCP snapshot at tick 0, a UDP one
        // without its hook.
        let tcp = tcp.filter(|t| t.tick > 0);
        let udp = udp.filter(|u| !u.hook.is_empty());
        if tcp.is_none() && udp.is_none() {
            return;
        }
        let inventory = self.inventory();
        let now = SystemTime::now();
        let params = network::NetworkParams {
            udp_min_flow_age: self.udp_min_flow_age,
            peer_window: self.peer_window,
            own_cgroup_path: self.own_cgroup_path.as_deref(),
            host_cgroups: &self.host_cgroups,
            now,
        };
        let data = network::network_snapshot(tcp.as_deref(), udp.as_ref(), &inventory, &params);
        let mut provenance: Provenance = network::network_provenance(tcp.as_deref(), udp.as_ref());
        for note in &self.network_notes {
            provenance.fidelity = format!("{}; {note}", provenance.fidelity);
        }
        self.store.publish_network(now, provenance, data);
        self.store
            .publish_network_diagnostics(diagnostics::network_diagnostics(
                tcp.as_deref(),
                udp.as_ref(),
            ));
        self.publish_meta(&inventory);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SourceStatus;

    fn feeds(started: &[&'static str], unavailable: &[&'static str]) -> Feeds {
        Feeds {
            started: started.to_vec(),
            unavailable: unavailable
                .iter()
                .map(|n| (*n, format!("{n} cannot run")))
                .collect(),
            ..Feeds::default()
        }
    }

    fn status(store: &Store, kind: SourceKind) -> Option<SourceStatus> {
        store.snapshot().sources.get(&kind).cloned()
    }

    #[tokio::test]
    async fn each_supervised_tasks_health_reaches_the_store_on_every_change() {
        use crate::supervise::TaskHealth;
        let store = Store::new();
        let (tcp_tx, tcp_rx) = watch::channel(TaskHealth::default());
        let (_gpu_tx, gpu_rx) = watch::channel(TaskHealth::default());
        let cancel = CancellationToken::new();
        let (s, c) = (store.clone(), cancel.clone());
        let task = tokio::spawn(async move {
            publish_tasks(&s, vec![(tcp::NAME, tcp_rx), (gpu::NAME, gpu_rx)], c).await;
        });
        let wait = |f: fn(&crate::store::Snapshot) -> bool| {
            let store = store.clone();
            async move {
                while !f(&store.snapshot()) {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        };
        // The current values first: both tasks up, never restarted.
        wait(|s| s.tasks.len() == 2 && s.tasks.values().all(|h| h.up && h.restarts == 0)).await;
        tcp_tx.send_modify(|h| {
            h.restarts = 1;
            h.up = false;
            h.last_failure = Some("panicked: boom".to_owned());
        });
        wait(|s| {
            s.tasks
                .get(tcp::NAME)
                .is_some_and(|h| h.restarts == 1 && !h.up)
        })
        .await;
        assert_eq!(store.snapshot().tasks[gpu::NAME], TaskHealth::default());
        cancel.cancel();
        task.await.expect("stops on cancel");
    }

    #[test]
    fn network_waits_for_whichever_of_tcp_and_udp_runs() {
        let store = Store::new();
        register(
            &store,
            &crate::config::Config::default().bridge(),
            &feeds(&[tcp::NAME, cgroup::NAME], &[udp::NAME, gpu::NAME]),
        );
        assert_eq!(
            status(&store, SourceKind::Network),
            Some(SourceStatus::Pending)
        );
        assert_eq!(
            status(&store, SourceKind::Cgroup),
            Some(SourceStatus::Pending)
        );
        assert_eq!(
            status(&store, SourceKind::Node),
            Some(SourceStatus::Pending)
        );
        assert!(matches!(
            status(&store, SourceKind::Gpu),
            Some(SourceStatus::Unavailable { reason }) if reason.contains("gpu cannot run")
        ));
    }

    #[test]
    fn network_is_unavailable_only_when_neither_source_runs_with_both_reasons() {
        let store = Store::new();
        register(
            &store,
            &crate::config::Config::default().bridge(),
            &feeds(&[cgroup::NAME], &[tcp::NAME, udp::NAME]),
        );
        match status(&store, SourceKind::Network) {
            Some(SourceStatus::Unavailable { reason }) => {
                assert!(
                    reason.contains(tcp::NAME) && reason.contains(udp::NAME),
                    "{reason}"
                );
            }
            other => panic!("expected unavailable, got {other:?}"),
        }
    }

    #[test]
    fn disabled_sources_are_not_registered() {
        let store = Store::new();
        let mut config = crate::config::Config::default();
        config.node.enabled = false;
        register(&store, &config.bridge(), &feeds(&[cgroup::NAME], &[]));
        let s = store.snapshot();
        assert!(s.sources.contains_key(&SourceKind::Cgroup));
        assert!(!s.sources.contains_key(&SourceKind::Node), "node disabled");
        assert!(
            !s.sources.contains_key(&SourceKind::Network),
            "no eBPF source asked for"
        );
        assert!(!s.sources.contains_key(&SourceKind::Gpu));
    }

    #[test]
    fn a_cgroup_source_that_cannot_start_marks_cgroup_and_node_unavailable() {
        let store = Store::new();
        register(
            &store,
            &crate::config::Config::default().bridge(),
            &feeds(&[], &[cgroup::NAME]),
        );
        for kind in [SourceKind::Cgroup, SourceKind::Node] {
            assert!(matches!(
                status(&store, kind),
                Some(SourceStatus::Unavailable { .. })
            ));
        }
    }
}
