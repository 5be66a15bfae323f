//! Prometheus `/metrics`: what the sources publish, rendered in the text format on each scrape.
//!
//! Every per-container and node figure is read from the store (`network`, `store`), the same
//! data the gRPC API and the health rules read, with one label scheme
//! ([`container_labels`]); the verdict from the health state the health evaluator publishes. Besides them,
//! a few collectors describe the agent itself: `/proc/self` (`process_*`), the kernel's eBPF
//! program statistics, the supervisor's task states and the list of sources that started. The
//! sources' own diagnostics (the eBPF programs' drop and packet counters, the GPU source's
//! state) come from the store too: nothing here reads a source's feed. Nothing is kept
//! between scrapes: each collector is a plain function that writes what it reads.
//!
//! Names start with `nodeward_` (the standard `process_*` families excepted), use base units
//! (`_seconds`, `_bytes`, ratios 0..1); counters end in `_total` and are totals since the agent
//! (or the kernel) started, so that `rate()` works. Labels are bounded: a container's id, name,
//! pod and namespace, a GPU's index and UUID, an eBPF program name — never a connection or
//! flow.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    health::hub::Published,
    sources::Feeds,
    store::{ContainerMeta, Store},
    supervise::TaskResult,
};

pub mod agent;
pub mod encode;
pub mod gpu;
pub mod health;
mod http;
pub mod network;
pub mod rtcp;
pub mod rtt;
pub mod store;
pub mod tcp;
pub mod tls;
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
    /// PEM certificate chain: with `tls_key`, `/metrics` is served over HTTPS only.
    pub tls_cert: PathBuf,
    /// PEM private key of `tls_cert`.
    pub tls_key: PathBuf,
    /// PEM CA certificates: when set, a scraper must present a client certificate signed by
    /// one of them (the same meaning as `api.tls_client_ca`).
    pub tls_client_ca: PathBuf,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            tls_client_ca: PathBuf::new(),
        }
    }
}

/// A `[metrics]` value that does not fit with the others: (key, value, what is allowed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metrics.{key} = {value}: {allowed}")]
pub struct MetricsConfigError {
    pub key: &'static str,
    pub value: String,
    pub allowed: &'static str,
}

impl MetricsConfig {
    /// Whether `/metrics` is served over TLS.
    pub fn tls_enabled(&self) -> bool {
        !self.tls_cert.as_os_str().is_empty()
    }

    /// Checks the TLS keys go together (the files are read when the server starts).
    pub fn validate(&self) -> Result<(), MetricsConfigError> {
        let shown = |p: &std::path::Path| format!("{:?}", p.display().to_string());
        if self.tls_cert.as_os_str().is_empty() != self.tls_key.as_os_str().is_empty() {
            return Err(MetricsConfigError {
                key: "tls_key",
                value: shown(&self.tls_key),
                allowed: "tls_cert and tls_key must be given together",
            });
        }
        if !self.tls_client_ca.as_os_str().is_empty() && !self.tls_enabled() {
            return Err(MetricsConfigError {
                key: "tls_client_ca",
                value: shown(&self.tls_client_ca),
                allowed: "needs tls_cert and tls_key",
            });
        }
        Ok(())
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

    /// The agent itself (process, eBPF programs, sources and tasks): only the supervisor's
    /// task health and the list of sources are read from the feeds, never a source's data.
    /// [`Exporter::add_store`] adds the figures.
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
        exporter
    }

    /// Adds the store (every per-container and node figure, the GPUs, the eBPF programs'
    /// counters) and the health state the health evaluator publishes (verdict, drain,
    /// conditions).
    pub fn add_store(&mut self, store: Arc<Store>, health: Option<watch::Receiver<Published>>) {
        self.add(move |m| encode_snapshot(&store.snapshot(), m));
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

/// Everything one store snapshot holds.
pub fn encode_snapshot(snapshot: &crate::store::Snapshot, m: &mut Metrics) {
    network::encode(snapshot, m);
    rtcp::encode(snapshot, m);
    store::encode(snapshot, m);
    if let Some(d) = &snapshot.network_diagnostics {
        if let Some(drops) = &d.tcp {
            tcp::encode(drops, m);
        }
        if let Some(u) = &d.udp {
            udp::encode(u, m);
        }
    }
    if let Some(g) = &snapshot.gpus {
        gpu::encode(g, m);
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
    // Unlike a taken port, a TLS setup that fails stops the agent (as the API's does): running
    // on in plain HTTP, or without the scrapes the operator secured, would hide the mistake.
    let tls = match tls::acceptor(config) {
        Ok(tls) => tls,
        Err(e) => {
            let e = crate::task::TaskError::failed(e);
            tasks.spawn(async move { (NAME, Err(e)) });
            return;
        }
    };
    let mut exporter = Exporter::from_feeds(feeds);
    exporter.add_store(store.clone(), health);
    let exporter = Arc::new(exporter);
    let cancel = cancel.clone();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let client_certificates = !config.tls_client_ca.as_os_str().is_empty();
    tracing::info!(
        %addr,
        client_certificates,
        "serving Prometheus metrics at {scheme}://{addr}/metrics"
    );
    tasks.spawn(async move {
        let served = http::serve(listener, exporter, tls, cancel).await;
        (NAME, served.map_err(crate::task::TaskError::failed))
    });
}

fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    let listen = |source| MetricsError::Listen { addr, source };
    let std_listener = std::net::TcpListener::bind(addr).map_err(listen)?;
    std_listener.set_nonblocking(true).map_err(listen)?;
    tokio::net::TcpListener::from_std(std_listener).map_err(listen)
}

/// The labels every per-container series carries: `container_id` (the store's key: the
/// runtime's container id, else the cgroup path), `container` (the container's name, empty
/// until the agent resolves pods), `pod` and `namespace` (likewise). The same four on every
/// per-container family, so series of different families join on them.
pub fn container_labels<'a>(
    id: &'a str,
    meta: Option<&'a ContainerMeta>,
) -> [(&'static str, &'a str); 4] {
    [
        ("container_id", id),
        ("container", meta.map_or("", |m| m.name.as_str())),
        ("pod", meta.map_or("", |m| m.pod_name.as_str())),
        ("namespace", meta.map_or("", |m| m.pod_namespace.as_str())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NetworkDiagnostics, TcpDrops, UdpDiagnostics};

    fn render(snapshot: &crate::store::Snapshot) -> String {
        let mut m = Metrics::new();
        encode_snapshot(snapshot, &mut m);
        m.render()
    }

    #[test]
    fn source_diagnostics_come_from_the_store_and_only_once_reported() {
        let store = Store::new();
        let before = render(&store.snapshot());
        for family in ["nodeward_tcp_drops_total", "nodeward_udp_", "nodeward_gpu_"] {
            assert!(
                !before.contains(family),
                "{family} before any report:\n{before}"
            );
        }
        store.publish_network_diagnostics(NetworkDiagnostics {
            tcp: Some(TcpDrops {
                stats_full: 7,
                ..TcpDrops::default()
            }),
            udp: None,
        });
        store.publish_gpus(
            std::time::SystemTime::UNIX_EPOCH,
            crate::store::Provenance::default(),
            crate::store::GpuSnapshot::default(),
        );
        let text = render(&store.snapshot());
        assert!(
            text.lines()
                .any(|l| l == "nodeward_tcp_drops_total{reason=\"stats_full\"} 7"),
            "{text}"
        );
        assert!(
            !text.contains("nodeward_udp_"),
            "UDP never reported:\n{text}"
        );
        assert!(
            text.lines().any(|l| l == "nodeward_gpu_devices 0"),
            "{text}"
        );
        store.publish_network_diagnostics(NetworkDiagnostics {
            tcp: None,
            udp: Some(UdpDiagnostics {
                hook: "tc".to_owned(),
                ..UdpDiagnostics::default()
            }),
        });
        let text = render(&store.snapshot());
        assert!(
            text.lines()
                .any(|l| l == "nodeward_udp_hook_info{hook=\"tc\"} 1"),
            "{text}"
        );
    }
}
