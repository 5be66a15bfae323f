//! The package mirrors this machine is configured with, read from its own configuration (apt's
//! sources, npm's and pip's settings) instead of being written into the project: the kernels
//! test fetches Debian kernels from the machine's Debian mirror, and the hygiene test checks that
//! no tracked file names any of these hosts.

use std::{path::Path, process::Command};

/// The URIs of every apt source: one-line `deb`/`deb-src` entries in `sources.list` and
/// `sources.list.d/*.list`, and `URIs:` fields of deb822 `*.sources` files.
pub fn apt_uris(etc_apt: &Path) -> Vec<String> {
    let mut files = vec![etc_apt.join("sources.list")];
    if let Ok(dir) = std::fs::read_dir(etc_apt.join("sources.list.d")) {
        let mut more: Vec<_> = dir
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| uris_in(&text))
        .collect()
}

/// The URIs in one apt sources file, in either format.
pub fn uris_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("URIs:") {
            out.extend(rest.split_whitespace().map(str::to_owned));
        } else if let Some(rest) = line
            .strip_prefix("deb-src ")
            .or_else(|| line.strip_prefix("deb "))
        {
            let rest = rest.trim_start();
            // Options in brackets come before the URI: `deb [signed-by=...] URI suite ...`.
            let rest = match rest.strip_prefix('[') {
                Some(r) => r.split_once(']').map_or("", |(_, after)| after),
                None => rest,
            };
            out.extend(rest.split_whitespace().next().map(str::to_owned));
        }
    }
    out
}

/// The Debian archive among apt's sources: the first URI whose path is `/debian`.
pub fn debian_mirror(etc_apt: &Path) -> Option<String> {
    apt_uris(etc_apt)
        .into_iter()
        .find(|u| u.trim_end_matches('/').ends_with("/debian"))
        .map(|u| u.trim_end_matches('/').to_owned())
}

/// The host of a URL (`scheme://host[:port]/...`), lower-cased.
pub fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = host.split(':').next()?.trim();
    (!host.is_empty() && host.contains('.')).then(|| host.to_ascii_lowercase())
}

/// Every registry or mirror host this machine is configured with: apt's sources, npm's registry
/// and pip's index settings (where those tools exist).
pub fn configured_hosts() -> Vec<String> {
    let mut urls = apt_uris(Path::new("/etc/apt"));
    if let Ok(out) = Command::new("npm")
        .args(["config", "get", "registry"])
        .output()
    {
        urls.extend(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_owned),
        );
    }
    if let Ok(out) = Command::new("python3")
        .args(["-m", "pip", "config", "list"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((key, value)) = line.split_once('=') {
                if key.contains("index-url") || key.contains("extra-index-url") {
                    urls.extend(
                        value
                            .trim_matches(|c| c == '\'' || c == '"')
                            .split_whitespace()
                            .map(str::to_owned),
                    );
                }
            }
        }
    }
    for var in ["PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"] {
        if let Ok(v) = std::env::var(var) {
            urls.extend(v.split_whitespace().map(str::to_owned));
        }
    }
    let mut hosts: Vec<String> = urls.iter().filter_map(|u| host_of(u)).collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_source_formats_give_their_uris() {
        let one_line = "# deb http://commented.example/debian x main\n\
                        deb [signed-by=/k.gpg arch=amd64] http://a.example/debian bookworm main\n\
                        deb-src http://b.example/debian bookworm main\n";
        assert_eq!(
            uris_in(one_line),
            ["http://a.example/debian", "http://b.example/debian"]
        );
        let deb822 = "Types: deb\nURIs: http://c.example/debian http://d.example/x\nSuites: s\n";
        assert_eq!(
            uris_in(deb822),
            ["http://c.example/debian", "http://d.example/x"]
        );
    }

    #[test]
    fn hosts_lose_scheme_credentials_port_and_path() {
        assert_eq!(
            host_of("https://u:p@Mirror.Example:8443/debian/"),
            Some("mirror.example".to_owned())
        );
        assert_eq!(host_of("/opt/wheels"), None);
    }
}
