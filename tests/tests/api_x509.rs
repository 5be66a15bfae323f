//! Client-certificate identities (docs/api.md, "Authorization"): a subject with two CNs gives
//! no `cn:` name (neither the first nor the last counts), while its SAN DNS names and URIs
//! (`dns:`, `uri:spiffe://…`) do. Checked on certificates rcgen makes here, both by the parser
//! alone and end to end: a mutual-TLS client allowed or refused by the drain allow-list.

use nodeward::api::{
    identity::{certificate_identities, Identity},
    pb,
};
use nodeward_tests::{
    api::{health_config, TestApi},
    pki::Pki,
};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, SanType};
use tonic::Code;

const SPIFFE: &str = "spiffe://cluster.local/ns/ops/sa/rollout";

/// A client certificate whose subject holds two CNs ("first", then "second"), with a SPIFFE
/// URI SAN and a DNS SAN; returns its name for `Pki::client_conn`.
fn two_cns_and_a_spiffe_id(pki: &Pki) -> String {
    let mut params =
        CertificateParams::new(vec!["Rollout.Ops.example".to_owned()]).expect("client params");
    params.distinguished_name.push(DnType::CommonName, "first");
    // rcgen keeps one value per attribute type; the CN's OID (2.5.4.3) as a custom type adds
    // a second CN attribute to the subject.
    params
        .distinguished_name
        .push(DnType::CustomDnType(vec![2, 5, 4, 3]), "second");
    params
        .subject_alt_names
        .push(SanType::URI(SPIFFE.try_into().expect("IA5 URI")));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    pki.issue("two-cns", params);
    "two-cns".to_owned()
}

fn der(pki: &Pki, name: &str) -> Vec<u8> {
    std::fs::read(pki.path(&format!("{name}.der"))).expect("read DER")
}

#[test]
fn two_cns_give_no_cn_identity_and_the_san_names_count() {
    let pki = Pki::new("x509-parse");
    let name = two_cns_and_a_spiffe_id(&pki);
    let cert = der(&pki, &name);
    // The certificate really holds both CNs (checked with a second parser, the openssl CLI,
    // where it is installed).
    if let Ok(out) = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in"])
        .arg(pki.path(&format!("{name}.pem")))
        .output()
    {
        let subject = String::from_utf8_lossy(&out.stdout);
        assert!(
            subject.contains("CN=first") && subject.contains("CN=second"),
            "{subject}"
        );
    }
    assert_eq!(
        certificate_identities(&cert),
        vec![
            Identity::Dns("rollout.ops.example".to_owned()),
            Identity::Uri(SPIFFE.to_owned()),
        ],
        "no cn: from an ambiguous subject; SAN names lower-cased (DNS) or as written (URI)"
    );

    let one = pki.client("rollout-controller");
    assert_eq!(
        certificate_identities(&der(&pki, &one)),
        vec![Identity::Cn("rollout-controller".to_owned())]
    );
}

async fn begin(
    pki: &Pki,
    api: &TestApi,
    cert: &str,
) -> Result<pb::BeginDrainResponse, tonic::Status> {
    let conn = pki.client_conn(api.tcp.expect("TCP listener"), Some(cert));
    let mut client = nodeward::client::connect(&conn, std::path::Path::new("/nonexistent"))
        .await
        .expect("mutual TLS connect");
    client
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "x509-test".into(),
            reason: String::new(),
            deadline_seconds: 0,
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_with_two_cns_drains_only_by_its_spiffe_id() {
    let pki = Pki::new("x509-drain");
    let cert = two_cns_and_a_spiffe_id(&pki);
    for cn in ["cn:first", "cn:second"] {
        let mut cfg = pki.server_config(true);
        cfg.drain_allowed_identities = vec![cn.to_owned()];
        let api = TestApi::start(cfg, health_config()).await;
        let refused = begin(&pki, &api, &cert)
            .await
            .expect_err("an ambiguous CN matches no cn: entry");
        assert_eq!(refused.code(), Code::PermissionDenied, "{cn}: {refused:?}");
        assert!(
            refused.message().contains(&format!("uri:{SPIFFE}")),
            "the refusal names the caller: {}",
            refused.message()
        );
    }
    for allowed in [
        format!("uri:{SPIFFE}"),
        "dns:rollout.ops.example".to_owned(),
    ] {
        let mut cfg = pki.server_config(true);
        cfg.drain_allowed_identities = vec!["cn:first".to_owned(), allowed.clone()];
        let api = TestApi::start(cfg, health_config()).await;
        let drain = begin(&pki, &api, &cert)
            .await
            .unwrap_or_else(|e| panic!("{allowed} may drain: {e:?}"))
            .drain
            .expect("drain");
        assert_eq!(
            drain.requesters[0].identity, allowed,
            "the listed name is the identity recorded"
        );
    }
}
