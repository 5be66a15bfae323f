//! SIGHUP: read the config again (same file, environment and `--set` flags), and apply what
//! can change while running. An invalid config is logged with the key at fault and the running
//! config stays as it was; the agent never stops over a reload.
//!
//! Applied live: `log.filter`. Every other key is read by a source, a listener or the health
//! engine when it starts, so a changed value is logged as needing a restart
//! (`systemctl restart nodeward`) and the running value stays in force until then.

use std::{collections::BTreeMap, path::PathBuf};

use tokio::signal::unix::Signal;

use crate::config::{self, Config, ConfigError};

/// What a reload found, against the config the agent runs with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// The new `log.filter`, when it changed (applied live).
    pub log_filter: Option<String>,
    /// Changed keys that only take effect after a restart.
    pub needs_restart: Vec<String>,
}

/// Re-reads the config the way `main` first read it.
#[derive(Debug)]
pub struct Reloader {
    path: Option<PathBuf>,
    flags: Vec<String>,
    running: Config,
}

impl Reloader {
    /// `path`: the `--config` file, if one was named; `flags`: the `--set` flags; `running`: the
    /// config the agent started with.
    pub fn new(path: Option<PathBuf>, flags: Vec<String>, running: Config) -> Self {
        Self {
            path,
            flags,
            running,
        }
    }

    /// Loads the config again. On success, the live-applicable part becomes the running config
    /// and the changes are returned; on error nothing changes.
    pub fn reload(
        &mut self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Changes, ConfigError> {
        let source = config::Source {
            explicit_path: self.path.as_deref(),
            flags: &self.flags,
        };
        let new = config::load(&source, env)?;
        let mut changes = Changes::default();
        for key in changed_keys(&self.running, &new) {
            if key == "log.filter" {
                changes.log_filter = Some(new.log.filter.clone());
            } else {
                changes.needs_restart.push(key);
            }
        }
        self.running.log.filter = new.log.filter;
        Ok(changes)
    }
}

/// Leaf keys whose values differ (`agent.tick`, `udp.dynamic_clock_rates.96`, ...).
fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (leaves(old), leaves(new));
    let mut keys: Vec<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .chain(b.keys().filter(|k| !a.contains_key(*k)).cloned())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn leaves(c: &Config) -> BTreeMap<String, toml::Value> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Ok(v) = toml::Value::try_from(c) {
        walk("", &v, &mut out);
    }
    out
}

/// Reloads on every SIGHUP, for the life of the process. `hangup` is created by the caller
/// before the agent reports itself running, so no early SIGHUP falls back to the default action
/// (which would terminate the agent).
pub async fn on_sighup(mut reloader: Reloader, mut hangup: Signal) {
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP received, reloading the config");
        match reloader.reload(std::env::vars()) {
            Err(e) => {
                let key = match &e {
                    ConfigError::Invalid { key, .. } => key.clone(),
                    _ => String::new(),
                };
                tracing::error!(%key, error = %e, "config reload failed; keeping the running config");
            }
            Ok(changes) => {
                let mut applied = Vec::new();
                if let Some(filter) = &changes.log_filter {
                    match crate::logging::set_filter(filter) {
                        Ok(()) => {
                            applied.push("log.filter");
                            // Seen only if the new filter lets debug through: proof it took.
                            tracing::debug!(%filter, "log filter reloaded");
                        }
                        Err(e) => tracing::warn!(error = %e, "log.filter not applied"),
                    }
                }
                tracing::info!(
                    ?applied,
                    needs_restart = ?changes.needs_restart,
                    "new config applied; keys under needs_restart take effect after a restart"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempFile(PathBuf);
    impl TempFile {
        fn new(tag: &str, text: &str) -> Self {
            let p = std::env::temp_dir()
                .join(format!("nodeward-reload-{tag}-{}.toml", std::process::id()));
            std::fs::write(&p, text).expect("write temp config");
            Self(p)
        }
        fn write(&self, text: &str) {
            std::fs::write(&self.0, text).expect("rewrite temp config");
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn start(file: &TempFile) -> Reloader {
        let source = config::Source {
            explicit_path: Some(&file.0),
            flags: &[],
        };
        let running = config::load(&source, Vec::new()).expect("valid starting config");
        Reloader::new(Some(file.0.clone()), Vec::new(), running)
    }

    #[test]
    fn a_bad_value_is_an_error_naming_the_key_and_changes_nothing() {
        let file = TempFile::new("bad", "[log]\nfilter = \"info\"\n");
        let mut r = start(&file);
        file.write("[log]\nfilter = \"debug\"\n[agent]\ntick = \"fast\"\n");
        match r.reload(Vec::new()) {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "agent.tick"),
            other => panic!("expected an invalid agent.tick, got {other:?}"),
        }
        assert_eq!(r.running.log.filter, "info", "the running config is kept");
    }

    #[test]
    fn the_log_filter_applies_live_and_other_keys_are_listed_for_a_restart() {
        let file = TempFile::new("good", "[log]\nfilter = \"info\"\n");
        let mut r = start(&file);
        file.write("[log]\nfilter = \"nodeward=debug\"\n[agent]\ntick = \"3s\"\n");
        let c = r.reload(Vec::new()).expect("valid");
        assert_eq!(c.log_filter.as_deref(), Some("nodeward=debug"));
        assert_eq!(c.needs_restart, ["agent.tick"]);
        // The filter is now the running one: a second identical reload finds it unchanged, but
        // the tick is still not in force and is listed again.
        let c = r.reload(Vec::new()).expect("valid");
        assert_eq!(c.log_filter, None);
        assert_eq!(c.needs_restart, ["agent.tick"]);
    }
}
