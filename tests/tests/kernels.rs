//! Kernel compatibility: `nodeward probe --verify` on this host and inside QEMU on Debian's
//! packaged kernels (bullseye 5.10, bookworm 6.1), each booted with an initramfs that holds
//! busybox, the agent binary and its shared libraries.
//!
//! `--verify` loads every eBPF program of the agent on its own (the verifier's verdict), attaches
//! the hook paths the start-up probe chooses plus every TCP fallback the kernel supports, makes
//! loopback TCP and RTP traffic from a child cgroup, and compares what the kernel maps counted
//! with what it sent. The kernel packages come through apt from the Debian mirror this machine's
//! own apt sources name (signatures checked against Debian's archive keyring) and are cached
//! under `target/kernels/`.
//!
//! Skips, with the reason, where QEMU, busybox or cpio is missing, where apt names no Debian
//! mirror, or where the mirror cannot be reached. KVM is used where it works; otherwise TCG (about 20–60 s a boot).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nodeward_tests::{agent_binary, require_root, skip};
use serde_json::Value;

/// The Debian modules the guest loads (built as modules in Debian's kernels), by their directory
/// under `kernel/`: the sock_diag fallback's, and netem for the RTT accuracy run.
const MODULES: &[(&str, &str)] = &[
    ("net/ipv4", "inet_diag"),
    ("net/ipv4", "tcp_diag"),
    ("net/sched", "sch_netem"),
];
/// The delay netem puts on every packet of `lo` in the accuracy run, each way: the RTT the
/// guest's exchanges see is twice this, ± twice the jitter.
const NETEM: &str = "delay 10ms 2500us";
/// How long one boot may take under TCG (a KVM boot takes seconds).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// A KVM guest that printed nothing by then is stuck (nested virtualisation that does not work).
const KVM_FIRST_OUTPUT: Duration = Duration::from_secs(20);

fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/kernels")
        .components()
        .collect()
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(cmd))
            .find(|p| p.is_file())
    })
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the host needs, or why it cannot run the test.
fn tools() -> Result<(), String> {
    if std::env::consts::ARCH != "x86_64" {
        return Err(format!(
            "the guests are Debian amd64 kernels and the agent binary here is {}",
            std::env::consts::ARCH
        ));
    }
    for tool in [
        "qemu-system-x86_64",
        "busybox",
        "cpio",
        "apt-get",
        "dpkg-deb",
        "ldd",
        "tc",
    ] {
        if which(tool).is_none() {
            return Err(format!(
                "`{tool}` is not installed (cargo xtask setup installs qemu-system-x86, busybox-static, cpio)"
            ));
        }
    }
    Ok(())
}

/// A Debian kernel unpacked: its image and the modules the fallbacks need.
struct Kernel {
    release: String,
    vmlinuz: PathBuf,
    modules: Vec<PathBuf>,
}

/// Downloads (once) and unpacks the kernel that `linux-image-amd64` points at in `suite`.
/// apt checks the suite's InRelease signature with Debian's archive keyring and the package's
/// hash against the signed index.
fn debian_kernel(suite: &str) -> Result<Kernel, String> {
    let dir = kernels_dir().join(suite);
    let apt = dir.join("apt");
    std::fs::create_dir_all(apt.join("lists/partial")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(apt.join("cache/archives/partial")).map_err(|e| e.to_string())?;
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    if !Path::new(keyring).exists() {
        return Err(format!(
            "{keyring} missing (package debian-archive-keyring)"
        ));
    }
    let mirror = nodeward_tests::mirrors::debian_mirror(Path::new("/etc/apt"))
        .ok_or("this machine's apt sources name no Debian archive (a URI ending in /debian)")?;
    let sources = apt.join("sources.list");
    std::fs::write(
        &sources,
        format!("deb [signed-by={keyring}] {mirror} {suite} main\n"),
    )
    .map_err(|e| e.to_string())?;
    let opts = |cmd: &mut Command| {
        for (k, v) in [
            ("Dir::Etc::SourceList", sources.display().to_string()),
            ("Dir::Etc::SourceParts", "/dev/null".to_owned()),
            ("Dir::State::Lists", apt.join("lists").display().to_string()),
            ("Dir::Cache", apt.join("cache").display().to_string()),
            ("APT::Architecture", "amd64".to_owned()),
            // Only the package index: no translations or AppStream metadata.
            (
                "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled",
                "false".to_owned(),
            ),
            ("Acquire::Languages", "none".to_owned()),
            ("Debug::NoLocking", "1".to_owned()),
        ] {
            cmd.arg("-o").arg(format!("{k}={v}"));
        }
    };
    let resolve = || -> Result<String, String> {
        let mut cmd = Command::new("apt-cache");
        opts(&mut cmd);
        let show = run(cmd.args(["show", "linux-image-amd64"]))?;
        show.lines()
            .find_map(|l| l.strip_prefix("Depends: "))
            .and_then(|d| d.split([' ', ',']).find(|p| p.starts_with("linux-image-")))
            .map(str::to_owned)
            .ok_or_else(|| format!("no linux-image dependency in:\n{show}"))
    };
    // The index is fetched once; a cached one that no longer resolves is refreshed.
    let package = match resolve() {
        Ok(p) => p,
        Err(_) => {
            let mut cmd = Command::new("apt-get");
            opts(&mut cmd);
            run(cmd.args(["-q", "update"]))?;
            resolve()?
        }
    };
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_owned();
    // Only the image and the modules the test loads are kept (the package unpacks to ~350 MB).
    let kept = dir.join(&release);
    let vmlinuz = kept.join("vmlinuz");
    let module = |m: &str| kept.join(format!("{m}.ko"));
    // A cache from before netem was loaded lacks its module: fetched again once.
    if !vmlinuz.exists() || !module("sch_netem").exists() {
        let debs = dir.join("debs");
        std::fs::create_dir_all(&debs).map_err(|e| e.to_string())?;
        let mut cmd = Command::new("apt-get");
        opts(&mut cmd);
        run(cmd.current_dir(&debs).args(["-q", "download", &package]))?;
        let deb = std::fs::read_dir(&debs)
            .map_err(|e| e.to_string())?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")))
            })
            .ok_or_else(|| format!("apt-get download left no {package} .deb"))?;
        let unpacked = dir.join("unpacked");
        let _ = std::fs::remove_dir_all(&unpacked);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
        std::fs::create_dir_all(&kept).map_err(|e| e.to_string())?;
        let modules = unpacked.join(format!("lib/modules/{release}/kernel"));
        for (dir, m) in MODULES {
            // Absent (built in, or compressed) is fine: the check that needs it then says so.
            let _ = std::fs::copy(modules.join(dir).join(format!("{m}.ko")), module(m));
        }
        std::fs::copy(unpacked.join(format!("boot/vmlinuz-{release}")), &vmlinuz)
            .map_err(|e| format!("vmlinuz: {e}"))?;
        let _ = std::fs::remove_dir_all(&unpacked);
        let _ = std::fs::remove_file(&deb);
    }
    let modules = MODULES
        .iter()
        .map(|(_, m)| module(m))
        .filter(|p| p.exists())
        .collect();
    Ok(Kernel {
        release,
        vmlinuz,
        modules,
    })
}

/// The shared libraries `ldd` lists for `bin`, with the dynamic loader.
fn libraries(bin: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn copy_into(root: &Path, file: &Path) -> Result<(), String> {
    let to = root.join(file.strip_prefix("/").unwrap_or(file));
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    std::fs::copy(file, &to)
        .map(|_| ())
        .map_err(|e| format!("copy {}: {e}", file.display()))
}

/// The guest's /init: mount what the agent expects, load the sock_diag modules, run the
/// check, write its JSON and exit status to the second serial port, power off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
mount -t cgroup2 none /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing || mount -t debugfs debugfs /sys/kernel/debug
ip link set lo up
for m in /modules/*.ko; do [ -e "$m" ] && insmod "$m"; done
echo "nodeward-init: running probe --verify"
/bin/nodeward probe --verify --json > /tmp/verify.json 2> /tmp/verify.err
rc=$?
{ cat /tmp/verify.json; echo "NODEWARD-VERIFY-RC=$rc"; echo "NODEWARD-STDERR:"; tail -20 /tmp/verify.err; } > /dev/ttyS1
# Again with netem delaying every packet on lo: the agent's RTT figures against the exchanges as
# the client timed them.
echo "nodeward-init: running probe --verify with netem on lo"
echo > /tmp/verify.json
if /usr/sbin/tc qdisc add dev lo root netem @NETEM@ > /tmp/tc.out 2>&1; then
  /bin/nodeward probe --verify --json > /tmp/verify.json 2> /tmp/verify.err
  rc=$?
  /usr/sbin/tc qdisc del dev lo root
else
  rc=netem
fi
{ echo "NODEWARD-NETEM-BEGIN"; cat /tmp/verify.json; echo "NODEWARD-VERIFY-RC=$rc"; echo "NODEWARD-TC:"; cat /tmp/tc.out; echo "NODEWARD-STDERR:"; tail -20 /tmp/verify.err; } > /dev/ttyS1
# The same on cgroup v1 only (Anolis 8's default): no cgroup2 mounted anywhere.
umount /sys/fs/cgroup
mount -t tmpfs cgroup /sys/fs/cgroup
for c in cpu memory; do mkdir /sys/fs/cgroup/$c; mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c; done
echo "nodeward-init: running probe --verify on cgroup v1"
/bin/nodeward probe --verify --json > /tmp/verify.json 2> /tmp/verify.err
rc=$?
{ echo "NODEWARD-V1-BEGIN"; cat /tmp/verify.json; echo "NODEWARD-VERIFY-RC=$rc"; echo "NODEWARD-STDERR:"; tail -20 /tmp/verify.err; } > /dev/ttyS1
sync
poweroff -f
"#;

/// Builds `<dir>/initramfs.cpio.gz` holding busybox, the agent (debug info stripped), their
/// libraries, the modules and /init.
fn initramfs(dir: &Path, kernel: &Kernel) -> Result<PathBuf, String> {
    let root = dir.join("root");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "proc", "sys", "dev", "tmp", "run", "modules", "etc"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    let busybox = which("busybox").ok_or("no busybox")?;
    std::fs::copy(&busybox, root.join("bin/busybox")).map_err(|e| e.to_string())?;
    let agent = agent_binary();
    let stripped = root.join("bin/nodeward");
    if run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&agent)
        .arg(&stripped))
    .is_err()
    {
        std::fs::copy(&agent, &stripped).map_err(|e| e.to_string())?;
    }
    let tc = which("tc").ok_or("no tc")?;
    // Not in /bin, where busybox installs its own applets.
    std::fs::create_dir_all(root.join("usr/sbin")).map_err(|e| e.to_string())?;
    std::fs::copy(&tc, root.join("usr/sbin/tc")).map_err(|e| e.to_string())?;
    for bin in [&busybox, &agent, &tc] {
        for lib in libraries(bin)? {
            copy_into(&root, &lib)?;
        }
    }
    for m in &kernel.modules {
        std::fs::copy(
            m,
            root.join("modules").join(m.file_name().unwrap_or_default()),
        )
        .map_err(|e| e.to_string())?;
    }
    let init = root.join("init");
    std::fs::write(&init, INIT.replace("@NETEM@", NETEM)).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    let out = dir.join("initramfs.cpio.gz");
    run(Command::new("sh")
        .arg("-c")
        .arg("cd \"$1\" && find . | cpio -o -H newc --quiet | gzip -1 > \"$2\"")
        .arg("sh")
        .arg(&root)
        .arg(&out))?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Accel {
    Kvm,
    Tcg,
}

/// Boots `kernel` with `initrd`; returns the console log and what /init wrote to ttyS1, or
/// `None` when a KVM guest never started (the caller retries with TCG).
fn boot(
    dir: &Path,
    kernel: &Kernel,
    initrd: &Path,
    accel: Accel,
) -> Result<Option<(String, String)>, String> {
    let console = dir.join(format!("console-{accel:?}.log"));
    let result = dir.join(format!("result-{accel:?}.log"));
    let _ = std::fs::remove_file(&console);
    let _ = std::fs::remove_file(&result);
    let mut cmd = Command::new("qemu-system-x86_64");
    match accel {
        Accel::Kvm => cmd.args(["-enable-kvm", "-cpu", "host"]),
        Accel::Tcg => cmd.args(["-accel", "tcg"]),
    };
    cmd.args(["-m", "768", "-smp", "1", "-nodefaults", "-display", "none"])
        .args(["-no-reboot", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", result.display()))
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // no_timer_check: on a busy host a TCG guest's timer can look broken to the IO-APIC
        // check, which then panics the kernel before init.
        .args([
            "-append",
            "console=ttyS0 panic=-1 loglevel=4 no_timer_check",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("qemu: {e}"))?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(status);
        }
        let printed = std::fs::metadata(&console).is_ok_and(|m| m.len() > 0);
        if accel == Accel::Kvm && !printed && start.elapsed() > KVM_FIRST_OUTPUT {
            break None;
        }
        if start.elapsed() > BOOT_TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        if accel == Accel::Kvm && read(&console).is_empty() {
            eprintln!("KVM guest printed nothing in {KVM_FIRST_OUTPUT:?}; retrying with TCG");
            return Ok(None);
        }
        return Err(format!(
            "{} did not power off within {BOOT_TIMEOUT:?}; console:\n{}",
            kernel.release,
            tail(&read(&console), 40)
        ));
    };
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        if accel == Accel::Kvm {
            eprintln!(
                "KVM refused ({status}): {}; retrying with TCG",
                stderr.trim()
            );
            return Ok(None);
        }
        return Err(format!("qemu exited {status}: {stderr}"));
    }
    Ok(Some((read(&console), read(&result))))
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Parses what `--verify --json` printed and checks it: exit 0, the chosen paths and every
/// supported fallback passed, every program loaded. Returns the chosen TCP path.
fn check_report(what: &str, json: &str, rc: Option<i32>, log: &str) -> String {
    let report: Value = json
        .lines()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("{what}: no JSON report; output:\n{}", tail(log, 60)));
    let programs = report["programs"].as_array().expect("programs");
    let paths = report["paths"].as_array().expect("paths");
    eprintln!("{what}: kernel {}", report["kernel"]);
    for p in programs {
        eprintln!(
            "  program {} ({}): loaded {}, {} insns, {} verified",
            p["name"], p["kind"], p["loaded"], p["xlated_insns"], p["verified_insns"]
        );
    }
    for p in paths {
        eprintln!(
            "  {} {} {}: generated {}, observed {} ({})",
            p["role"], p["source"], p["path"], p["generated"], p["observed"], p["rule"]
        );
    }
    eprintln!("  not available: {}", report["unavailable"]);
    // sock_ops, sock_create, sock_tag_egress, udp ingress and egress.
    assert!(programs.len() >= 5, "{what}: {} programs", programs.len());
    for p in programs {
        assert_eq!(
            p["loaded"],
            Value::Bool(true),
            "{what}: the verifier rejected {}: {}",
            p["name"],
            p["error"]
        );
    }
    for p in paths {
        assert_eq!(
            p["passed"],
            Value::Bool(true),
            "{what}: {} {} {}: generated {} observed {} ({}), error {}",
            p["role"],
            p["source"],
            p["path"],
            p["generated"],
            p["observed"],
            p["rule"],
            p["error"]
        );
        assert!(
            p["observed"].as_u64().unwrap_or(0) > 0,
            "{what}: {} produced no data",
            p["path"]
        );
    }
    assert_eq!(report["passed"], Value::Bool(true), "{what}: chosen paths");
    assert_eq!(
        report["fallbacks_passed"],
        Value::Bool(true),
        "{what}: fallbacks"
    );
    assert_eq!(rc, Some(0), "{what}: exit status of probe --verify");
    paths
        .iter()
        .find(|p| p["role"] == "chosen" && p["source"] == "ebpf/tcp")
        .and_then(|p| p["path"].as_str())
        .expect("a chosen TCP path")
        .to_owned()
}

/// Checks the accuracy run (`--verify` with netem on `lo`): the chosen TCP path's RTT figures
/// for the child cgroup against the client's own timing of the same exchanges. A method that
/// claims `raw` samples must give the p50 within 5 % and the RFC 3550 jitter within 20 % (the
/// bars of `tcp_latency.rs`); a `smoothed` one must show the damping its name promises.
fn check_rtt(what: &str, out: &str, rc: Option<i32>, log: &str) {
    let report: Value = out
        .lines()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("{what}: no JSON report; output:\n{}", tail(log, 60)));
    let paths = report["paths"].as_array().expect("paths");
    for p in paths.iter().filter(|p| !p["rtt"].is_null()) {
        let r = &p["rtt"];
        eprintln!(
            "  {} {}: method {} ({}), p50 {:.3} ms, jitter {:.3} ms over {} path samples; \
             client-timed p50 {:.3} ms, jitter {:.3} ms over {} exchanges",
            p["role"],
            p["path"],
            r["method"],
            r["sample"],
            r["p50_us"].as_f64().unwrap_or(0.0) / 1e3,
            r["jitter_rfc3550_us"].as_f64().unwrap_or(0.0) / 1e3,
            r["path_samples"],
            r["timed_p50_us"].as_f64().unwrap_or(0.0) / 1e3,
            r["timed_jitter_rfc3550_us"].as_f64().unwrap_or(0.0) / 1e3,
            r["timed_exchanges"],
        );
    }
    assert_eq!(
        rc,
        Some(0),
        "{what}: exit status of probe --verify; output:\n{}",
        tail(out, 30)
    );
    let chosen = paths
        .iter()
        .find(|p| p["role"] == "chosen" && p["source"] == "ebpf/tcp")
        .expect("a chosen TCP path");
    let r = &chosen["rtt"];
    assert!(
        !r.is_null(),
        "{what}: no RTT figures for the chosen path: {chosen}"
    );
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    assert!(
        f("path_samples") >= 30.0 && f("timed_exchanges") >= 100.0,
        "{what}: too few samples: {r}"
    );
    let rel = |a: f64, b: f64| (a - b).abs() / b;
    // The delay line is the ground truth's scale: the exchanges must have seen it.
    assert!(
        f("timed_p50_us") > 15_000.0,
        "{what}: netem did not delay the exchanges: {r}"
    );
    match r["sample"].as_str() {
        Some("raw") => {
            assert!(
                rel(f("p50_us"), f("timed_p50_us")) <= 0.05,
                "{what}: p50 off by more than 5 %: {r}"
            );
            assert!(
                rel(f("jitter_rfc3550_us"), f("timed_jitter_rfc3550_us")) <= 0.20,
                "{what}: jitter off by more than 20 %: {r}"
            );
        }
        Some("smoothed") => {
            assert!(
                rel(f("p50_us"), f("timed_p50_us")) <= 0.10,
                "{what}: smoothed p50 off by more than 10 %: {r}"
            );
            assert!(
                f("jitter_rfc3550_us") < f("timed_jitter_rfc3550_us") * 0.5,
                "{what}: smoothed jitter not damped: {r}"
            );
        }
        other => panic!("{what}: unexpected sample kind {other:?}: {r}"),
    }
}

/// Boots Debian `suite`'s kernel, runs the check inside, and asserts the probe chose `expect`.
/// `expect_path`: the TCP path `auto` must choose with cgroup v2, then with cgroup v1 only.
fn boot_and_verify(test: &str, suite: &str, expect_release: &str, expect_path: (&str, &str)) {
    if let Err(reason) = tools() {
        skip(test, &reason);
        return;
    }
    let kernel = match debian_kernel(suite) {
        Ok(k) => k,
        Err(e) => {
            skip(
                test,
                &format!("cannot download Debian {suite}'s kernel: {e}"),
            );
            return;
        }
    };
    assert!(
        kernel.release.starts_with(expect_release),
        "Debian {suite} now ships {}",
        kernel.release
    );
    let dir = kernels_dir().join(suite);
    let initrd = initramfs(&dir, &kernel).unwrap_or_else(|e| panic!("initramfs: {e}"));
    let mut accels = vec![Accel::Tcg];
    if Path::new("/dev/kvm").exists() {
        accels.insert(0, Accel::Kvm);
    }
    let mut booted = None;
    // A guest that never reached the check (a kernel panic during a TCG boot on a busy host)
    // gets one more boot; a check that ran and failed does not.
    let attempts = accels.iter().copied().chain([Accel::Tcg]);
    for accel in attempts {
        let start = Instant::now();
        match boot(&dir, &kernel, &initrd, accel) {
            Ok(Some(out)) if !out.1.contains("NODEWARD-VERIFY-RC=") && accel == Accel::Tcg => {
                eprintln!(
                    "{} never ran the check; console:\n{}\nbooting once more",
                    kernel.release,
                    tail(&out.0, 20)
                );
                booted = Some(out);
            }
            Ok(Some(out)) => {
                eprintln!(
                    "{} booted with {accel:?} in {:?}",
                    kernel.release,
                    start.elapsed()
                );
                booted = Some(out);
                break;
            }
            Ok(None) => continue,
            Err(e) => panic!("{e}"),
        }
    }
    let (console, result) = booted.expect("neither KVM nor TCG booted the guest");
    eprintln!("{}", tail(&console, 30));
    let (v2, v1) = result
        .split_once("NODEWARD-V1-BEGIN")
        .unwrap_or((result.as_str(), ""));
    let (v2, netem) = v2.split_once("NODEWARD-NETEM-BEGIN").unwrap_or((v2, ""));
    let rc = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("NODEWARD-VERIFY-RC="))
            .and_then(|v| v.trim().parse().ok())
    };
    let log = format!("{result}\n{console}");
    let what = format!("{} ({suite}, cgroup v2)", kernel.release);
    let path = check_report(&what, v2, rc(v2), &log);
    eprintln!("{what}: the probe chose {path}");
    assert_eq!(path, expect_path.0, "{what}: chosen TCP hook path");
    let what = format!(
        "{} ({suite}, cgroup v2, netem {NETEM} on lo)",
        kernel.release
    );
    check_rtt(&what, netem, rc(netem), &log);
    let what = format!("{} ({suite}, cgroup v1 only)", kernel.release);
    let path = check_report(&what, v1, rc(v1), &log);
    eprintln!("{what}: the probe chose {path}");
    assert_eq!(path, expect_path.1, "{what}: chosen TCP hook path");
}

/// Debian 11's 5.10 (the ANCK 5.10 generation): every program passes the verifier, the probe
/// picks sock_create + egress tagging, and that and every other supported fallback produce data;
/// with cgroup v1 only it picks sock_diag polling, which produces data too.
#[test]
fn debian_bullseye_5_10_verifies_every_program_and_hook_path() {
    require_root!("debian_bullseye_5_10_verifies_every_program_and_hook_path");
    boot_and_verify(
        "debian_bullseye_5_10_verifies_every_program_and_hook_path",
        "bullseye",
        "5.10.",
        // cgroup v1 only: 5.10 has no netns cookie in sock_ops, so no eBPF path fits.
        ("sock_ops+sock_create+cgroup_skb_egress", "sock_diag_poll"),
    );
}

/// Debian 12's 6.1: the same checks; with cgroup v1 only the probe picks netns cookies.
#[test]
fn debian_bookworm_6_1_verifies_every_program_and_hook_path() {
    require_root!("debian_bookworm_6_1_verifies_every_program_and_hook_path");
    boot_and_verify(
        "debian_bookworm_6_1_verifies_every_program_and_hook_path",
        "bookworm",
        "6.1.",
        (
            "sock_ops+sock_create+cgroup_skb_egress",
            "sock_ops+netns_cookie",
        ),
    );
}

/// This host's kernel, without a VM.
#[test]
fn this_host_verifies_every_program_and_hook_path() {
    require_root!("this_host_verifies_every_program_and_hook_path");
    let out = Command::new(agent_binary())
        .args(["probe", "--verify", "--json"])
        .output()
        .expect("run nodeward probe --verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let path = check_report("this host", &stdout, out.status.code(), &log);
    eprintln!("this host: the probe chose {path}");
    // The configured attribution is what is checked as chosen (here the 5.10-era fallback).
    let out = Command::new(agent_binary())
        .args([
            "probe",
            "--verify",
            "--json",
            "--set",
            "tcp.attribution=egress",
        ])
        .output()
        .expect("run nodeward probe --verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let path = check_report("this host, egress", &stdout, out.status.code(), &log);
    assert_eq!(path, "sock_ops+cgroup_skb_egress");
}

/// The check fails when the kernel maps miss traffic: with room for one UDP flow, the RTP
/// exchange (an egress and an ingress flow) cannot be counted whole, so `--verify` must say FAIL
/// for the UDP path and exit 1, while the TCP paths still pass.
#[test]
fn verify_fails_when_the_maps_miss_traffic() {
    require_root!("verify_fails_when_the_maps_miss_traffic");
    let out = Command::new(agent_binary())
        .args(["probe", "--verify", "--json", "--set", "udp.max_flows=1"])
        .output()
        .expect("run nodeward probe --verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON report: {stdout}"));
    let path = |source: &str| {
        report["paths"]
            .as_array()
            .expect("paths")
            .iter()
            .find(|p| p["role"] == "chosen" && p["source"] == source)
            .cloned()
            .unwrap_or_else(|| panic!("no chosen {source} path"))
    };
    let udp = path("ebpf/udp");
    eprintln!("udp with one flow slot: {udp}");
    assert_eq!(udp["passed"], Value::Bool(false), "{udp}");
    assert_eq!(path("ebpf/tcp")["passed"], Value::Bool(true));
    assert_eq!(report["passed"], Value::Bool(false));
    assert_eq!(out.status.code(), Some(1), "exit status");
}
