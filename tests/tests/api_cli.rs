//! The `nodeward` client subcommands against a live in-process API: JSON and tables, exit
//! codes. Needs the binary built first (`cargo build -p nodeward`).

use nodeward::api::pb;
use nodeward_tests::{
    agent_binary,
    api::{api_config, feed_all, health_config, verdict_becomes, TempDir, TestApi},
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
