//! The CRI `runtime.v1` client generated from the vendored `proto/vendor/runtime/v1/api.proto`
//! is checked in (`agent/src/containers/cri/generated/`), like the agent's own API, so building
//! the agent needs no `protoc`; this test regenerates it and fails when the copy differs.
//!
//! After updating the vendored proto, refresh the code with
//! `NODEWARD_BLESS=1 cargo test -p nodeward-tests --test cri_codegen`.

use std::path::{Path, PathBuf};

use nodeward_tests::skip;

const OUTPUT: &str = "runtime.v1.rs";

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

#[test]
fn checked_in_cri_client_matches_the_vendored_proto() {
    if !protoc_available() {
        skip(
            "checked_in_cri_client_matches_the_vendored_proto",
            "protoc not found (apt-get install -y protobuf-compiler)",
        );
        return;
    }
    let root = workspace_root();
    let out = std::env::temp_dir().join(format!("nodeward-cri-codegen-{}", std::process::id()));
    std::fs::create_dir_all(&out).expect("create temp out dir");
    // The agent only ever calls a runtime: no server code.
    tonic_prost_build::configure()
        .out_dir(&out)
        .emit_rerun_if_changed(false)
        .build_client(true)
        .build_server(false)
        .compile_protos(
            &[root.join("proto/vendor/runtime/v1/api.proto")],
            &[root.join("proto/vendor")],
        )
        .expect("protoc and tonic-prost-build generate the runtime.v1 client");
    let fresh = std::fs::read(out.join(OUTPUT)).expect("generator wrote the file");
    let _ = std::fs::remove_dir_all(&out);
    check_or_bless(
        &fresh,
        &root.join("agent/src/containers/cri/generated").join(OUTPUT),
    );

    // The benchmark's stand-in runtime (tests crate only): a server whose unlisted methods
    // answer `Unimplemented`.
    let out = std::env::temp_dir().join(format!(
        "nodeward-cri-server-codegen-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&out).expect("create temp out dir");
    tonic_prost_build::configure()
        .out_dir(&out)
        .emit_rerun_if_changed(false)
        .build_client(false)
        .build_server(true)
        .generate_default_stubs(true)
        .compile_protos(
            &[root.join("proto/vendor/runtime/v1/api.proto")],
            &[root.join("proto/vendor")],
        )
        .expect("protoc and tonic-prost-build generate the runtime.v1 server");
    let fresh = std::fs::read(out.join(OUTPUT)).expect("generator wrote the file");
    let _ = std::fs::remove_dir_all(&out);
    check_or_bless(
        &fresh,
        &root.join("tests/src/generated/runtime_v1_server.rs"),
    );
}

fn check_or_bless(fresh: &[u8], path: &Path) {
    if std::env::var_os("NODEWARD_BLESS").is_some() {
        std::fs::write(path, fresh).expect("write checked-in generated code");
        return;
    }
    assert!(
        std::fs::read(path).ok().as_deref() == Some(fresh),
        "{} is out of date with proto/vendor/runtime/v1/api.proto; run \
         NODEWARD_BLESS=1 cargo test -p nodeward-tests --test cri_codegen",
        path.display()
    );
}
