//! The daemon's life: start the sources, tell systemd we are ready, wait for SIGTERM/SIGINT or
//! for a task to fail, then cancel everything and wait for it within the shutdown deadline.
//!
//! Tasks share one [`CancellationToken`]; each returns a `Result`, and a task that ends before
//! shutdown was asked for is an error that reaches `main`, never a silent hang.

use std::time::Duration;

use tokio::{
    signal::unix::{signal, SignalKind},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use crate::{bridge, config::Config, metrics, notify, probe::Capabilities, sources};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot install the {0} signal handler: {1}")]
    Signal(&'static str, std::io::Error),
    #[error("task `{task}` failed: {message}")]
    TaskFailed { task: &'static str, message: String },
    #[error("task `{task}` stopped unexpectedly")]
    TaskEnded { task: &'static str },
    #[error("task panicked or was aborted: {0}")]
    TaskJoin(String),
    #[error("shutdown did not finish within {0:?}; {1} task(s) aborted")]
    ShutdownTimeout(Duration, usize),
}

/// What a task returns: its name, and an error message if it failed.
pub type TaskResult = (&'static str, Result<(), String>);

/// Runs until a signal or a task failure. Returns once everything has stopped.
pub async fn run(config: Config, caps: Capabilities) -> Result<(), DaemonError> {
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| DaemonError::Signal("SIGTERM", e))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| DaemonError::Signal("SIGINT", e))?;

    let cancel = CancellationToken::new();
    let mut tasks: JoinSet<TaskResult> = JoinSet::new();

    // The store that the API, the health engine and the metrics read; the bridge maps every
    // source's snapshots into it and registers the sources, so the verdict leaves UNKNOWN once
    // each enabled source has reported or said it cannot run.
    let store = crate::store::Store::new();
    let feeds = sources::start(&config, &caps, &cancel, &mut tasks);
    bridge::spawn(&config, &feeds, &store, &cancel, &mut tasks);
    // The API is bound here rather than in its task so that the metrics exporter can read the
    // very health state the API serves (verdict, conditions, drain).
    let mut health = None;
    if config.api.enabled {
        let clock = std::sync::Arc::new(crate::store::SystemClock);
        match crate::api::BoundApi::bind(
            &config.api,
            &config.health,
            store.clone(),
            clock,
            cancel.clone(),
        )
        .await
        {
            Ok(bound) => {
                health = Some(bound.health());
                tasks.spawn(async move { ("api", bound.serve().await.map_err(|e| e.to_string())) });
            }
            Err(e) => {
                // Same outcome as before: the failed task reaches `main` through the join set.
                let message = e.to_string();
                tasks.spawn(async move { ("api", Err(message)) });
            }
        }
    }
    metrics::spawn(&config, &feeds, &store, health, &cancel, &mut tasks);
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
                Ok((name, Err(message))) => {
                    tracing::warn!(task = name, %message, "task failed while stopping")
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

fn early_exit(joined: Result<TaskResult, tokio::task::JoinError>) -> DaemonError {
    match joined {
        Ok((task, Err(message))) => DaemonError::TaskFailed { task, message },
        Ok((task, Ok(()))) => DaemonError::TaskEnded { task },
        Err(e) => DaemonError::TaskJoin(e.to_string()),
    }
}
