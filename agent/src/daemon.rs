//! The daemon's life: start the sources and the health engine, tell systemd we are ready, wait
//! for SIGTERM/SIGINT or for a task to fail, then cancel everything and wait for it within the
//! shutdown deadline.
//!
//! Tasks share one [`CancellationToken`]; each returns a [`TaskResult`], and a task that ends
//! before shutdown was asked for is an error that reaches `main`, never a silent hang. The
//! sources and the health evaluator run under supervision (restarted with back-off); the API,
//! the metrics exporter and the bridge are outputs that only read what they publish.

use std::time::Duration;

use tokio::{
    signal::unix::{signal, SignalKind},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use crate::{
    bridge, config::Config, health, metrics, notify, probe::Capabilities, sources,
    supervise::TaskResult, task::TaskError,
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot install the {0} signal handler: {1}")]
    Signal(&'static str, std::io::Error),
    #[error("task `{task}` failed: {source}")]
    TaskFailed {
        task: &'static str,
        source: TaskError,
    },
    #[error("task `{task}` stopped unexpectedly")]
    TaskEnded { task: &'static str },
    #[error("task panicked or was aborted: {0}")]
    TaskJoin(String),
    #[error("shutdown did not finish within {0:?}; {1} task(s) aborted")]
    ShutdownTimeout(Duration, usize),
}

/// Runs until a signal or a task failure. Returns once everything has stopped.
pub async fn run(config: Config, caps: Capabilities) -> Result<(), DaemonError> {
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| DaemonError::Signal("SIGTERM", e))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| DaemonError::Signal("SIGINT", e))?;

    let cancel = CancellationToken::new();
    let mut tasks: JoinSet<TaskResult> = JoinSet::new();

    // The store that the health engine, the API and the metrics read; the bridge maps every
    // source's snapshots into it. The sources are registered first, so the verdict leaves
    // UNKNOWN once each enabled source has reported or said it cannot run.
    let store = crate::store::Store::new();
    let mut feeds = sources::start(&config.sources(), &caps, &cancel, &mut tasks);
    let bridge_settings = config.bridge();
    bridge::register(&store, &bridge_settings, &feeds);
    // The health engine runs whether or not the API is served, supervised like a source: its
    // restarts reach the store (and so the verdict) and `/metrics` through `feeds.supervised`.
    let clock = std::sync::Arc::new(crate::store::SystemClock);
    // The drain restored from its state file, before the API can answer for it.
    let drain = health::drain::DrainController::open(
        clock.clone(),
        health::drain::DrainSettings {
            max_requesters: config.drain.max_requesters,
            max_streams_listed: config.drain.max_streams_listed,
            stale_after: config.health.source_stale_after,
            state_file: Some(config.drain.state_path(&config.api.unix_socket)),
            policy: config.drain.policy(),
            exclude_containers: config.drain.exclude_containers.clone(),
        },
    );
    let health = health::evaluator::spawn_with(
        &config.health,
        drain,
        store.clone(),
        clock,
        &cancel,
        &mut tasks,
    );
    feeds
        .supervised
        .push((health::evaluator::NAME, health.task.clone()));
    // Pod identity from the container runtime, where there is one: a table the bridge reads.
    let identity = config.containers.enabled.then(|| {
        use crate::containers::cri;
        let settings = config.containers.runtime();
        let (tx, rx) = cri::channel(&settings);
        let cancel = cancel.clone();
        tasks.spawn(async move {
            cri::run(settings, tx, cancel).await;
            (cri::NAME, Ok(()))
        });
        rx
    });
    // Which pod holds which GPU, from the kubelet, for GPUs whose processes NVML cannot list.
    let gpu_assignments = (config.containers.enabled && feeds.gpu.is_some()).then(|| {
        use crate::containers::podresources;
        let socket = config.containers.pod_resources_socket.clone();
        let resync = config.containers.runtime().resync;
        let (tx, rx) = podresources::channel(&socket);
        let cancel = cancel.clone();
        tasks.spawn(async move {
            podresources::run(socket, resync, tx, cancel).await;
            (podresources::NAME, Ok(()))
        });
        rx
    });
    // Node conditions and Events, where there is a Kubernetes API server to publish them to.
    if let Some(running) = kube_publisher(&config, &health, &store, &cancel, &mut tasks) {
        feeds.supervised.extend(running);
    }
    bridge::spawn(
        &bridge_settings,
        &feeds,
        identity,
        gpu_assignments,
        &store,
        &cancel,
        &mut tasks,
    );
    if config.api.enabled {
        match crate::api::BoundApi::bind(&config.api, &health, store.clone(), cancel.clone()).await
        {
            Ok(bound) => {
                tasks.spawn(async move { ("api", bound.serve().await.map_err(TaskError::failed)) });
            }
            Err(e) => {
                // The failed task reaches `main` through the join set, as any task failure.
                let e = TaskError::failed(e);
                tasks.spawn(async move { ("api", Err(e)) });
            }
        }
    }
    metrics::spawn(
        &config.metrics,
        &feeds,
        &store,
        Some(health.subscribe()),
        &cancel,
        &mut tasks,
    );
    if let Some(interval) = notify::watchdog_interval() {
        let cancel = cancel.clone();
        tasks.spawn(async move {
            notify::watchdog(interval, cancel).await;
            ("watchdog", Ok(()))
        });
        tracing::info!(?interval, "systemd watchdog enabled");
    }

    let status = format!("serving; sources: {}", feeds.started.join(", "));
    notify::ready(&status);
    tracing::info!(sources = ?feeds.started, unavailable = feeds.unavailable.len(), "nodeward is running");

    let outcome = tokio::select! {
        _ = sigterm.recv() => { tracing::info!("SIGTERM received, shutting down"); Ok(()) }
        _ = sigint.recv() => { tracing::info!("SIGINT received, shutting down"); Ok(()) }
        Some(joined) = tasks.join_next() => Err(early_exit(joined)),
    };
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "a task stopped; shutting down");
    }

    notify::stopping();
    cancel.cancel();
    let deadline = config.agent.shutdown_timeout;
    let drained = tokio::time::timeout(deadline, async {
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((name, Err(e))) => {
                    tracing::warn!(task = name, error = %e, "task failed while stopping")
                }
                Ok((name, Ok(()))) => tracing::debug!(task = name, "task stopped"),
                Err(e) => tracing::warn!(error = %e, "task panicked while stopping"),
            }
        }
    })
    .await;
    if drained.is_err() {
        let left = tasks.len();
        // Aborting drops the tasks' futures, and with them any loaded eBPF programs.
        tasks.shutdown().await;
        return Err(DaemonError::ShutdownTimeout(deadline, left));
    }
    tracing::info!("all tasks stopped; every eBPF program detached");
    outcome
}

/// Starts the Kubernetes publisher when `[kubernetes]` and the environment say so. A config that
/// asks for it where there is no API server, or a client that cannot be built (an unreadable
/// CA file), is logged and the agent runs without it: the node's own work does not depend on
/// the cluster.
fn kube_publisher(
    config: &Config,
    health: &health::evaluator::Health,
    store: &std::sync::Arc<crate::store::Store>,
    cancel: &tokio_util::sync::CancellationToken,
    tasks: &mut JoinSet<TaskResult>,
) -> Option<
    [(
        &'static str,
        tokio::sync::watch::Receiver<crate::task::TaskHealth>,
    ); 2],
> {
    use crate::kube;
    let section = &config.kubernetes;
    let target = section
        .target(
            |k| std::env::var(k).ok(),
            std::path::Path::new(kube::SERVICE_ACCOUNT_DIR),
        )
        .inspect_err(|e| tracing::error!(error = %e, "not publishing Node conditions"))
        .ok()??;
    let client = kube::Client::new(target, section.request_timeout)
        .inspect_err(|e| tracing::error!(error = %e, "not publishing Node conditions"))
        .ok()?;
    let publisher = kube::Publisher {
        client,
        // The name the API answers with: `api.node_name`, the DaemonSet's NODE_NAME, the host name.
        node: crate::api::node_name(&config.api.node_name),
        config: section.clone(),
        published: health.subscribe(),
    };
    let drainer = kube::drain::Drainer {
        client: publisher.client.clone(),
        node: publisher.node.clone(),
        taint_key: section.drain_taint_key.clone(),
        taint_effect: section.drain_taint_effect,
        evict: section.drain_evict,
        max_backoff: section.max_backoff,
        // Beside the drain's own state, so that it lives as long (`/run/nodeward`).
        state_file: config
            .drain
            .state_path(&config.api.unix_socket)
            .with_file_name("kube-drain.json"),
        drain: health.drain.clone(),
        store: store.clone(),
        published: health.subscribe(),
    };
    let c = cancel.clone();
    let drain_health = crate::supervise::spawn(kube::drain::NAME, cancel, tasks, move || {
        kube::drain::run(drainer.clone(), c.clone())
    });
    let c = cancel.clone();
    let publish_health = crate::supervise::spawn(kube::NAME, cancel, tasks, move || {
        kube::run(publisher.clone(), c.clone())
    });
    Some([
        (kube::NAME, publish_health),
        (kube::drain::NAME, drain_health),
    ])
}

fn early_exit(joined: Result<TaskResult, tokio::task::JoinError>) -> DaemonError {
    match joined {
        Ok((task, Err(source))) => DaemonError::TaskFailed { task, source },
        Ok((task, Ok(()))) => DaemonError::TaskEnded { task },
        Err(e) => DaemonError::TaskJoin(e.to_string()),
    }
}
