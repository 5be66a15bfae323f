//! The kubelet pod-resources `v1` code generated from the vendored
//! `proto/vendor/podresources/v1/api.proto` is checked in, like the CRI client: the agent's
//! client (`agent/src/containers/podresources/generated/v1.rs`) and the tests' stand-in server
//! (`tests/src/generated/podresources_v1_server.rs`, never in the agent). This test regenerates
//! both and fails when a copy differs.
//!
//! After updating the vendored proto, refresh the code with
//! `NODEWARD_BLESS=1 cargo test -p nodeward-tests --test pod_resources_codegen`.

use std::path::{Path, PathBuf};

use nodeward_tests::skip;

const TEST: &str = "checked_in_pod_resources_code_matches_the_vendored_proto";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn protoc_available() -> bool {
    let protoc = std::env::var("PROTOC").unwrap_or_else(|_| "protoc".to_owned());
    std::process::Command::new(protoc)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Generates the client or the server side into a fresh directory and returns `v1.rs`.
fn generate(root: &Path, client: bool) -> Vec<u8> {
    let out = std::env::temp_dir().join(format!(
        "nodeward-podres-codegen-{}-{client}",
        std::process::id()
    ));
    std::fs::create_dir_all(&out).expect("create temp out dir");
    tonic_prost_build::configure()
        .out_dir(&out)
        .emit_rerun_if_changed(false)
        .build_client(client)
        .build_server(!client)
        .compile_protos(
            &[root.join("proto/vendor/podresources/v1/api.proto")],
            &[root.join("proto/vendor")],
        )
        .expect("protoc and tonic-prost-build generate the pod-resources code");
    let fresh = std::fs::read(out.join("v1.rs")).expect("generator wrote v1.rs");
    let _ = std::fs::remove_dir_all(&out);
    fresh
}

#[test]
fn checked_in_pod_resources_code_matches_the_vendored_proto() {
    if !protoc_available() {
        return skip(
            TEST,
            "protoc not found (apt-get install -y protobuf-compiler)",
        );
    }
    let root = workspace_root();
    for (client, checked_in) in [
        (true, "agent/src/containers/podresources/generated/v1.rs"),
        (false, "tests/src/generated/podresources_v1_server.rs"),
    ] {
        let fresh = generate(&root, client);
        let path = root.join(checked_in);
        if std::env::var_os("NODEWARD_BLESS").is_some() {
            std::fs::write(&path, &fresh).expect("write checked-in generated code");
            continue;
        }
        assert!(
            std::fs::read(&path).ok().as_deref() == Some(fresh.as_slice()),
            "{} is out of date with proto/vendor/podresources/v1/api.proto; run \
             NODEWARD_BLESS=1 cargo test -p nodeward-tests --test pod_resources_codegen",
            path.display()
        );
    }
}
