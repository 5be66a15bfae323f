//! Pod identity from a real containerd: pods created through CRI in two namespaces with
//! labels are listed by the agent under their pod, namespace and container names, filtered by
//! namespace and `kubectl -l` selectors (checked with grpcurl too), named on /metrics (a valid
//! exposition under promtool, hostile metadata included); a removed pod goes away; containerd
//! stopping degrades identity to cgroup paths with a reason and no crash, and its return brings
//! the names back.

use std::{
    collections::{BTreeSet, HashMap},
    io::{Read as _, Write as _},
    process::{Command, Stdio},
    time::Duration,
};

use nodeward::api::pb::{self, node_health_client::NodeHealthClient};
use nodeward_tests::{
    agent_binary,
    api::{conn, eventually},
    containerd::{self, Containerd, Pod, PodSpec},
    promtool_accepts, skip,
};
use tonic::transport::Channel;

/// Generous bound that only catches a hang: several resyncs of 1 s on a loaded machine.
const WAIT: Duration = Duration::from_secs(60);

fn spec(n: u32, name: &str, ns: &str, labels: &[(&str, &str)]) -> PodSpec {
    PodSpec {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        // UUID-shaped, as the kubelet's: the cgroup path parser expects hex and dashes.
        uid: format!("{:08x}-0000-4000-8000-{n:012x}", std::process::id()),
        container: format!("{name}-c"),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        annotations: HashMap::new(),
    }
}

async fn list(
    client: &mut NodeHealthClient<Channel>,
    ns: &str,
    selector: &str,
) -> Vec<pb::Container> {
    client
        .list_containers(pb::ListContainersRequest {
            pod_namespace: ns.to_owned(),
            selector: selector.to_owned(),
            ..Default::default()
        })
        .await
        .expect("ListContainers")
        .into_inner()
        .containers
}

fn pod_names(cs: &[pb::Container]) -> BTreeSet<String> {
    cs.iter().map(|c| c.pod_name.clone()).collect()
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect /metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read /metrics");
    out.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn cgroup_fidelity(client: &mut NodeHealthClient<Channel>) -> String {
    let h = client
        .get_node_health(pb::GetNodeHealthRequest {})
        .await
        .expect("GetNodeHealth")
        .into_inner();
    h.health
        .map(|h| h.sources)
        .unwrap_or_default()
        .into_iter()
        .find(|s| s.name == "cgroup")
        .map(|s| s.fidelity)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_from_containerd_are_named_filtered_and_survive_the_runtime_going_away() {
    let test = "pods_from_containerd_are_named_filtered_and_survive_the_runtime_going_away";
    if let Some(why) = containerd::unavailable() {
        skip(test, &why);
        return;
    }
    let mut ctrd = Containerd::start("cri-identity");
    let mut cri = ctrd.client().await;
    let specs = [
        spec(1, "web-0", "prod", &[("app", "web"), ("tier", "front")]),
        spec(2, "db-0", "prod", &[("app", "db")]),
        spec(3, "web-1", "staging", &[("app", "web")]),
    ];
    // Hostile metadata: 200 labels of 63 characters, quotes and a line feed in a value, a
    // 256 KiB annotation on the allow-list.
    let mut hostile = spec(4, "odd-0", "hostile", &[("weird", "a\"b\\c\nd")]);
    for i in 0..200 {
        hostile.labels.insert(format!("l{i:03}"), "v".repeat(63));
    }
    hostile
        .annotations
        .insert("big".to_owned(), "z".repeat(256 * 1024));
    let mut pods: Vec<(PodSpec, Pod)> = Vec::new();
    for s in specs.iter().chain([&hostile]) {
        let pod = containerd::run_pod(&ctrd, &mut cri, s)
            .await
            .unwrap_or_else(|e| {
                let log =
                    std::fs::read_to_string(ctrd.dir.join("containerd.log")).unwrap_or_default();
                panic!(
                    "create pod {}: {e}\ncontainerd log tail:\n{}",
                    s.name,
                    tail(&log)
                )
            });
        pods.push((s.clone(), pod));
    }

    let agent_sock = ctrd.dir.join("agent.sock");
    let port = free_port();
    let mut agent = tokio::process::Command::new(agent_binary())
        .arg("run")
        .args(["--config", "/dev/null"])
        .arg("--set")
        .arg(format!(
            "containers.runtime_endpoint=unix://{}",
            ctrd.socket().display()
        ))
        .args(["--set", "containers.runtime_resync=1s"])
        .args(["--set", "containers.runtime_keep_names=1s"])
        .args(["--set", r#"containers.runtime_annotations=["big"]"#])
        .args(["--set", "ebpf.enabled=false", "--set", "agent.tick=500ms"])
        .arg("--set")
        .arg(format!("api.unix_socket={}", agent_sock.display()))
        .arg("--set")
        .arg(format!("metrics.listen=127.0.0.1:{port}"))
        .env("NODEWARD_LOG", "warn")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the agent");
    let mut client = eventually(WAIT, || {
        let sock = agent_sock.clone();
        async move {
            nodeward::client::connect(&conn(&format!("unix:{}", sock.display())), &sock)
                .await
                .ok()
        }
    })
    .await
    .expect("the agent's API comes up");

    // Namespace and selector together: exactly the matching containers, with their names.
    let prod = eventually(WAIT, || {
        let mut c = client.clone();
        async move {
            let cs = list(&mut c, "prod", "app in (web,db)").await;
            (pod_names(&cs).len() == 2).then_some(cs)
        }
    })
    .await
    .expect("both prod pods are named");
    let ids: BTreeSet<&str> = prod.iter().map(|c| c.id.as_str()).collect();
    let want: BTreeSet<&str> = pods[..2]
        .iter()
        .map(|(_, p)| p.container_id.as_str())
        .collect();
    assert_eq!(ids, want, "exactly the two prod containers: {prod:#?}");
    let web0 = prod.iter().find(|c| c.pod_name == "web-0").expect("web-0");
    assert_eq!(
        (
            web0.name.as_str(),
            web0.pod_namespace.as_str(),
            web0.pod_uid.as_str()
        ),
        ("web-0-c", "prod", specs[0].uid.as_str())
    );
    assert_eq!(web0.labels.get("tier").map(String::as_str), Some("front"));
    for (ns, sel, want) in [
        ("", "app=web", vec!["web-0", "web-1"]),
        ("prod", "!tier", vec!["db-0"]),
        ("prod", "app notin (web)", vec!["db-0"]),
        ("staging", "app==web,!tier", vec!["web-1"]),
        ("", "tier,app!=db", vec!["web-0"]),
    ] {
        let got = pod_names(&list(&mut client, ns, sel).await);
        let want: BTreeSet<String> = want.into_iter().map(str::to_owned).collect();
        assert_eq!(got, want, "namespace {ns:?} selector {sel:?}");
    }

    // A stock client: grpcurl through server reflection, on the socket with its default
    // authority.
    if Command::new("grpcurl").arg("-version").output().is_ok() {
        let out = nodeward_tests::run(
            Command::new("grpcurl")
                .args(["-plaintext", "-unix", "-d"])
                .arg(r#"{"pod_namespace":"prod","selector":"app=web"}"#)
                .arg(&agent_sock)
                .arg("nodeward.v1.NodeHealth/ListContainers"),
        );
        let v: serde_json::Value = serde_json::from_str(&out).expect("grpcurl prints JSON");
        let names: Vec<&str> = v["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .filter_map(|c| c["podName"].as_str())
            .collect();
        assert_eq!(names, ["web-0"], "{out}");
    } else {
        skip(&format!("{test} (grpcurl part)"), "grpcurl not installed");
    }

    // The CLI shows pod and container names.
    let cli = nodeward_tests::run(
        Command::new(agent_binary())
            .args(["containers", "--addr"])
            .arg(format!("unix:{}", agent_sock.display()))
            .args(["-n", "staging", "-l", "app in (web)"]),
    );
    assert!(
        cli.contains("web-1") && cli.contains("web-1-c") && !cli.contains("web-0"),
        "{cli}"
    );

    // /metrics: every series of a named container carries its names; the exposition stays
    // valid with the hostile pod in it.
    let body = eventually(WAIT, || async {
        let b = scrape(port);
        b.contains("pod=\"odd-0\"").then_some(b)
    })
    .await
    .expect("/metrics names the pods");
    let web0_id = pods[0].1.container_id.clone();
    let lines: Vec<&str> = body
        .lines()
        .filter(|l| l.contains(&format!("container_id=\"{web0_id}\"")))
        .collect();
    assert!(!lines.is_empty(), "web-0's container has series");
    for l in &lines {
        assert!(
            l.contains("pod=\"web-0\"")
                && l.contains("namespace=\"prod\"")
                && l.contains("container=\"web-0-c\""),
            "{l}"
        );
    }
    promtool_accepts("cri_identity", &body);
    let odd = list(&mut client, "hostile", "").await;
    assert_eq!(odd.len(), 1, "{odd:#?}");
    assert!(odd[0].labels.len() <= 256 && odd[0].labels.len() >= 200);
    assert!(
        odd[0].labels["weird"].contains('\u{fffd}'),
        "line feed replaced"
    );
    // The 256 KiB allow-listed annotation reaches the API cut to its bound.
    assert_eq!(
        odd[0].annotations.get("big").map(String::len),
        Some(4096),
        "{:?}",
        odd[0].annotations.keys().collect::<Vec<_>>()
    );
    assert_eq!(odd[0].image, containerd::IMAGE);

    // A pod removed through CRI: gone from the list.
    let (_, db) = pods.remove(1);
    containerd::remove_pod(&mut cri, &db).await;
    eventually(WAIT, || {
        let mut c = client.clone();
        async move {
            (pod_names(&list(&mut c, "prod", "").await) == BTreeSet::from(["web-0".to_owned()]))
                .then_some(())
        }
    })
    .await
    .expect("db-0 leaves the list");

    // A pod created while the agent runs (containerd 1.6 has no event stream): found by the
    // resync.
    let late_spec = spec(5, "late-0", "staging", &[("app", "late")]);
    let late = containerd::run_pod(&ctrd, &mut cri, &late_spec)
        .await
        .expect("create late-0");
    let found = eventually(WAIT, || {
        let mut c = client.clone();
        async move {
            let cs = list(&mut c, "staging", "app=late").await;
            (cs.len() == 1).then_some(cs)
        }
    })
    .await
    .expect("late-0 is found");
    assert_eq!(
        (found[0].id.as_str(), found[0].pod_name.as_str()),
        (late.container_id.as_str(), "late-0")
    );
    pods.push((late_spec, late));

    // containerd stops: identity degrades (said in the cgroup source's fidelity), names go
    // after runtime_keep_names, the container is still listed by its id, the agent lives.
    ctrd.stop();
    let fidelity = eventually(WAIT, || {
        let mut c = client.clone();
        async move {
            let f = cgroup_fidelity(&mut c).await;
            f.contains("identity degraded").then_some(f)
        }
    })
    .await
    .expect("the fidelity says identity is degraded");
    assert!(fidelity.contains("unreachable"), "{fidelity}");
    let unnamed = eventually(WAIT, || {
        let mut c = client.clone();
        let id = web0_id.clone();
        async move {
            let all = list(&mut c, "", "").await;
            all.into_iter()
                .find(|c| c.id == id && c.pod_name.is_empty())
        }
    })
    .await
    .expect("web-0's container is listed by id once its name is dropped");
    assert!(unnamed.cgroup_path.contains(web0_id.as_str()));
    assert!(
        agent.try_wait().expect("try_wait").is_none(),
        "agent still runs"
    );

    // containerd back: names return.
    ctrd.restart();
    eventually(WAIT, || {
        let mut c = client.clone();
        async move {
            pod_names(&list(&mut c, "prod", "app=web").await)
                .contains("web-0")
                .then_some(())
        }
    })
    .await
    .expect("names return with containerd");
    eventually(WAIT, || {
        let mut c = client.clone();
        async move {
            cgroup_fidelity(&mut c)
                .await
                .contains("over CRI")
                .then_some(())
        }
    })
    .await
    .expect("the fidelity says identity is back");

    let mut cri = ctrd.client().await;
    for (_, pod) in &pods {
        containerd::remove_pod(&mut cri, pod).await;
    }
    let _ = agent.kill().await;
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
