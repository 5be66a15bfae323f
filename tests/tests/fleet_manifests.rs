//! The cert-manager example (packaging/kubernetes-overlays/mtls/cert-manager.yaml) makes what
//! the mtls overlay mounts and trusts. No cert-manager CRD schema is available offline here,
//! so this is a structural check against cert-manager v1's documented `Issuer` and
//! `Certificate` fields: only known spec fields and usages, every issuerRef resolves in the
//! file, the agents' Secret is the one the overlay's DaemonSet mounts and carries the headless
//! Service's name, and the client certificate's CN is an identity the overlay's agent config
//! lets drain (read by the agent's own config loader).

use std::path::{Path, PathBuf};

use nodeward_tests::{
    kube::{find, yaml},
    skip,
};
use serde_json::Value;

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

/// cert-manager v1 `CertificateSpec` fields.
const CERTIFICATE_FIELDS: &[&str] = &[
    "additionalOutputFormats",
    "commonName",
    "dnsNames",
    "duration",
    "emailAddresses",
    "encodeUsagesInRequest",
    "ipAddresses",
    "isCA",
    "issuerRef",
    "keystores",
    "literalSubject",
    "nameConstraints",
    "otherNames",
    "privateKey",
    "renewBefore",
    "renewBeforePercentage",
    "revisionHistoryLimit",
    "secretName",
    "secretTemplate",
    "subject",
    "uris",
    "usages",
];

/// cert-manager v1 `KeyUsage` values.
const USAGES: &[&str] = &[
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
];

/// A Go duration of whole hours, minutes or seconds ("2160h").
fn go_duration(s: &str) -> bool {
    s.strip_suffix(['h', 'm', 's'])
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"))
}

#[test]
fn the_cert_manager_example_makes_the_secret_the_mtls_overlay_mounts_and_trusts() {
    const TEST: &str = "fleet_cert_manager_example";
    let Some(docs) = yaml(&packaging().join("kubernetes-overlays/mtls/cert-manager.yaml")) else {
        return skip(TEST, "python3 with PyYAML is needed to read the manifests");
    };
    let patch = yaml(&packaging().join("kubernetes-overlays/mtls/daemonset-tls.yaml"))
        .expect("the overlay's DaemonSet patch");
    let mounted = str_of(
        &find(&patch, "DaemonSet")["spec"]["template"]["spec"]["volumes"][0]["secret"]
            ["secretName"],
        "the mounted Secret",
    );
    let base = yaml(&packaging().join("kubernetes/40-service.yaml")).expect("the Service");
    let service = find(&base, "Service");
    let service_name = format!(
        "{}.{}.svc",
        str_of(&service["metadata"]["name"], "name"),
        str_of(&service["metadata"]["namespace"], "namespace")
    );

    let issuers: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Issuer").collect();
    let certificates: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Certificate").collect();
    assert_eq!(
        issuers.len() + certificates.len(),
        docs.len(),
        "only Issuers and Certificates"
    );
    for d in &docs {
        assert_eq!(d["apiVersion"], "cert-manager.io/v1", "{d}");
        assert_eq!(d["metadata"]["namespace"], "nodeward", "{d}");
    }
    for i in &issuers {
        let spec = i["spec"].as_object().expect("an Issuer spec");
        assert_eq!(spec.len(), 1, "one issuer type: {i}");
        assert!(
            spec.contains_key("selfSigned") || spec.contains_key("ca"),
            "{i}"
        );
        if let Some(ca) = spec.get("ca") {
            // The CA issuer signs with a Secret that a CA Certificate of this file makes.
            let secret = str_of(&ca["secretName"], "ca.secretName");
            assert!(
                certificates
                    .iter()
                    .any(|c| c["spec"]["secretName"] == secret && c["spec"]["isCA"] == true),
                "no CA Certificate makes {secret}"
            );
        }
    }
    for c in &certificates {
        let spec = c["spec"].as_object().expect("a Certificate spec");
        for key in spec.keys() {
            assert!(
                CERTIFICATE_FIELDS.contains(&key.as_str()),
                "unknown field {key} in {c}"
            );
        }
        let issuer = &spec["issuerRef"];
        assert_eq!(issuer["kind"], "Issuer", "{c}");
        assert!(
            issuers
                .iter()
                .any(|i| i["metadata"]["name"] == issuer["name"]),
            "issuerRef {issuer} names no Issuer of the file"
        );
        for u in spec
            .get("usages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            assert!(USAGES.contains(&str_of(u, "a usage")), "unknown usage {u}");
        }
        for key in ["duration", "renewBefore"] {
            if let Some(d) = spec.get(key) {
                assert!(
                    go_duration(str_of(d, key)),
                    "{key} {d} is not a Go duration"
                );
            }
        }
        let algorithm = &spec["privateKey"]["algorithm"];
        assert!(
            ["RSA", "ECDSA", "Ed25519"].iter().any(|a| algorithm == a),
            "{c}"
        );
    }

    let usages = |c: &Value| -> Vec<String> {
        c["spec"]["usages"]
            .as_array()
            .map(|a| a.iter().map(|u| str_of(u, "usage").to_owned()).collect())
            .unwrap_or_default()
    };
    let agents = certificates
        .iter()
        .find(|c| c["spec"]["secretName"] == mounted)
        .unwrap_or_else(|| panic!("no Certificate makes the Secret {mounted} the overlay mounts"));
    assert!(
        usages(agents).iter().any(|u| u == "server auth"),
        "{agents}"
    );
    let issuer = agents["spec"]["issuerRef"]["name"].clone();
    assert!(
        issuers
            .iter()
            .any(|i| i["metadata"]["name"] == issuer && i["spec"].get("ca").is_some()),
        "the agents' certificate comes from the CA issuer, so its ca.crt signs the clients too"
    );
    let dns: Vec<&str> = agents["spec"]["dnsNames"]
        .as_array()
        .expect("dnsNames")
        .iter()
        .map(|d| str_of(d, "dnsName"))
        .collect();
    assert!(
        dns.contains(&service_name.as_str()),
        "{dns:?} lacks {service_name}"
    );

    // The client: its CN is an identity the overlay's agent lets drain.
    let config = nodeward::config::load(
        &nodeward::config::Source {
            explicit_path: Some(&packaging().join("kubernetes-overlays/mtls/nodeward.toml")),
            flags: &[],
        },
        std::iter::empty::<(String, String)>(),
    )
    .expect("the overlay's agent config loads");
    let clients: Vec<&&Value> = certificates
        .iter()
        .filter(|c| usages(c).iter().any(|u| u == "client auth"))
        .collect();
    assert!(!clients.is_empty(), "no client certificate");
    for c in clients {
        assert_eq!(c["spec"]["issuerRef"]["name"], issuer, "{c}");
        let cn = format!("cn:{}", str_of(&c["spec"]["commonName"], "commonName"));
        assert!(
            config.api.drain_allowed_identities.contains(&cn),
            "{cn} may not drain: {:?}",
            config.api.drain_allowed_identities
        );
    }
}
