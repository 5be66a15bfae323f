//! The gRPC code generated from `proto/nodeward/v1/*.proto` is checked in
//! (`agent/src/api/generated/`), so building the agent needs no `protoc`; this test
//! regenerates it and fails when the checked-in copy differs from what the protos produce.
//!
//! After editing a `.proto`, refresh the checked-in code with
//! `NODEWARD_BLESS=1 cargo test -p nodeward-tests --test proto_codegen`.
//! This test crate links the agent, so bless right after editing the `.proto` (the agent still
//! compiles: new fields are additions) and only then use the new fields in the agent's code.
//!
//! Why checked in rather than a `build.rs`: an RPM or container build needs no `protoc`, the
//! agent's `build.rs` stays the eBPF build alone, and reviewers see the API's Rust surface change
//! in the diff; this test keeps the copy honest.

use std::path::{Path, PathBuf};

use nodeward_tests::skip;

const PROTOS: [&str; 3] = [
    "nodeward/v1/types.proto",
    "nodeward/v1/health.proto",
    "nodeward/v1/service.proto",
];
/// Files the generator writes, and their checked-in names.
const OUTPUTS: [&str; 2] = ["nodeward.v1.rs", "nodeward_v1_descriptor.bin"];

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

fn generate(out: &Path) {
    let root = workspace_root();
    let protos: Vec<PathBuf> = PROTOS.iter().map(|p| root.join("proto").join(p)).collect();
    tonic_prost_build::configure()
        .out_dir(out)
        .file_descriptor_set_path(out.join("nodeward_v1_descriptor.bin"))
        .emit_rerun_if_changed(false)
        .build_client(true)
        .build_server(true)
        .compile_protos(&protos, &[root.join("proto")])
        .expect("protoc and tonic-prost-build generate the nodeward.v1 code");
}

#[test]
fn checked_in_generated_code_matches_the_protos() {
    if !protoc_available() {
        skip(
            "checked_in_generated_code_matches_the_protos",
            "protoc not found (apt-get install -y protobuf-compiler)",
        );
        return;
    }
    let out = std::env::temp_dir().join(format!("nodeward-codegen-{}", std::process::id()));
    std::fs::create_dir_all(&out).expect("create temp out dir");
    generate(&out);
    let checked_in = workspace_root().join("agent/src/api/generated");
    let bless = std::env::var_os("NODEWARD_BLESS").is_some();
    let mut stale = Vec::new();
    for name in OUTPUTS {
        let fresh = std::fs::read(out.join(name)).expect("generator wrote the file");
        let path = checked_in.join(name);
        if bless {
            std::fs::write(&path, &fresh).expect("write checked-in generated code");
        } else if std::fs::read(&path).ok().as_deref() != Some(fresh.as_slice()) {
            stale.push(path.display().to_string());
        }
    }
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        stale.is_empty(),
        "generated code is out of date with proto/: {stale:?}; run \
         NODEWARD_BLESS=1 cargo test -p nodeward-tests --test proto_codegen"
    );
}
