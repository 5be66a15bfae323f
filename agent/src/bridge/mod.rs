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
//! either started, and marked unavailable only when neither could. Each network report says
//! what each enabled feed last did ([`FeedState`]): reported in its current run (the
//! supervisor's restart count when its snapshot arrived), waiting for its first report, or
//! blind (it could not start); the drain trusts the stream counts only when every feed has
//! reported in its current run.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    containers::{cri::Identities, podresources::Assignments, proc_cgroup::ProcCgroup, Inventory},
    sources::{cgroup, gpu, tcp, udp, Feeds},
    store::{FeedState, Provenance, SourceKind, Store},
    supervise::TaskResult,
    task::TaskHealth,
};

pub mod diagnostics;
pub mod gpu_pods;
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
/// `identity` is the container runtime's table (`containers::cri`), where the agent looks one
/// up.
pub fn spawn(
    config: &Settings,
    feeds: &Feeds,
    identity: Option<watch::Receiver<Arc<Identities>>>,
    gpu_assignments: Option<watch::Receiver<Arc<Assignments>>>,
    store: &Arc<Store>,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<TaskResult>,
) {
    let bridge = Bridge {
        store: store.clone(),
        identity,
        gpu_assignments,
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
        blind_feeds: [tcp::NAME, udp::NAME]
            .into_iter()
            .filter_map(|n| feeds.unavailable.iter().find(|(u, _)| *u == n))
            .map(|(n, r)| (*n, r.clone()))
            .collect(),
        feed_tasks: feeds
            .supervised
            .iter()
            .filter(|(n, _)| [tcp::NAME, udp::NAME].contains(n))
            .map(|(n, rx)| (*n, rx.clone()))
            .collect(),
        reported_run: BTreeMap::new(),
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
    identity: Option<watch::Receiver<Arc<Identities>>>,
    /// The kubelet's GPU assignments (`containers::podresources`).
    gpu_assignments: Option<watch::Receiver<Arc<Assignments>>>,
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
    /// Network feeds that could not start, with the reason.
    blind_feeds: Vec<(&'static str, String)>,
    /// The supervisor's view of each started network feed's task.
    feed_tasks: BTreeMap<&'static str, watch::Receiver<TaskHealth>>,
    /// The restart count of each feed's task when its latest real snapshot arrived.
    reported_run: BTreeMap<&'static str, u32>,
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
        self.note_report(tcp::NAME);
        self.note_report(udp::NAME);
        self.publish_network();
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = changed(&mut self.cgroup) => self.publish_resources(),
                () = changed(&mut self.identity) => self.publish_meta(&self.inventory()),
                () = changed(&mut self.gpu) => self.publish_gpu(),
                () = changed(&mut self.tcp) => {
                    self.note_report(tcp::NAME);
                    self.publish_network();
                }
                () = changed(&mut self.udp) => {
                    self.note_report(udp::NAME);
                    self.publish_network();
                }
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
            let mut provenance = resources::cgroup_provenance(&scan);
            // Where the containers' names come from, and whether that is degraded.
            if let Some(rx) = &self.identity {
                let note = rx.borrow().status.describe();
                provenance.fidelity = format!("{}; {note}", provenance.fidelity);
            }
            self.store.publish_cgroups(
                scan.taken_at,
                provenance,
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
        let runtime = self.identity.as_ref().map(|rx| rx.borrow().clone());
        let mut meta: BTreeMap<_, _> = key::container_meta(inventory, runtime.as_deref());
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
                let (mut data, mut provenance) = resources::gpu_snapshot(&snap);
                if let Some(rx) = &self.gpu_assignments {
                    let assignments = rx.borrow().clone();
                    let runtime = self.identity.as_ref().map(|r| r.borrow().clone());
                    gpu_pods::assign(&mut data.gpus, &assignments, runtime.as_deref());
                    provenance.fidelity =
                        format!("{}; {}", provenance.fidelity, assignments.status.describe());
                }
                self.store.publish_gpus(snap.taken_at, provenance, data);
            }
            _ => {}
        }
    }

    /// Feed `name` published a snapshot: if it is a real one (not the placeholder before a
    /// source's first tick) and its task is up, it reported in the task's current run. A
    /// restarted task keeps feeding the same channel, whose last value is the old run's until
    /// the new run ticks; the restart count tells the two apart.
    fn note_report(&mut self, name: &'static str) {
        let real = match name {
            tcp::NAME => self.tcp.as_ref().is_some_and(|r| r.borrow().tick > 0),
            _ => self
                .udp
                .as_ref()
                .is_some_and(|r| !r.borrow().hook.is_empty()),
        };
        let task = self.feed_tasks.get(name).map(|rx| rx.borrow().clone());
        if real && task.as_ref().is_none_or(|t| t.up) {
            self.reported_run
                .insert(name, task.map_or(0, |t| t.restarts));
        }
    }

    /// What each enabled network feed last did (see the module's doc).
    fn feeds(&self) -> BTreeMap<&'static str, FeedState> {
        let mut out: BTreeMap<&'static str, FeedState> = self
            .blind_feeds
            .iter()
            .map(|(n, r)| (*n, FeedState::Blind { reason: r.clone() }))
            .collect();
        let started = [
            (tcp::NAME, self.tcp.is_some()),
            (udp::NAME, self.udp.is_some()),
        ];
        for (name, _) in started.into_iter().filter(|(_, on)| *on) {
            let state = match self.reported_run.get(name) {
                Some(run) => FeedState::Reporting { run: *run },
                None => FeedState::Waiting,
            };
            out.insert(name, state);
        }
        out
    }

    fn publish_network(&mut self) {
        // A feed whose snapshot arrived with the other's is read (and so marked seen) here,
        // and gets no wake-up of its own: note its report now.
        if self
            .tcp
            .as_ref()
            .is_some_and(|r| r.has_changed().unwrap_or(false))
        {
            self.note_report(tcp::NAME);
        }
        if self
            .udp
            .as_ref()
            .is_some_and(|r| r.has_changed().unwrap_or(false))
        {
            self.note_report(udp::NAME);
        }
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
        let mut data = network::network_snapshot(tcp.as_deref(), udp.as_ref(), &inventory, &params);
        data.feeds = self.feeds();
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
mod tests;
