//! The drain's side in the cluster: on `BeginDrain` the Node gets the taint
//! `kubernetes.drain_taint` (`nodeward.io/draining:NoSchedule`), so nothing new is scheduled on
//! it; once the drain handshake finds no live stream or viewer left (never while one remains,
//! and never while the counts are unknown), the node's pods are evicted through the Eviction
//! API, so PodDisruptionBudgets are honoured (a `429` is retried with back-off, never forced);
//! DaemonSet pods and static pods' mirrors are left, as `kubectl drain` leaves them. On
//! `CancelDrain` the taint is removed, only if this agent added it: a node someone else tainted
//! keeps its taint. Whether it did is kept in a file beside the drain's state, so that a
//! restarted agent still knows.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Client, ClientError};
use crate::{
    health::{drain::DrainController, hub::Published},
    store::Store,
    task::TaskError,
};

/// The supervised task's name.
pub const NAME: &str = "kubernetes/drain";

/// How often the drain's progress is read while draining.
const POLL: Duration = Duration::from_secs(1);

/// The taint's effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl Effect {
    fn as_str(self) -> &'static str {
        match self {
            Self::NoSchedule => "NoSchedule",
            Self::PreferNoSchedule => "PreferNoSchedule",
            Self::NoExecute => "NoExecute",
        }
    }
}

/// What the drain task needs.
#[derive(Clone)]
pub struct Drainer {
    pub client: Client,
    pub node: String,
    pub taint_key: String,
    pub taint_effect: Effect,
    /// Evict the node's pods once no stream is left.
    pub evict: bool,
    pub max_backoff: Duration,
    /// Where "this agent added the taint" is kept.
    pub state_file: PathBuf,
    pub drain: DrainController,
    pub store: Arc<Store>,
    pub published: watch::Receiver<Published>,
}

impl std::fmt::Debug for Drainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drainer")
            .field("node", &self.node)
            .field("taint_key", &self.taint_key)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    version: u32,
    /// This agent added the taint (and so may remove it).
    added_taint: bool,
}

fn load(path: &PathBuf) -> bool {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Stored>(&b).ok())
        .is_some_and(|s| s.version == 1 && s.added_taint)
}

fn save(path: &PathBuf, added: bool) -> Result<(), ClientError> {
    if !added {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(ClientError::Read(path.clone(), e))
            }
            _ => Ok(()),
        };
    }
    let text = json!({"version": 1, "added_taint": true}).to_string();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| ClientError::Read(path.clone(), e))
}

/// Where one drain stands, for this run of the task.
#[derive(Debug, Default)]
struct Progress {
    /// The taint step is done for the current drain (added, or found someone else's).
    tainted: bool,
    /// No pod is left to evict for the current drain.
    evicted: bool,
    /// Per pod (`ns/name`): failures so far and when to try again.
    retry: std::collections::BTreeMap<String, (u32, Instant)>,
}

/// Runs until `cancel`; API failures are retried, never returned.
pub async fn run(mut d: Drainer, cancel: CancellationToken) -> Result<(), TaskError> {
    let mut added = load(&d.state_file);
    let mut progress = Progress::default();
    let mut failures: u32 = 0;
    let mut health_open = true;
    loop {
        let draining = d.published.borrow_and_update().drain.is_some();
        let step = if draining {
            drain_step(&d, &mut added, &mut progress).await
        } else {
            progress = Progress::default();
            untaint_step(&d, &mut added).await
        };
        let wait = match step {
            Ok(()) => {
                failures = 0;
                POLL
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = Duration::from_secs(1)
                    .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
                    .min(d.max_backoff)
                    .max(e.retry_after().unwrap_or_default());
                tracing::warn!(error = %e, retry_in = ?wait, "drain: a Kubernetes API call failed; retrying");
                wait
            }
        };
        let idle = !draining && !added;
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            changed = d.published.changed(), if health_open => {
                // The channel outlives the evaluator's restarts: closed means shutdown.
                health_open = changed.is_ok();
            }
            _ = tokio::time::sleep(wait), if !idle || failures > 0 || !health_open => {}
        }
    }
}

fn is_ours(t: &Value, key: &str, effect: Effect) -> bool {
    t["key"] == key && t["effect"] == effect.as_str()
}

/// The Node's taints and resourceVersion.
async fn taints(d: &Drainer) -> Result<(Vec<Value>, Value), ClientError> {
    let node = d.client.get(&format!("/api/v1/nodes/{}", d.node)).await?;
    let taints = node["spec"]["taints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok((taints, node["metadata"]["resourceVersion"].clone()))
}

/// Replaces the Node's taints, conditional on the resourceVersion read (`spec.taints` has no
/// merge key: a patch replaces the whole list, so a concurrent change must not be lost).
async fn set_taints(d: &Drainer, taints: Vec<Value>, rv: Value) -> Result<(), ClientError> {
    d.client
        .patch(
            &format!("/api/v1/nodes/{}", d.node),
            &json!({"metadata": {"resourceVersion": rv}, "spec": {"taints": taints}}),
        )
        .await
        .map(|_| ())
}

/// Conflicts retried at once (the agent's own status patches bump the resourceVersion too)
/// before the step fails and waits out a back-off.
const CONFLICT_RETRIES: u32 = 5;

fn conflict(e: &ClientError) -> bool {
    e.status() == Some(hyper::StatusCode::CONFLICT)
}

/// Adds the taint unless it is there.
async fn taint(d: &Drainer, added: &mut bool) -> Result<(), ClientError> {
    let mut attempt = 0;
    loop {
        let (mut taints, rv) = taints(d).await?;
        if taints
            .iter()
            .any(|t| is_ours(t, &d.taint_key, d.taint_effect))
        {
            // Already there: ours from before a restart, or someone else's (kept as it is).
            tracing::info!(node = %d.node, key = %d.taint_key, ours = *added, "drain: the node is already tainted");
            return Ok(());
        }
        // Recorded first: a crash after the patch must not leave a taint no one removes.
        save(&d.state_file, true)?;
        *added = true;
        taints.push(json!({"key": d.taint_key, "effect": d.taint_effect.as_str()}));
        match set_taints(d, taints, rv).await {
            Ok(()) => {
                tracing::info!(node = %d.node, key = %d.taint_key, effect = d.taint_effect.as_str(), "drain: node tainted; waiting for its streams to end");
                return Ok(());
            }
            Err(e) if conflict(&e) && attempt < CONFLICT_RETRIES => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

async fn drain_step(
    d: &Drainer,
    added: &mut bool,
    progress: &mut Progress,
) -> Result<(), ClientError> {
    if !progress.tainted {
        taint(d, added).await?;
        progress.tainted = true;
    }
    if !d.evict || progress.evicted {
        return Ok(());
    }
    let p = d.drain.progress(&d.store.snapshot());
    // Never while a stream or viewer remains, or while they cannot be counted; the drain
    // deadline does not change that: evicting a pod that still serves viewers is what the
    // drain exists to avoid.
    if !(p.ready && p.streams_known && p.live_streams == 0 && p.viewers == 0) {
        return Ok(());
    }
    let list = d
        .client
        .get(&format!(
            "/api/v1/pods?fieldSelector=spec.nodeName%3D{}",
            d.node
        ))
        .await?;
    let pods: Vec<(String, String)> = list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|p| evictable(p))
                .filter_map(name)
                .collect()
        })
        .unwrap_or_default();
    if pods.is_empty() {
        tracing::info!(node = %d.node, "drain: no pod left to evict");
        progress.evicted = true;
        return Ok(());
    }
    let now = Instant::now();
    for (ns, pod) in pods {
        let key = format!("{ns}/{pod}");
        if progress.retry.get(&key).is_some_and(|(_, at)| now < *at) {
            continue;
        }
        let body = json!({"apiVersion": "policy/v1", "kind": "Eviction",
                          "metadata": {"name": pod, "namespace": ns}});
        match d
            .client
            .post(
                &format!("/api/v1/namespaces/{ns}/pods/{pod}/eviction"),
                &body,
            )
            .await
        {
            Ok(_) => {
                tracing::info!(pod = %key, "drain: pod evicted");
                progress.retry.remove(&key);
            }
            Err(e) if e.status() == Some(hyper::StatusCode::NOT_FOUND) => {
                progress.retry.remove(&key);
            }
            // A disruption budget (429) or the server itself: this pod again later.
            Err(e) => {
                let n = progress.retry.get(&key).map_or(1, |(n, _)| n + 1);
                let wait = Duration::from_secs(1)
                    .saturating_mul(1u32 << (n - 1).min(16))
                    .min(d.max_backoff)
                    .max(e.retry_after().unwrap_or_default());
                tracing::info!(pod = %key, error = %e, retry_in = ?wait, "drain: eviction refused; retrying");
                progress.retry.insert(key, (n, now + wait));
            }
        }
    }
    Ok(())
}

async fn untaint_step(d: &Drainer, added: &mut bool) -> Result<(), ClientError> {
    if !*added {
        return Ok(());
    }
    let mut attempt = 0;
    loop {
        let (taints, rv) = taints(d).await?;
        let kept: Vec<Value> = taints
            .iter()
            .filter(|t| !is_ours(t, &d.taint_key, d.taint_effect))
            .cloned()
            .collect();
        if kept.len() == taints.len() {
            break;
        }
        match set_taints(d, kept, rv).await {
            Ok(()) => {
                tracing::info!(node = %d.node, key = %d.taint_key, "drain cancelled: the taint this agent added is removed");
                break;
            }
            Err(e) if conflict(&e) && attempt < CONFLICT_RETRIES => attempt += 1,
            Err(e) => return Err(e),
        }
    }
    save(&d.state_file, false)?;
    *added = false;
    Ok(())
}

/// Whether `kubectl drain` would evict it: not a DaemonSet's pod, not a static pod's mirror.
fn evictable(pod: &Value) -> bool {
    let daemonset = pod["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|owners| {
            owners
                .iter()
                .any(|o| o["controller"] == true && o["kind"] == "DaemonSet")
        });
    let mirror = pod["metadata"]["annotations"]
        .get("kubernetes.io/config.mirror")
        .is_some();
    !daemonset && !mirror
}

fn name(pod: &Value) -> Option<(String, String)> {
    Some((
        pod["metadata"]["namespace"].as_str()?.to_owned(),
        pod["metadata"]["name"].as_str()?.to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemonset_pods_and_mirrors_stay_as_kubectl_drain_leaves_them() {
        let pod = |owner: Value, annotations: Value| {
            json!({"metadata": {"name": "p", "namespace": "n",
                                "ownerReferences": owner, "annotations": annotations}})
        };
        let ds = json!([{"kind": "DaemonSet", "controller": true}]);
        let rs = json!([{"kind": "ReplicaSet", "controller": true}]);
        // A DaemonSet that owns without controlling does not keep the pod.
        let ds_not_controller = json!([{"kind": "DaemonSet", "controller": false}]);
        let mirror = json!({"kubernetes.io/config.mirror": "abc"});
        assert!(!evictable(&pod(ds, json!(null))));
        assert!(!evictable(&pod(json!(null), mirror)));
        assert!(evictable(&pod(rs, json!({"other": "x"}))));
        assert!(evictable(&pod(ds_not_controller, json!(null))));
        assert!(evictable(&pod(json!(null), json!(null))), "a bare pod");
    }

    #[test]
    fn the_taint_is_ours_only_with_our_key_and_effect() {
        let t = |k: &str, e: &str| json!({"key": k, "effect": e});
        assert!(is_ours(
            &t("nodeward.io/draining", "NoSchedule"),
            "nodeward.io/draining",
            Effect::NoSchedule
        ));
        assert!(!is_ours(
            &t("nodeward.io/draining", "NoExecute"),
            "nodeward.io/draining",
            Effect::NoSchedule
        ));
        assert!(!is_ours(
            &t("other", "NoSchedule"),
            "nodeward.io/draining",
            Effect::NoSchedule
        ));
    }

    #[test]
    fn whether_the_taint_was_added_survives_in_its_file() {
        let dir = std::env::temp_dir().join(format!("nodeward-kube-drain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("kube-drain.json");
        assert!(!load(&file), "no file: not added");
        save(&file, true).expect("save");
        assert!(load(&file));
        save(&file, false).expect("clear");
        assert!(!file.exists() && !load(&file));
        std::fs::write(&file, "{\"version\": 2, \"added_taint\": true}").expect("write");
        assert!(!load(&file), "another version is not read as ours");
    }
}
