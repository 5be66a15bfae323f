use super::*;

const A: &str = r#"
apiVersion: v1
kind: Config
current-context: east
preferences: {}
clusters:
- name: east
  cluster:
    server: https://10.0.0.1:6443
    certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==
- name: shared
  cluster:
    server: https://shared-from-a:6443
    certificate-authority: ca/shared.crt
users:
- name: east-admin
  user:
    token: abc.def
- name: certs
  user:
    client-certificate: pki/ops.crt
    client-key: pki/ops.key
contexts:
- name: east
  context:
    cluster: east
    user: east-admin
    namespace: live
- name: shared
  context:
    cluster: shared
    user: certs
"#;

const B: &str = r#"
current-context: west
clusters:
- name: west
  cluster:
    server: http://127.0.0.1:8080
    insecure-skip-tls-verify: true
    tls-server-name: kubernetes.default
- name: shared
  cluster:
    server: https://shared-from-b:6443
users:
- name: west-sa
  user:
    tokenFile: west.token
contexts:
- name: west
  context:
    cluster: west
    user: west-sa
- name: east
  context:
    cluster: west
    user: west-sa
"#;

fn merged() -> Kubeconfig {
    Kubeconfig::from_texts(vec![
        (PathBuf::from("/k/a/config"), A.to_owned()),
        (PathBuf::from("/k/b/config"), B.to_owned()),
    ])
    .expect("valid")
}

fn one(text: &str) -> Kubeconfig {
    Kubeconfig::from_texts(vec![(PathBuf::from("/k/c/config"), text.to_owned())]).expect("valid")
}

#[test]
fn the_first_file_wins_each_name_and_the_current_context() {
    let k = merged();
    let ctx = k.select(&[], false).expect("current");
    assert_eq!(ctx.len(), 1);
    assert_eq!(ctx[0].name, "east", "the first file's current-context");
    // `east` is defined in both files: the first file's, with its own cluster and token.
    assert_eq!(ctx[0].target.server, "https://10.0.0.1:6443");
    assert_eq!(ctx[0].credentials.token.as_deref(), Some("abc.def"));
    assert_eq!(
        ctx[0].credentials.ca_pem.as_deref(),
        Some(&b"-----BEGIN CERTIFICATE-----\n"[..])
    );
    assert_eq!(ctx[0].namespace.as_deref(), Some("live"));
    // `shared` names a cluster both files define: the first file's.
    let shared = k.resolve("shared");
    let e = shared
        .expect_err("its certificate files do not exist")
        .to_string();
    assert!(
        e.contains("/k/a/pki/ops.crt") && e.contains("client-certificate"),
        "{e}"
    );
    let west = k.resolve("west").expect("west");
    assert_eq!(west.target.server, "http://127.0.0.1:8080");
    assert!(west.credentials.insecure);
    assert_eq!(
        west.credentials.server_name.as_deref(),
        Some("kubernetes.default")
    );
    assert_eq!(
        west.target.token_file.as_deref(),
        Some(Path::new("/k/b/west.token")),
        "relative to the file that defines the user"
    );
    // Every context: `shared` cannot be had, and the error says which file it wants.
    let e = k.select(&[], true).expect_err("shared fails").to_string();
    assert!(
        e.contains("\"certs\"") && e.contains("/k/a/pki/ops.crt"),
        "{e}"
    );
}

#[test]
fn all_contexts_come_in_file_order_and_named_ones_as_asked() {
    let k = one(&B.replace("current-context: west", ""));
    let names = |v: Vec<Context>| v.into_iter().map(|c| c.name).collect::<Vec<_>>();
    assert_eq!(names(k.select(&[], true).expect("all")), ["west", "east"]);
    assert_eq!(
        names(
            k.select(&["east".into(), "west".into()], false)
                .expect("named")
        ),
        ["east", "west"]
    );
    let e = k.select(&[], false).expect_err("no current").to_string();
    assert!(
        e.contains("no current-context") && e.contains("/k/c/config"),
        "{e}"
    );
}

#[test]
fn client_certificates_are_read_relative_to_their_file() {
    let dir = std::env::temp_dir().join(format!("nodeward-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("pki")).expect("dir");
    std::fs::write(dir.join("pki/ops.crt"), "CERT").expect("write");
    std::fs::write(dir.join("pki/ops.key"), "KEY").expect("write");
    let k = Kubeconfig::from_texts(vec![(dir.join("config"), A.to_owned())]).expect("valid");
    let c = k.resolve("shared").expect("resolved");
    assert_eq!(
        c.credentials.identity,
        Some((b"CERT".to_vec(), b"KEY".to_vec()))
    );
    assert_eq!(c.target.ca_file, Some(dir.join("ca/shared.crt")));
    assert_eq!(c.credentials.token, None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inline_data_and_a_token_beat_nothing_and_token_beats_token_file() {
    let k = one(
        "current-context: c\nclusters: [{name: k, cluster: {server: 'https://h'}}]\n\
         users: [{name: u, user: {token: t1, tokenFile: /x, client-certificate-data: Q0VSVA==, \
         client-key-data: 'S0VZ'}}]\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n",
    );
    let c = k.resolve("c").expect("resolved");
    assert_eq!(c.credentials.token.as_deref(), Some("t1"));
    assert_eq!(c.target.token_file, None);
    assert_eq!(
        c.credentials.identity,
        Some((b"CERT".to_vec(), b"KEY".to_vec()))
    );
}

fn error_of(text: &str, context: &str) -> String {
    one(text)
        .resolve(context)
        .expect_err("an error")
        .to_string()
}

const CLUSTER: &str = "clusters: [{name: k, cluster: {server: 'https://h'}}]\n";

#[test]
fn unsupported_authentication_is_refused_naming_the_user_and_the_way_out() {
    let exec = format!(
        "{CLUSTER}users: [{{name: gke, user: {{exec: {{apiVersion: client.authentication.k8s.io/v1beta1, \
         command: gke-gcloud-auth-plugin}}}}}}]\ncontexts: [{{name: c, context: {{cluster: k, user: gke}}}}]\n"
    );
    let e = error_of(&exec, "c");
    assert!(
        e.contains("/k/c/config")
            && e.contains("\"gke\"")
            && e.contains("exec plugin (gke-gcloud-auth-plugin)")
            && e.contains("token"),
        "{e}"
    );
    let provider = format!(
        "{CLUSTER}users: [{{name: old, user: {{auth-provider: {{name: oidc}}}}}}]\n\
         contexts: [{{name: c, context: {{cluster: k, user: old}}}}]\n"
    );
    let e = error_of(&provider, "c");
    assert!(
        e.contains("auth-provider \"oidc\"") && e.contains("\"old\""),
        "{e}"
    );
    let basic = format!(
        "{CLUSTER}users: [{{name: b, user: {{username: admin, password: x}}}}]\n\
         contexts: [{{name: c, context: {{cluster: k, user: b}}}}]\n"
    );
    assert!(error_of(&basic, "c").contains("basic authentication"));
    let half = format!(
        "{CLUSTER}users: [{{name: h, user: {{client-certificate-data: Q0VSVA==}}}}]\n\
         contexts: [{{name: c, context: {{cluster: k, user: h}}}}]\n"
    );
    assert!(error_of(&half, "c").contains("without a client key"));
}

#[test]
fn broken_references_and_data_name_the_file_the_context_and_the_key() {
    let e = error_of("contexts: [{name: c, context: {cluster: nowhere}}]\n", "c");
    assert!(
        e.contains("/k/c/config") && e.contains("\"c\"") && e.contains("cluster \"nowhere\""),
        "{e}"
    );
    let e = error_of(
        &format!("{CLUSTER}contexts: [{{name: c, context: {{cluster: k, user: ghost}}}}]\n"),
        "c",
    );
    assert!(e.contains("user \"ghost\""), "{e}");
    let e = error_of("contexts: [{name: c, context: {user: u}}]\n", "c");
    assert!(e.contains("has no cluster"), "{e}");
    let e = error_of(
        "clusters: [{name: k, cluster: {}}]\ncontexts: [{name: c, context: {cluster: k}}]\n",
        "c",
    );
    assert!(e.contains("has no cluster.server"), "{e}");
    let e = error_of(
        "clusters: [{name: k, cluster: {server: 'https://h', certificate-authority-data: '%%%'}}]\n\
         contexts: [{name: c, context: {cluster: k}}]\n",
        "c",
    );
    assert!(
        e.contains("cluster \"k\": certificate-authority-data is not valid base64"),
        "{e}"
    );
    let e = error_of(
        &format!("{CLUSTER}contexts: [{{name: c, context: {{cluster: k}}}}]\n"),
        "d",
    );
    assert!(
        e.contains("no context named \"d\"") && e.contains("there are: c"),
        "{e}"
    );
    let e = error_of(
        "clusters: [{name: k, cluster: {server: 'https://h', proxy-url: 'http://p'}}]\n\
         contexts: [{name: c, context: {cluster: k}}]\n",
        "c",
    );
    assert!(e.contains("proxy-url"), "{e}");
}

#[test]
fn a_file_that_is_not_a_kubeconfig_is_an_error_naming_it() {
    let e = Kubeconfig::from_texts(vec![(PathBuf::from("/k/bad"), "clusters: 7\n".to_owned())])
        .expect_err("an error")
        .to_string();
    assert!(e.contains("/k/bad") && e.contains("not valid YAML"), "{e}");
    // An empty file is an empty kubeconfig, as kubectl takes it.
    let k = Kubeconfig::from_texts(vec![(PathBuf::from("/k/empty"), String::new())]).expect("ok");
    let e = k.select(&[], true).expect_err("no contexts").to_string();
    assert!(e.contains("/k/empty: no contexts"), "{e}");
}

#[test]
fn kubeconfig_skips_missing_files_but_an_explicit_one_must_exist() {
    let dir = std::env::temp_dir().join(format!("nodeward-kubeconfig-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let b = dir.join("b");
    std::fs::write(&b, B).expect("write");
    let missing = dir.join("missing");
    let env = format!("{}::{}", missing.display(), b.display());
    let k = Kubeconfig::load(None, Some(&env), None).expect("b is read");
    assert_eq!(k.select(&[], false).expect("current")[0].name, "west");
    let e = Kubeconfig::load(None, Some(&missing.display().to_string()), None)
        .expect_err("nothing exists")
        .to_string();
    assert!(e.contains("none of the files KUBECONFIG names"), "{e}");
    let e = Kubeconfig::load(Some(&missing), Some(&env), None)
        .expect_err("explicit and missing")
        .to_string();
    assert!(e.contains(&missing.display().to_string()), "{e}");
    // Without either, ~/.kube/config.
    std::fs::create_dir_all(dir.join(".kube")).expect("dir");
    let e = Kubeconfig::load(None, None, Some(&dir))
        .expect_err("no ~/.kube/config")
        .to_string();
    assert!(e.contains(".kube/config does not exist"), "{e}");
    std::fs::write(dir.join(".kube/config"), A).expect("write");
    let k = Kubeconfig::load(None, Some(""), Some(&dir)).expect("home");
    assert_eq!(k.select(&[], false).expect("current")[0].name, "east");
    let _ = std::fs::remove_dir_all(&dir);
}
