//! The `nodeward.v1.NodeHealth` service: translates the store, the published health state and
//! the drain controller into replies. It decides nothing itself.

use std::{path::Path, sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{
    authz::{self, DrainPolicy},
    convert, identity,
    pb::{self, node_health_server::NodeHealth},
    requests::{self, ContainerFilter, DrainAsk},
};
use crate::{
    health::{
        drain::{DrainController, Requester},
        hub::Published,
    },
    store::{clock::unix_ms, Clock, Snapshot, SourceKind, Store},
};

/// Everything the RPCs read. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: String,
    store: Arc<Store>,
    health: watch::Receiver<Published>,
    drain: DrainController,
    clock: Arc<dyn Clock>,
    heartbeat: Duration,
    default_deadline: Duration,
    drain_policy: DrainPolicy,
    /// One permit per open Watch stream, across all connections.
    watch_slots: Arc<Semaphore>,
    max_watch_streams: usize,
    cancel: CancellationToken,
}

/// What the service is built from.
#[derive(Debug)]
pub struct ServiceParts {
    pub node: String,
    pub store: Arc<Store>,
    /// The health engine's published state.
    pub health: watch::Receiver<Published>,
    pub drain: DrainController,
    pub clock: Arc<dyn Clock>,
    pub heartbeat: Duration,
    pub default_deadline: Duration,
    /// Who may call BeginDrain and CancelDrain.
    pub drain_policy: DrainPolicy,
    /// Watch streams open at once across all connections; more are refused.
    pub max_watch_streams: usize,
    /// Ends open Watch streams at shutdown.
    pub cancel: CancellationToken,
}

impl Service {
    pub fn new(p: ServiceParts) -> Self {
        Self {
            inner: Arc::new(Inner {
                node: p.node,
                store: p.store,
                health: p.health,
                drain: p.drain,
                clock: p.clock,
                heartbeat: p.heartbeat,
                default_deadline: p.default_deadline,
                drain_policy: p.drain_policy,
                watch_slots: Arc::new(Semaphore::new(p.max_watch_streams)),
                max_watch_streams: p.max_watch_streams,
                cancel: p.cancel,
            }),
        }
    }

    fn authorize<T>(&self, req: &Request<T>, rpc: &str) -> Result<String, Status> {
        let caller = identity::caller(req);
        // /proc of the agent's own PID namespace: SO_PEERCRED gives the pid as seen there.
        let groups = |peer: &identity::PeerCred| authz::peer_groups(Path::new("/proc"), peer);
        match self.inner.drain_policy.authorize(&caller, rpc, groups) {
            Ok(who) => Ok(who.to_string()),
            Err(refused) => {
                tracing::warn!(identity = %caller.names(), rpc, "drain call refused");
                Err(Status::permission_denied(refused.0))
            }
        }
    }

    fn container(&self, snap: &Snapshot, id: &str) -> Option<pb::Container> {
        let meta = snap.containers.as_ref().and_then(|m| m.get(id));
        let stats = snap.cgroups.as_ref().and_then(|c| c.containers.get(id));
        let net = snap.network.as_ref().and_then(|n| n.containers.get(id));
        if meta.is_none() && stats.is_none() && net.is_none() {
            return None;
        }
        let now = self.inner.clock.now();
        let reported = snap.reported_at(SourceKind::Network);
        let mut c = pb::Container {
            id: id.to_owned(),
            stats: stats.map(pb::ContainerStats::from),
            network: net.map(|n| convert::container_network(id, n, reported, now)),
            ..Default::default()
        };
        if let Some(m) = meta {
            c.name = m.name.clone();
            c.pod_name = m.pod_name.clone();
            c.pod_namespace = m.pod_namespace.clone();
            c.pod_uid = m.pod_uid.clone();
            c.labels = m
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            c.cgroup_path = m.cgroup_path.clone();
            c.cgroup_id = m.cgroup_id;
            c.image = m.image.clone();
            c.annotations = m
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            c.set_qos_class(convert::qos_class(m.qos));
        }
        Some(c)
    }

    fn drain_info(&self) -> pb::DrainInfo {
        self.inner.drain.current().as_ref().into()
    }
}

fn matches(c: &pb::Container, f: &ContainerFilter) -> bool {
    (f.pod_name.is_empty() || c.pod_name == f.pod_name)
        && (f.pod_namespace.is_empty() || c.pod_namespace == f.pod_namespace)
        && f.labels.iter().all(|(k, v)| c.labels.get(k) == Some(v))
        && (f.selector.0.is_empty()
            || f.selector.matches(
                &c.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ))
}

#[tonic::async_trait]
impl NodeHealth for Service {
    async fn get_node_health(
        &self,
        _: Request<pb::GetNodeHealthRequest>,
    ) -> Result<Response<pb::GetNodeHealthResponse>, Status> {
        let p = self.inner.health.borrow().clone();
        let snap = self.inner.store.snapshot();
        // The drain state is read live, not from the last evaluation, so a caller sees its own
        // BeginDrain in the very next GetNodeHealth.
        let drain = self.inner.drain.current();
        Ok(Response::new(pb::GetNodeHealthResponse {
            health: Some(convert::node_health(
                &self.inner.node,
                &p.report,
                drain.as_ref(),
            )),
            node_stats: snap.node.as_deref().map(pb::NodeStats::from),
        }))
    }

    type WatchNodeHealthStream = ReceiverStream<Result<pb::WatchNodeHealthResponse, Status>>;

    async fn watch_node_health(
        &self,
        req: Request<pb::WatchNodeHealthRequest>,
    ) -> Result<Response<Self::WatchNodeHealthStream>, Status> {
        let heartbeat = requests::heartbeat(req.get_ref(), self.inner.heartbeat)?;
        // Each stream holds a task and two messages; the cap keeps callers from opening them
        // until the agent runs out of memory. The permit lives as long as the stream's task.
        let slot = Arc::clone(&self.inner.watch_slots)
            .try_acquire_owned()
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "{} WatchNodeHealth streams are open, the most this agent serves \
                     (api.limits.max_watch_streams); close one or retry later",
                    self.inner.max_watch_streams
                ))
            })?;
        let mut rx = self.inner.health.clone();
        // Two messages at most wait for a slow reader; meanwhile the watch channel keeps only
        // the newest state, so the reader skips to it instead of the agent queueing old ones.
        let (tx, out) = mpsc::channel(2);
        let node = self.inner.node.clone();
        let cancel = self.inner.cancel.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut is_heartbeat = false;
            loop {
                let p = rx.borrow_and_update().clone();
                let msg = pb::WatchNodeHealthResponse {
                    health: Some(convert::node_health(&node, &p.report, p.drain.as_ref())),
                    heartbeat: is_heartbeat,
                    revision: p.revision,
                };
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    sent = tx.send(Ok(msg)) => if sent.is_err() { return },
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tx.closed() => return,
                    changed = rx.changed() => {
                        if changed.is_err() { return }
                        is_heartbeat = false;
                    }
                    _ = tokio::time::sleep(heartbeat) => is_heartbeat = true,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn list_containers(
        &self,
        req: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        let filter = ContainerFilter::try_from(req.into_inner())?;
        let snap = self.inner.store.snapshot();
        let mut ids = std::collections::BTreeSet::new();
        if let Some(m) = &snap.containers {
            ids.extend(m.keys().cloned());
        }
        if let Some(c) = &snap.cgroups {
            ids.extend(c.containers.keys().cloned());
        }
        if let Some(n) = &snap.network {
            ids.extend(n.containers.keys().cloned());
        }
        let mut containers: Vec<pb::Container> = ids
            .iter()
            .filter_map(|id| self.container(&snap, id))
            .filter(|c| matches(c, &filter))
            .collect();
        containers.sort_by(|a, b| {
            (&a.pod_namespace, &a.pod_name, &a.name, &a.id).cmp(&(
                &b.pod_namespace,
                &b.pod_name,
                &b.name,
                &b.id,
            ))
        });
        Ok(Response::new(pb::ListContainersResponse { containers }))
    }

    async fn get_container_network(
        &self,
        req: Request<pb::GetContainerNetworkRequest>,
    ) -> Result<Response<pb::GetContainerNetworkResponse>, Status> {
        let id = requests::container_id(req.into_inner())?;
        let snap = self.inner.store.snapshot();
        let container = self.container(&snap, &id).ok_or_else(|| {
            Status::not_found(format!("no container with id {id:?} is known on this node"))
        })?;
        let network = container.network.clone();
        Ok(Response::new(pb::GetContainerNetworkResponse {
            container: Some(container),
            network,
        }))
    }

    async fn list_gpus(
        &self,
        _: Request<pb::ListGpusRequest>,
    ) -> Result<Response<pb::ListGpusResponse>, Status> {
        let snap = self.inner.store.snapshot();
        let published = self.inner.health.borrow();
        Ok(Response::new(convert::gpus(&snap, &published.report)))
    }

    async fn begin_drain(
        &self,
        req: Request<pb::BeginDrainRequest>,
    ) -> Result<Response<pb::BeginDrainResponse>, Status> {
        let who = self.authorize(&req, "BeginDrain")?;
        let ask = DrainAsk::try_from(req.into_inner())?;
        let deadline = ask.deadline.unwrap_or(self.inner.default_deadline);
        let requester = Requester {
            requested_by: ask.requested_by,
            identity: who,
            reason: ask.reason,
            at: self.inner.clock.now(),
        };
        tracing::info!(requested_by = %requester.requested_by, identity = %requester.identity, reason = %requester.reason, ?deadline, "drain requested");
        let (drain, already) = self.inner.drain.begin(requester, deadline);
        Ok(Response::new(pb::BeginDrainResponse {
            drain: Some(Some(&drain).into()),
            already_draining: already,
        }))
    }

    async fn get_drain_status(
        &self,
        _: Request<pb::GetDrainStatusRequest>,
    ) -> Result<Response<pb::GetDrainStatusResponse>, Status> {
        let snap = self.inner.store.snapshot();
        let p = self.inner.drain.progress(&snap);
        let meta = snap.containers.as_deref();
        let containers = p
            .containers
            .iter()
            .map(|c| {
                let m = meta.and_then(|m| m.get(&c.container_id));
                pb::ContainerStreams {
                    container_id: c.container_id.clone(),
                    pod_name: m.map(|m| m.pod_name.clone()).unwrap_or_default(),
                    pod_namespace: m.map(|m| m.pod_namespace.clone()).unwrap_or_default(),
                    container_name: m.map(|m| m.name.clone()).unwrap_or_default(),
                    pod_uid: m.map(|m| m.pod_uid.clone()).unwrap_or_default(),
                    live_streams: c.live_streams,
                    established_connections: c.established_connections,
                    // Already cut to `drain.max_streams_listed` over the whole reply.
                    streams: c
                        .streams
                        .iter()
                        .map(|s| pb::LiveStream {
                            holds_drain: s.holds_drain,
                            ..convert::live_stream(&s.stream, p.evaluated_at)
                        })
                        .collect(),
                    viewers: c.viewers,
                    viewer_list: c
                        .viewer_list
                        .iter()
                        .map(|v| convert::viewer(v, p.evaluated_at))
                        .collect(),
                }
            })
            .collect();
        Ok(Response::new(pb::GetDrainStatusResponse {
            drain: Some(p.drain.as_ref().into()),
            containers,
            live_streams: p.live_streams,
            ready_to_drain: p.ready,
            ready_reason: p.ready_reason,
            streams_known: p.streams_known,
            evaluated_unix_ms: unix_ms(p.evaluated_at),
            truncated: p.truncated,
            viewers: p.viewers,
        }))
    }

    async fn cancel_drain(
        &self,
        req: Request<pb::CancelDrainRequest>,
    ) -> Result<Response<pb::CancelDrainResponse>, Status> {
        let who = self.authorize(&req, "CancelDrain")?;
        let ask = DrainAsk::try_from(req.into_inner())?;
        let was = self.inner.drain.cancel();
        tracing::info!(requested_by = %ask.requested_by, identity = %who, reason = %ask.reason, was_draining = was, "drain cancelled");
        Ok(Response::new(pb::CancelDrainResponse {
            drain: Some(self.drain_info()),
            was_draining: was,
        }))
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
