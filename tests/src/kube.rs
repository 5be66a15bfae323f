//! The Kubernetes manifests as the tests read them: PyYAML (an independent parser) turns each
//! document into JSON, and kubernetes-validate (PyPI, with the API schemas) checks them against
//! a Kubernetes release without a network.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

use crate::is_root;

/// The Kubernetes release the manifests are validated against (tests/requirements.txt pins the
/// kubernetes-validate release that has its schemas).
pub const KUBERNETES_VERSION: &str = "1.37.0";

pub use crate::tool;

/// `kubernetes-validate --strict` on `files`, without network where it can be cut (root: a
/// network namespace of its own). Panics if kubernetes-validate is not installed: callers skip
/// first.
pub fn validate(files: &[PathBuf]) -> std::process::Output {
    let validator = tool("kubernetes-validate").expect("checked by the caller");
    let mut cmd = if is_root() && tool("unshare").is_some() {
        let mut c = Command::new("unshare");
        c.arg("--net").arg(validator);
        c
    } else {
        Command::new(validator)
    };
    cmd.args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(files)
        .output()
        .expect("run kubernetes-validate")
}

/// Every document of a YAML file, as JSON; `None` without python3 and PyYAML.
pub fn yaml(path: &Path) -> Option<Vec<Value>> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
        ])
        .arg(path)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The first document of `kind` in `docs`; panics if there is none.
pub fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the manifests"))
}

/// The strings of a JSON array (empty for anything else).
pub fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}
