//! A stand-in for a Kubernetes API server, for the tests of the agent's cluster side.
//!
//! No kube-apiserver can be installed on the machines these tests run on (none is packaged in a
//! registry they reach), so the tests run this small server instead. It stands in for a real
//! kube-apiserver and implements only the calls the agent makes, over plain HTTP on 127.0.0.1,
//! as faithfully to the real API as those calls need:
//!
//! - `GET` and `PATCH /api/v1/nodes/{name}` and its `/status` subresource: a patch of the main
//!   resource changes metadata and spec and leaves status alone; a patch of `/status` changes
//!   status only (the node strategies' `PrepareForUpdate` in the real server);
//! - patches by content type: `application/strategic-merge-patch+json` (maps merged, `null`
//!   deletes a key, `status.conditions` and `status.addresses` merged by `type` as their
//!   `patchMergeKey` says, every other list — `spec.taints` included, which has no patch
//!   strategy — replaced, `$patch: delete` in a merged list's element, `$setElementOrder`
//!   directives accepted and ignored), `application/merge-patch+json` (RFC 7386: every list
//!   replaced); anything else is `415`;
//! - `metadata.resourceVersion` bumped on every write that changes the object (a no-op patch
//!   keeps it, as etcd is not written), and `409 Conflict` when a patch carries a stale one;
//! - `GET /api/v1/pods?fieldSelector=spec.nodeName=X`, and
//!   `GET /api/v1/namespaces/{ns}/pods?labelSelector=...` (equality, set-based and existence
//!   requirements), `GET /api/v1/nodes`: `PodList` and `NodeList` as the real server sends
//!   them (`cluster.rs`);
//! - `POST /api/v1/namespaces/{ns}/pods/{name}/eviction` (`policy/v1` Eviction): the pod is
//!   deleted, or `429` with the disruption-budget message as many times as a test asks;
//! - `POST /api/v1/namespaces/{ns}/events` (`core/v1` Event), names from `generateName`;
//! - on demand: HTTPS with a certificate the test makes, requiring a client certificate its CA
//!   signs (the TLS handshake refuses others, as a real server with `--client-ca-file` does for
//!   a client that presents a bad one), and a bearer token (`401 Unauthorized` without it);
//! - on demand: down (connections refused: the listener is closed and later bound again on the
//!   same port), `503`, or `429` with `Retry-After` for the next N requests.
//!
//! Every request is recorded (method, path, query, content type, body, time) for assertions.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use tokio::{net::TcpSocket, task::JoinHandle};

use crate::{
    agent_binary,
    api::{conn, eventually, TempDir},
};
use nodeward::api::pb;

mod cluster;
pub use cluster::TlsFiles;

/// One request as it reached the server.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    /// The body as JSON (`Null` when empty or not JSON).
    pub body: Value,
    pub at: SystemTime,
    /// The status the server answered with.
    pub status: u16,
}

impl Recorded {
    /// The RBAC (verb, resource, subresource) this request needs, as the real authorizer
    /// derives it: `GET` on a name is `get`, on a collection `list`; `PATCH` is `patch`; `POST`
    /// is `create`.
    pub fn rbac(&self) -> Option<(String, String, String)> {
        let parts: Vec<&str> = self.path.trim_start_matches('/').split('/').collect();
        // api/v1/[namespaces/{ns}/]{resource}[/{name}[/{sub}]]
        let rest = match parts.as_slice() {
            ["api", "v1", "namespaces", _, rest @ ..] if !rest.is_empty() => rest,
            ["api", "v1", rest @ ..] => rest,
            _ => return None,
        };
        let (resource, named, sub) = match rest {
            [r] => (*r, false, ""),
            [r, _] => (*r, true, ""),
            [r, _, s] => (*r, true, *s),
            _ => return None,
        };
        let verb = match (self.method.as_str(), named) {
            ("GET", true) => "get",
            ("GET", false) => "list",
            ("PATCH", _) => "patch",
            ("PUT", _) => "update",
            ("POST", _) => "create",
            ("DELETE", _) => "delete",
            _ => return None,
        };
        Some((verb.to_owned(), resource.to_owned(), sub.to_owned()))
    }
}

/// What the server answers besides the API itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Up,
    /// `503 Service Unavailable` to everything.
    Unavailable,
}

#[derive(Debug)]
struct State {
    nodes: BTreeMap<String, Value>,
    /// Pods by (namespace, name).
    pods: BTreeMap<(String, String), Value>,
    events: Vec<Value>,
    requests: Vec<Recorded>,
    /// The cluster-wide resourceVersion counter.
    version: u64,
    mode: Mode,
    /// The next N requests get `429` with this `Retry-After` (seconds).
    throttle: Option<(u32, u32)>,
    /// Pods whose next N evictions get the disruption-budget `429`.
    pdb_blocks: BTreeMap<(String, String), u32>,
    /// The bearer token every request must carry, when set.
    token: Option<String>,
}

impl State {
    fn bump(&mut self) -> String {
        self.version += 1;
        self.version.to_string()
    }
}

/// The running stand-in. Dropping it stops it.
#[derive(Debug)]
pub struct KubeApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    listener: Mutex<Option<JoinHandle<()>>>,
    /// HTTPS instead of HTTP, when set.
    tls: Option<cluster::Acceptor>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(task) = self.listener_slot().take() {
            task.abort();
        }
    }
}

impl KubeApi {
    /// Starts on a free port of 127.0.0.1. Call from within a tokio runtime.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    fn start_with(tls: Option<cluster::Acceptor>) -> Self {
        let state = Arc::new(Mutex::new(State {
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            events: Vec::new(),
            requests: Vec::new(),
            version: 100,
            mode: Mode::Up,
            throttle: None,
            pdb_blocks: BTreeMap::new(),
            token: None,
        }));
        let (addr, task) = listen(
            "127.0.0.1:0".parse().expect("an address"),
            state.clone(),
            tls.clone(),
        );
        Self {
            addr,
            state,
            listener: Mutex::new(Some(task)),
            tls,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn listener_slot(&self) -> MutexGuard<'_, Option<JoinHandle<()>>> {
        self.listener.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `http://127.0.0.1:PORT`, for the agent's `kubernetes.server`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Adds a Node with no conditions and no taints (and `taints` when given).
    pub fn add_node(&self, name: &str, taints: Value) {
        let mut s = self.lock();
        let rv = s.bump();
        let mut spec = Map::new();
        if !taints.is_null() {
            spec.insert("taints".to_owned(), taints);
        }
        s.nodes.insert(
            name.to_owned(),
            json!({
                "kind": "Node", "apiVersion": "v1",
                "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": rv},
                "spec": spec,
                "status": {"conditions": []},
            }),
        );
    }

    /// Adds a pod bound to `node`; `owner` is its controller's kind (`DaemonSet`, `ReplicaSet`)
    /// or empty; `mirror` makes it a static pod's mirror (the kubelet's annotation).
    pub fn add_pod(&self, namespace: &str, name: &str, node: &str, owner: &str, mirror: bool) {
        let mut s = self.lock();
        let rv = s.bump();
        let mut metadata = json!({
            "name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}"),
            "resourceVersion": rv,
        });
        if !owner.is_empty() {
            metadata["ownerReferences"] = json!([{
                "apiVersion": "apps/v1", "kind": owner, "name": format!("{name}-owner"),
                "uid": "owner", "controller": true,
            }]);
        }
        if mirror {
            metadata["annotations"] = json!({"kubernetes.io/config.mirror": "hash"});
        }
        s.pods.insert(
            (namespace.to_owned(), name.to_owned()),
            json!({"kind": "Pod", "apiVersion": "v1", "metadata": metadata,
                   "spec": {"nodeName": node}, "status": {"phase": "Running"}}),
        );
    }

    /// The node as stored.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.lock().nodes.get(name).cloned()
    }

    /// The pods left, as `namespace/name`.
    pub fn pods(&self) -> Vec<String> {
        self.lock()
            .pods
            .keys()
            .map(|(ns, n)| format!("{ns}/{n}"))
            .collect()
    }

    /// Events created so far.
    pub fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// Sets a field of a stored node as another client would (bumps the resourceVersion).
    pub fn edit_node(&self, name: &str, edit: impl FnOnce(&mut Value)) {
        let mut s = self.lock();
        let rv = s.bump();
        if let Some(node) = s.nodes.get_mut(name) {
            edit(node);
            node["metadata"]["resourceVersion"] = Value::String(rv);
        }
    }

    /// The next `times` evictions of the pod get the disruption-budget `429`.
    pub fn block_eviction(&self, namespace: &str, name: &str, times: u32) {
        self.lock()
            .pdb_blocks
            .insert((namespace.to_owned(), name.to_owned()), times);
    }

    /// The next `times` requests get `429 Too Many Requests` with `Retry-After: seconds`.
    pub fn throttle(&self, times: u32, retry_after_seconds: u32) {
        self.lock().throttle = Some((times, retry_after_seconds));
    }

    /// `503` to everything until [`Self::recover`].
    pub fn unavailable(&self) {
        self.lock().mode = Mode::Unavailable;
    }

    /// Serving normally again (after [`Self::unavailable`] or [`Self::down`]).
    pub fn recover(&self) {
        self.lock().mode = Mode::Up;
        let mut slot = self.listener_slot();
        if slot.is_none() {
            let (_, task) = listen(self.addr, self.state.clone(), self.tls.clone());
            *slot = Some(task);
        }
    }

    /// Closes the listener: connections are refused until [`Self::recover`].
    pub fn down(&self) {
        if let Some(task) = self.listener_slot().take() {
            task.abort();
        }
    }
}

/// Binds `addr` (again, after [`KubeApi::down`]: hence `SO_REUSEADDR`) and serves it.
fn listen(
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    tls: Option<cluster::Acceptor>,
) -> (SocketAddr, JoinHandle<()>) {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(addr).expect("binding the stand-in API server");
    let listener = socket.listen(64).expect("listening");
    let addr = listener.local_addr().expect("its address");
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let state = state.clone();
            let tls = tls.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(req, &state).await) }
                });
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    }
                    Some(acceptor) => {
                        // A refused handshake (no or a foreign client certificate) ends here.
                        if let Ok(stream) = acceptor.0.accept(stream).await {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: &Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A `meta/v1` Status, as the real server answers errors.
fn status(code: StatusCode, reason: &str, message: &str) -> Reply {
    reply(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

async fn handle(req: Request<Incoming>, state: &Mutex<State>) -> Reply {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    let answer = match &s.token {
        Some(t) if authorization.as_deref() != Some(format!("Bearer {t}").as_str()) => {
            status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
        }
        _ => route(&mut s, &method, &path, &query, &content_type, &body),
    };
    s.requests.push(Recorded {
        method: method.to_string(),
        path,
        query,
        content_type,
        body,
        at: SystemTime::now(),
        status: answer.status().as_u16(),
    });
    answer
}

fn route(
    s: &mut State,
    method: &Method,
    path: &str,
    query: &str,
    content_type: &str,
    body: &Value,
) -> Reply {
    if s.mode == Mode::Unavailable {
        return status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        );
    }
    if let Some((left, seconds)) = s.throttle {
        s.throttle = (left > 1).then_some((left - 1, seconds));
        let mut r = status(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            "Too many requests, please try again later.",
        );
        r.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from(seconds),
        );
        return r;
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::GET, ["api", "v1", "nodes", name]) => match s.nodes.get(*name) {
            Some(node) => reply(StatusCode::OK, node),
            None => not_found("nodes", name),
        },
        (&Method::PATCH, ["api", "v1", "nodes", name]) => {
            patch_node(s, name, false, content_type, body)
        }
        (&Method::PATCH, ["api", "v1", "nodes", name, "status"]) => {
            patch_node(s, name, true, content_type, body)
        }
        (&Method::GET, ["api", "v1", "pods"]) => list_pods(s, query),
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods"]) => {
            cluster::list_namespaced_pods(s, ns, query)
        }
        (&Method::GET, ["api", "v1", "nodes"]) => cluster::list_nodes(s),
        (&Method::POST, ["api", "v1", "namespaces", ns, "pods", name, "eviction"]) => {
            evict(s, ns, name, body)
        }
        (&Method::POST, ["api", "v1", "namespaces", ns, "events"]) => create_event(s, ns, body),
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

fn not_found(resource: &str, name: &str) -> Reply {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{resource} \"{name}\" not found"),
    )
}

fn patch_node(
    s: &mut State,
    name: &str,
    subresource_status: bool,
    content_type: &str,
    patch: &Value,
) -> Reply {
    let Some(old) = s.nodes.get(name).cloned() else {
        return not_found("nodes", name);
    };
    // Parameters such as `; charset=utf-8` do not change the patch type.
    let kind = content_type.split(';').next().unwrap_or_default().trim();
    let strategic = match kind {
        "application/strategic-merge-patch+json" => true,
        "application/merge-patch+json" => false,
        _ => {
            return status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                &format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json; got {content_type:?}"),
            )
        }
    };
    if !patch.is_object() {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the patch is not a JSON object",
        );
    }
    if let Some(rv) = patch.pointer("/metadata/resourceVersion") {
        if Some(rv) != old.pointer("/metadata/resourceVersion") {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                &format!("Operation cannot be fulfilled on nodes \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
            );
        }
    }
    let mut new = old.clone();
    if strategic {
        strategic_merge(&mut new, patch, "");
    } else {
        merge_patch(&mut new, patch);
    }
    // What each endpoint may change, as the node strategies' PrepareForUpdate.
    if subresource_status {
        new["spec"] = old["spec"].clone();
        new["metadata"] = old["metadata"].clone();
    } else {
        new["status"] = old["status"].clone();
        for fixed in ["name", "uid", "resourceVersion"] {
            match (old["metadata"].get(fixed), new["metadata"].as_object_mut()) {
                (Some(v), Some(m)) => {
                    m.insert(fixed.to_owned(), v.clone());
                }
                (None, Some(m)) => {
                    m.remove(fixed);
                }
                _ => {}
            }
        }
    }
    if new != old {
        let rv = s.bump();
        new["metadata"]["resourceVersion"] = Value::String(rv);
        s.nodes.insert(name.to_owned(), new.clone());
    }
    reply(StatusCode::OK, &new)
}

/// The merge keys of the lists the stand-in knows a patch strategy for (`patchMergeKey` in the
/// API's Go types); every other list is replaced.
fn merge_key(path: &str) -> Option<&'static str> {
    match path {
        "/status/conditions" | "/status/addresses" => Some("type"),
        _ => None,
    }
}

fn strategic_merge(target: &mut Value, patch: &Value, path: &str) {
    let (Some(t), Some(p)) = (target.as_object_mut(), patch.as_object()) else {
        *target = patch.clone();
        return;
    };
    for (k, v) in p {
        if k.starts_with("$setElementOrder/") || k == "$retainKeys" {
            continue;
        }
        let here = format!("{path}/{k}");
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (merge_key(&here), v.as_array(), t.get_mut(k)) {
            (Some(key), Some(items), Some(Value::Array(existing))) => {
                merge_list(existing, items, key, &here)
            }
            (Some(key), Some(items), _) => {
                let mut fresh = Vec::new();
                merge_list(&mut fresh, items, key, &here);
                t.insert(k.clone(), Value::Array(fresh));
            }
            (None, _, Some(existing)) if v.is_object() && existing.is_object() => {
                strategic_merge(existing, v, &here)
            }
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

fn merge_list(existing: &mut Vec<Value>, items: &[Value], key: &str, path: &str) {
    for item in items {
        let id = item.get(key);
        let at = existing.iter().position(|e| e.get(key) == id);
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (at, delete) {
            (Some(i), true) => {
                existing.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge(&mut existing[i], item, path),
            (None, false) => existing.push(item.clone()),
        }
    }
}

/// RFC 7386.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(t) = target.as_object_mut() {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn list_pods(s: &mut State, query: &str) -> Reply {
    let selector = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("fieldSelector="))
        .map(|v| v.replace("%3D", "=").replace("%3d", "="));
    let node = match selector.as_deref() {
        None => None,
        Some(sel) => match sel.strip_prefix("spec.nodeName=") {
            Some(n) => Some(n.to_owned()),
            None => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("field label not supported: {sel}"),
                )
            }
        },
    };
    let items: Vec<Value> = s
        .pods
        .values()
        .filter(|p| node.as_deref().is_none_or(|n| p["spec"]["nodeName"] == n))
        .cloned()
        .collect();
    let rv = s.version.to_string();
    reply(
        StatusCode::OK,
        &json!({"kind": "PodList", "apiVersion": "v1",
                "metadata": {"resourceVersion": rv}, "items": items}),
    )
}

fn evict(s: &mut State, ns: &str, name: &str, body: &Value) -> Reply {
    if body["apiVersion"] != "policy/v1" || body["kind"] != "Eviction" {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not a policy/v1 Eviction",
        );
    }
    let key = (ns.to_owned(), name.to_owned());
    if !s.pods.contains_key(&key) {
        return not_found("pods", name);
    }
    if let Some(left) = s.pdb_blocks.get_mut(&key) {
        if *left > 0 {
            *left -= 1;
            return status(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "Cannot evict pod as it would violate the pod's disruption budget.",
            );
        }
    }
    s.pods.remove(&key);
    s.bump();
    reply(
        StatusCode::CREATED,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}),
    )
}

fn create_event(s: &mut State, ns: &str, body: &Value) -> Reply {
    if body["involvedObject"].is_null() || body["reason"].is_null() {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "Event is invalid: involvedObject and reason are required",
        );
    }
    let mut event = body.clone();
    let rv = s.bump();
    if event.pointer("/metadata/name").is_none() {
        let stem = event
            .pointer("/metadata/generateName")
            .and_then(Value::as_str)
            .unwrap_or("event.")
            .to_owned();
        event["metadata"]["name"] = Value::String(format!("{stem}{rv}"));
    }
    event["metadata"]["namespace"] = Value::String(ns.to_owned());
    event["metadata"]["resourceVersion"] = Value::String(rv);
    s.events.push(event.clone());
    reply(StatusCode::CREATED, &event)
}

/// Each agent step's bound: many ticks and back-offs, so a slow shared machine is no failure.
pub const STEP: Duration = Duration::from_secs(90);

pub type Client = pb::node_health_client::NodeHealthClient<tonic::transport::Channel>;

/// A real agent (`nodeward run`, built with fault injection) publishing to a [`KubeApi`]: eBPF,
/// GPU and node sources off (a later `extra` setting wins), its API on a Unix socket.
#[derive(Debug)]
pub struct Agent {
    child: tokio::process::Child,
    pub client: Client,
    log: PathBuf,
    _dir: TempDir,
}

impl Agent {
    pub async fn start(stem: &str, node: &str, api: &KubeApi, fault: &str, extra: &[&str]) -> Self {
        let dir = TempDir::new(stem);
        let socket = dir.0.join("agent.sock");
        let log = dir.0.join("agent.log");
        let mut cmd = tokio::process::Command::new(agent_binary());
        cmd.args(["run", "--config", "/dev/null"]);
        let sets = [
            "api.tcp_listen=".to_owned(),
            "metrics.enabled=false".to_owned(),
            "ebpf.enabled=false".to_owned(),
            "gpu.enabled=false".to_owned(),
            "node.enabled=false".to_owned(),
            "containers.runtime_endpoint=none".to_owned(),
            "agent.tick=200ms".to_owned(),
            "health.interval=100ms".to_owned(),
            format!("api.unix_socket={}", socket.display()),
            format!("drain.state_file={}", dir.0.join("drain.json").display()),
            format!("api.node_name={node}"),
            format!("kubernetes.server={}", api.url()),
            "kubernetes.min_interval=0s".to_owned(),
            "kubernetes.max_backoff=2s".to_owned(),
        ];
        for kv in sets.iter().map(String::as_str).chain(extra.iter().copied()) {
            cmd.args(["--set", kv]);
        }
        if !fault.is_empty() {
            cmd.env("NODEWARD_FAULT_INJECT", fault);
        }
        let child = cmd
            .env("NODEWARD_LOG", "info,nodeward::kube=debug")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("NODE_NAME")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("start nodeward run");
        let addr = format!("unix:{}", socket.display());
        let client = eventually(STEP, || {
            let (addr, socket) = (addr.clone(), socket.clone());
            async move { nodeward::client::connect(&conn(&addr), &socket).await.ok() }
        })
        .await
        .unwrap_or_else(|| panic!("the daemon never answered on its socket"));
        Self {
            child,
            client,
            log,
            _dir: dir,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn stop(mut self) {
        let pid = i32::try_from(self.child.id().expect("the agent runs")).expect("pid fits");
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let exit = tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("exits in time")
            .expect("wait");
        let log = self.log_text();
        let problems: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .collect();
        assert!(
            exit.success(),
            "clean exit: {exit:?}\n{}",
            problems.join("\n")
        );
    }
}

/// The Node condition of type `t` as stored: (status, reason).
pub fn condition(api: &KubeApi, node: &str, t: &str) -> Option<(String, String)> {
    let n = api.node(node)?;
    n["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == t)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

pub fn has(api: &KubeApi, node: &str, t: &str, status: &str, reason: &str) -> bool {
    condition(api, node, t) == Some((status.to_owned(), reason.to_owned()))
}

pub fn status_patches(requests: &[Recorded], node: &str) -> Vec<Recorded> {
    let path = format!("/api/v1/nodes/{node}/status");
    requests
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == path)
        .cloned()
        .collect()
}

/// Waits until `f` holds, polling every 100 ms, for at most `limit` (a bound that only catches
/// a hang). Returns whether it held.
pub async fn until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with(node: Value) -> State {
        let mut s = State {
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            events: Vec::new(),
            requests: Vec::new(),
            version: 7,
            mode: Mode::Up,
            throttle: None,
            pdb_blocks: BTreeMap::new(),
            token: None,
        };
        s.nodes.insert("n".to_owned(), node);
        s
    }

    fn node() -> Value {
        json!({"metadata": {"name": "n", "resourceVersion": "7", "labels": {"a": "1"}},
               "spec": {"taints": [{"key": "x", "effect": "NoSchedule"}]},
               "status": {"conditions": [{"type": "Ready", "status": "True"},
                                         {"type": "Mine", "status": "False"}]}})
    }

    const SMP: &str = "application/strategic-merge-patch+json";

    #[test]
    fn conditions_merge_by_type_and_taints_are_replaced() {
        let mut s = state_with(node());
        let r = patch_node(
            &mut s,
            "n",
            true,
            SMP,
            &json!({"status": {"conditions": [{"type": "Mine", "status": "True"},
                                              {"type": "New", "status": "False"}]}}),
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            s.nodes["n"]["status"]["conditions"],
            json!([
            {"type": "Ready", "status": "True"}, {"type": "Mine", "status": "True"},
            {"type": "New", "status": "False"}])
        );
        patch_node(
            &mut s,
            "n",
            false,
            SMP,
            &json!({"spec": {"taints": [{"key": "y", "effect": "NoExecute"}]}}),
        );
        assert_eq!(
            s.nodes["n"]["spec"]["taints"],
            json!([{"key": "y", "effect": "NoExecute"}])
        );
        patch_node(
            &mut s,
            "n",
            true,
            SMP,
            &json!({"status": {"conditions": [{"type": "New", "$patch": "delete"}]}}),
        );
        assert_eq!(
            s.nodes["n"]["status"]["conditions"]
                .as_array()
                .map(Vec::len),
            Some(2)
        );
    }

    #[test]
    fn status_changes_only_through_status_and_spec_only_through_the_node() {
        let mut s = state_with(node());
        patch_node(
            &mut s,
            "n",
            true,
            SMP,
            &json!({"spec": {"unschedulable": true},
            "metadata": {"labels": {"b": "2"}}}),
        );
        assert_eq!(
            s.nodes["n"],
            node(),
            "a status patch changed spec or metadata"
        );
        patch_node(
            &mut s,
            "n",
            false,
            SMP,
            &json!({"status": {"conditions": []}}),
        );
        assert_eq!(s.nodes["n"], node(), "a node patch changed status");
        patch_node(
            &mut s,
            "n",
            false,
            "application/merge-patch+json",
            &json!({"metadata": {"labels": {"a": null, "b": "2"}}}),
        );
        assert_eq!(s.nodes["n"]["metadata"]["labels"], json!({"b": "2"}));
    }

    #[test]
    fn writes_bump_the_version_no_ops_do_not_and_stale_versions_conflict() {
        let mut s = state_with(node());
        patch_node(
            &mut s,
            "n",
            false,
            SMP,
            &json!({"metadata": {"labels": {"a": "1"}}}),
        );
        assert_eq!(
            s.nodes["n"]["metadata"]["resourceVersion"], "7",
            "a no-op patch wrote"
        );
        patch_node(
            &mut s,
            "n",
            false,
            SMP,
            &json!({"metadata": {"labels": {"a": "2"}}}),
        );
        assert_eq!(s.nodes["n"]["metadata"]["resourceVersion"], "8");
        let stale = patch_node(
            &mut s,
            "n",
            false,
            SMP,
            &json!({"metadata": {"resourceVersion": "7", "labels": {"a": "3"}}}),
        );
        assert_eq!(stale.status(), StatusCode::CONFLICT);
        assert_eq!(s.nodes["n"]["metadata"]["labels"]["a"], "2");
        let json_patch = patch_node(
            &mut s,
            "n",
            false,
            "application/json-patch+json",
            &json!([]),
        );
        assert_eq!(json_patch.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}
