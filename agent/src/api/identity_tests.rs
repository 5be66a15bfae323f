//! Allow-list entries: what parses, to what, and why the rest is refused. Certificates are
//! tested in `tests/tests/api_x509.rs`, where rcgen makes them.

use super::*;

#[test]
fn allow_list_entries_parse_to_the_identity_callers_are_matched_by() {
    assert_eq!("uid:0".parse(), Ok(Identity::Uid(0)));
    assert_eq!("uid:4294967295".parse(), Ok(Identity::Uid(u32::MAX)));
    assert_eq!(
        "cn:Rollout Controller".parse(),
        Ok(Identity::Cn("Rollout Controller".to_owned()))
    );
    assert_eq!(
        "dns:rollout.ops.svc".parse(),
        Ok(Identity::Dns("rollout.ops.svc".to_owned()))
    );
    assert_eq!(
        "uri:spiffe://cluster.local/ns/ops/sa/rollout".parse(),
        Ok(Identity::Uri(
            "spiffe://cluster.local/ns/ops/sa/rollout".to_owned()
        ))
    );
    assert_eq!("anonymous".parse(), Ok(Identity::Anonymous));
    for ok in [
        "uid:1000",
        "cn:rollout",
        "dns:*.ops.example",
        "uri:spiffe://td/x",
        "anonymous",
    ] {
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
        ("cn:", IdentityError::Empty("cn")),
        ("cn: rollout", IdentityError::BadCn),
        ("cn:rollout\n", IdentityError::BadCn),
        ("dns:", IdentityError::Empty("dns")),
        ("dns:roll out", IdentityError::BadDns),
        ("dns:a_b.example", IdentityError::BadDns),
        (
            "dns:Rollout.Example",
            IdentityError::NotCanonical("dns:rollout.example".to_owned()),
        ),
        ("uri:", IdentityError::Empty("uri")),
        ("uri:no-scheme", IdentityError::BadUri),
        ("uri:://x", IdentityError::BadUri),
        ("uri:spiffe://td/a b", IdentityError::BadUri),
        ("uri:spiffe://td/a\n", IdentityError::BadUri),
        ("root", IdentityError::UnknownForm),
        ("gid:0", IdentityError::UnknownForm),
        ("UID:0", IdentityError::UnknownForm),
        ("spiffe://td/x", IdentityError::UnknownForm),
        ("", IdentityError::UnknownForm),
        (" anonymous", IdentityError::UnknownForm),
    ] {
        assert_eq!(entry.parse::<Identity>(), Err(want), "{entry:?}");
    }
}

#[test]
fn a_certificate_that_cannot_be_parsed_gives_no_name() {
    assert_eq!(certificate_identities(b""), Vec::new());
    assert_eq!(
        certificate_identities(&[0x30, 0x03, 0x02, 0x01, 0x00]),
        Vec::new()
    );
    assert_eq!(subject_common_name(b"not DER"), None);
}
