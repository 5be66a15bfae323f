//! The agent's side in a Kubernetes cluster: the health verdict and its firing conditions as
//! conditions on this node's Node object, and an Event on each of their transitions.
//!
//! It reads what the health engine publishes (the same `watch` channel the API and `/metrics`
//! read) and only translates it: health knows nothing of Kubernetes. One supervised task patches
//! the Node's `status` subresource with a strategic merge patch (which merges
//! `status.conditions` by `type`, leaving the kubelet's own conditions alone), when a
//! condition's status, reason or causes change, and on every `kubernetes.heartbeat`; never more
//! often than `kubernetes.min_interval`. A failed call is retried with back-off (the server's
//! `Retry-After` when it gives one); an API server that is down only delays the conditions,
//! which catch up when it answers again: the agent's other work never waits for it.
//!
//! `kubernetes.enabled = "auto"` turns this on where the agent can reach an API server: inside a
//! pod (the service account's token and the `KUBERNETES_SERVICE_HOST`/`_PORT` variables), or
//! where `kubernetes.server` is configured. See docs/cluster.md.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod client;
pub mod conditions;
pub mod drain;
mod publish;

pub use client::{Client, ClientError, Target};
pub use conditions::ConditionNames;
pub use publish::{run, Publisher, NAME};

/// Where a pod's service account is mounted.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// `kubernetes.enabled`: on, off, or on where an API server is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enabled {
    Auto,
    On,
    Off,
}

impl Serialize for Enabled {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto => s.serialize_str("auto"),
            Self::On => s.serialize_bool(true),
            Self::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for Enabled {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(Self::On),
            Raw::Bool(false) => Ok(Self::Off),
            Raw::Text(t) => match t.as_str() {
                "auto" => Ok(Self::Auto),
                "true" => Ok(Self::On),
                "false" => Ok(Self::Off),
                other => Err(serde::de::Error::custom(format!(
                    "expected \"auto\", true or false, got {other:?}"
                ))),
            },
        }
    }
}

/// The `[kubernetes]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubeConfig {
    /// `"auto"`: on inside a pod (service account present) or when `server` is set; `true`;
    /// `false`.
    pub enabled: Enabled,
    /// The API server, `https://HOST:PORT` (or `http://` for a local one); empty: the in-cluster
    /// address from `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`.
    pub server: String,
    /// A file holding the bearer token; empty: the service account's token inside a pod, none
    /// otherwise.
    pub token_file: PathBuf,
    /// The CA bundle of the API server's certificate; empty: the service account's `ca.crt`.
    pub ca_file: PathBuf,
    /// Patch the conditions at least this often even when nothing changed (their
    /// `lastHeartbeatTime`).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// The least time between two patches: changes within it are sent together.
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// How long one API call may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The longest wait between retries of a failed call.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Create an Event on each condition transition.
    pub events: bool,
    /// The namespace of those Events (Node events live in `default`, as the kubelet's do).
    pub event_namespace: String,
    /// The taint a drain puts on the Node (`BeginDrain`) and takes off again (`CancelDrain`,
    /// only if this agent added it).
    pub drain_taint_key: String,
    pub drain_taint_effect: drain::Effect,
    /// Evict the node's pods through the Eviction API once the drain finds no live stream or
    /// viewer left.
    pub drain_evict: bool,
    /// The condition types' names.
    pub conditions: ConditionNames,
}

impl Default for KubeConfig {
    fn default() -> Self {
        Self {
            enabled: Enabled::Auto,
            server: String::new(),
            token_file: PathBuf::new(),
            ca_file: PathBuf::new(),
            heartbeat: Duration::from_secs(300),
            min_interval: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(60),
            events: true,
            event_namespace: "default".to_owned(),
            drain_taint_key: "nodeward.io/draining".to_owned(),
            drain_taint_effect: drain::Effect::NoSchedule,
            drain_evict: true,
            conditions: ConditionNames::default(),
        }
    }
}

/// A bad `[kubernetes]` value: the key under `kubernetes.`, the value, what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kubernetes.{key} = {value}: {allowed}")]
pub struct KubeConfigError {
    pub key: String,
    pub value: String,
    pub allowed: String,
}

/// A DNS subdomain / CamelCase-ish name the API takes as a condition type: letters, digits,
/// `.`, `-`, `_`, `/`, at most 316 characters.
fn valid_type(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 316
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
}

impl KubeConfig {
    pub fn validate(&self) -> Result<(), KubeConfigError> {
        let err = |key: &str, value: String, allowed: &str| KubeConfigError {
            key: key.to_owned(),
            value,
            allowed: allowed.to_owned(),
        };
        let dur = |d: Duration| format!("\"{}\"", humantime::format_duration(d));
        let in_range = |key: &str, d: Duration, min: u64, max: u64| {
            if d < Duration::from_secs(min) || d > Duration::from_secs(max) {
                Err(err(
                    key,
                    dur(d),
                    &format!(
                        "must be between {} and {}",
                        humantime::format_duration(Duration::from_secs(min)),
                        humantime::format_duration(Duration::from_secs(max))
                    ),
                ))
            } else {
                Ok(())
            }
        };
        in_range("heartbeat", self.heartbeat, 1, 3600)?;
        in_range("min_interval", self.min_interval, 0, 3600)?;
        in_range("request_timeout", self.request_timeout, 1, 300)?;
        in_range("max_backoff", self.max_backoff, 1, 3600)?;
        if self.min_interval > self.heartbeat {
            return Err(err(
                "min_interval",
                dur(self.min_interval),
                "must not be longer than kubernetes.heartbeat",
            ));
        }
        let scheme = ["https://", "http://"]
            .iter()
            .any(|p| self.server.starts_with(p));
        if !self.server.is_empty() && !scheme {
            return Err(err(
                "server",
                format!("{:?}", self.server),
                "must be empty (in-cluster) or https://HOST:PORT (http:// for a local server)",
            ));
        }
        let names = &self.conditions;
        for (key, name) in [
            ("conditions.verdict", &names.verdict),
            ("conditions.network", &names.network),
            ("conditions.gpu", &names.gpu),
            ("conditions.node", &names.node),
            ("conditions.draining", &names.draining),
        ] {
            if !valid_type(name) {
                return Err(err(
                    key,
                    format!("{name:?}"),
                    "must be a condition type: a letter, then letters, digits, '.', '-', '_' or '/'",
                ));
            }
        }
        let all = names.all();
        if (1..all.len()).any(|i| all[..i].contains(&all[i])) {
            return Err(err(
                "conditions",
                format!("{all:?}"),
                "the five condition types must have five different names",
            ));
        }
        let key_ok = self.drain_taint_key.len() <= 316
            && self
                .drain_taint_key
                .rsplit('/')
                .next()
                .is_some_and(|name| !name.is_empty() && name.len() <= 63)
            && self
                .drain_taint_key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'));
        if !key_ok {
            return Err(err(
                "drain_taint_key",
                format!("{:?}", self.drain_taint_key),
                "must be a taint key: [prefix/]name, name 1 to 63 letters, digits, '.', '-' or '_'",
            ));
        }
        if self.event_namespace.is_empty() {
            return Err(err(
                "event_namespace",
                "\"\"".to_owned(),
                "must name a namespace",
            ));
        }
        Ok(())
    }

    /// Where the API server is, by this section, the environment (`env` looks a variable up)
    /// and the service account directory: `None` when publishing is off or `"auto"` finds no
    /// API server; an error when it is on and there is none.
    pub fn target(
        &self,
        env: impl Fn(&str) -> Option<String>,
        service_account: &Path,
    ) -> Result<Option<Target>, KubeConfigError> {
        let in_cluster = service_account.join("token").is_file();
        let from_env = match (
            env("KUBERNETES_SERVICE_HOST"),
            env("KUBERNETES_SERVICE_PORT"),
        ) {
            (Some(h), Some(p)) if !h.is_empty() && !p.is_empty() => {
                // An IPv6 service address needs brackets in a URL.
                let host = if h.contains(':') { format!("[{h}]") } else { h };
                Some(format!("https://{host}:{p}"))
            }
            _ => None,
        };
        let configured = !self.server.is_empty();
        let server = if configured {
            Some(self.server.clone())
        } else {
            from_env.filter(|_| in_cluster)
        };
        let server = match (self.enabled, server) {
            (Enabled::Off, _) | (Enabled::Auto, None) => return Ok(None),
            (Enabled::On, None) => {
                return Err(KubeConfigError {
                    key: "enabled".to_owned(),
                    value: "true".to_owned(),
                    allowed: format!(
                        "no API server: set kubernetes.server, or run in a pod (no {}/token, \
                         or no KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT)",
                        service_account.display()
                    ),
                })
            }
            (Enabled::On | Enabled::Auto, Some(server)) => server,
        };
        // The service account's files go with the in-cluster address only.
        let or_sa = |p: &Path, file: &str| {
            if !p.as_os_str().is_empty() {
                Some(p.to_path_buf())
            } else if !configured {
                Some(service_account.join(file))
            } else {
                None
            }
        };
        Ok(Some(Target {
            server,
            token_file: or_sa(&self.token_file, "token"),
            ca_file: or_sa(&self.ca_file, "ca.crt"),
        }))
    }
}

#[cfg(test)]
mod tests;
