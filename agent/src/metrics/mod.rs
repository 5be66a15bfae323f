//! Prometheus `/metrics`: what the sources publish, rendered in the text format on each scrape.
//!
//! The exporter holds a list of collectors; each is a plain function from one feed's latest
//! snapshot to samples, so wiring a new feed is one line in [`Exporter::from_feeds`]
//! (`exporter.add_feed(rx, my_feed::encode)`) and one small function. Nothing is stored
//! between scrapes: a scrape reads the `watch` channels, the store (the per-container and node
//! numbers the API serves), the health state the health evaluator publishes, `/proc/self` and
//! the kernel's eBPF program statistics, and writes them out.
//!
//! Names start with `nodeward_`, use base units (`_seconds`, `_bytes`, ratios 0..1) and
//! counters end in `_total`. Labels are bounded: a container's cgroup and container id, a
//! GPU's index and UUID, a window length, an eBPF program name — never a connection or flow.

use std::{net::SocketAddr, sync::Arc};

use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{health::hub::Published, sources::Feeds, store::Store, supervise::TaskResult};

pub mod agent;
pub mod encode;
pub mod gpu;
pub mod health;
mod http;
pub mod store;
pub mod tcp;
pub mod udp;

pub use encode::{Kind, Metrics};

/// The task's name in the daemon's logs.
pub const NAME: &str = "metrics";

/// `[metrics]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics`.
    pub enabled: bool,
    /// Address and port of the HTTP listener. Loopback by default: the DaemonSet sets the
    /// pod's address so that Prometheus can reach it.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for scrapes on {addr}: {source} (set metrics.listen, or metrics.enabled = false)")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

type Collector = Box<dyn Fn(&mut Metrics) + Send + Sync>;

/// Renders every registered collector into one scrape.
#[derive(Default)]
pub struct Exporter {
    collectors: Vec<Collector>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("collectors", &self.collectors.len())
            .finish()
    }
}

impl Exporter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything the daemon knows how to export today: the agent itself, which sources run,
    /// and each feed that started.
    pub fn from_feeds(feeds: &Feeds) -> Self {
        let mut exporter = Self::new();
        exporter.add(agent::encode_process);
        exporter.add(agent::encode_ebpf);
        let sources = agent::SourceList::from_feeds(feeds);
        exporter.add(move |m| sources.encode(m));
        for (name, rx) in &feeds.supervised {
            let (name, rx) = (*name, rx.clone());
            exporter.add(move |m| agent::encode_task(name, &rx.borrow(), m));
        }
        if let Some(rx) = &feeds.tcp {
            exporter.add_feed(rx.clone(), |s, m| tcp::encode(s, m));
        }
        if let Some(rx) = &feeds.udp {
            exporter.add_feed(rx.clone(), udp::encode);
        }
        if let Some(rx) = &feeds.gpu {
            exporter.add_feed(rx.clone(), gpu::encode);
        }
        exporter
    }

    /// Adds what the daemon has beyond the raw feeds: the store (per-container TCP, cgroup and
    /// node numbers) and the health state the evaluator publishes (verdict, drain, conditions).
    pub fn add_store(&mut self, store: Arc<Store>, health: Option<watch::Receiver<Published>>) {
        self.add(move |m| store::encode(&store.snapshot(), m));
        if let Some(rx) = health {
            self.add_feed(rx, health::encode);
        }
    }

    /// Adds a collector that writes samples on each scrape.
    pub fn add(&mut self, collect: impl Fn(&mut Metrics) + Send + Sync + 'static) {
        self.collectors.push(Box::new(collect));
    }

    /// Adds a feed: on each scrape, `encode` reads the latest value the source published.
    pub fn add_feed<T: Send + Sync + 'static>(
        &mut self,
        rx: watch::Receiver<T>,
        encode: fn(&T, &mut Metrics),
    ) {
        // The borrow holds the channel's read lock only while encoding (microseconds).
        self.add(move |m| encode(&rx.borrow(), m));
    }

    /// One scrape's text.
    pub fn render(&self) -> String {
        let mut metrics = Metrics::new();
        for collect in &self.collectors {
            collect(&mut metrics);
        }
        metrics.render()
    }
}

/// Binds the listener and spawns the scrape server into the daemon's tasks. Binding happens
/// here, before the daemon reports ready. A port that is taken is logged as an error and the
/// agent runs on without `/metrics`: like a source that cannot start, a missing output must
/// not take the health verdict and the gRPC API down with it (and two agents on one machine,
/// as in the tests, must not kill each other).
pub fn spawn(
    config: &MetricsConfig,
    feeds: &Feeds,
    store: &Arc<Store>,
    health: Option<watch::Receiver<Published>>,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<TaskResult>,
) {
    if !config.enabled {
        tracing::info!("Prometheus metrics disabled by config (metrics.enabled = false)");
        return;
    }
    let addr = config.listen;
    let listener = match bind(addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "Prometheus metrics unavailable");
            return;
        }
    };
    let mut exporter = Exporter::from_feeds(feeds);
    exporter.add_store(store.clone(), health);
    let exporter = Arc::new(exporter);
    let cancel = cancel.clone();
    tracing::info!(%addr, "serving Prometheus metrics at http://{addr}/metrics");
    tasks.spawn(async move {
        let served = http::serve(listener, exporter, cancel).await;
        (NAME, served.map_err(crate::task::TaskError::failed))
    });
}

fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    let listen = |source| MetricsError::Listen { addr, source };
    let std_listener = std::net::TcpListener::bind(addr).map_err(listen)?;
    std_listener.set_nonblocking(true).map_err(listen)?;
    tokio::net::TcpListener::from_std(std_listener).map_err(listen)
}

/// The labels every per-container series carries: the cgroup path below the v2 root (or
/// `id:<cgroup id>` once the cgroup is gone) and the container id found in it ("" for a
/// cgroup that is not a container's). Pod and namespace join here once the agent resolves them.
pub fn container_labels(cgroup_id: u64, cgroup_path: Option<&str>) -> (String, String) {
    match cgroup_path {
        Some(path) => (
            path.to_owned(),
            crate::sources::gpu::procs::container_for_cgroup(path).unwrap_or_default(),
        ),
        None => (format!("id:{cgroup_id}"), String::new()),
    }
}
