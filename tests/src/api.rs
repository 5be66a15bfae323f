//! An in-process gRPC API over a real Unix socket (and TCP where asked), with a store the test
//! feeds directly: the sources that will write into the store are built elsewhere, so tests
//! stand in for them with recorded values.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use nodeward::{
    api::{pb::node_health_client::NodeHealthClient, ApiConfig, ApiError, BoundApi},
    client::Conn,
    health::HealthConfig,
    store::{Store, SystemClock},
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
}

impl TestApi {
    pub async fn start(api: ApiConfig, health: HealthConfig) -> Self {
        let store = Store::new();
        let cancel = CancellationToken::new();
        let bound = BoundApi::bind(
            &api,
            &health,
            store.clone(),
            Arc::new(SystemClock),
            cancel.clone(),
        )
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
pub fn now() -> SystemTime {
    SystemTime::now()
}
