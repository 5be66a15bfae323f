//! The stand-in's side for `nodeward fleet`'s discovery: the DaemonSet's pods listed by
//! namespace and label selector, the node list, HTTPS with client certificates, and bearer
//! tokens.

use std::{path::PathBuf, sync::Arc};

use hyper::StatusCode;
use serde_json::{json, Map, Value};
use tokio_rustls::{
    rustls::{
        self,
        pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
        server::WebPkiClientVerifier,
        RootCertStore, ServerConfig,
    },
    TlsAcceptor,
};

use super::{reply, status, KubeApi, Reply, State};

/// The stand-in's certificate, its key, and the CA its clients' certificates must chain to
/// (`None`: no client certificate asked for).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The HTTPS acceptor (rustls' has no `Debug`).
#[derive(Clone)]
pub(super) struct Acceptor(pub TlsAcceptor);

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor")
    }
}

fn read(path: &PathBuf) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

impl KubeApi {
    /// Starts serving HTTPS on a free port of 127.0.0.1 (its certificate must name 127.0.0.1).
    pub fn start_tls(files: &TlsFiles) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS versions");
        let builder = match &files.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(&read(ca)) {
                    roots
                        .add(c.expect("a CA certificate"))
                        .expect("a usable CA");
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .expect("a client verifier");
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let chain = CertificateDer::pem_slice_iter(&read(&files.cert))
            .collect::<Result<Vec<_>, _>>()
            .expect("the server certificate");
        let key = PrivateKeyDer::from_pem_slice(&read(&files.key)).expect("the server key");
        let mut config = builder
            .with_single_cert(chain, key)
            .expect("the server certificate and key");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self::start_with(Some(Acceptor(TlsAcceptor::from(Arc::new(config)))))
    }

    /// Every request must carry `Authorization: Bearer <token>` from now on.
    pub fn require_token(&self, token: &str) {
        self.lock().token = Some(token.to_owned());
    }

    /// Adds a pod as a DaemonSet's: `labels`, bound to `node`, in `phase` with `ip` (none when
    /// empty), its container serving `grpc_port` under the port name `grpc` when given.
    #[expect(
        clippy::too_many_arguments,
        reason = "a pod's fields, named at each call"
    )]
    pub fn add_daemon_pod(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        labels: &[(&str, &str)],
        phase: &str,
        ip: &str,
        grpc_port: Option<u16>,
    ) {
        let mut s = self.lock();
        let rv = s.bump();
        let labels: Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
            .collect();
        let mut ports = vec![json!({"name": "metrics", "containerPort": 9464, "protocol": "TCP"})];
        if let Some(p) = grpc_port {
            ports.push(json!({"name": "grpc", "containerPort": p, "protocol": "TCP"}));
        }
        let mut status = json!({"phase": phase, "hostIP": "192.0.2.1"});
        if !ip.is_empty() {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
        }
        s.pods.insert(
            (namespace.to_owned(), name.to_owned()),
            json!({"kind": "Pod", "apiVersion": "v1",
                   "metadata": {"name": name, "namespace": namespace, "labels": labels,
                                "uid": format!("uid-{namespace}-{name}"), "resourceVersion": rv,
                                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                    "name": "nodeward", "uid": "ds", "controller": true}]},
                   "spec": {"nodeName": node, "containers": [{"name": "nodeward", "ports": ports}]},
                   "status": status}),
        );
    }
}

/// `%XX` and `+` decoded, as Go's `url.ParseQuery` reads a query.
fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// One requirement of a label selector.
#[derive(Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            Self::Equals(k, v) => get(k) == Some(v.as_str()),
            Self::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Self::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Self::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Self::Exists(k) => get(k).is_some(),
            Self::NotExists(k) => get(k).is_none(),
        }
    }
}

/// The requirements of a selector (`a=b,c!=d,e in (f,g),h,!i`), or the real server's words
/// for what is wrong.
fn parse_selector(text: &str) -> Result<Vec<Requirement>, String> {
    // Split at commas outside parentheses.
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    let key_ok = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    };
    let mut out = Vec::new();
    for part in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("unable to parse requirement: found '{part}'");
        let set = |rest: &str| -> Option<Vec<String>> {
            let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
            Some(inner.split(',').map(|v| v.trim().to_owned()).collect())
        };
        let r = if let Some(k) = part.strip_prefix('!') {
            Requirement::NotExists(k.trim().to_owned())
        } else if let Some((k, v)) = part.split_once("!=") {
            Requirement::NotEquals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            Requirement::Equals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, rest)) = part.split_once(" notin ") {
            Requirement::NotIn(k.trim().to_owned(), set(rest).ok_or_else(bad)?)
        } else if let Some((k, rest)) = part.split_once(" in ") {
            Requirement::In(k.trim().to_owned(), set(rest).ok_or_else(bad)?)
        } else {
            Requirement::Exists(part.to_owned())
        };
        let key = match &r {
            Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::NotExists(k) => k,
        };
        if !key_ok(key) {
            return Err(bad());
        }
        out.push(r);
    }
    Ok(out)
}

/// `GET /api/v1/namespaces/{ns}/pods[?labelSelector=...]`.
pub(super) fn list_namespaced_pods(s: &mut State, ns: &str, query: &str) -> Reply {
    let mut selector = Vec::new();
    for kv in query.split('&') {
        let Some(raw) = kv.strip_prefix("labelSelector=") else {
            continue;
        };
        let Some(text) = decode(raw) else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "invalid URL escape");
        };
        match parse_selector(&text) {
            Ok(r) => selector = r,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
        }
    }
    let items: Vec<Value> = s
        .pods
        .iter()
        .filter(|((pod_ns, _), _)| pod_ns == ns)
        .map(|(_, p)| p)
        .filter(|p| {
            let labels = &p["metadata"]["labels"];
            selector.iter().all(|r| r.matches(labels))
        })
        .map(item)
        .collect();
    let rv = s.version.to_string();
    reply(
        StatusCode::OK,
        &json!({"kind": "PodList", "apiVersion": "v1",
                "metadata": {"resourceVersion": rv}, "items": items}),
    )
}

/// `GET /api/v1/nodes`.
pub(super) fn list_nodes(s: &mut State) -> Reply {
    let items: Vec<Value> = s.nodes.values().map(item).collect();
    let rv = s.version.to_string();
    reply(
        StatusCode::OK,
        &json!({"kind": "NodeList", "apiVersion": "v1",
                "metadata": {"resourceVersion": rv}, "items": items}),
    )
}

/// A list's item: the object without `kind` and `apiVersion`, which the real server leaves
/// to the list.
fn item(object: &Value) -> Value {
    let mut v = object.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("kind");
        m.remove("apiVersion");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_as_the_real_server_reads_them() {
        let labels = json!({"app.kubernetes.io/name": "nodeward", "tier": "edge"});
        let m = |sel: &str| {
            parse_selector(sel)
                .expect("parses")
                .iter()
                .all(|r| r.matches(&labels))
        };
        assert!(m("app.kubernetes.io/name=nodeward"));
        assert!(m("app.kubernetes.io/name==nodeward,tier"));
        assert!(!m("app.kubernetes.io/name=other"));
        assert!(m("tier in (core, edge),!gone"));
        assert!(!m("tier notin (edge)"));
        assert!(m("tier!=core"));
        assert!(!m("missing"));
        assert!(parse_selector("a=b,=c").is_err());
        assert_eq!(
            decode("app.kubernetes.io%2Fname%3Dnodeward+x").as_deref(),
            Some("app.kubernetes.io/name=nodeward x")
        );
    }
}
