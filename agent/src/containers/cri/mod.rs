//! Pod identity from the container runtime, over the Kubernetes CRI (`runtime.v1`) on the
//! runtime's Unix socket: which pod, namespace, pod UID, container name, image, pod labels and
//! allow-listed annotations each container id belongs to.
//!
//! One task ([`run`], spawned by the daemon) lists the runtime's sandboxes and containers every
//! `containers.runtime_resync`, and at once on each event of the runtime's container event
//! stream where it has one (containerd 1.7+, CRI-O; containerd 1.6 answers `Unimplemented` and
//! the resync alone keeps the table current). It publishes the table on a watch channel that
//! the bridge reads when it maps a cgroup scan: no CRI call is on the per-tick path.
//!
//! When the runtime stops answering, the last table is kept until
//! `containers.runtime_keep_names` has passed since the last listing that worked (a stopped
//! runtime creates and removes no container, so the names stay true meanwhile), then dropped; the status says so throughout,
//! and the names come back with the first listing that succeeds.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub mod client;
pub mod model;

pub use model::PodIdentity;

/// The code generated from `proto/vendor/runtime/v1/api.proto` (client only; see
/// `proto/vendor/README.md`).
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unused_qualifications,
    rustdoc::all,
    reason = "generated code"
)]
pub mod pb {
    include!("generated/runtime.v1.rs");
}

pub const NAME: &str = "runtime-identity";

/// The sockets tried, in order, when `containers.runtime_endpoint` is empty.
pub const DEFAULT_ENDPOINTS: [&str; 2] =
    ["/run/containerd/containerd.sock", "/var/run/crio/crio.sock"];

/// What the identity task reads from `[containers]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `runtime_endpoint`: a socket path (or `unix://` URL); empty = the first of
    /// [`DEFAULT_ENDPOINTS`] that exists.
    pub endpoint: String,
    pub resync: Duration,
    pub keep_names: Duration,
    pub annotations: Vec<String>,
}

/// Where the identity of containers comes from right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// `containers.runtime_endpoint = "none"`: identity from cgroup paths only.
    Disabled,
    /// No runtime socket found: identity from cgroup paths only.
    NoRuntime { tried: Vec<PathBuf> },
    /// The first listing has not come back yet.
    Connecting { endpoint: PathBuf },
    /// Listing works.
    Connected {
        endpoint: PathBuf,
        /// `runtime_name runtime_version` as the runtime reports them.
        runtime: String,
        /// Whether the runtime's container event stream is followed (else resync only).
        events: bool,
    },
    /// The runtime stopped answering at `since`; names of the last listing are shown until
    /// `containers.runtime_keep_names` has passed (`names_kept`), then cgroup paths only.
    Lost {
        endpoint: PathBuf,
        since: SystemTime,
        error: String,
        names_kept: bool,
    },
}

impl Status {
    /// The identity's fidelity in words, for the cgroup source's provenance.
    pub fn describe(&self) -> String {
        match self {
            Self::Disabled => "identity: cgroup paths only (runtime lookup off)".to_owned(),
            Self::NoRuntime { tried } => format!(
                "identity: cgroup paths only (no container runtime socket at {})",
                tried
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Self::Connecting { endpoint } => {
                format!(
                    "identity: connecting to the runtime at {}",
                    endpoint.display()
                )
            }
            Self::Connected {
                endpoint,
                runtime,
                events,
            } => format!(
                "identity: {runtime} over CRI at {} ({})",
                endpoint.display(),
                if *events {
                    "events and resync"
                } else {
                    "resync only"
                }
            ),
            Self::Lost {
                endpoint,
                since,
                error,
                names_kept,
            } => format!(
                "identity degraded: runtime at {} unreachable for {} ({error}); {}",
                endpoint.display(),
                humantime::format_duration(Duration::from_secs(
                    since.elapsed().unwrap_or_default().as_secs()
                )),
                if *names_kept {
                    "names from the last listing"
                } else {
                    "cgroup paths only"
                }
            ),
        }
    }
}

/// The runtime's view: container id → identity, and where it came from.
#[derive(Debug, Clone)]
pub struct Identities {
    pub status: Status,
    pub by_container: HashMap<String, Arc<PodIdentity>>,
}

impl Identities {
    fn empty(status: Status) -> Self {
        Self {
            status,
            by_container: HashMap::new(),
        }
    }

    pub fn get(&self, container_id: &str) -> Option<&PodIdentity> {
        self.by_container.get(container_id).map(|p| p.as_ref())
    }
}

/// The socket to use: the configured one, else the first default that exists; `None` when
/// lookups are off (`"none"`) or no socket is there (with the paths tried).
pub fn resolve_endpoint(
    configured: &str,
    exists: impl Fn(&Path) -> bool,
) -> Result<PathBuf, Status> {
    let configured = configured.trim();
    if configured == "none" {
        return Err(Status::Disabled);
    }
    if !configured.is_empty() {
        return Ok(PathBuf::from(
            configured.strip_prefix("unix://").unwrap_or(configured),
        ));
    }
    DEFAULT_ENDPOINTS
        .iter()
        .map(PathBuf::from)
        .find(|p| exists(p))
        .ok_or_else(|| Status::NoRuntime {
            tried: DEFAULT_ENDPOINTS.iter().map(PathBuf::from).collect(),
        })
}

/// The channel the identity task publishes on, holding the first status (no socket, or
/// connecting); the receiver always holds the latest table.
pub fn channel(
    settings: &Settings,
) -> (
    watch::Sender<Arc<Identities>>,
    watch::Receiver<Arc<Identities>>,
) {
    let first = match resolve_endpoint(&settings.endpoint, Path::exists) {
        Ok(endpoint) => Status::Connecting { endpoint },
        Err(status) => status,
    };
    watch::channel(Arc::new(Identities::empty(first)))
}

/// The identity task: lists the runtime on every resync and event until cancelled; never
/// fails (a runtime that does not answer is a status, not an error).
pub async fn run(
    settings: Settings,
    tx: watch::Sender<Arc<Identities>>,
    cancel: CancellationToken,
) {
    // The last table published while the runtime answered (shared with the channel).
    let mut last_good: Option<(Arc<Identities>, SystemTime)> = None;
    let mut lost_since: Option<SystemTime> = None;
    loop {
        // Resolved each round: a runtime installed or started after the agent is found.
        let endpoint = match resolve_endpoint(&settings.endpoint, Path::exists) {
            Ok(e) => e,
            Err(status) => {
                if tx.borrow().status != status {
                    tracing::info!(status = %status.describe(), "container identity");
                }
                tx.send_replace(Arc::new(Identities::empty(status)));
                if sleep_or_cancel(settings.resync, &cancel).await {
                    return;
                }
                continue;
            }
        };
        let session = client::Session::connect(&endpoint).await;
        let outcome = match session {
            Ok(mut s) => s.follow(&settings, &tx, &cancel, &mut last_good).await,
            Err(e) => Err(e),
        };
        let error = match outcome {
            Ok(()) => return, // cancelled
            Err(e) => e.to_string(),
        };
        // Unreachable since the last listing that worked, or since the first failure.
        if last_good
            .as_ref()
            .is_some_and(|(_, at)| lost_since.is_none_or(|l| *at > l))
        {
            lost_since = None;
        }
        let since = *lost_since.get_or_insert_with(SystemTime::now);
        let names_kept = last_good
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed().unwrap_or_default() < settings.keep_names);
        if !names_kept {
            last_good = None;
        }
        let status = Status::Lost {
            endpoint,
            since,
            error,
            names_kept,
        };
        if !matches!(tx.borrow().status, Status::Lost { .. }) {
            tracing::warn!(status = %status.describe(), "container identity degraded");
        }
        tx.send_replace(Arc::new(Identities {
            status,
            by_container: last_good
                .as_ref()
                .map(|(m, _)| m.by_container.clone())
                .unwrap_or_default(),
        }));
        if sleep_or_cancel(settings.resync, &cancel).await {
            return;
        }
    }
}

/// Sleeps; `true` when cancelled meanwhile.
async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_is_configured_found_or_reported_missing() {
        assert_eq!(
            resolve_endpoint("unix:///x/y.sock", |_| false),
            Ok(PathBuf::from("/x/y.sock"))
        );
        assert_eq!(resolve_endpoint("none", |_| true), Err(Status::Disabled));
        assert_eq!(
            resolve_endpoint("", |p| p.ends_with("crio.sock")),
            Ok(PathBuf::from("/var/run/crio/crio.sock"))
        );
        assert_eq!(
            resolve_endpoint("", |_| true),
            Ok(PathBuf::from("/run/containerd/containerd.sock")),
            "containerd first when both are there"
        );
        assert!(matches!(
            resolve_endpoint("", |_| false),
            Err(Status::NoRuntime { tried }) if tried.len() == 2
        ));
    }

    #[test]
    fn lost_status_says_whether_names_are_kept() {
        let lost = |names_kept| Status::Lost {
            endpoint: PathBuf::from("/run/c.sock"),
            since: SystemTime::now(),
            error: "connection refused".to_owned(),
            names_kept,
        };
        assert!(lost(true)
            .describe()
            .contains("names from the last listing"));
        assert!(lost(false).describe().contains("cgroup paths only"));
        assert!(lost(false).describe().starts_with("identity degraded"));
    }
}
