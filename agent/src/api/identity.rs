//! Who is calling: `uid:<n>` for a Unix-socket peer (from `SO_PEERCRED`), `cn:<name>` for a TLS
//! client certificate's subject common name, `anonymous` otherwise. Used by the drain RPCs'
//! allow-list (`api.drain_allowed_identities`).

use tonic::{transport::server::UdsConnectInfo, Request};

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
