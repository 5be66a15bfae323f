//! `GetDrainStatus` names the pods a controller must evict: a pod created through a real
//! containerd's CRI serves a TCP connection from its own container process (busybox `nc`), and
//! the drain status lists that container under its namespace, pod name, pod UID and container
//! name, over the Rust client and a stock client (grpcurl), and in `nodeward drain status`.
//! The same listing carries the container's image, QoS class and allow-listed annotation.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use nodeward::api::pb::{self, node_health_client::NodeHealthClient};
use nodeward_tests::{
    agent_binary,
    api::{eventually, network_reported},
    containerd::{self, Containerd, PodSpec},
    skip,
};

/// Generous bound that only catches a hang.
const WAIT: Duration = Duration::from_secs(60);
const TEST: &str = "drain_status_names_the_pod_serving_each_stream";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A connection to `port` that a thread keeps busy (a round trip every 50 ms) until dropped.
struct Pinger {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pinger {
    fn start(mut conn: TcpStream) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let mut buf = [0u8; 4];
                if conn.write_all(b"ping").is_err() || conn.read_exact(&mut buf).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects to the pod's echo server once it listens, and checks it echoes.
fn connect_echo(port: u16) -> Option<TcpStream> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.write_all(b"ping").ok()?;
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).ok()?;
    (&buf == b"ping").then_some(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_status_names_the_pod_serving_each_stream() {
    if let Some(why) = containerd::unavailable() {
        return skip(TEST, &why);
    }
    let ctrd = Containerd::start("cri-drain");
    let mut cri = ctrd.client().await;

    let api_port = free_port();
    let mut agent = tokio::process::Command::new(agent_binary())
        .args(["run", "--config", "/dev/null"])
        .arg("--set")
        .arg(format!(
            "containers.runtime_endpoint=unix://{}",
            ctrd.socket().display()
        ))
        .args(["--set", "containers.runtime_resync=1s"])
        .args(["--set", r#"containers.runtime_annotations=["team"]"#])
        .args([
            "--set",
            "metrics.enabled=false",
            "--set",
            "gpu.enabled=false",
        ])
        .args(["--set", "agent.tick=500ms"])
        .arg("--set")
        .arg(format!("api.tcp_listen=127.0.0.1:{api_port}"))
        .arg("--set")
        .arg(format!(
            "api.unix_socket={}",
            ctrd.dir.join("agent.sock").display()
        ))
        .env("NODEWARD_LOG", "warn")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the agent");
    let endpoint = format!("http://127.0.0.1:{api_port}");
    let client = eventually(WAIT, || {
        let endpoint = endpoint.clone();
        async move { NodeHealthClient::connect(endpoint).await.ok() }
    })
    .await
    .expect("the agent answers on its TCP port");
    // Sockets older than the TCP source carry no cgroup: the pod's comes after it runs.
    network_reported(&client, WAIT)
        .await
        .expect("the network source reports");

    let port = free_port();
    let spec = PodSpec {
        name: "live-0".to_owned(),
        namespace: "edu".to_owned(),
        uid: format!("{:08x}-0000-4000-8000-00000000d0d0", std::process::id()),
        container: "packager".to_owned(),
        labels: HashMap::from([("app".to_owned(), "live".to_owned())]),
        annotations: HashMap::from([
            ("team".to_owned(), "media".to_owned()),
            ("private".to_owned(), "not listed".to_owned()),
        ]),
    };
    let port_arg = port.to_string();
    let pod = containerd::run_pod_with(
        &ctrd,
        &mut cri,
        &spec,
        &["/bin/nc", "-l", "-p", &port_arg, "-e", "/bin/cat"],
    )
    .await
    .expect("create the serving pod");
    let conn = eventually(WAIT, || async { connect_echo(port) })
        .await
        .expect("the pod's echo server answers");
    let client_addr = conn.local_addr().expect("client address").to_string();
    let pinger = Pinger::start(conn);

    let entry = eventually(WAIT, || {
        let mut c = client.clone();
        let id = pod.container_id.clone();
        async move {
            let s = c
                .get_drain_status(pb::GetDrainStatusRequest {})
                .await
                .ok()?
                .into_inner();
            s.containers
                .into_iter()
                .find(|e| e.container_id == id && !e.pod_name.is_empty() && e.live_streams > 0)
        }
    })
    .await
    .expect("the pod's container holds a named live stream");
    assert_eq!(
        (
            entry.pod_namespace.as_str(),
            entry.pod_name.as_str(),
            entry.container_name.as_str(),
            entry.pod_uid.as_str()
        ),
        ("edu", "live-0", "packager", spec.uid.as_str())
    );
    assert!(
        entry.streams.iter().any(|s| s.remote_addr == client_addr),
        "the stream is the test's connection from {client_addr}: {entry:?}"
    );

    // The same identity in ListContainers: image, QoS class (the burstable cgroup parent the
    // harness gives every pod), and only the allow-listed annotation.
    let listed = client
        .clone()
        .list_containers(pb::ListContainersRequest {
            pod_namespace: "edu".to_owned(),
            ..Default::default()
        })
        .await
        .expect("ListContainers")
        .into_inner()
        .containers;
    let c = listed
        .iter()
        .find(|c| c.id == pod.container_id)
        .expect("the pod's container is listed");
    assert_eq!(c.image, containerd::IMAGE);
    assert_eq!(c.qos_class(), pb::QosClass::Burstable);
    assert_eq!(
        c.annotations.iter().collect::<Vec<_>>(),
        [(&"team".to_owned(), &"media".to_owned())]
    );

    // A stock client sees the same names.
    if Command::new("grpcurl").arg("-version").output().is_ok() {
        let out = nodeward_tests::run(
            Command::new("grpcurl")
                .args(["-plaintext", "-d", "{}"])
                .arg(format!("127.0.0.1:{api_port}"))
                .arg("nodeward.v1.NodeHealth/GetDrainStatus"),
        );
        let v: serde_json::Value = serde_json::from_str(&out).expect("grpcurl prints JSON");
        let e = v["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .find(|e| e["containerId"] == pod.container_id.as_str())
            .unwrap_or_else(|| panic!("the pod's entry: {out}"));
        assert_eq!(
            (
                e["podNamespace"].as_str(),
                e["podName"].as_str(),
                e["containerName"].as_str()
            ),
            (Some("edu"), Some("live-0"), Some("packager")),
            "{out}"
        );
    } else {
        skip(&format!("{TEST} (grpcurl part)"), "grpcurl not installed");
    }

    // The CLI prints them too.
    let cli = nodeward_tests::run(
        Command::new(agent_binary())
            .args(["drain", "status", "--addr"])
            .arg(format!("http://127.0.0.1:{api_port}")),
    );
    assert!(
        cli.contains(&format!("{} edu/live-0 (packager)", pod.container_id)),
        "{cli}"
    );

    drop(pinger);
    containerd::remove_pod(&mut cri, &pod).await;
    let _ = agent.kill().await;
}
