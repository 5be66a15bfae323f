//! No tracked file names a package registry or mirror host: the hosts are taken from this
//! machine's own configuration (apt's sources, npm's registry, pip's index settings), so the
//! project can be built against whatever mirrors a site uses without carrying any of them.

use std::{path::Path, process::Command};

use nodeward_tests::{mirrors::configured_hosts, skip};

#[test]
fn no_tracked_file_names_a_configured_registry_or_mirror_host() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let hosts = configured_hosts();
    if hosts.is_empty() {
        skip(
            "no_tracked_file_names_a_configured_registry_or_mirror_host",
            "this machine configures no apt, npm or pip host to look for",
        );
        return;
    }
    let listed = match Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["ls-files", "-z"])
        .output()
    {
        Ok(out) if out.status.success() => out.stdout,
        _ => {
            skip(
                "no_tracked_file_names_a_configured_registry_or_mirror_host",
                "not a git checkout (or no git): the tracked files cannot be listed",
            );
            return;
        }
    };
    let files: Vec<String> = listed
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert!(!files.is_empty(), "git lists no tracked files");
    let mut found = Vec::new();
    for file in &files {
        // A file deleted in the working tree but still in the index has nothing to read.
        let Ok(bytes) = std::fs::read(root.join(file)) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
        for host in &hosts {
            if text.contains(host.as_str()) {
                found.push(format!("{file}: {host}"));
            }
        }
    }
    println!(
        "checked {} tracked files for {} configured hosts: {}",
        files.len(),
        hosts.len(),
        hosts.join(", ")
    );
    assert!(
        found.is_empty(),
        "tracked files name registry or mirror hosts (take them from the machine's \
         configuration instead):\n{}",
        found.join("\n")
    );
}
