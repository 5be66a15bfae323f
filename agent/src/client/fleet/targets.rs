//! Where the fleet's agents are: a static list (`--target`, `--targets FILE`), one
//! `host:port [node-name]` per entry. Discovery through the Kubernetes API server
//! (`discover`) is another [`Discovery`].

use std::{fmt, path::Path};

/// One agent to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The host as written: a DNS name, an IPv4 address, or an IPv6 address without brackets.
    pub host: String,
    pub port: u16,
    /// The node's name, when the list gives it: shown for an agent that does not answer, and
    /// the TLS server name to verify (node certificates carry it).
    pub node: Option<String>,
    /// The kubeconfig context it was found in, when several were asked.
    pub context: Option<String>,
}

impl Target {
    /// `host:port`, with brackets around an IPv6 host.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The name of a row for this target before (or without) an answer.
    pub fn label(&self) -> String {
        self.node.clone().unwrap_or_else(|| self.address())
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some(n) => write!(f, "{} {n}", self.address()),
            None => f.write_str(&self.address()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("{at}: expected \"host:port [node-name]\", got {text:?}")]
    Form { at: String, text: String },
    #[error("{at}: {port:?} is not a port (1 to 65535)")]
    Port { at: String, port: String },
    #[error("{at}: the host is empty")]
    EmptyHost { at: String },
    #[error("{at}: the host {host:?} holds a character a host name cannot")]
    BadHost { at: String, host: String },
    #[error("{at}: the node name {name:?} holds a character a node name cannot (a Kubernetes node name is lower-case letters, digits, '-' and '.')")]
    BadNode { at: String, name: String },
    #[error("{at}: {address} is listed twice (also at {first})")]
    Duplicate {
        at: String,
        address: String,
        first: String,
    },
    #[error("cannot read {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("no targets: give --target host:port or --targets FILE")]
    None,
}

fn node_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
}

fn host_ok(host: &str) -> bool {
    host.parse::<std::net::IpAddr>().is_ok()
        || host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// Parses one entry, `host:port [node-name]`; `at` says where it came from, for errors.
pub fn parse_target(text: &str, at: &str) -> Result<Target, TargetError> {
    let form = || TargetError::Form {
        at: at.to_owned(),
        text: text.to_owned(),
    };
    let mut words = text.split_whitespace();
    let addr = words.next().ok_or_else(form)?;
    let node = words.next().map(str::to_owned);
    if words.next().is_some() {
        return Err(form());
    }
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (host, port) = rest.split_once("]:").ok_or_else(form)?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(TargetError::BadHost {
                at: at.to_owned(),
                host: host.to_owned(),
            });
        }
        (host, port)
    } else {
        let (host, port) = addr.rsplit_once(':').ok_or_else(form)?;
        if host.contains(':') {
            // An IPv6 address needs brackets, or its last group reads as the port.
            return Err(form());
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(TargetError::EmptyHost { at: at.to_owned() });
    }
    if !host_ok(host) {
        return Err(TargetError::BadHost {
            at: at.to_owned(),
            host: host.to_owned(),
        });
    }
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => {
            return Err(TargetError::Port {
                at: at.to_owned(),
                port: port.to_owned(),
            })
        }
    };
    if let Some(name) = &node {
        if !node_name_ok(name) {
            return Err(TargetError::BadNode {
                at: at.to_owned(),
                name: name.clone(),
            });
        }
    }
    Ok(Target {
        host: host.to_owned(),
        port,
        node,
        context: None,
    })
}

/// Parses a targets file's text: one entry a line; blank lines and `#` comments are skipped.
/// Each entry comes with where it was (`path:line`).
fn file_entries(text: &str, path: &str) -> Result<Vec<(Target, String)>, TargetError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split_once('#').map_or(line, |(l, _)| l).trim();
        if line.is_empty() {
            continue;
        }
        let at = format!("{path}:{}", n + 1);
        out.push((parse_target(line, &at)?, at));
    }
    Ok(out)
}

fn check_unique(list: Vec<(Target, String)>) -> Result<Vec<Target>, TargetError> {
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut out = Vec::with_capacity(list.len());
    for (t, at) in list {
        let address = t.address();
        if let Some((_, first)) = seen.iter().find(|(a, _)| *a == address) {
            return Err(TargetError::Duplicate {
                at,
                address,
                first: first.clone(),
            });
        }
        seen.push((address, at));
        out.push(t);
    }
    Ok(out)
}

/// A node known to the fleet without an agent to ask: its row says why (no agent pod on the
/// node, or its context's API server did not answer: then `node` is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Absent {
    pub node: String,
    pub context: Option<String>,
    pub error: String,
}

/// What a discovery found: the agents to ask, and the nodes to show without asking.
#[derive(Debug, Clone, Default)]
pub struct Found {
    pub targets: Vec<Target>,
    pub absent: Vec<Absent>,
}

/// Finds the agents to ask. The static list is one; discovery through the API server (the
/// DaemonSet's pods, per kubeconfig context) is another (`discover`).
pub trait Discovery {
    fn find(&self) -> impl std::future::Future<Output = Result<Found, super::FleetError>>;
}

/// `--target` entries and the lines of `--targets` files, in that order.
#[derive(Debug, Clone, Default)]
pub struct StaticList {
    pub targets: Vec<String>,
    pub files: Vec<std::path::PathBuf>,
}

impl StaticList {
    fn read(&self) -> Result<Vec<Target>, TargetError> {
        let mut all = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            let at = format!("--target #{}", i + 1);
            all.push((parse_target(t, &at)?, at));
        }
        for file in &self.files {
            let text = read_text(file)?;
            all.extend(file_entries(&text, &file.display().to_string())?);
        }
        if all.is_empty() {
            return Err(TargetError::None);
        }
        check_unique(all)
    }
}

fn read_text(path: &Path) -> Result<String, TargetError> {
    std::fs::read_to_string(path).map_err(|e| TargetError::Read {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

impl Discovery for StaticList {
    async fn find(&self) -> Result<Found, super::FleetError> {
        Ok(Found {
            targets: self.read()?,
            absent: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_with_and_without_a_node_name_parse() {
        let t = parse_target("10.0.0.2:50051 node-a", "x").expect("ok");
        assert_eq!(
            t,
            Target {
                host: "10.0.0.2".into(),
                port: 50051,
                node: Some("node-a".into()),
                context: None,
            }
        );
        let t = parse_target("agent.example:1", "x").expect("ok");
        assert_eq!(t.node, None);
        assert_eq!(t.label(), "agent.example:1");
        let t = parse_target("[fd00::2]:50051", "x").expect("ok");
        assert_eq!(t.host, "fd00::2");
        assert_eq!(t.address(), "[fd00::2]:50051");
    }

    #[test]
    fn bad_entries_say_what_is_wrong_and_where() {
        let e = |s: &str| parse_target(s, "f:3").expect_err("an error").to_string();
        assert!(e("10.0.0.2").contains("f:3: expected"), "{}", e("10.0.0.2"));
        assert!(e("10.0.0.2:0").contains("not a port"));
        assert!(e("10.0.0.2:70000").contains("not a port"));
        assert!(e("10.0.0.2:http").contains("not a port"));
        assert!(e(":50051").contains("host is empty"));
        assert!(e("fd00::2:50051").contains("expected"));
        assert!(e("[zz]:1").contains("character a host name cannot"));
        assert!(e("h:1 Node_A").contains("node name"));
        assert!(e("h:1 a b").contains("expected"));
    }

    #[test]
    fn a_file_skips_comments_and_refuses_duplicates_with_both_lines() {
        let parse = |text: &str| check_unique(file_entries(text, "t")?);
        let list = parse("# fleet\n\n10.0.0.2:1 a # first\n10.0.0.3:1\n").expect("ok");
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].node.as_deref(), Some("a"));
        let e = parse("h:1 a\nh:1 b\n").expect_err("an error").to_string();
        assert!(e.contains("t:2") && e.contains("t:1"), "{e}");
    }

    #[test]
    fn an_empty_static_list_is_an_error() {
        let e = StaticList::default().read().expect_err("an error");
        assert_eq!(e, TargetError::None);
    }
}
