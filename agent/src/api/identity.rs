//! Who is calling. A Unix-socket peer is `uid:<n>` (from `SO_PEERCRED`); a TLS client's
//! certificate names it by its subject common name (`cn:<name>`), its SAN DNS names
//! (`dns:<name>`) and its SAN URIs (`uri:<uri>`, e.g. a SPIFFE ID); a TCP caller without a
//! certificate is `anonymous`. Used by the drain RPCs' authorization (`authz`).

use std::{fmt, str::FromStr};

use tonic::{transport::server::UdsConnectInfo, Request};

/// One entry of `api.drain_allowed_identities`, or one name a caller is known by. Entries are
/// parsed at load so that a typo is a config error instead of an entry that never matches (or,
/// for `uid:abc`, one that looks like a uid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Uid(u32),
    Cn(String),
    /// A SAN DNS name, lower case (DNS names compare without case).
    Dns(String),
    /// A SAN URI, compared exactly (e.g. `spiffe://cluster.local/ns/ops/sa/rollout`).
    Uri(String),
    Anonymous,
}

/// Why an allow-list entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "unknown form; each entry must be \"uid:<n>\", \"cn:<name>\", \"dns:<name>\", \
         \"uri:<uri>\" or \"anonymous\""
    )]
    UnknownForm,
    #[error("\"uid:\" needs a numeric user id (0 to 4294967295)")]
    BadUid,
    #[error("\"{0}:\" needs a non-empty name")]
    Empty(&'static str),
    #[error("the name has leading or trailing spaces or control characters, which no caller's name would match")]
    BadCn,
    #[error("\"dns:\" needs a DNS name of letters, digits, '-', '.' and '*' only")]
    BadDns,
    #[error("\"uri:\" needs a URI with a scheme (such as spiffe://trust-domain/path) and no spaces or control characters")]
    BadUri,
    #[error("the same identity is written {0:?}; write it that way, as callers are matched by that text")]
    NotCanonical(String),
}

fn printable(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

fn parse_dns(name: &str) -> Result<Identity, IdentityError> {
    if name.is_empty() {
        return Err(IdentityError::Empty("dns"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'*'))
    {
        return Err(IdentityError::BadDns);
    }
    Ok(Identity::Dns(name.to_ascii_lowercase()))
}

fn parse_uri(uri: &str) -> Result<Identity, IdentityError> {
    if uri.is_empty() {
        return Err(IdentityError::Empty("uri"));
    }
    // RFC 3986: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ), then ':'.
    let scheme_ok = uri.split_once(':').is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    if !scheme_ok || uri.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(IdentityError::BadUri);
    }
    Ok(Identity::Uri(uri.to_owned()))
}

impl FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        let id = if s == "anonymous" {
            Self::Anonymous
        } else if let Some(uid) = s.strip_prefix("uid:") {
            if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_digit()) {
                return Err(IdentityError::BadUid);
            }
            Self::Uid(uid.parse().map_err(|_| IdentityError::BadUid)?)
        } else if let Some(cn) = s.strip_prefix("cn:") {
            if cn.is_empty() {
                return Err(IdentityError::Empty("cn"));
            }
            if cn.trim() != cn || !printable(cn) {
                return Err(IdentityError::BadCn);
            }
            Self::Cn(cn.to_owned())
        } else if let Some(name) = s.strip_prefix("dns:") {
            parse_dns(name)?
        } else if let Some(uri) = s.strip_prefix("uri:") {
            parse_uri(uri)?
        } else {
            return Err(IdentityError::UnknownForm);
        };
        // `uid:007` parses, but the caller is matched as `uid:7`: refuse what would not match.
        let canonical = id.to_string();
        if canonical != s {
            return Err(IdentityError::NotCanonical(canonical));
        }
        Ok(id)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uid(uid) => write!(f, "uid:{uid}"),
            Self::Cn(cn) => write!(f, "cn:{cn}"),
            Self::Dns(name) => write!(f, "dns:{name}"),
            Self::Uri(uri) => write!(f, "uri:{uri}"),
            Self::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// A Unix-socket peer's credentials at connect time (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    /// In the agent's PID namespace; absent when the peer is in another one.
    pub pid: Option<i32>,
}

/// Who called, as the transport tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A peer on the Unix socket.
    Unix(PeerCred),
    /// A TCP client that presented a certificate the client CA verified: the names it holds
    /// (see [`certificate_identities`]; empty when it holds none that can be used).
    Certificate(Vec<Identity>),
    /// A TCP client without a certificate.
    Anonymous,
}

impl Caller {
    /// The names this caller is known by, for logs and refusals.
    pub fn names(&self) -> String {
        match self {
            Self::Unix(p) => Identity::Uid(p.uid).to_string(),
            Self::Certificate(ids) if ids.is_empty() => {
                "a client certificate with no usable name".to_owned()
            }
            Self::Certificate(ids) => ids
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" "),
            Self::Anonymous => Identity::Anonymous.to_string(),
        }
    }
}

/// The caller of `req`.
pub fn caller<T>(req: &Request<T>) -> Caller {
    if let Some(info) = req.extensions().get::<UdsConnectInfo>() {
        return match info.peer_cred {
            Some(cred) => Caller::Unix(PeerCred {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
            }),
            // Linux always gives a socket peer's credentials; without them the peer is nobody
            // in particular, which no allow-list entry but `anonymous` names.
            None => Caller::Anonymous,
        };
    }
    match req.peer_certs() {
        Some(certs) => match certs.first() {
            Some(leaf) => Caller::Certificate(certificate_identities(leaf.as_ref())),
            None => Caller::Anonymous,
        },
        None => Caller::Anonymous,
    }
}

/// The names an X.509 certificate (DER) gives its holder: `cn:` from the subject's common name
/// when the subject holds exactly one, `dns:` for each SAN DNS name, `uri:` for each SAN URI.
///
/// A subject with two or more CNs gives no `cn:` name at all: which of them a CA checked
/// before signing is not written in the certificate, so taking either (the old code took the
/// last) would let an applicant who controls one of them pass as the other. SAN names are
/// separate entries and each counts. Names with control characters are dropped (they are
/// logged). The certificate was verified by rustls against the client CA before this runs; a
/// certificate that cannot be parsed gives no name.
pub fn certificate_identities(der: &[u8]) -> Vec<Identity> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    let mut cns = cert.subject().iter_common_name();
    if let (Some(cn), None) = (cns.next(), cns.next()) {
        if let Ok(cn) = cn.as_str() {
            ids.push(Identity::Cn(cn.to_owned()));
        }
    }
    // More than one SAN extension is malformed (RFC 5280 §4.2): x509-parser refuses it, and
    // the certificate then gives no SAN name.
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(n) => {
                    ids.push(Identity::Dns(n.to_ascii_lowercase()));
                }
                x509_parser::extensions::GeneralName::URI(u) => {
                    ids.push(Identity::Uri((*u).to_owned()));
                }
                _ => {}
            }
        }
    }
    ids.retain(|id| printable(&id.to_string()));
    ids
}

/// The subject common name of a certificate (DER), when the subject holds exactly one.
pub fn subject_common_name(der: &[u8]) -> Option<String> {
    certificate_identities(der)
        .into_iter()
        .find_map(|id| match id {
            Identity::Cn(cn) => Some(cn),
            _ => None,
        })
}

#[cfg(test)]
#[path = "identity_tests.rs"]
mod tests;
