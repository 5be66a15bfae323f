//! The crates an RPM of nodeward bundles, read from `cargo metadata`: for the spec's `License:`
//! expression and its `Provides: bundled(crate(NAME)) = VERSION` lines.
//!
//! "Bundled" means compiled into the shipped binary: the agent's normal (not build, not dev)
//! dependencies on the target platform, and those of the eBPF programs (`agent-ebpf` on the bpf
//! target), which the binary embeds. Proc-macro crates run in the compiler and leave no code
//! behind, so they are left out, as Fedora's `%cargo_license` and `%cargo_vendor_manifest` do.

use std::{collections::BTreeSet, path::Path};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::cargo;

/// One crate compiled into the binary.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Crate {
    pub name: String,
    pub version: String,
    /// The SPDX expression of its `license` field, `/` (an old cargo spelling) read as `OR`.
    pub license: String,
    /// A member of this workspace (nodeward's own code), not a bundled third-party crate.
    pub local: bool,
}

/// The crates that `package` links on `target`, itself included.
pub fn linked_crates(root: &Path, package: &str, target: &str) -> anyhow::Result<Vec<Crate>> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(["--filter-platform", target])
        .current_dir(root)
        .output()
        .context("run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata --filter-platform {target} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: Value = serde_json::from_slice(&out.stdout).context("parse cargo metadata")?;
    let packages = meta["packages"]
        .as_array()
        .context("cargo metadata has no packages")?;
    let package_of = |id: &str| packages.iter().find(|p| p["id"] == id);
    let nodes = meta["resolve"]["nodes"]
        .as_array()
        .context("cargo metadata has no resolve graph")?;
    let root_id = packages
        .iter()
        .find(|p| p["name"] == package && p["source"].is_null())
        .and_then(|p| p["id"].as_str())
        .with_context(|| format!("no workspace package {package}"))?;

    let mut seen = BTreeSet::new();
    let mut todo = vec![root_id.to_owned()];
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let node = nodes
            .iter()
            .find(|n| n["id"] == id.as_str())
            .with_context(|| format!("{id} is not in the resolve graph"))?;
        for dep in node["deps"].as_array().into_iter().flatten() {
            let normal = dep["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["kind"].is_null());
            let Some(dep_id) = dep["pkg"].as_str() else {
                continue;
            };
            let proc_macro = package_of(dep_id).is_some_and(is_proc_macro);
            let enabled = package_of(&id).is_none_or(|p| {
                dependency_enabled(p, node, dep["name"].as_str().unwrap_or_default())
            });
            if normal && !proc_macro && enabled {
                todo.push(dep_id.to_owned());
            }
        }
    }

    let mut crates = Vec::new();
    for id in &seen {
        let p = package_of(id).with_context(|| format!("{id} has no package entry"))?;
        let name = p["name"].as_str().context("package without a name")?;
        let Some(license) = p["license"].as_str() else {
            bail!("crate {name} states no SPDX licence (only a licence file): decide by hand");
        };
        crates.push(Crate {
            name: name.to_owned(),
            version: p["version"].as_str().context("no version")?.to_owned(),
            license: license.replace(" / ", " OR ").replace('/', " OR "),
            local: p["source"].is_null(),
        });
    }
    crates.sort();
    Ok(crates)
}

/// Whether the dependency that `package` (resolved as `node`) names `lib` (its library name,
/// as the resolve graph gives it) is built: a required dependency always; an optional one only
/// where an activated feature turns it on. `cargo metadata`'s resolve graph also lists an
/// optional dependency that only a weak feature (`dep?/feature`) names — yasna's `bit-vec`
/// under rcgen — though cargo builds nothing of it (`cargo tree` and the build agree).
fn dependency_enabled(package: &Value, node: &Value, lib: &str) -> bool {
    let declared: Vec<&Value> = package["dependencies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["kind"].is_null())
        .filter(|d| {
            let key = d["rename"]
                .as_str()
                .or(d["name"].as_str())
                .unwrap_or_default();
            key.replace('-', "_") == lib
        })
        .collect();
    if declared.is_empty() || declared.iter().any(|d| d["optional"] != true) {
        return true;
    }
    let active: Vec<&str> = node["features"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    declared.iter().any(|d| {
        let key = d["rename"]
            .as_str()
            .or(d["name"].as_str())
            .unwrap_or_default();
        active.contains(&key)
            || active.iter().any(|f| {
                package["features"][*f]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .any(|v| {
                        v == key
                            || v.strip_prefix("dep:") == Some(key)
                            || v.split_once('/').is_some_and(|(d, _)| d == key)
                    })
            })
    })
}

fn is_proc_macro(package: &Value) -> bool {
    package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["kind"].as_array().into_iter().flatten())
        .any(|k| k == "proc-macro")
}

/// What the RPM built for `arches` (target triples) bundles: the agent on each, and the eBPF
/// programs on the bpf target; one entry per crate and version.
pub fn rpm_crates(root: &Path, arches: &[&str]) -> anyhow::Result<Vec<Crate>> {
    let mut all = BTreeSet::new();
    for target in arches {
        all.extend(linked_crates(root, "nodeward", target)?);
    }
    all.extend(linked_crates(root, "agent-ebpf", "bpfel-unknown-none")?);
    Ok(all.into_iter().collect())
}

/// One SPDX expression that every crate's licence holds under: the distinct terms joined by
/// `AND`, a choice (`A OR B`) in parentheses, in a stable order.
pub fn license_expression(crates: &[Crate]) -> String {
    let mut terms = BTreeSet::new();
    for c in crates {
        terms.extend(license_terms(&c.license));
    }
    let n = terms.len();
    terms
        .into_iter()
        .map(|t| {
            if n > 1 && t.contains(" OR ") {
                format!("({t})")
            } else {
                t
            }
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The `AND`-ed parts of one licence, each a normalised choice: `MIT OR Apache-2.0` and
/// `Apache-2.0 OR MIT` are the same term. An expression with parentheses stays whole.
fn license_terms(license: &str) -> Vec<String> {
    let license = license.trim();
    if license.contains('(') {
        return vec![license.to_owned()];
    }
    license
        .split(" AND ")
        .map(|part| {
            let mut choices: Vec<&str> = part.split(" OR ").map(str::trim).collect();
            choices.sort_unstable();
            choices.dedup();
            choices.join(" OR ")
        })
        .collect()
}

/// `Provides: bundled(crate(NAME)) = VERSION` for each third-party crate.
pub fn provides(crates: &[Crate]) -> String {
    crates
        .iter()
        .filter(|c| !c.local)
        .map(|c| format!("Provides: bundled(crate({})) = {}\n", c.name, c.version))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, license: &str) -> Crate {
        Crate {
            name: name.to_owned(),
            version: "1.0.0".to_owned(),
            license: license.to_owned(),
            local: false,
        }
    }

    #[test]
    fn choices_in_either_order_are_one_term_and_ands_split() {
        let crates = [
            c("a", "MIT OR Apache-2.0"),
            c("b", "Apache-2.0 OR MIT"),
            c("c", "MIT AND BSD-3-Clause"),
            c("d", "Zlib"),
        ];
        assert_eq!(
            license_expression(&crates),
            "(Apache-2.0 OR MIT) AND BSD-3-Clause AND MIT AND Zlib"
        );
        assert_eq!(license_expression(&crates[..1]), "Apache-2.0 OR MIT");
    }

    #[test]
    fn an_optional_dependency_only_a_weak_feature_names_is_not_built() {
        let package = serde_json::json!({
            "dependencies": [
                {"name": "bit-vec", "kind": null, "optional": true, "rename": null},
                {"name": "time", "kind": null, "optional": true, "rename": null},
                {"name": "num-bigint", "kind": null, "optional": true, "rename": null},
                {"name": "libc", "kind": null, "optional": false, "rename": null},
            ],
            "features": {
                "std": ["bit-vec?/std", "time?/std"],
                "big": ["dep:num-bigint"],
                "default": [],
            },
        });
        let node = serde_json::json!({"features": ["std", "time", "big"]});
        assert!(!dependency_enabled(&package, &node, "bit_vec"));
        assert!(dependency_enabled(&package, &node, "time"));
        assert!(dependency_enabled(&package, &node, "num_bigint"));
        assert!(dependency_enabled(&package, &node, "libc"));
        let without = serde_json::json!({"features": ["std"]});
        assert!(!dependency_enabled(&package, &without, "time"));
        assert!(!dependency_enabled(&package, &without, "num_bigint"));
    }

    /// What `cargo tree` says the agent and the eBPF programs link, against this module's walk
    /// of `cargo metadata` (the workspace's own lock file; tests/tests/rpm_srpm.rs checks the
    /// spec built from it end to end).
    #[test]
    fn the_walk_finds_what_cargo_tree_finds() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace");
        let tree = |package: &str, target: &str| -> BTreeSet<(String, String)> {
            let out = cargo()
                .args(["tree", "--locked", "-p", package, "--target", target])
                .args([
                    "-e",
                    "normal,no-proc-macro",
                    "--prefix",
                    "none",
                    "--no-dedupe",
                ])
                .args(["-f", "{p}"])
                .current_dir(root)
                .output()
                .expect("cargo tree");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.contains(" (/"))
                .filter_map(|l| {
                    let mut w = l.split_whitespace();
                    Some((
                        w.next()?.to_owned(),
                        w.next()?.trim_start_matches('v').to_owned(),
                    ))
                })
                .collect()
        };
        let walk = |package: &str, target: &str| -> BTreeSet<(String, String)> {
            linked_crates(root, package, target)
                .expect("cargo metadata")
                .into_iter()
                .filter(|c| !c.local)
                .map(|c| (c.name, c.version))
                .collect()
        };
        // The union, as the spec states it: on its own, the eBPF crate's walk also finds what
        // its `user` feature pulls in (which the workspace turns on for the agent's side).
        let (mut walked, mut treed) = (BTreeSet::new(), BTreeSet::new());
        for (package, target) in [
            ("nodeward", "x86_64-unknown-linux-gnu"),
            ("nodeward", "aarch64-unknown-linux-gnu"),
            ("agent-ebpf", "bpfel-unknown-none"),
        ] {
            walked.extend(walk(package, target));
            treed.extend(tree(package, target));
        }
        assert_eq!(walked, treed);
    }

    #[test]
    fn parenthesised_expressions_stay_whole() {
        assert_eq!(
            license_terms("(MIT OR Apache-2.0) AND Unicode-3.0"),
            ["(MIT OR Apache-2.0) AND Unicode-3.0"]
        );
    }

    #[test]
    fn local_crates_are_not_bundled() {
        let mut own = c("nodeward", "MIT OR Apache-2.0");
        own.local = true;
        let crates = [own, c("tokio", "MIT")];
        assert_eq!(
            provides(&crates),
            "Provides: bundled(crate(tokio)) = 1.0.0\n"
        );
    }
}
