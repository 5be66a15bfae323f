//! The `nodeward` client subcommands against a live in-process API: JSON and tables, exit
//! codes. Needs the binary built first (`cargo build -p nodeward`).

use nodeward::api::pb;
use nodeward_tests::{
    agent_binary,
    api::{
        api_config, eventually, feed_all, health_config, verdict_becomes, TempDir, TestApi, WAIT,
    },
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_prints_json_and_tables_from_a_live_agent() {
    let bin = agent_binary();
    let dir = TempDir::new("api-cli");
    let api = TestApi::start(api_config(&dir), health_config()).await;
    feed_all(&api.store, 2);
    verdict_becomes(&mut api.client().await, pb::Verdict::Healthy).await;
    let addr = format!("unix:{}", api.socket.display());
    let run = |args: Vec<String>| {
        let bin = bin.clone();
        async move {
            let out = tokio::process::Command::new(bin)
                .args(&args)
                .env_remove("NODEWARD_LOG")
                .output()
                .await
                .expect("run the CLI");
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let json: serde_json::Value = serde_json::from_str(
        &run(vec![
            "status".into(),
            "--addr".into(),
            addr.clone(),
            "--json".into(),
        ])
        .await,
    )
    .expect("status --json is JSON");
    assert_eq!(json["health"]["verdict"], "VERDICT_HEALTHY", "{json}");
    assert_eq!(json["health"]["drain"]["state"], "DRAIN_STATE_NOT_DRAINING");

    let table = run(vec![
        "containers".into(),
        "--addr".into(),
        addr.clone(),
        "-n".into(),
        "edu".into(),
    ])
    .await;
    assert!(
        table.contains("live-0") && !table.contains("train-0"),
        "{table}"
    );

    let started: serde_json::Value = serde_json::from_str(
        &run(vec![
            "drain".into(),
            "start".into(),
            "--addr".into(),
            addr.clone(),
            "--by".into(),
            "cli-test".into(),
            "--deadline".into(),
            "10m".into(),
            "--json".into(),
        ])
        .await,
    )
    .expect("drain start --json is JSON");
    assert_eq!(
        started["drain"]["state"], "DRAIN_STATE_DRAINING",
        "{started}"
    );
    let status = run(vec![
        "drain".into(),
        "status".into(),
        "--addr".into(),
        addr.clone(),
    ])
    .await;
    assert!(
        status.contains("streams:   2") && status.contains("c-live"),
        "{status}"
    );
    let line = run(vec![
        "watch".into(),
        "--addr".into(),
        addr.clone(),
        "--count".into(),
        "1".into(),
    ])
    .await;
    assert!(
        line.contains("drain=DRAINING") && line.contains("verdict=HEALTHY"),
        "{line}"
    );
    let line = run(vec![
        "watch".into(),
        "--addr".into(),
        addr.clone(),
        "--count".into(),
        "1".into(),
        "--json".into(),
    ])
    .await;
    assert_eq!(line.lines().count(), 1, "one object per line: {line}");
    let msg: serde_json::Value = serde_json::from_str(&line).expect("watch --json is JSON");
    assert_eq!(msg["health"]["verdict"], "VERDICT_HEALTHY", "{msg}");
    // uint64: a string in protobuf's JSON mapping.
    assert!(
        msg["revision"]
            .as_str()
            .is_some_and(|r| r.parse::<u64>().is_ok()),
        "{msg}"
    );
    let gpus = run(vec!["gpus".into(), "--addr".into(), addr.clone()]).await;
    assert!(gpus.contains("GPU-aaaa"), "{gpus}");

    let out = tokio::process::Command::new(&bin)
        .args(["drain", "start", "--addr", &addr, "--deadline", "0s"])
        .output()
        .await
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(64),
        "a zero deadline is a usage error"
    );
    let out = tokio::process::Command::new(&bin)
        .args([
            "status",
            "--addr",
            &format!("unix:{}/missing.sock", dir.0.display()),
        ])
        .output()
        .await
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(69),
        "an unreachable agent is EX_UNAVAILABLE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_the_api_and_removes_its_socket_on_sigterm() {
    let bin = agent_binary();
    let dir = TempDir::new("api-daemon");
    let socket = dir.0.join("agent.sock");
    let mut agent = tokio::process::Command::new(&bin)
        .args([
            "run",
            "--set",
            "ebpf.enabled=false",
            "--set",
            "api.tcp_listen=",
        ])
        .arg("--set")
        .arg(format!("api.unix_socket={}", socket.display()))
        .env("NODEWARD_LOG", "warn")
        .env_remove("NOTIFY_SOCKET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start nodeward run");
    let addr = format!("unix:{}", socket.display());
    let status = eventually(WAIT, || {
        let (bin, addr) = (bin.clone(), addr.clone());
        async move {
            let out = tokio::process::Command::new(bin)
                .args(["status", "--json", "--addr", &addr])
                .output()
                .await
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        }
    })
    .await
    .expect("the daemon answers on its socket");
    let json: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    // The bridge registers the sources before the API starts, so even the first answer names
    // the sources the verdict waits for (the eBPF ones are off here, and GPU has none).
    let sources: Vec<&str> = json["health"]["sources"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    for kind in ["cgroup", "node"] {
        assert!(sources.contains(&kind), "{kind} missing: {json}");
    }

    let pid = i32::try_from(agent.id().expect("pid")).expect("pid fits");
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let exit = tokio::time::timeout(WAIT, agent.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    assert!(exit.success(), "clean exit: {exit:?}");
    assert!(!socket.exists(), "socket removed at shutdown");
}

/// The reply with every value under a `...UnixMs` or `ageSeconds` key (timestamps and ages, which
/// move between two calls) replaced by its JSON type; the rest as it is, numbers included (`2`
/// and `2.0` differ).
fn comparable(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = if k.ends_with("UnixMs") || k == "ageSeconds" {
                        let kind = match v {
                            Value::String(_) => "string",
                            Value::Number(_) => "number",
                            _ => "other",
                        };
                        Value::String(format!("<timestamp as {kind}>"))
                    } else {
                        comparable(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(comparable).collect()),
        _ => v.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_is_what_grpcurl_prints_for_get_node_health() {
    let grpcurl = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".to_owned());
    if !std::process::Command::new(&grpcurl)
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        nodeward_tests::skip(
            "status_json_is_what_grpcurl_prints_for_get_node_health",
            "grpcurl not found (set GRPCURL to its path)",
        );
        return;
    }
    let dir = TempDir::new("api-grpcurl");
    // Both on the Unix socket, grpcurl with its default authority.
    let api = TestApi::start(api_config(&dir), health_config()).await;
    feed_all(&api.store, 2);
    let mut client = api.client().await;
    verdict_becomes(&mut client, pb::Verdict::Healthy).await;
    // A drain, so the reply holds a nested message with int64s and a repeated message in it.
    client
        .begin_drain(pb::BeginDrainRequest {
            requested_by: "grpcurl-test".to_owned(),
            reason: "compare".to_owned(),
            deadline_seconds: 600,
        })
        .await
        .expect("drain starts");
    let socket = api.socket.display().to_string();

    let (ours, theirs) = both(&grpcurl, &socket, &["status"], "GetNodeHealth").await;
    // The comparison means something only if the reply has what the mapping changes.
    assert_eq!(theirs["health"]["drain"]["state"], "DRAIN_STATE_DRAINING");
    assert!(
        theirs["health"]["drain"]["startedUnixMs"].is_string(),
        "{theirs}"
    );
    assert_eq!(
        comparable(&ours),
        comparable(&theirs),
        "ours:\n{ours:#}\ngrpcurl:\n{theirs:#}"
    );

    // Containers: uint64 counters, doubles, maps (labels) and a repeated nested message.
    let (ours, theirs) = both(&grpcurl, &socket, &["containers"], "ListContainers").await;
    assert!(
        theirs["containers"][0]["network"]["windows"][0]["samples"].is_string(),
        "{theirs}"
    );
    assert_eq!(
        comparable(&ours),
        comparable(&theirs),
        "ours:\n{ours:#}\ngrpcurl:\n{theirs:#}"
    );
}

/// `nodeward <cli> --json` on the Unix socket and grpcurl's `method` on TCP, both parsed.
async fn both(
    grpcurl: &str,
    socket: &str,
    cli: &[&str],
    method: &str,
) -> (serde_json::Value, serde_json::Value) {
    let ours = tokio::process::Command::new(agent_binary())
        .args(cli)
        .args(["--json", "--addr", &format!("unix:{socket}")])
        .env_remove("NODEWARD_LOG")
        .output()
        .await
        .expect("run nodeward");
    let theirs = tokio::process::Command::new(grpcurl)
        .args(["-plaintext", "-unix", socket])
        .arg(format!("nodeward.v1.NodeHealth/{method}"))
        .output()
        .await
        .expect("run grpcurl");
    for (who, out) in [("nodeward", &ours), ("grpcurl", &theirs)] {
        assert!(
            out.status.success(),
            "{who} {method}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (
        serde_json::from_slice(&ours.stdout).expect("ours is JSON"),
        serde_json::from_slice(&theirs.stdout).expect("grpcurl's is JSON"),
    )
}
