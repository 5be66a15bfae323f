//! The contract between the daemon's long-running tasks and whoever watches them: what a task
//! returns ([`TaskError`]) and what its supervisor reports about it ([`TaskHealth`]).
//!
//! These types sit at the bottom of the layers so that the store (which keeps each task's
//! health for the verdict) and the sources (whose runs return a [`TaskError`]) need nothing
//! from the supervisor or the daemon above them.

/// Why a task stopped. The daemon turns the first one into its exit; a supervisor records it
/// in [`TaskHealth::last_failure`] and restarts the task.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The task's own error, kept with its type and source chain.
    #[error("{0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The task panicked; the panic's message.
    #[error("panicked: {0}")]
    Panicked(String),
    /// The task returned before shutdown was asked for.
    #[error("stopped before shutdown was asked for")]
    Ended,
    /// The task's future was dropped (the runtime shutting down under it).
    #[error("was aborted: {0}")]
    Aborted(String),
    /// Its supervisor stopped restarting it after this failure.
    #[error("{last} (gave up after {restarts} restarts)")]
    GaveUp { last: Box<TaskError>, restarts: u32 },
}

impl TaskError {
    /// Wraps a task's own error (a typed error, or a message as `String`).
    pub fn failed(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Failed(e.into())
    }
}

/// What the supervisor reports about its task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskHealth {
    /// Restarts since the agent started.
    pub restarts: u32,
    /// The last failure (error message or panic payload), if any.
    pub last_failure: Option<String>,
    /// Set when the supervisor stopped restarting.
    pub gave_up: bool,
    /// False from a failure until the next run starts (the back-off), and for good once the
    /// supervisor gave up.
    pub up: bool,
}

impl Default for TaskHealth {
    /// A task that has just been started: up, never failed.
    fn default() -> Self {
        Self {
            restarts: 0,
            last_failure: None,
            gave_up: false,
            up: true,
        }
    }
}
