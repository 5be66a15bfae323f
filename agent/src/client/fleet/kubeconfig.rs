//! Kubeconfig files, read as kubectl reads them: `--kubeconfig FILE`, else the files of
//! `KUBECONFIG` (`:`-separated) merged, else `~/.kube/config`. In a merge the first file that
//! names a cluster, user or context wins it, and the first non-empty `current-context` wins;
//! files `KUBECONFIG` names that do not exist are skipped. Relative paths in a file are relative
//! to that file's directory.
//!
//! Of the ways a kubeconfig authenticates, the ones that need no program of their own are
//! supported: a client certificate (file or `-data`), a token (`token` or `tokenFile`), none.
//! `exec` plugins and `auth-provider`s are refused with a clear error: running a cloud's plugin
//! well (its caching, its interactive prompts) is its own project.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use base64::Engine as _;
use serde::Deserialize;

use crate::kube::client::{Credentials, Target};

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("cannot read the kubeconfig {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the kubeconfig {path} is not valid YAML for a kubeconfig: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("no kubeconfig: {0}")]
    Missing(String),
    #[error("{files}: no current-context is set: name one with --context, or use --all-contexts")]
    NoCurrentContext { files: String },
    #[error("{files}: no contexts at all")]
    NoContexts { files: String },
    #[error("{files}: no context named {name:?} (there are: {known})")]
    UnknownContext {
        files: String,
        name: String,
        known: String,
    },
    #[error("{file}: context {context:?} names the {kind} {name:?}, which no kubeconfig defines")]
    Dangling {
        file: PathBuf,
        context: String,
        kind: &'static str,
        name: String,
    },
    #[error("{file}: context {context:?} has no {key}")]
    MissingKey {
        file: PathBuf,
        context: String,
        key: &'static str,
    },
    #[error("{file}: user {user:?} authenticates with an exec plugin ({command}), which `nodeward fleet` does not run: give this user a token (`token` or `tokenFile`, e.g. a service account's) or a client certificate")]
    Exec {
        file: PathBuf,
        user: String,
        command: String,
    },
    #[error("{file}: user {user:?} authenticates with the auth-provider {provider:?}, which `nodeward fleet` does not support: give this user a token (`token` or `tokenFile`) or a client certificate")]
    AuthProvider {
        file: PathBuf,
        user: String,
        provider: String,
    },
    #[error("{file}: user {user:?} has a username and password: basic authentication is not supported (and gone from Kubernetes since 1.19): give a token or a client certificate")]
    Basic { file: PathBuf, user: String },
    #[error("{file}: user {user:?} has {present} without {absent}")]
    HalfIdentity {
        file: PathBuf,
        user: String,
        present: &'static str,
        absent: &'static str,
    },
    #[error("{file}: cluster {cluster:?} has proxy-url, which is not supported")]
    Proxy { file: PathBuf, cluster: String },
    #[error("{file}: {owner} {name:?}: {key} is not valid base64: {detail}")]
    Base64 {
        file: PathBuf,
        owner: &'static str,
        name: String,
        key: &'static str,
        detail: String,
    },
    #[error("{file}: user {user:?}: cannot read {key} {path}: {source}")]
    ReadCredential {
        file: PathBuf,
        user: String,
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One file as written; unknown keys (extensions, preferences) are ignored.
#[derive(Debug, Default, Deserialize)]
struct File {
    #[serde(default)]
    clusters: Option<Vec<Named<Cluster>>>,
    #[serde(default)]
    users: Option<Vec<Named<User>>>,
    #[serde(default)]
    contexts: Option<Vec<Named<ContextEntry>>>,
    #[serde(default, rename = "current-context")]
    current_context: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "user", alias = "context")]
    item: Option<T>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Cluster {
    server: Option<String>,
    certificate_authority: Option<PathBuf>,
    certificate_authority_data: Option<String>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
    tls_server_name: Option<String>,
    proxy_url: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct User {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
    client_certificate: Option<PathBuf>,
    client_certificate_data: Option<String>,
    client_key: Option<PathBuf>,
    client_key_data: Option<String>,
    username: Option<String>,
    exec: Option<Exec>,
    auth_provider: Option<AuthProvider>,
}

#[derive(Debug, Clone, Deserialize)]
struct Exec {
    command: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct AuthProvider {
    name: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
struct ContextEntry {
    cluster: Option<String>,
    user: Option<String>,
    namespace: Option<String>,
}

/// An entry with the file it came from (relative paths are relative to its directory).
#[derive(Debug, Clone)]
struct Origin<T> {
    file: PathBuf,
    item: T,
}

/// The merged view of one or more kubeconfig files.
#[derive(Debug, Default)]
pub struct Kubeconfig {
    files: Vec<PathBuf>,
    clusters: BTreeMap<String, Origin<Cluster>>,
    users: BTreeMap<String, Origin<User>>,
    /// In the order the files list them (for `--all-contexts`).
    contexts: Vec<(String, Origin<ContextEntry>)>,
    current: Option<String>,
}

/// A context resolved to what the API client needs.
#[derive(Debug, Clone)]
pub struct Context {
    pub name: String,
    pub target: Target,
    pub credentials: Credentials,
    /// The context's namespace, if it sets one (shown, not used: see docs/fleet.md).
    pub namespace: Option<String>,
}

impl Kubeconfig {
    /// The files to read: `explicit`, else `KUBECONFIG`'s (`env`), else `home/.kube/config`.
    pub fn load(
        explicit: Option<&Path>,
        env: Option<&str>,
        home: Option<&Path>,
    ) -> Result<Self, KubeconfigError> {
        if let Some(path) = explicit {
            return Self::from_texts(vec![(path.to_path_buf(), read(path)?)]);
        }
        if let Some(list) = env.filter(|v| !v.is_empty()) {
            let mut texts = Vec::new();
            for p in list.split(':').filter(|p| !p.is_empty()) {
                let path = PathBuf::from(p);
                match std::fs::read_to_string(&path) {
                    Ok(t) => texts.push((path, t)),
                    // kubectl skips the files of KUBECONFIG that do not exist.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(KubeconfigError::Read { path, source }),
                }
            }
            if texts.is_empty() {
                return Err(KubeconfigError::Missing(format!(
                    "none of the files KUBECONFIG names exists ({list})"
                )));
            }
            return Self::from_texts(texts);
        }
        let Some(home) = home else {
            return Err(KubeconfigError::Missing(
                "HOME is not set and neither KUBECONFIG nor --kubeconfig is given".to_owned(),
            ));
        };
        let path = home.join(".kube").join("config");
        match std::fs::read_to_string(&path) {
            Ok(t) => Self::from_texts(vec![(path, t)]),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(KubeconfigError::Missing(format!(
                    "{} does not exist: give --kubeconfig FILE, set KUBECONFIG, or list the agents with --target/--targets",
                    path.display()
                )))
            }
            Err(source) => Err(KubeconfigError::Read { path, source }),
        }
    }

    /// Merges the files' texts, first file first.
    pub fn from_texts(texts: Vec<(PathBuf, String)>) -> Result<Self, KubeconfigError> {
        let mut out = Self::default();
        for (path, text) in texts {
            let file: File = if text.trim().is_empty() {
                File::default()
            } else {
                serde_norway::from_str(&text).map_err(|e| KubeconfigError::Parse {
                    path: path.clone(),
                    detail: e.to_string(),
                })?
            };
            for c in file.clusters.unwrap_or_default() {
                out.clusters.entry(c.name).or_insert_with(|| Origin {
                    file: path.clone(),
                    item: c.item.unwrap_or_default(),
                });
            }
            for u in file.users.unwrap_or_default() {
                out.users.entry(u.name).or_insert_with(|| Origin {
                    file: path.clone(),
                    item: u.item.unwrap_or_default(),
                });
            }
            for c in file.contexts.unwrap_or_default() {
                if !out.contexts.iter().any(|(n, _)| *n == c.name) {
                    out.contexts.push((
                        c.name,
                        Origin {
                            file: path.clone(),
                            item: c.item.unwrap_or_default(),
                        },
                    ));
                }
            }
            if out.current.is_none() {
                out.current = file.current_context.filter(|c| !c.is_empty());
            }
            out.files.push(path);
        }
        Ok(out)
    }

    fn files(&self) -> String {
        self.files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// The contexts asked for: `names`, or every one (`all`), or the current one.
    pub fn select(&self, names: &[String], all: bool) -> Result<Vec<Context>, KubeconfigError> {
        let names: Vec<String> = if all {
            if self.contexts.is_empty() {
                return Err(KubeconfigError::NoContexts {
                    files: self.files(),
                });
            }
            self.contexts.iter().map(|(n, _)| n.clone()).collect()
        } else if names.is_empty() {
            vec![self
                .current
                .clone()
                .ok_or_else(|| KubeconfigError::NoCurrentContext {
                    files: self.files(),
                })?]
        } else {
            names.to_vec()
        };
        names.iter().map(|n| self.resolve(n)).collect()
    }

    /// One context, with its cluster and user.
    pub fn resolve(&self, name: &str) -> Result<Context, KubeconfigError> {
        let Some((_, ctx)) = self.contexts.iter().find(|(n, _)| n == name) else {
            return Err(KubeconfigError::UnknownContext {
                files: self.files(),
                name: name.to_owned(),
                known: if self.contexts.is_empty() {
                    "none".to_owned()
                } else {
                    self.contexts
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            });
        };
        let missing = |key| KubeconfigError::MissingKey {
            file: ctx.file.clone(),
            context: name.to_owned(),
            key,
        };
        let dangling = |kind, n: &str| KubeconfigError::Dangling {
            file: ctx.file.clone(),
            context: name.to_owned(),
            kind,
            name: n.to_owned(),
        };
        let cluster_name = ctx
            .item
            .cluster
            .as_deref()
            .ok_or_else(|| missing("cluster"))?;
        let cluster = self
            .clusters
            .get(cluster_name)
            .ok_or_else(|| dangling("cluster", cluster_name))?;
        let server = cluster
            .item
            .server
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| missing("cluster.server"))?;
        if cluster.item.proxy_url.is_some() {
            return Err(KubeconfigError::Proxy {
                file: cluster.file.clone(),
                cluster: cluster_name.to_owned(),
            });
        }
        let cdir = dir_of(&cluster.file);
        let mut target = Target {
            server,
            token_file: None,
            ca_file: cluster
                .item
                .certificate_authority
                .as_ref()
                .map(|p| cdir.join(p)),
        };
        let mut credentials = Credentials {
            insecure: cluster.item.insecure_skip_tls_verify,
            server_name: cluster
                .item
                .tls_server_name
                .clone()
                .filter(|n| !n.is_empty()),
            ..Credentials::default()
        };
        if let Some(data) = &cluster.item.certificate_authority_data {
            credentials.ca_pem = Some(decode(data).map_err(|detail| KubeconfigError::Base64 {
                file: cluster.file.clone(),
                owner: "cluster",
                name: cluster_name.to_owned(),
                key: "certificate-authority-data",
                detail,
            })?);
        }
        if let Some(user_name) = ctx.item.user.as_deref().filter(|u| !u.is_empty()) {
            let user = self
                .users
                .get(user_name)
                .ok_or_else(|| dangling("user", user_name))?;
            user_credentials(user, user_name, &mut target, &mut credentials)?;
        }
        Ok(Context {
            name: name.to_owned(),
            target,
            credentials,
            namespace: ctx.item.namespace.clone().filter(|n| !n.is_empty()),
        })
    }
}

fn user_credentials(
    user: &Origin<User>,
    name: &str,
    target: &mut Target,
    credentials: &mut Credentials,
) -> Result<(), KubeconfigError> {
    let file = || user.file.clone();
    let u = &user.item;
    if let Some(exec) = &u.exec {
        return Err(KubeconfigError::Exec {
            file: file(),
            user: name.to_owned(),
            command: exec.command.clone().unwrap_or_default(),
        });
    }
    if let Some(p) = &u.auth_provider {
        return Err(KubeconfigError::AuthProvider {
            file: file(),
            user: name.to_owned(),
            provider: p.name.clone().unwrap_or_default(),
        });
    }
    if u.username.is_some() {
        return Err(KubeconfigError::Basic {
            file: file(),
            user: name.to_owned(),
        });
    }
    let dir = dir_of(&user.file);
    // The kubeconfig format's rule: with both, `token` wins.
    credentials.token = u.token.clone().filter(|t| !t.is_empty());
    if credentials.token.is_none() {
        target.token_file = u.token_file.as_ref().map(|p| dir.join(p));
    }
    let pem = |key: &'static str, path: &Option<PathBuf>, data: &Option<String>| {
        if let Some(data) = data {
            return decode(data)
                .map(Some)
                .map_err(|detail| KubeconfigError::Base64 {
                    file: file(),
                    owner: "user",
                    name: name.to_owned(),
                    key,
                    detail,
                });
        }
        match path {
            None => Ok(None),
            Some(p) => {
                let path = dir.join(p);
                std::fs::read(&path)
                    .map(Some)
                    .map_err(|source| KubeconfigError::ReadCredential {
                        file: file(),
                        user: name.to_owned(),
                        key,
                        path,
                        source,
                    })
            }
        }
    };
    let cert = pem(
        "client-certificate",
        &u.client_certificate,
        &u.client_certificate_data,
    )?;
    let key = pem("client-key", &u.client_key, &u.client_key_data)?;
    let half = |present, absent| KubeconfigError::HalfIdentity {
        file: file(),
        user: name.to_owned(),
        present,
        absent,
    };
    credentials.identity = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(_), None) => return Err(half("a client certificate", "a client key")),
        (None, Some(_)) => return Err(half("a client key", "a client certificate")),
    };
    Ok(())
}

fn dir_of(file: &Path) -> PathBuf {
    file.parent().map_or_else(PathBuf::new, Path::to_path_buf)
}

fn decode(data: &str) -> Result<Vec<u8>, String> {
    let compact: String = data.split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|e| e.to_string())
}

fn read(path: &Path) -> Result<String, KubeconfigError> {
    std::fs::read_to_string(path).map_err(|source| KubeconfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
#[path = "kubeconfig_tests.rs"]
mod tests;
