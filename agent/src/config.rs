//! Configuration: built-in defaults, overridden by the TOML file, then by environment variables,
//! then by command-line `--set key=value` flags (flag > environment > file > default).
//!
//! Every key has a default, so the agent runs with no file at all. A bad value is rejected with
//! a message naming the key, the value, where it came from and what is allowed; `main` turns that
//! into exit code 64 (`EX_USAGE`). Loading takes the environment as an iterator so tests never
//! touch the real one.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use crate::paths::PathsConfig;
use crate::store::{Window, DEFAULT_NETWORK_WINDOWS};

/// The default config file location.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nodeward/nodeward.toml";
/// Prefix of the environment variables that override config keys (`NODEWARD_AGENT_TICK`, ...).
pub const ENV_PREFIX: &str = "NODEWARD_";
/// The log filter variable; it overrides `log.filter`.
pub const LOG_ENV: &str = "NODEWARD_LOG";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub log: LogConfig,
    pub agent: AgentConfig,
    pub ebpf: EbpfConfig,
    pub paths: PathsConfig,
    pub udp: crate::sources::udp::UdpConfig,
    /// NVIDIA GPUs through NVML (section defined in `sources::gpu`).
    pub gpu: crate::sources::gpu::GpuConfig,
    pub health: crate::health::HealthConfig,
    pub api: crate::api::ApiConfig,
    /// The drain handshake's state file, reply bounds and which streams it waits for (section
    /// defined in `health::drain`).
    pub drain: crate::health::drain::DrainConfig,
    pub tcp: crate::sources::tcp::TcpConfig,
    pub network: NetworkConfig,
    pub containers: crate::containers::ContainersConfig,
    pub node: crate::sources::node::NodeConfig,
    /// Prometheus `/metrics` (section defined in `metrics`).
    pub metrics: crate::metrics::MetricsConfig,
    /// Node conditions and Events in a Kubernetes cluster (section defined in `kube`).
    pub kubernetes: crate::kube::KubeConfig,
}

impl Config {
    /// What every source shares: the tick, the host paths, whether eBPF may load.
    pub fn shared(&self) -> crate::sources::Shared {
        crate::sources::Shared {
            tick: self.agent.tick,
            paths: self.paths.clone(),
            ebpf: self.ebpf.enabled,
            windows: self.network.windows.clone(),
        }
    }

    /// The sources' sections, for `sources::start` to hand each source its own.
    pub fn sources(&self) -> crate::sources::Sections {
        crate::sources::Sections {
            tcp: self.tcp.clone(),
            udp: self.udp.clone(),
            gpu: self.gpu.clone(),
            containers: self.containers.clone(),
            node: self.node.clone(),
            shared: self.shared(),
        }
    }

    /// What the bridge from the sources to the store reads.
    pub fn bridge(&self) -> crate::bridge::Settings {
        crate::bridge::Settings {
            containers: self.containers.enabled,
            node: self.node.enabled,
            udp_min_flow_age: self.udp.stream_min_duration,
            peer_window: self.health.network_window,
            host_cgroups: self.drain.host_cgroups.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `plain` (human readable) or `json` (one object per line).
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `nodeward=debug,aya=warn`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Plain,
            filter: "info".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// How often sources are read (eBPF maps, cgroup files).
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// How long shutdown may take before the agent gives up waiting for its tasks.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EbpfConfig {
    /// Load the eBPF programs. With `false` the agent runs its other sources only.
    pub enabled: bool,
}

impl Default for EbpfConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// The `[network]` section: what the TCP and UDP sources, the store, the health rules and
/// `/metrics` share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// The sliding windows every network figure is reported over, shortest first.
    pub windows: Vec<Window>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            windows: DEFAULT_NETWORK_WINDOWS.to_vec(),
        }
    }
}

/// Bounds on `network.windows`: each window's length, and how many (each costs a pass over
/// the TCP ring per tick and a label value per metric).
pub const WINDOW_MIN: Duration = Duration::from_secs(1);
pub const WINDOW_MAX: Duration = Duration::from_secs(3600);
pub const WINDOWS_MAX: usize = 8;

impl NetworkConfig {
    /// What is wrong with `windows`, if anything.
    pub fn check(&self) -> Result<(), String> {
        if self.windows.is_empty() || self.windows.len() > WINDOWS_MAX {
            return Err(format!("must list 1 to {WINDOWS_MAX} windows"));
        }
        if let Some(w) = self
            .windows
            .iter()
            .find(|w| w.duration() < WINDOW_MIN || w.duration() > WINDOW_MAX)
        {
            return Err(format!(
                "window \"{w}\" is out of range: each must be between {} and {}",
                humantime::format_duration(WINDOW_MIN),
                humantime::format_duration(WINDOW_MAX)
            ));
        }
        if self.windows.windows(2).any(|p| p[0] >= p[1]) {
            return Err("must be distinct and ascending (shortest first)".to_owned());
        }
        Ok(())
    }

    /// The windows as `"10s", "1m", "5m"`, for error messages.
    pub fn listed(&self) -> String {
        self.windows
            .iter()
            .map(|w| format!("\"{w}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Where a config value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Env(String),
    Flag,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => write!(f, "built-in default"),
            Self::File(p) => write!(f, "file {}", p.display()),
            Self::Env(name) => write!(f, "environment variable {name}"),
            Self::Flag => write!(f, "command-line flag --set"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}` = {value} (from {origin}): {allowed}")]
    Invalid {
        key: String,
        value: String,
        origin: Origin,
        allowed: String,
    },
    #[error("`--set {0}`: expected KEY=VALUE, e.g. --set agent.tick=2s")]
    BadFlag(String),
}

/// Where to read the file from, and whether a missing file is an error.
#[derive(Debug, Clone)]
pub struct Source<'a> {
    /// `Some` when the user named a file with `--config`: then it must exist.
    pub explicit_path: Option<&'a Path>,
    /// `KEY=VALUE` overrides from `--set`.
    pub flags: &'a [String],
}

/// Loads the configuration. `env` is the process environment (or a test's stand-in).
pub fn load(
    source: &Source<'_>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let defaults = defaults_table();
    let mut merged = defaults.clone();
    let mut origins: BTreeMap<String, Origin> = BTreeMap::new();

    let path = source
        .explicit_path
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let file: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Syntax {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
            overlay(
                &mut merged,
                &file,
                "",
                &Origin::File(path.clone()),
                &mut origins,
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && source.explicit_path.is_none() => {}
        Err(source) => return Err(ConfigError::Read { path, source }),
    }

    let leaves = leaf_keys(&defaults);
    for (name, value) in env {
        let key = if name == LOG_ENV {
            Some("log.filter".to_owned())
        } else {
            name.strip_prefix(ENV_PREFIX)
                .and_then(|rest| leaves.keys().find(|k| env_suffix(k) == rest).cloned())
        };
        if let Some(key) = key {
            let parsed = parse_scalar(&value, leaves.get(&key));
            set_path(&mut merged, &key, parsed);
            origins.insert(key, Origin::Env(name));
        }
    }

    for flag in source.flags {
        let (key, value) = flag
            .split_once('=')
            .ok_or_else(|| ConfigError::BadFlag(flag.clone()))?;
        let key = key.trim();
        let parsed = parse_scalar(value.trim(), leaves.get(key));
        set_path(&mut merged, key, parsed);
        origins.insert(key.to_owned(), Origin::Flag);
    }

    let config: Config = serde_path_to_error::deserialize(toml::Value::Table(merged.clone()))
        .map_err(|e| {
            let key = e.path().to_string();
            let value = get_path(&merged, &key)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "(absent)".to_owned());
            let origin = origins
                .iter()
                .find(|(k, _)| key.starts_with(k.as_str()) || k.starts_with(key.as_str()))
                .map(|(_, o)| o.clone())
                .unwrap_or(Origin::Default);
            ConfigError::Invalid {
                key,
                value,
                origin,
                allowed: first_line(&e.into_inner().to_string()),
            }
        })?;
    validate(&config, &origins)?;
    Ok(config)
}

/// serde errors from toml values end with "in `key`" on a second line; the key is reported
/// separately.
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_owned()
}

/// Range checks that types alone cannot express.
fn validate(config: &Config, origins: &BTreeMap<String, Origin>) -> Result<(), ConfigError> {
    let origin = |key: &str| origins.get(key).cloned().unwrap_or(Origin::Default);
    let duration_in = |key: &str, value: Duration, min: Duration, max: Duration| {
        if value < min || value > max {
            Err(ConfigError::Invalid {
                key: key.to_owned(),
                value: format!("\"{}\"", humantime::format_duration(value)),
                origin: origin(key),
                allowed: format!(
                    "must be between {} and {}",
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            })
        } else {
            Ok(())
        }
    };
    duration_in(
        "agent.tick",
        config.agent.tick,
        Duration::from_millis(100),
        Duration::from_secs(60),
    )?;
    duration_in(
        "agent.shutdown_timeout",
        config.agent.shutdown_timeout,
        Duration::from_millis(100),
        Duration::from_secs(300),
    )?;
    if let Err(e) = config.udp.clock_rates() {
        let key = format!("udp.dynamic_clock_rates.{}", e.key);
        return Err(ConfigError::Invalid {
            value: config
                .udp
                .dynamic_clock_rates
                .get(&e.key)
                .map_or_else(String::new, u32::to_string),
            origin: origin(&key),
            key,
            allowed: e.reason.to_owned(),
        });
    }
    if let Err(e) = crate::sources::gpu::validate(&config.gpu) {
        return Err(ConfigError::Invalid {
            key: e.key.to_owned(),
            value: e.value,
            origin: origin(e.key),
            allowed: e.allowed.to_owned(),
        });
    }
    if let Some(allowed) = config.drain.check() {
        return Err(ConfigError::Invalid {
            key: "drain.host_cgroups".to_owned(),
            value: format!("{:?}", config.drain.host_cgroups),
            origin: origin("drain.host_cgroups"),
            allowed,
        });
    }
    if let Err(allowed) = config.network.check() {
        return Err(ConfigError::Invalid {
            key: "network.windows".to_owned(),
            value: format!("[{}]", config.network.listed()),
            origin: origin("network.windows"),
            allowed,
        });
    }
    // Every key that names a window must name a configured one: a rule reading a window no
    // source keeps would never fire.
    for (key, window) in config.health.window_keys() {
        if !config.network.windows.contains(&window) {
            return Err(ConfigError::Invalid {
                key: key.to_owned(),
                value: format!("\"{window}\""),
                origin: origin(key),
                allowed: format!(
                    "must be one of network.windows ({})",
                    config.network.listed()
                ),
            });
        }
    }
    if let Err(e) = config.health.validate() {
        let key = format!("health.{}", e.key);
        return Err(ConfigError::Invalid {
            origin: origin(&key),
            key,
            value: e.value,
            allowed: e.allowed,
        });
    }
    if let Err(e) = config.metrics.validate() {
        let key = format!("metrics.{}", e.key);
        return Err(ConfigError::Invalid {
            origin: origin(&key),
            key,
            value: e.value,
            allowed: e.allowed.to_owned(),
        });
    }
    if let Err(e) = config.api.validate() {
        let key = format!("api.{}", e.key);
        return Err(ConfigError::Invalid {
            origin: origin(&key),
            key,
            value: e.value,
            allowed: e.allowed,
        });
    }
    if let Err(e) = config.kubernetes.validate() {
        let key = format!("kubernetes.{}", e.key);
        return Err(ConfigError::Invalid {
            origin: origin(&key),
            key,
            value: e.value,
            allowed: e.allowed,
        });
    }
    if let Err((key, value, allowed)) = config.tcp.check() {
        let origin = origin(&key);
        return Err(ConfigError::Invalid {
            key,
            value,
            origin,
            allowed,
        });
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log.filter) {
        return Err(ConfigError::Invalid {
            key: "log.filter".to_owned(),
            value: format!("{:?}", config.log.filter),
            origin: origin("log.filter"),
            allowed: format!("not a tracing filter directive ({e}); e.g. \"info\" or \"nodeward=debug,aya=warn\""),
        });
    }
    Ok(())
}

/// The defaults as a TOML table; also the source of the sample config.
pub fn defaults_table() -> toml::Table {
    match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        // Config is a struct of plain fields: serialisation cannot fail or yield a non-table.
        _ => toml::Table::new(),
    }
}

/// Renders a config as TOML (for `nodeward config show`).
pub fn to_toml(config: &Config) -> String {
    toml::to_string_pretty(config).unwrap_or_default()
}

/// The environment variable that overrides `key` (`agent.tick` → `NODEWARD_AGENT_TICK`).
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", env_suffix(key))
}

fn env_suffix(key: &str) -> String {
    key.replace('.', "_").to_ascii_uppercase()
}

fn leaf_keys(table: &toml::Table) -> BTreeMap<String, toml::Value> {
    let mut out = BTreeMap::new();
    fn walk(prefix: &str, t: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(inner) => walk(&key, inner, out),
                other => {
                    out.insert(key, other.clone());
                }
            }
        }
    }
    walk("", table, &mut out);
    out
}

/// A value given as text (environment, flag): strings stay strings where the default is a
/// string; otherwise the text is read as a TOML value (`true`, `5`, `["a"]`), falling back to a
/// string so that durations like `2s` work unquoted.
fn parse_scalar(text: &str, default: Option<&toml::Value>) -> toml::Value {
    if let Some(toml::Value::String(_)) = default {
        return toml::Value::String(text.to_owned());
    }
    match format!("v = {text}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(text.to_owned())),
        Err(_) => toml::Value::String(text.to_owned()),
    }
}

fn overlay(
    base: &mut toml::Table,
    top: &toml::Table,
    prefix: &str,
    origin: &Origin,
    origins: &mut BTreeMap<String, Origin>,
) {
    for (k, v) in top {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => {
                overlay(b, t, &key, origin, origins)
            }
            _ => {
                base.insert(k.clone(), v.clone());
                origins.insert(key, origin.clone());
            }
        }
    }
}

fn set_path(table: &mut toml::Table, key: &str, value: toml::Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let Some(last) = parts.pop() else { return };
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        match entry {
            toml::Value::Table(inner) => t = inner,
            _ => return,
        }
    }
    t.insert(last.to_owned(), value);
}

fn get_path<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let mut v = table.get(parts.next()?)?;
    for p in parts {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

#[cfg(test)]
mod tests;
