//! The source RPM as a distribution packager meets it: its spec states the licences and the
//! bundled crates that cargo's resolver says the binary links (`cargo tree`, not xtask's own
//! reading of `cargo metadata`), its scriptlets go through the `%systemd_*` macros where the
//! build host defines them, rpmlint with only the Fedora profile's filters finds no error, and
//! `rpmbuild --rebuild` builds it with no network and an empty cargo home into a binary RPM
//! with the same files, modes and owners as the one `cargo xtask rpm` builds.
//!
//! The rebuild is one full release build (the spec's `cargo build --release`, its target dir
//! inside rpmbuild's build dir): minutes on a CI machine.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use nodeward_tests::{
    is_root,
    rpm::{
        bundled_ground_truth, file_entries, have_tools, newest_glibc, rpm_query, rpmlint, temp_dir,
        text, xtask, ANOLIS_23_GLIBC, WORKSPACE,
    },
    skip,
};

/// The source RPM, built once for all the tests of this file (they run in parallel and xtask
/// writes it under target/rpm); `None` after a skip.
fn srpm(test: &str) -> Option<PathBuf> {
    static SRPM: OnceLock<Option<PathBuf>> = OnceLock::new();
    if !have_tools(
        test,
        &[
            ("rpmbuild", "rpm"),
            ("rpmspec", "rpm"),
            ("rpm2cpio", "rpm"),
            ("cpio", "cpio"),
            ("rpmlint", "rpmlint"),
            ("rustup", "rustup (the nightly's rust-src is vendored too)"),
        ],
    ) {
        return None;
    }
    // Into target/rpm, where each run replaces the last.
    SRPM.get_or_init(|| xtask(test, &["srpm"])).clone()
}

/// The spec inside the source RPM, extracted into `dir`.
fn spec_of(srpm: &Path, dir: &Path) -> PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg("rpm2cpio \"$1\" | cpio -i --quiet nodeward.spec")
        .arg("sh")
        .arg(srpm)
        .current_dir(dir)
        .output()
        .expect("run rpm2cpio | cpio");
    assert!(out.status.success(), "extract the spec: {}", text(&out));
    dir.join("nodeward.spec")
}

fn rpmspec(spec: &Path, args: &[&str]) -> String {
    let out = Command::new("rpmspec")
        .args(args)
        .arg(spec)
        .output()
        .expect("run rpmspec");
    assert!(out.status.success(), "rpmspec {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A licence as a set of `AND`-ed terms, each a sorted choice: `A OR B` and `B OR A` are one
/// term, `MIT/Apache-2.0` (cargo's old spelling) is `Apache-2.0 OR MIT`. Parentheses around a
/// whole term are dropped; a term with inner parentheses stays as written.
fn license_terms(license: &str) -> BTreeSet<String> {
    let license = license.replace(" / ", " OR ").replace('/', " OR ");
    // Split on AND at parenthesis depth 0.
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    let bytes = license.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'(' => depth += 1,
            b')' => depth -= 1,
            b' ' if depth == 0 && license[i..].starts_with(" AND ") => {
                terms.push(&license[start..i]);
                start = i + 5;
                i += 4;
            }
            _ => {}
        }
        i += 1;
    }
    terms.push(&license[start..]);
    terms
        .into_iter()
        .map(|t| {
            let t = t.trim();
            let inner = t
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .filter(|s| !s.contains('('))
                .unwrap_or(t);
            if inner.contains('(') {
                return inner.to_owned();
            }
            let mut choices: Vec<&str> = inner.split(" OR ").map(str::trim).collect();
            choices.sort_unstable();
            choices.dedup();
            choices.join(" OR ")
        })
        .collect()
}

/// The workspace's own licence (`license` of `[workspace.package]`).
fn own_license() -> String {
    let manifest =
        std::fs::read_to_string(Path::new(WORKSPACE).join("Cargo.toml")).expect("Cargo.toml");
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("license = "))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .expect("the workspace states its licence")
}

/// `bundled(crate(NAME)) = VERSION` lines as (name, version).
fn bundled_provides(provides: &str) -> BTreeSet<(String, String)> {
    provides
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("bundled(crate(")?;
            let (name, version) = rest.split_once(")) = ")?;
            Some((name.to_owned(), version.trim().to_owned()))
        })
        .collect()
}

/// The bundled crates and the licence terms that cargo's resolver gives.
fn expected() -> (BTreeSet<(String, String)>, BTreeSet<String>) {
    let truth = bundled_ground_truth();
    let crates = truth
        .iter()
        .map(|(n, v, _)| (n.clone(), v.clone()))
        .collect();
    let mut terms = license_terms(&own_license());
    for (_, _, license) in &truth {
        terms.extend(license_terms(license));
    }
    (crates, terms)
}

#[test]
fn the_spec_states_the_licences_and_the_bundled_crates_cargo_resolves() {
    const TEST: &str = "srpm_spec_matches_cargo";
    let Some(srpm) = srpm(TEST) else { return };
    let dir = temp_dir(TEST);
    let spec = spec_of(&srpm, &dir);
    let (crates, terms) = expected();
    assert!(
        crates.iter().any(|(n, _)| n == "tokio") && crates.iter().any(|(n, _)| n == "aya-ebpf"),
        "the ground truth holds the agent's and the eBPF programs' crates: {crates:?}"
    );

    let provided = bundled_provides(&rpmspec(&spec, &["-q", "--provides"]));
    let missing: Vec<_> = crates.difference(&provided).collect();
    let extra: Vec<_> = provided.difference(&crates).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "bundled() Provides differ from cargo tree: missing {missing:?}, not linked {extra:?}"
    );

    let license = rpmspec(&spec, &["-q", "--qf", "%{LICENSE}\n"]);
    let license = license.lines().next().unwrap_or_default();
    assert_eq!(
        license,
        rpm_query(&srpm, &["--qf", "%{LICENSE}"]),
        "the source RPM's header and its spec state one licence"
    );
    let stated = license_terms(license);
    assert_eq!(
        stated, terms,
        "License: {license}\nstates other terms than the crates' licences"
    );

    let (report, clean) = rpmlint(&srpm);
    assert!(clean, "rpmlint on the source RPM:\n{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_scriptlets_use_the_systemd_macros_where_the_build_host_has_them() {
    const TEST: &str = "srpm_systemd_macros";
    let Some(srpm) = srpm(TEST) else { return };
    let dir = temp_dir(TEST);
    let spec = spec_of(&srpm, &dir);
    let section = |parsed: &str, name: &str| -> String {
        parsed
            .split(&format!("\n{name}\n"))
            .nth(1)
            .and_then(|rest| rest.split("\n%").next())
            .unwrap_or_default()
            .to_owned()
    };
    // Stand-ins for systemd-rpm-macros' definitions: each says which macro ran.
    let with_macros = rpmspec(
        &spec,
        &[
            "-P",
            "--define",
            "systemd_post() MACRO-POST %*",
            "--define",
            "systemd_preun() MACRO-PREUN %*",
            "--define",
            "systemd_postun_with_restart() MACRO-POSTUN %*",
        ],
    );
    let without = rpmspec(
        &spec,
        &[
            "-P",
            "--undefine",
            "systemd_post",
            "--undefine",
            "systemd_preun",
            "--undefine",
            "systemd_postun_with_restart",
        ],
    );
    for (name, mac, fallback) in [
        ("%post", "MACRO-POST", "install-system-units"),
        ("%preun", "MACRO-PREUN", "remove-system-units"),
        ("%postun", "MACRO-POSTUN", "mark-restart-system-units"),
    ] {
        let body = section(&with_macros, name);
        assert_eq!(
            body.trim(),
            format!("{mac} nodeward.service"),
            "{name} with the macros defined"
        );
        let body = section(&without, name);
        assert!(
            body.contains(fallback) && !body.contains("MACRO"),
            "{name} without the macros:\n{body}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `unshare -n` gives the command a network namespace of its own: only a loopback, down.
fn no_network_works(test: &str) -> bool {
    let out = Command::new("unshare")
        .args(["-n", "cat", "/proc/net/dev"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let devices: Vec<String> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .skip(2)
                .filter_map(|l| Some(l.split(':').next()?.trim().to_owned()))
                .collect();
            assert_eq!(devices, ["lo"], "unshare -n left network devices");
            true
        }
        other => {
            skip(test, &format!("unshare -n does not work here: {other:?}"));
            false
        }
    }
}

#[test]
fn the_srpm_rebuilds_offline_into_the_rpm_xtask_builds() {
    const TEST: &str = "srpm_rebuild_offline";
    if !is_root() {
        return skip(TEST, "needs root for a network namespace (unshare -n)");
    }
    if !have_tools(TEST, &[("unshare", "util-linux"), ("strip", "binutils")]) {
        return;
    }
    if !no_network_works(TEST) {
        return;
    }
    let Some(srpm) = srpm(TEST) else { return };
    let dir = temp_dir(TEST);
    let topdir = dir.join("rpmbuild");
    let cargo_home = dir.join("cargo-home");
    std::fs::create_dir_all(&cargo_home).expect("create the empty cargo home");
    // A build root's environment: the toolchains on PATH (rustup's proxies, bpf-linker), an
    // empty cargo home, nothing else of this machine's or the test harness's.
    let mut rebuild = Command::new("unshare");
    rebuild
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .env("CARGO_HOME", &cargo_home);
    if let Some(rustup_home) = std::env::var_os("RUSTUP_HOME") {
        rebuild.env("RUSTUP_HOME", rustup_home);
    }
    let out = rebuild
        .args(["-n", "rpmbuild", "--rebuild", "--nodeps", "--define"])
        .arg(format!("_topdir {}", topdir.display()))
        .arg(&srpm)
        .current_dir(&dir)
        .output()
        .expect("run rpmbuild --rebuild");
    let log = text(&out);
    assert!(
        out.status.success(),
        "rpmbuild --rebuild without network failed:\n{}",
        &log[log.len().saturating_sub(8000)..]
    );
    let arch = std::env::consts::ARCH;
    let rebuilt = std::fs::read_dir(topdir.join("RPMS").join(arch))
        .expect("rpmbuild wrote RPMS/<arch>")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with("nodeward-0") && name.ends_with(".rpm")
        })
        .expect("the rebuilt nodeward RPM");
    // Cargo creates registry/CACHEDIR.TAG whatever the source; an index, a crate archive or an
    // unpacked crate would be something fetched.
    let fetched: Vec<PathBuf> = ["registry", "git"]
        .iter()
        .filter_map(|d| std::fs::read_dir(cargo_home.join(d)).ok())
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| !p.ends_with("CACHEDIR.TAG"))
        .collect();
    assert!(
        fetched.is_empty(),
        "the build put crates in its cargo home instead of using the vendored ones: {fetched:?}"
    );

    let xtask_rpm = dir.join("xtask");
    let Some(built) = xtask(
        TEST,
        &[
            "rpm",
            "--reuse-debug",
            "--out",
            &xtask_rpm.display().to_string(),
        ],
    ) else {
        return;
    };
    let (ours, theirs) = (file_entries(&rebuilt), file_entries(&built));
    assert!(
        ours.iter().any(|f| f.0 == "/usr/bin/nodeward"),
        "the rebuilt RPM holds the agent: {ours:#?}"
    );
    assert_eq!(
        ours, theirs,
        "the rebuilt RPM and `cargo xtask rpm`'s differ in files, modes, owners or %config"
    );

    for package in [&rebuilt, &built] {
        let (report, clean) = rpmlint(package);
        assert!(clean, "rpmlint on {}:\n{report}", package.display());
        let requires = rpm_query(package, &["-R"]);
        assert!(newest_glibc(&requires) <= ANOLIS_23_GLIBC, "{requires}");
        assert!(requires.lines().any(|l| l == "systemd"), "{requires}");
    }
    let (crates, terms) = expected();
    assert_eq!(
        bundled_provides(&rpm_query(&rebuilt, &["--provides"])),
        crates,
        "the rebuilt RPM's bundled() Provides"
    );
    assert_eq!(
        license_terms(&rpm_query(&rebuilt, &["--qf", "%{LICENSE}"])),
        terms,
        "the rebuilt RPM's License"
    );
    // The rebuilt agent runs (rpmbuild's %check ran it too).
    let root = dir.join("root");
    let out = Command::new("sh")
        .arg("-c")
        .arg("rpm2cpio \"$1\" | cpio -idm --quiet")
        .arg("sh")
        .arg(&rebuilt)
        .current_dir({
            std::fs::create_dir_all(&root).expect("create root");
            &root
        })
        .output()
        .expect("extract the rebuilt RPM");
    assert!(out.status.success(), "{}", text(&out));
    let version = Command::new(root.join("usr/bin/nodeward"))
        .arg("--version")
        .output()
        .expect("run the rebuilt agent");
    assert!(
        version.status.success() && text(&version).starts_with("nodeward "),
        "{}",
        text(&version)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn license_terms_are_compared_as_sets_of_choices() {
    let t = |s: &str| license_terms(s).into_iter().collect::<Vec<_>>();
    assert_eq!(t("MIT/Apache-2.0"), ["Apache-2.0 OR MIT"]);
    assert_eq!(
        t("(Apache-2.0 OR MIT) AND Zlib AND (MIT OR Unlicense)"),
        ["Apache-2.0 OR MIT", "MIT OR Unlicense", "Zlib"]
    );
    assert_eq!(t("MIT AND BSD-3-Clause"), ["BSD-3-Clause", "MIT"]);
    assert_ne!(t("MIT AND Zlib"), t("MIT OR Zlib"));
}
