//! Finding the agents through the API server: the DaemonSet's pods (by namespace and label
//! selector) in each kubeconfig context asked for. Each Running pod with an IP is a target,
//! named by its node; every node the API lists that has no running agent pod is a row saying
//! so, and a context whose API server does not answer is a row with its error, while the other
//! contexts still report.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde_json::Value;

use super::{
    kubeconfig::Context,
    targets::{Absent, Found, Target},
    FleetError,
};
use crate::{
    client::chain,
    kube::client::{Client, ClientError},
};

/// The DaemonSet's defaults, as packaging/kubernetes ships it.
pub const NAMESPACE: &str = "nodeward";
pub const SELECTOR: &str = "app.kubernetes.io/name=nodeward";
/// The pod's gRPC port when its container names none `grpc`.
pub const PORT: u16 = 50051;

/// Discovery across kubeconfig contexts.
#[derive(Debug, Clone)]
pub struct KubeDiscovery {
    pub contexts: Vec<Context>,
    pub namespace: String,
    pub selector: String,
    /// `--port`: overrides the pods' own `grpc` container port.
    pub port: Option<u16>,
    /// Each API call's limit.
    pub timeout: Duration,
}

/// What one context gave: targets and nodes without an agent, or why nothing.
type Listed = Result<(Vec<Target>, Vec<Absent>), String>;

impl KubeDiscovery {
    /// Asks every context at once; the answers in the contexts' order.
    pub async fn find(&self) -> Result<Found, FleetError> {
        let several = self.contexts.len() > 1;
        let me = Arc::new(self.clone());
        let mut set = tokio::task::JoinSet::new();
        for (i, ctx) in self.contexts.iter().enumerate() {
            let (me, ctx) = (me.clone(), ctx.clone());
            set.spawn(async move { (i, me.list(&ctx).await) });
        }
        let mut answers: Vec<Option<Listed>> = vec![None; self.contexts.len()];
        while let Some(done) = set.join_next().await {
            match done {
                Ok((i, listed)) => answers[i] = Some(listed),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        let mut found = Found::default();
        for (ctx, listed) in self.contexts.iter().zip(answers) {
            let label = several.then(|| ctx.name.clone());
            // Every spawned task answers (a panic is resumed above).
            match listed.unwrap_or_else(|| Err("no answer".to_owned())) {
                Ok((targets, absent)) => {
                    found.targets.extend(targets.into_iter().map(|t| Target {
                        context: label.clone(),
                        ..t
                    }));
                    found.absent.extend(absent.into_iter().map(|a| Absent {
                        context: label.clone(),
                        ..a
                    }));
                }
                Err(e) if !several => {
                    return Err(FleetError::Unavailable(format!(
                        "context {}: {e}",
                        ctx.name
                    )))
                }
                Err(e) => {
                    found.absent.push(Absent {
                        node: String::new(),
                        context: label,
                        error: format!("context {}: {e}", ctx.name),
                    });
                }
            }
        }
        Ok(found)
    }

    async fn list(&self, ctx: &Context) -> Listed {
        let client =
            Client::with_credentials(ctx.target.clone(), ctx.credentials.clone(), self.timeout)
                .map_err(|e| chain(&e))?;
        let pods_path = format!(
            "/api/v1/namespaces/{}/pods?labelSelector={}",
            encode(&self.namespace),
            encode(&self.selector)
        );
        let pods = client
            .get(&pods_path)
            .await
            .map_err(|e| format!("cannot list the agent pods: {}", api_error(&e)))?;
        let nodes = client
            .get("/api/v1/nodes")
            .await
            .map_err(|e| format!("cannot list the nodes: {}", api_error(&e)))?;
        Ok(targets(&pods, &nodes, self.port, &self.namespace))
    }
}

fn api_error(e: &ClientError) -> String {
    match e.status() {
        Some(s) if s == hyper::StatusCode::FORBIDDEN => {
            format!(
                "{} (the fleet user needs the RBAC of docs/fleet.md)",
                chain(e)
            )
        }
        _ => chain(e),
    }
}

/// Percent-encodes a query value: everything but RFC 3986's unreserved characters.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The gRPC port of a pod: its container port named `grpc`, else [`PORT`].
fn grpc_port(pod: &Value) -> u16 {
    let containers = pod["spec"]["containers"].as_array().into_iter().flatten();
    containers
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .find(|p| p["name"] == "grpc")
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .unwrap_or(PORT)
}

/// The targets a PodList and a NodeList make: a target per Running pod with an IP and a node;
/// a row per listed node without one (saying what its pod is doing, if it has one).
pub fn targets(
    pods: &Value,
    nodes: &Value,
    port: Option<u16>,
    namespace: &str,
) -> (Vec<Target>, Vec<Absent>) {
    let mut running = Vec::new();
    // Pods not running, by node: `(name, phase)`.
    let mut other: BTreeMap<String, (String, String)> = BTreeMap::new();
    for pod in pods["items"].as_array().into_iter().flatten() {
        let Some(node) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) else {
            continue;
        };
        let phase = pod["status"]["phase"].as_str().unwrap_or("Unknown");
        let ip = pod["status"]["podIP"].as_str().filter(|ip| !ip.is_empty());
        match (phase, ip) {
            ("Running", Some(ip)) => running.push(Target {
                host: ip.to_owned(),
                port: port.unwrap_or_else(|| grpc_port(pod)),
                node: Some(node.to_owned()),
                context: None,
            }),
            _ => {
                let name = pod["metadata"]["name"].as_str().unwrap_or("?").to_owned();
                other.insert(node.to_owned(), (name, phase.to_owned()));
            }
        }
    }
    running.sort_by(|a, b| a.node.cmp(&b.node));
    let mut absent = Vec::new();
    for node in nodes["items"].as_array().into_iter().flatten() {
        let Some(name) = node["metadata"]["name"].as_str() else {
            continue;
        };
        if running.iter().any(|t| t.node.as_deref() == Some(name)) {
            continue;
        }
        let error = match other.get(name) {
            Some((pod, phase)) => format!("the nodeward pod {namespace}/{pod} is {phase}"),
            None => "no nodeward pod on this node".to_owned(),
        };
        absent.push(Absent {
            node: name.to_owned(),
            context: None,
            error,
        });
    }
    (running, absent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, node: &str, phase: &str, ip: &str, port: Option<u16>) -> Value {
        let mut p = json!({"metadata": {"name": name, "namespace": "nodeward"},
            "spec": {"nodeName": node, "containers": [{"name": "agent", "ports": [
                {"name": "metrics", "containerPort": 9464}]}]},
            "status": {"phase": phase}});
        if !ip.is_empty() {
            p["status"]["podIP"] = json!(ip);
        }
        if let Some(port) = port {
            p["spec"]["containers"][0]["ports"]
                .as_array_mut()
                .expect("ports")
                .push(json!({"name": "grpc", "containerPort": port}));
        }
        p
    }

    fn list(items: Vec<Value>) -> Value {
        json!({"kind": "List", "items": items})
    }

    fn node(name: &str) -> Value {
        json!({"metadata": {"name": name}})
    }

    #[test]
    fn running_pods_are_targets_and_every_other_node_is_a_row_saying_why() {
        let pods = list(vec![
            pod("nw-b", "b", "Running", "10.1.0.2", Some(7000)),
            pod("nw-a", "a", "Running", "fd00::1", None),
            pod("nw-c", "c", "Pending", "", None),
            pod("nw-d", "d", "Running", "", None),
        ]);
        let nodes = list(vec![node("a"), node("b"), node("c"), node("d"), node("e")]);
        let (t, absent) = targets(&pods, &nodes, None, "nodeward");
        let got: Vec<(String, Option<&str>)> =
            t.iter().map(|t| (t.address(), t.node.as_deref())).collect();
        assert_eq!(
            got,
            [
                ("[fd00::1]:50051".to_owned(), Some("a")),
                ("10.1.0.2:7000".to_owned(), Some("b"))
            ]
        );
        let rows: Vec<(&str, &str)> = absent
            .iter()
            .map(|a| (a.node.as_str(), a.error.as_str()))
            .collect();
        assert_eq!(
            rows,
            [
                ("c", "the nodeward pod nodeward/nw-c is Pending"),
                ("d", "the nodeward pod nodeward/nw-d is Running"),
                ("e", "no nodeward pod on this node"),
            ]
        );
        // --port wins over the pod's own.
        let (t, _) = targets(&pods, &nodes, Some(9), "nodeward");
        assert!(t.iter().all(|t| t.port == 9));
    }

    #[test]
    fn selectors_are_percent_encoded() {
        assert_eq!(
            encode("app.kubernetes.io/name=nodeward,tier in (a b)"),
            "app.kubernetes.io%2Fname%3Dnodeward%2Ctier%20in%20%28a%20b%29"
        );
    }
}
