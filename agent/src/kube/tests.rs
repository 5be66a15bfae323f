use std::{collections::BTreeMap, path::PathBuf};

use super::*;

fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: BTreeMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |k| map.get(k).cloned()
}

/// A service account directory with a token, as the kubelet mounts it into a pod.
fn service_account(stem: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nodeward-kube-{stem}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("token"), "t0ken\n").expect("token");
    dir
}

const IN_POD: &[(&str, &str)] = &[
    ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
    ("KUBERNETES_SERVICE_PORT", "443"),
];

#[test]
fn auto_is_on_in_a_pod_with_the_service_accounts_files() {
    let sa = service_account("pod");
    let t = KubeConfig::default()
        .target(env(IN_POD), &sa)
        .expect("valid")
        .expect("on in a pod");
    assert_eq!(t.server, "https://10.96.0.1:443");
    assert_eq!(t.token_file, Some(sa.join("token")));
    assert_eq!(t.ca_file, Some(sa.join("ca.crt")));
    let v6 = KubeConfig::default()
        .target(
            env(&[
                ("KUBERNETES_SERVICE_HOST", "fd00::1"),
                ("KUBERNETES_SERVICE_PORT", "443"),
            ]),
            &sa,
        )
        .expect("valid")
        .expect("on");
    assert_eq!(v6.server, "https://[fd00::1]:443");
}

#[test]
fn auto_is_off_on_a_host_without_an_api_server_and_true_there_is_an_error() {
    let nowhere = std::env::temp_dir().join("nodeward-kube-no-such-dir");
    // The variables without a token (a host that happens to have them) are not a pod.
    assert_eq!(
        KubeConfig::default().target(env(IN_POD), &nowhere),
        Ok(None)
    );
    let on = KubeConfig {
        enabled: Enabled::On,
        ..KubeConfig::default()
    };
    let e = on
        .target(env(&[]), &nowhere)
        .expect_err("on with no server");
    assert_eq!(e.key, "enabled");
    let off = KubeConfig {
        enabled: Enabled::Off,
        ..KubeConfig::default()
    };
    assert_eq!(off.target(env(IN_POD), &service_account("off")), Ok(None));
}

#[test]
fn a_configured_server_is_used_without_the_service_accounts_files() {
    let sa = service_account("configured");
    let c = KubeConfig {
        server: "http://127.0.0.1:8001".to_owned(),
        ..KubeConfig::default()
    };
    let t = c.target(env(IN_POD), &sa).expect("valid").expect("on");
    assert_eq!(
        t,
        Target {
            server: "http://127.0.0.1:8001".to_owned(),
            token_file: None,
            ca_file: None
        }
    );
}

#[test]
fn the_section_is_read_from_toml_flags_and_checked() {
    let load = |flags: &[&str]| {
        let flags: Vec<String> = flags.iter().map(|s| (*s).to_owned()).collect();
        crate::config::load(
            &crate::config::Source {
                explicit_path: Some(std::path::Path::new("/dev/null")),
                flags: &flags,
            },
            Vec::new(),
        )
    };
    let c = load(&[]).expect("defaults");
    assert_eq!(c.kubernetes.enabled, Enabled::Auto);
    let c = load(&["kubernetes.enabled=true", "kubernetes.heartbeat=30s"]).expect("valid");
    assert_eq!(c.kubernetes.enabled, Enabled::On);
    assert_eq!(c.kubernetes.heartbeat, Duration::from_secs(30));
    assert_eq!(
        load(&["kubernetes.enabled=false"])
            .expect("valid")
            .kubernetes
            .enabled,
        Enabled::Off
    );
    for (flag, key) in [
        ("kubernetes.enabled=maybe", "kubernetes.enabled"),
        ("kubernetes.heartbeat=0s", "kubernetes.heartbeat"),
        ("kubernetes.min_interval=10m", "kubernetes.min_interval"),
        ("kubernetes.server=10.0.0.1:6443", "kubernetes.server"),
        (
            "kubernetes.conditions.gpu=9lives",
            "kubernetes.conditions.gpu",
        ),
        (
            "kubernetes.conditions.gpu=NodewardDraining",
            "kubernetes.conditions",
        ),
    ] {
        match load(&[flag]) {
            Err(crate::config::ConfigError::Invalid { key: k, .. }) => {
                assert_eq!(k, key, "{flag}")
            }
            other => panic!("{flag}: {other:?}"),
        }
    }
}
