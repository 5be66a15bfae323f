//! Who is calling: `uid:<n>` for a Unix-socket peer (from `SO_PEERCRED`), `cn:<name>` for a TLS
//! client certificate's subject common name, `anonymous` otherwise. Used by the drain RPCs'
//! allow-list (`api.drain_allowed_identities`).

use std::{fmt, str::FromStr};

use tonic::{transport::server::UdsConnectInfo, Request};

/// One entry of `api.drain_allowed_identities`, parsed at load so that a typo is a config error
/// instead of an entry that never matches (or, for `uid:abc`, one that looks like a uid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Uid(u32),
    Cn(String),
    Anonymous,
}

/// Why an allow-list entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("unknown form; each entry must be \"uid:<n>\", \"cn:<name>\" or \"anonymous\"")]
    UnknownForm,
    #[error("\"uid:\" needs a numeric user id (0 to 4294967295)")]
    BadUid,
    #[error("\"cn:\" needs a non-empty common name")]
    EmptyCn,
    #[error("the common name has leading or trailing spaces or control characters, which no caller's name would match")]
    BadCn,
    #[error("the same identity is written {0:?}; write it that way, as callers are matched by that text")]
    NotCanonical(String),
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
                return Err(IdentityError::EmptyCn);
            }
            if cn.trim() != cn || cn.chars().any(char::is_control) {
                return Err(IdentityError::BadCn);
            }
            Self::Cn(cn.to_owned())
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
            Self::Anonymous => f.write_str("anonymous"),
        }
    }
}

pub fn of<T>(req: &Request<T>) -> String {
    if let Some(cred) = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
    {
        return format!("uid:{}", cred.uid());
    }
    if let Some(certs) = req.peer_certs() {
        if let Some(cn) = certs.first().and_then(|c| subject_common_name(c.as_ref())) {
            return format!("cn:{cn}");
        }
    }
    "anonymous".to_owned()
}

/// One DER TLV: (tag, content, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The subject CN of an X.509 certificate in DER. The certificate was already verified by
/// rustls against the configured client CA; this only reads a name out of it, so a small
/// walker over the fixed TBSCertificate layout is enough (RFC 5280 §4.1).
pub fn subject_common_name(der: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    const CN_OID: [u8; 3] = [0x55, 0x04, 0x03];
    let (tag, cert, _) = tlv(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    // Optional [0] version, then serialNumber, signature, issuer, validity, subject.
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (tag, mut subject, _) = tlv(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    // Name ::= SEQUENCE OF RelativeDistinguishedName (SET OF AttributeTypeAndValue).
    let mut cn = None;
    while !subject.is_empty() {
        let (_, mut set, next) = tlv(subject)?;
        subject = next;
        while !set.is_empty() {
            let (_, atv, next) = tlv(set)?;
            set = next;
            let (oid_tag, oid, value) = tlv(atv)?;
            if oid_tag == 0x06 && oid == CN_OID {
                let (_, text, _) = tlv(value)?;
                cn = Some(String::from_utf8_lossy(text).into_owned());
            }
        }
    }
    cn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_entries_parse_to_the_identity_callers_are_matched_by() {
        assert_eq!("uid:0".parse(), Ok(Identity::Uid(0)));
        assert_eq!("uid:4294967295".parse(), Ok(Identity::Uid(u32::MAX)));
        assert_eq!(
            "cn:Rollout Controller".parse(),
            Ok(Identity::Cn("Rollout Controller".to_owned()))
        );
        assert_eq!("anonymous".parse(), Ok(Identity::Anonymous));
        for ok in ["uid:1000", "cn:rollout", "anonymous"] {
            let id: Identity = ok.parse().expect(ok);
            assert_eq!(id.to_string(), ok, "round trip");
        }
    }

    #[test]
    fn malformed_allow_list_entries_are_refused_with_the_reason() {
        for (entry, want) in [
            ("uid:abc", IdentityError::BadUid),
            ("uid:", IdentityError::BadUid),
            ("uid:-1", IdentityError::BadUid),
            ("uid:+1", IdentityError::BadUid),
            ("uid: 1", IdentityError::BadUid),
            ("uid:4294967296", IdentityError::BadUid),
            ("uid:007", IdentityError::NotCanonical("uid:7".to_owned())),
            ("cn:", IdentityError::EmptyCn),
            ("cn: rollout", IdentityError::BadCn),
            ("cn:rollout\n", IdentityError::BadCn),
            ("root", IdentityError::UnknownForm),
            ("gid:0", IdentityError::UnknownForm),
            ("UID:0", IdentityError::UnknownForm),
            ("", IdentityError::UnknownForm),
            (" anonymous", IdentityError::UnknownForm),
        ] {
            assert_eq!(entry.parse::<Identity>(), Err(want), "{entry:?}");
        }
    }
}
