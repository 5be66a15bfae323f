//! The host packaging as an administrator meets it, judged by the distribution's own tools:
//! the systemd unit by `systemd-analyze verify` and `security`, its capability set by running
//! the agent with exactly those capabilities, and the RPM (built by `xtask rpm --reuse-debug`
//! from the debug binary and the spec, in seconds) by `rpm -qpl/--scripts/-qpR`, `rpmlint`,
//! and an install into a scratch root whose files must be where the unit and the docs say; and
//! the release binary (what the RPM and the image ship) by its `--help`, its parser and its
//! symbol table: it holds the product, no benchmark, fixture or fault-injection code.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use nodeward_tests::{
    agent_binary, cap_number, grantable_caps, is_root, rpm::temp_dir, send_signal, skip, text,
    tool, wait_for,
};
use rustix::process::Signal;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/nodeward.service");
const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The unit with ExecStart pointing at the built binary: `verify` checks that the command
/// exists, and /usr/bin/nodeward is not installed on a build machine.
fn unit_for_this_machine(dir: &Path) -> PathBuf {
    let unit = std::fs::read_to_string(UNIT).expect("read the unit");
    let path = dir.join("nodeward.service");
    let bin = agent_binary();
    std::fs::write(
        &path,
        unit.replace("/usr/bin/nodeward", &bin.display().to_string()),
    )
    .expect("write unit copy");
    path
}

/// The values of a directive, split on spaces, over every line that sets it.
fn directive(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

#[test]
fn systemd_analyze_verifies_the_unit_without_a_warning() {
    const TEST: &str = "unit_verify";
    let Some(analyze) = tool("systemd-analyze") else {
        skip(
            TEST,
            "systemd-analyze not installed (Debian package `systemd`)",
        );
        return;
    };
    let dir = temp_dir(TEST);
    let unit = unit_for_this_machine(&dir);
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze verify");
    // verify exits 0 on unknown keys and bad values ("ignoring"): any output is a finding.
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "systemd-analyze verify:\n{}",
        text(&out)
    );

    // systemd's own exposure score: a root service with no hardening scores 9.6 ("UNSAFE").
    let out = Command::new(&analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze security");
    let report = text(&out);
    let score: f64 = report
        .lines()
        .find_map(|l| l.split("exposure level for nodeward.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{report}"));
    assert!(score <= 6.0, "exposure {score} above 6.0:\n{report}");
    let _ = std::fs::remove_dir_all(&dir);

    let text = std::fs::read_to_string(UNIT).expect("read the unit");
    assert_eq!(directive(&text, "Type"), ["notify"]);
    assert!(!directive(&text, "WatchdogSec").is_empty(), "{text}");
    assert_eq!(directive(&text, "RuntimeDirectory"), ["nodeward"]);
    assert_eq!(directive(&text, "LimitMEMLOCK"), ["infinity"]);
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] {
        assert!(
            directive(&text, "CapabilityBoundingSet")
                .iter()
                .any(|c| c == cap),
            "{cap} missing from CapabilityBoundingSet"
        );
    }
}

#[test]
fn the_units_capabilities_are_enough_for_the_ebpf_sources() {
    const TEST: &str = "unit_capabilities";
    if !is_root() {
        skip(TEST, "needs root to drop to the unit's capabilities");
        return;
    }
    let Some(setpriv) = tool("setpriv") else {
        skip(TEST, "setpriv not installed (Debian package `util-linux`)");
        return;
    };
    let unit = std::fs::read_to_string(UNIT).expect("read the unit");
    let caps = directive(&unit, "CapabilityBoundingSet");
    assert!(
        caps.iter().all(|c| cap_number(c).is_some()),
        "the test does not know every capability the unit names: {caps:?}"
    );
    // A capability this sandbox lacks itself cannot be granted; say which, and go on without.
    let names: Vec<&str> = caps.iter().map(String::as_str).collect();
    let (list, missing) = grantable_caps(&names);
    if !missing.is_empty() {
        eprintln!("{TEST}: this machine cannot grant {missing:?}; testing without them");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let agent = Command::new(setpriv)
        .arg(format!("--inh-caps=-all,{list}"))
        .arg(format!("--bounding-set=-all,{list}"))
        .arg(agent_binary())
        .args(["run", "--set", "gpu.enabled=false"])
        .args(["--set", &format!("metrics.listen=127.0.0.1:{port}")])
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the agent under setpriv");
    let scrape = wait_for(Duration::from_secs(30), || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        use std::io::{Read as _, Write as _};
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.contains("nodeward_source_up").then_some(body)
    });
    send_signal(agent.id(), Signal::Term).expect("SIGTERM the agent");
    let out = agent.wait_with_output().expect("agent exits");
    let log = String::from_utf8_lossy(&out.stderr);
    let scrape = scrape.unwrap_or_else(|| panic!("no scrape; log:\n{log}"));
    for source in ["ebpf/tcp", "ebpf/udp"] {
        assert!(
            scrape.contains(&format!("nodeward_source_up{{source=\"{source}\"}} 1")),
            "{source} did not start with {list}:\n{scrape}\nlog:\n{log}"
        );
    }
    // bpf_prog_info of the agent's own programs needs no capability beyond holding them.
    let loaded = scrape
        .lines()
        .find_map(|l| l.strip_prefix("nodeward_ebpf_programs_loaded "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        loaded >= 2.0,
        "eBPF program info not read with {list}:\n{scrape}"
    );
    assert!(out.status.success(), "{}: {log}", out.status);
}

/// Builds the RPM from the debug binary; `None` (after a skip) when a tool is missing.
fn build_rpm(test: &str, out_dir: &Path) -> Option<PathBuf> {
    for (t, pkg) in [
        ("rpm", "rpm"),
        ("rpmbuild", "rpm"),
        ("rpmlint", "rpmlint"),
        ("strip", "binutils"),
    ] {
        if tool(t).is_none() {
            skip(test, &format!("{t} not installed (Debian package `{pkg}`)"));
            return None;
        }
    }
    // The xtask binary, not `cargo xtask`: cargo holds the build directory's lock while the
    // tests run, so a nested cargo build would wait for ever.
    let xtask = agent_binary().with_file_name("xtask");
    if !xtask.exists() {
        skip(
            test,
            "target/debug/xtask not built (cargo xtask test builds it)",
        );
        return None;
    }
    let out = Command::new(&xtask)
        .args(["rpm", "--reuse-debug", "--out"])
        .arg(out_dir)
        .current_dir(WORKSPACE)
        .output()
        .expect("run xtask rpm");
    assert!(out.status.success(), "xtask rpm failed:\n{}", text(&out));
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(PathBuf::from)
        .expect("xtask rpm prints the package path");
    assert!(path.exists(), "{} missing", path.display());
    Some(path)
}

fn rpm_query(rpm: &Path, args: &[&str]) -> String {
    let out = Command::new("rpm")
        .arg("-qp")
        .args(args)
        .arg(rpm)
        .output()
        .expect("run rpm -qp");
    assert!(out.status.success(), "rpm -qp {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Anolis OS 23 ships glibc 2.38: the binary may need no symbol version newer than that.
const ANOLIS_23_GLIBC: (u32, u32) = (2, 38);

#[test]
fn the_rpm_holds_the_agent_passes_rpmlint_and_installs_where_the_docs_say() {
    const TEST: &str = "rpm";
    let dir = temp_dir(TEST);
    let Some(rpm) = build_rpm(TEST, &dir.join("out")) else {
        return;
    };

    let files: Vec<String> = rpm_query(&rpm, &["-l"])
        .lines()
        .map(str::to_owned)
        .collect();
    for f in [
        "/usr/bin/nodeward",
        "/usr/bin/kubectl-nodeward",
        "/usr/lib/systemd/system/nodeward.service",
        "/etc/nodeward/nodeward.toml",
        "/usr/share/doc/nodeward/README.md",
        "/usr/share/doc/nodeward/packaging.md",
        "/usr/share/licenses/nodeward/LICENSE-MIT",
        "/usr/share/licenses/nodeward/LICENSE-APACHE",
    ] {
        assert!(
            files.iter().any(|l| l == f),
            "{f} not in the RPM: {files:?}"
        );
    }
    // %config(noreplace): rpm shows the flags as "c" (config) and "n" (noreplace).
    let flags = rpm_query(&rpm, &["--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]"]);
    assert!(
        flags.lines().any(|l| l == "/etc/nodeward/nodeward.toml cn"),
        "the config is not %config(noreplace):\n{flags}"
    );

    let scripts = rpm_query(&rpm, &["--scripts"]);
    for (section, must) in [
        (
            "postinstall scriptlet",
            "install-system-units nodeward.service",
        ),
        ("postinstall scriptlet", "preset nodeward.service"),
        (
            "preuninstall scriptlet",
            "remove-system-units nodeward.service",
        ),
        ("preuninstall scriptlet", "disable --now nodeward.service"),
        (
            "postuninstall scriptlet",
            "mark-restart-system-units nodeward.service",
        ),
        ("postuninstall scriptlet", "try-restart nodeward.service"),
    ] {
        let body = scripts
            .split(section)
            .nth(1)
            .and_then(|rest| rest.split(" scriptlet").next())
            .unwrap_or_default();
        assert!(body.contains(must), "{section} lacks `{must}`:\n{scripts}");
    }

    let requires = rpm_query(&rpm, &["-R"]);
    assert!(requires.lines().any(|l| l == "systemd"), "{requires}");
    let newest = requires
        .split("GLIBC_")
        .skip(1)
        .filter_map(|rest| {
            let v = rest.split(')').next()?;
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .max()
        .expect("the binary links glibc");
    assert!(
        newest <= ANOLIS_23_GLIBC,
        "needs GLIBC_{}.{}, newer than Anolis OS 23's:\n{requires}",
        newest.0,
        newest.1
    );

    let lint = Command::new("rpmlint")
        .arg("-c")
        .arg(Path::new(WORKSPACE).join("packaging/rpm/rpmlint.toml"))
        .arg(&rpm)
        .output()
        .expect("run rpmlint");
    let report = text(&lint);
    assert!(report.contains(" 0 errors,"), "rpmlint:\n{report}");

    install_and_check(&rpm, &dir.join("root"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Installs into a scratch root and checks the files against the unit, the docs and the agent
/// itself; then reinstalls over an edited config, which must survive.
fn install_and_check(rpm: &Path, root: &Path) {
    let install = |extra: &[&str]| {
        let out = Command::new("rpm")
            .args(extra)
            .arg("--root")
            .arg(root)
            .args(["--nodeps", "--noscripts"])
            .arg(rpm)
            .output()
            .expect("run rpm -i");
        assert!(out.status.success(), "rpm {extra:?}: {}", text(&out));
    };
    install(&["-i"]);
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/nodeward.service"))
        .expect("the unit is installed");
    let exec = directive(&unit, "ExecStart");
    let installed = |p: &str| root.join(p.trim_start_matches('/'));
    assert!(
        installed(&exec[0]).is_file(),
        "ExecStart {} missing",
        exec[0]
    );
    for doc in directive(&unit, "Documentation") {
        let path = doc.strip_prefix("file://").expect("file:// documentation");
        assert!(installed(path).is_file(), "Documentation {path} missing");
    }
    let config = installed(nodeward::config::DEFAULT_CONFIG_PATH);
    // The installed binary accepts the installed config.
    let check = Command::new(installed(&exec[0]))
        .arg("--config")
        .arg(&config)
        .args(["config", "check"])
        .output()
        .expect("run the installed nodeward");
    assert!(check.status.success(), "{}", text(&check));

    // An administrator's edit survives a reinstall/upgrade (noreplace).
    let edited = format!(
        "{}\n# edited by the administrator\n",
        std::fs::read_to_string(&config).expect("read installed config")
    );
    std::fs::write(&config, &edited).expect("edit config");
    install(&["-U", "--force"]);
    assert_eq!(
        std::fs::read_to_string(&config).expect("config after upgrade"),
        edited,
        "the upgrade replaced the administrator's config"
    );
}

/// Runs a scriptlet with `$1 = arg`, a logging `systemctl` first on PATH and, when `helper`
/// is true, a logging stand-in for systemd-update-helper; returns the commands it ran.
fn run_scriptlet(name: &str, arg: u32, helper: bool) -> Vec<String> {
    let script = std::fs::read_to_string(Path::new(WORKSPACE).join("packaging/rpm").join(name))
        .expect("read scriptlet");
    let dir = temp_dir(&format!("scriptlet-{name}-{arg}-{helper}"));
    let log = dir.join("log");
    let logger = format!(
        "#!/bin/sh\necho \"$(basename \"$0\") $*\" >> {}\n",
        log.display()
    );
    for tool in ["systemctl", "systemd-update-helper"] {
        let path = dir.join(tool);
        std::fs::write(&path, &logger).expect("write stand-in");
        let mut perms = std::fs::metadata(&path).expect("stat").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&path, perms).expect("chmod");
    }
    // The real helper's fixed path is swapped for ours, or for one that does not exist.
    let helper_path = if helper {
        dir.join("systemd-update-helper")
    } else {
        dir.join("absent")
    };
    let script = script.replace(
        "/usr/lib/systemd/systemd-update-helper",
        &helper_path.display().to_string(),
    );
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .args(["-c", &script, name, &arg.to_string()])
        .env("PATH", path)
        .output()
        .expect("run sh");
    assert!(out.status.success(), "{name} {arg}: {}", text(&out));
    let ran = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    ran
}

#[test]
fn the_scriptlets_do_what_the_systemd_macros_do_on_install_upgrade_and_removal() {
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<String>>();
    // rpm passes the number of package instances left after the operation:
    // install 1, upgrade 2 (post) / 1 (preun, postun of the old one), removal 0.
    let cases: [(&str, u32, bool, Vec<String>); 12] = [
        (
            "post_install.sh",
            1,
            true,
            s(&["systemd-update-helper install-system-units nodeward.service"]),
        ),
        (
            "post_install.sh",
            1,
            false,
            s(&["systemctl --no-reload preset nodeward.service"]),
        ),
        ("post_install.sh", 2, true, s(&[])),
        ("post_install.sh", 2, false, s(&[])),
        (
            "pre_uninstall.sh",
            0,
            true,
            s(&["systemd-update-helper remove-system-units nodeward.service"]),
        ),
        (
            "pre_uninstall.sh",
            0,
            false,
            s(&["systemctl --no-reload disable --now nodeward.service"]),
        ),
        ("pre_uninstall.sh", 1, true, s(&[])),
        ("pre_uninstall.sh", 1, false, s(&[])),
        (
            "post_uninstall.sh",
            1,
            true,
            s(&[
                "systemctl daemon-reload",
                "systemd-update-helper mark-restart-system-units nodeward.service",
            ]),
        ),
        (
            "post_uninstall.sh",
            1,
            false,
            s(&[
                "systemctl daemon-reload",
                "systemctl try-restart nodeward.service",
            ]),
        ),
        (
            "post_uninstall.sh",
            0,
            true,
            s(&["systemctl daemon-reload"]),
        ),
        (
            "post_uninstall.sh",
            0,
            false,
            s(&["systemctl daemon-reload"]),
        ),
    ];
    for (name, arg, helper, expected) in cases {
        assert_eq!(
            run_scriptlet(name, arg, helper),
            expected,
            "{name} with $1={arg}, update helper {}",
            if helper { "present" } else { "absent" }
        );
    }
}

/// The binary of the shipped configuration: `cargo build --release -p nodeward` (one package,
/// so no other package's features are unified in), which `cargo xtask test` builds before the
/// tests and `cargo xtask rpm` packages.
fn release_binary() -> PathBuf {
    let debug = agent_binary();
    let bin = debug
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/nodeward")
        .join("release/nodeward");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --release -p nodeward, or cargo xtask test)",
        bin.display()
    );
    bin
}

/// Demangled names of the functions and data the binary defines (`nm -C --defined-only`).
fn defined_symbols(bin: &Path) -> Vec<String> {
    let out = Command::new("nm")
        .args(["-C", "--defined-only"])
        .arg(bin)
        .output()
        .expect("run nm (binutils)");
    assert!(out.status.success(), "nm failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.splitn(3, ' ').nth(2))
        .map(str::to_owned)
        .collect()
}

/// The names of the defined symbols that belong to `modules` of the agent's library.
fn symbols_of(symbols: &[String], modules: &[&str]) -> Vec<String> {
    symbols
        .iter()
        .filter(|s| {
            modules
                .iter()
                .any(|m| s.contains(&format!("nodeward::{m}::")))
        })
        .cloned()
        .collect()
}

/// The symbol table of the release binary, checked to be one that names the agent's modules
/// (so that an empty search below means absent code, not a stripped binary).
fn release_symbols() -> (PathBuf, Vec<String>) {
    let bin = release_binary();
    let symbols = defined_symbols(&bin);
    assert!(
        !symbols_of(&symbols, &["daemon"]).is_empty(),
        "the symbol table names the agent's own modules ({} symbols): stripped?",
        symbols.len()
    );
    (bin, symbols)
}

/// The shipped binary answers to no benchmark or fault-injection command, hidden or not, and
/// links none of the benchmark code nor the tests' fake cgroupfs: its `--help`, clap's answer
/// to each former hidden subcommand and its symbol table are checked. Each check is paired with
/// one that shows it can see what it looks for (a hidden command that does exist is recognised
/// by name; the daemon's own modules are in the symbol table).
#[test]
fn the_release_binary_has_no_bench_command_nor_bench_or_fixture_code() {
    const TEST: &str = "the_release_binary_has_no_bench_command_nor_bench_or_fixture_code";
    if tool("nm").is_none() {
        return skip(TEST, "nm (binutils) is not installed");
    }
    let (bin, symbols) = release_symbols();
    let run = |args: &[&str]| {
        Command::new(&bin)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run the release binary")
    };

    let help = run(&["--help"]);
    assert!(help.status.success(), "--help: {}", text(&help));
    let help = text(&help);
    assert!(
        help.contains("status"),
        "--help lists the commands:\n{help}"
    );
    // Word by word: "default" is no fault.
    let lower = help.to_lowercase();
    let words: Vec<&str> = lower.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    for word in ["bench", "fault", "fixture", "inject"] {
        assert!(
            !words.iter().any(|w| w.starts_with(word)),
            "--help mentions {word:?}:\n{help}"
        );
    }

    // Hidden subcommands do not show in --help: ask the parser for each one by name.
    let hidden = run(&["gpu-check", "--help"]);
    assert!(
        hidden.status.success(),
        "the hidden gpu-check is recognised by name: {}",
        text(&hidden)
    );
    for sub in [
        "bench-scan",
        "bench-api",
        "bench-watch",
        "bench-rr",
        "bench-load-api",
        "fault-inject",
    ] {
        let out = run(&[sub]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "nodeward {sub}: {said}");
        assert!(
            said.contains(&format!("unrecognized subcommand '{sub}'")),
            "nodeward {sub}: {said}"
        );
    }

    let test_code = symbols_of(&symbols, &["bench", "containers::fixture"]);
    assert!(
        test_code.is_empty(),
        "the release binary links bench or fixture code: {test_code:#?}"
    );
}

/// The fault injection of the tests (`agent/src/fault.rs`, the `fault-injection` feature) is
/// not in the shipped binary: none of its code is linked, and the name of the environment
/// variable that arms it is nowhere in the file, so no build of the product can read it.
#[test]
fn the_release_binary_has_no_fault_injection_code() {
    const TEST: &str = "the_release_binary_has_no_fault_injection_code";
    if tool("nm").is_none() {
        return skip(TEST, "nm (binutils) is not installed");
    }
    let (bin, symbols) = release_symbols();
    let fault = symbols_of(&symbols, &["fault"]);
    assert!(
        fault.is_empty(),
        "the release binary links fault-injection code ({} symbols): {:#?}",
        fault.len(),
        &fault[..fault.len().min(5)]
    );
    let bytes = std::fs::read(&bin).expect("read the release binary");
    let armed = b"NODEWARD_FAULT_INJECT";
    assert!(
        !bytes.windows(armed.len()).any(|w| w == armed),
        "the release binary contains the fault-injection variable's name"
    );
}
