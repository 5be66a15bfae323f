//! An in-process gRPC API over a real Unix socket (and TCP where asked), with a store the test
//! feeds directly: the sources that will write into the store are built elsewhere, so tests
//! stand in for them with recorded values.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use nodeward::{
    api::{pb, pb::node_health_client::NodeHealthClient, ApiConfig, ApiError, BoundApi},
    client::Conn,
    health::HealthConfig,
    store::{
        CgroupSnapshot, ContainerMeta, ContainerNetwork, ContainerStats, FeedState, GpuDevice,
        GpuSnapshot, LiveStream, NetworkSnapshot, NetworkWindow, NodeStats, Provenance, SourceKind,
        Store, StreamProtocol, SystemClock,
    },
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(stem: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "nodeward-{stem}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `[api]` for a test: a socket in `dir`, no TCP listener.
pub fn api_config(dir: &TempDir) -> ApiConfig {
    ApiConfig {
        unix_socket: dir.0.join("nodeward.sock"),
        tcp_listen: String::new(),
        node_name: "test-node".to_owned(),
        ..ApiConfig::default()
    }
}

/// `[health]` for a test: a fast tick, default rules.
pub fn health_config() -> HealthConfig {
    HealthConfig {
        interval: Duration::from_millis(100),
        ..HealthConfig::default()
    }
}

/// A running API.
#[derive(Debug)]
pub struct TestApi {
    pub store: Arc<Store>,
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), ApiError>>>,
    /// The health evaluator, which the daemon runs beside the API.
    _health: tokio::task::JoinSet<nodeward::supervise::TaskResult>,
}

impl TestApi {
    pub async fn start(api: ApiConfig, health: HealthConfig) -> Self {
        let store = Store::new();
        let cancel = CancellationToken::new();
        let mut health_tasks = tokio::task::JoinSet::new();
        let health = nodeward::health::evaluator::spawn(
            &health,
            store.clone(),
            Arc::new(SystemClock),
            nodeward::health::streams::StreamPolicy::default(),
            &cancel,
            &mut health_tasks,
        );
        let bound = BoundApi::bind(&api, &health, store.clone(), cancel.clone())
            .await
            .expect("the API binds");
        let tcp = bound.tcp_addr();
        let task = tokio::spawn(bound.serve());
        Self {
            store,
            socket: api.unix_socket,
            tcp,
            cancel,
            task: Some(task),
            _health: health_tasks,
        }
    }

    /// A client on the Unix socket.
    pub async fn client(&self) -> NodeHealthClient<Channel> {
        nodeward::client::connect(
            &conn(&format!("unix:{}", self.socket.display())),
            &self.socket,
        )
        .await
        .expect("connect over the Unix socket")
    }

    /// Cancels and waits for the server to stop.
    pub async fn stop(mut self) -> Result<(), ApiError> {
        self.cancel.cancel();
        match self.task.take() {
            Some(t) => t.await.expect("API task joins"),
            None => Ok(()),
        }
    }
}

impl Drop for TestApi {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Client options for `addr` (no TLS).
pub fn conn(addr: &str) -> Conn {
    Conn {
        addr: Some(addr.to_owned()),
        json: false,
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
        tls_domain: None,
        connect_timeout: Duration::from_secs(5),
    }
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Now, for store reports.
/// Waits (up to `timeout`) until the agent's health lists the `network` source with a report:
/// from then on its TCP source attributes the sockets that are created.
pub async fn network_reported(client: &NodeHealthClient<Channel>, timeout: Duration) -> Option<()> {
    eventually(timeout, || {
        let mut c = client.clone();
        async move {
            let h = c
                .get_node_health(pb::GetNodeHealthRequest {})
                .await
                .ok()?
                .into_inner()
                .health?;
            h.sources
                .iter()
                .any(|s| s.name == "network" && s.last_report_unix_ms > 0)
                .then_some(())
        }
    })
    .await
}

pub fn now() -> SystemTime {
    SystemTime::now()
}

// ---- recorded source data, as the sources would publish it ----

/// How long a test waits for something that should happen within a tick or two.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn prov(hook: &str) -> Provenance {
    Provenance {
        hook: hook.to_owned(),
        fidelity: "full".to_owned(),
    }
}

pub fn stream(remote: &str, age: Duration) -> LiveStream {
    LiveStream {
        protocol: StreamProtocol::Tcp,
        kind: nodeward::store::StreamKind::Rtmp,
        direction: nodeward::store::StreamDirection::Served,
        local: "10.1.0.5:1935".parse::<SocketAddr>().expect("addr"),
        remote: remote.parse().expect("addr"),
        started_at: SystemTime::now() - age,
        viewers: 0,
        bytes: None,
        viewer_reports: None,
    }
}

/// What a network source would report: one streaming container with `streams` live streams.
pub fn network(streams: usize) -> NetworkSnapshot {
    let mut containers = BTreeMap::new();
    containers.insert(
        "c-live".to_owned(),
        ContainerNetwork {
            windows: vec![
                NetworkWindow {
                    samples: 200,
                    rtt_p50_us: 1_800,
                    rtt_p99_us: 9_000,
                    ..NetworkWindow::new(nodeward::store::Window::from_secs(10))
                },
                NetworkWindow {
                    samples: 1_200,
                    rtt_p50_us: 2_000,
                    rtt_p99_us: 11_000,
                    jitter_rfc3550_us: 700,
                    ..NetworkWindow::new(nodeward::store::Window::from_secs(60))
                },
                NetworkWindow {
                    samples: 6_000,
                    rtt_p50_us: 2_100,
                    rtt_p99_us: 12_000,
                    ..NetworkWindow::new(nodeward::store::Window::from_secs(300))
                },
            ],
            established_connections: streams as u32 + 1,
            streams: (0..streams)
                .map(|i| {
                    stream(
                        &format!("203.0.113.{}:5{i}000", i + 1),
                        Duration::from_secs(90),
                    )
                })
                .collect(),
            peers: Vec::new(),
            ..Default::default()
        },
    );
    // Both feeds reported in their first run, as the bridge would say.
    let feeds = [
        ("ebpf/tcp", FeedState::Reporting { run: 0 }),
        ("ebpf/udp", FeedState::Reporting { run: 0 }),
    ]
    .into_iter()
    .collect();
    NetworkSnapshot { containers, feeds }
}

/// Every source reports once: the verdict can leave UNKNOWN.
pub fn feed_all(store: &Store, streams: usize) {
    for k in SourceKind::ALL {
        store.register(k);
    }
    let mut meta = BTreeMap::new();
    let mut labels = BTreeMap::new();
    labels.insert("app".to_owned(), "live-class".to_owned());
    meta.insert(
        "c-live".to_owned(),
        ContainerMeta {
            id: "c-live".into(),
            name: "srs".into(),
            pod_name: "live-0".into(),
            pod_namespace: "edu".into(),
            labels: labels.into(),
            ..Default::default()
        },
    );
    meta.insert(
        "c-batch".to_owned(),
        ContainerMeta {
            id: "c-batch".into(),
            name: "job".into(),
            pod_name: "train-0".into(),
            pod_namespace: "ml".into(),
            ..Default::default()
        },
    );
    store.publish_container_meta(meta);
    store.publish_network(now(), prov("tracepoint tcp:tcp_probe"), network(streams));
    let mut cg = CgroupSnapshot::default();
    cg.containers.insert(
        "c-live".into(),
        ContainerStats {
            cpu_usage_cores: 1.5,
            memory_bytes: 512 << 20,
            ..Default::default()
        },
    );
    cg.containers.insert(
        "c-batch".into(),
        ContainerStats {
            cpu_usage_cores: 3.0,
            ..Default::default()
        },
    );
    store.publish_cgroups(now(), prov("cgroup v2"), cg);
    store.publish_node(
        now(),
        prov("procfs"),
        NodeStats {
            memory_total_bytes: 64 << 30,
            clock_synchronized: Some(true),
            ..Default::default()
        },
    );
    store.publish_gpus(
        now(),
        prov("NVML"),
        GpuSnapshot {
            gpus: vec![GpuDevice {
                index: 0,
                uuid: "GPU-aaaa".into(),
                name: "Test GPU".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
    );
}

pub async fn verdict_becomes(
    client: &mut pb::node_health_client::NodeHealthClient<tonic::transport::Channel>,
    want: pb::Verdict,
) -> pb::NodeHealthReport {
    eventually(WAIT, || {
        let mut c = client.clone();
        async move {
            let h = c
                .get_node_health(pb::GetNodeHealthRequest {})
                .await
                .ok()?
                .into_inner()
                .health?;
            (h.verdict == want as i32).then_some(h)
        }
    })
    .await
    .unwrap_or_else(|| panic!("verdict never became {want:?}"))
}

/// The next Watch message, or a panic after [`WAIT`].
pub async fn next(
    s: &mut tonic::Streaming<pb::WatchNodeHealthResponse>,
) -> pb::WatchNodeHealthResponse {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("a message in time")
        .expect("stream ok")
        .expect("stream not ended")
}

/// This process's uid (the identity the Unix socket reports).
pub fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}
