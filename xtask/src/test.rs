//! `cargo xtask test`: unit tests, then the privileged integration tests (as root), then lints.
//!
//! Privileged tests that find a kernel feature missing skip with a reason, written to the file
//! named by `NODEWARD_SKIP_LOG`; they are reported as skipped here, never counted as passed.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

use crate::{cargo, is_root, say, setup, step, which};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip the lints (fmt, clippy).
    #[arg(long)]
    no_lint: bool,
    /// Also run the proptest fuzz targets (`agent/tests/fuzz`) with many more cases.
    #[arg(long)]
    fuzz: bool,
    /// Cases per fuzz property with `--fuzz` (ordinary runs use 64); bounds the time taken.
    #[arg(long, default_value_t = 10_000)]
    fuzz_cases: u32,
    /// Only run tests whose name contains this (passed to cargo test).
    filter: Option<String>,
}

#[derive(Default, Debug)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Runs `cmd`, echoing its output, and adds up libtest's `test result:` lines; a run that
/// fails with no failing test reported counts as one failure.
fn run_tests(what: &str, cmd: &mut Command, tally: &mut Tally) -> anyhow::Result<()> {
    say(&format!("{what}: {cmd:?}"));
    let failed_before = tally.failed;
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: cannot start {cmd:?}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match kind {
                    "passed" => tally.passed += n,
                    "failed" => tally.failed += n,
                    "ignored" => tally.ignored += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() && tally.failed == failed_before {
        // No test reported failing, yet the run failed: a test binary did not build, crashed
        // (signal, abort, stack overflow) or was killed. Count it, so the summary says so.
        say(&format!(
            "{what}: FAILED: cargo exited with {status} although no test reported failing \
             (a test binary did not build or crashed; cargo's error is above)"
        ));
        tally.failed += 1;
    }
    Ok(())
}

/// What a group of checks gave (`cargo deny check ...`, `buf ...`): each counts as one test.
#[derive(Default)]
struct Checks {
    passed: u64,
    failed: u64,
    skipped: Vec<String>,
}

/// `cargo deny` against `deny.toml`. Licences, bans and sources need only the lock file;
/// advisories need the RustSec database, fetched from GitHub, which some build machines cannot
/// reach: then that check is reported as skipped, with the reason, and never as passed.
fn supply_chain() -> anyhow::Result<Checks> {
    setup::ensure_cargo_deny()?;
    let mut checks = Checks::default();
    let mut count = |what: &str, ok: bool| {
        say(&format!(
            "supply chain: cargo deny check {what} {}",
            if ok { "ok" } else { "FAILED" }
        ));
        if ok {
            checks.passed += 1;
        } else {
            checks.failed += 1;
        }
    };
    // `cargo deny` reads `cargo metadata` for every platform, so it needs the sources of crates
    // this machine never builds (Windows-only ones); a fresh cargo cache lacks them and the
    // checks run `--offline`. Fetch them first (the default registry only, pinned by the lock file).
    say("supply chain: fetching the sources of every locked crate, all platforms (cargo fetch --locked)");
    let fetched = cargo()
        .args(["fetch", "--locked"])
        .status()
        .context("cargo fetch")?;
    if !fetched.success() {
        say(&format!(
            "supply chain: cargo fetch --locked failed ({fetched}); the checks below will say what is missing"
        ));
    }
    for what in ["licenses", "bans", "sources"] {
        let status = cargo()
            .args(["deny", "--offline", "check", "--hide-inclusion-graph", what])
            .status()
            .context("cargo deny")?;
        count(what, status.success());
    }
    say("supply chain: fetching the RustSec advisory database");
    let fetch = cargo()
        .args(["deny", "fetch", "db"])
        .output()
        .context("cargo deny fetch")?;
    if fetch.status.success() {
        let status = cargo()
            .args(["deny", "check", "--disable-fetch", "advisories"])
            .status()
            .context("cargo deny")?;
        count("advisories", status.success());
    } else {
        let stderr = String::from_utf8_lossy(&fetch.stderr);
        let why = stderr
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("no reason given");
        checks.skipped.push(format!(
            "cargo deny check advisories: the RustSec advisory database could not be fetched ({why})"
        ));
    }
    Ok(checks)
}

/// The ref `buf breaking` compares the proto with: the previous commit, unless
/// `NODEWARD_BUF_AGAINST` names another (a release tag, or the merge base in CI).
fn breaking_baseline() -> String {
    std::env::var("NODEWARD_BUF_AGAINST").unwrap_or_else(|_| "HEAD~1".to_owned())
}

/// `buf lint` and `buf breaking` (rules in `proto/buf.yaml`), each one check. `buf breaking`
/// needs the baseline commit and its proto: a shallow clone or the first commit has none, and
/// then the check is skipped with the reason, never passed.
fn proto_checks(root: &Path) -> anyhow::Result<Checks> {
    setup::ensure_buf()?;
    let mut checks = Checks::default();
    let mut count = |what: &str, ok: bool| {
        say(&format!(
            "proto: {what} {}",
            if ok { "ok" } else { "FAILED" }
        ));
        if ok {
            checks.passed += 1;
        } else {
            checks.failed += 1;
        }
    };
    let lint = Command::new("buf")
        .args(["lint", "proto"])
        .current_dir(root)
        .status()
        .context("buf lint")?;
    count("buf lint", lint.success());

    let against = breaking_baseline();
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let commit = format!("{against}^{{commit}}");
    let tree = format!("{against}:proto");
    if !git(&["rev-parse", "--verify", "--quiet", &commit]) {
        checks.skipped.push(format!(
            "buf breaking: no commit {against} to compare with (first commit or shallow clone)"
        ));
    } else if !git(&["cat-file", "-e", &tree]) {
        checks.skipped.push(format!(
            "buf breaking: {against} has no proto/ to compare with"
        ));
    } else {
        let status = Command::new("buf")
            .args(["breaking", "proto", "--against"])
            .arg(format!(".git#ref={against},subdir=proto"))
            .current_dir(root)
            .status()
            .context("buf breaking")?;
        count(&format!("buf breaking against {against}"), status.success());
    }
    Ok(checks)
}

/// The agent's test-only features: fault injection (agent/src/fault.rs) and the fake cgroupfs.
const TEST_FEATURES: &str = "nodeward/fault-injection,nodeward/test-fixtures";

pub fn run(root: &Path, args: &TestArgs) -> anyhow::Result<()> {
    setup::ensure_all(root)?;
    // The shipped configuration, on its own (building it with the tests crate would unify the
    // test-only features in): the packaging test checks it holds no bench, fixture or fault code.
    step(
        "building nodeward in release mode (the binary the RPM ships; a packaging test inspects it)",
        cargo().args(["build", "--release", "-p", "nodeward"]),
    )?;
    // The rpm_aarch64 test packages a cross build (debug: minutes less than release) and runs it
    // under qemu-user.
    if std::env::consts::ARCH != "x86_64" || which("aarch64-linux-gnu-gcc").is_none() {
        say("no x86_64 host with aarch64-linux-gnu-gcc: the rpm_aarch64 test will skip");
    } else {
        let triple = "aarch64-unknown-linux-gnu";
        let mut cross = cargo();
        crate::rpm::cross_build_env(triple, &mut cross)?;
        step(
            "building nodeward for aarch64 (the rpm_aarch64 test packages it)",
            cross.args(["build", "-p", "nodeward", "--target", triple]),
        )?;
    }

    let mut tally = Tally::default();

    let mut unit = cargo();
    // With the test-only features, so that their own unit tests run too (the shipped build
    // is the release one above).
    unit.args([
        "test",
        "--workspace",
        "--exclude",
        "nodeward-tests",
        "--features",
        TEST_FEATURES,
        "--no-fail-fast",
    ]);
    if let Some(f) = &args.filter {
        unit.args(["--", f]);
    }
    run_tests("unit tests", &mut unit, &mut tally)?;

    if args.fuzz {
        let mut fuzz = cargo();
        fuzz.args(["test", "-p", "nodeward", "--test", "fuzz", "--no-fail-fast"])
            .env("PROPTEST_CASES", args.fuzz_cases.to_string());
        if let Some(f) = &args.filter {
            fuzz.args(["--", f]);
        }
        run_tests(
            &format!("fuzz targets, {} cases each", args.fuzz_cases),
            &mut fuzz,
            &mut tally,
        )?;
    }

    // Built right before the tests that start it: any cargo run with other features in between
    // would rebuild `target/debug/nodeward` without the hooks that supervise.rs and
    // tcp_fallback.rs arm.
    step(
        "building nodeward (the integration tests start the binary)",
        cargo().args(["build", "-p", "nodeward", "--features", TEST_FEATURES]),
    )?;
    let skip_log = std::env::temp_dir().join(format!("nodeward-skips-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&skip_log);
    let mut privileged = cargo();
    privileged
        .args(["test", "-p", "nodeward-tests", "--no-fail-fast"])
        .env("NODEWARD_SKIP_LOG", &skip_log);
    if let Some(f) = &args.filter {
        privileged.args(["--", f]);
    }
    if !is_root() {
        if which("sudo").is_some() {
            say("not root: the privileged tests run through `sudo -E`");
            privileged.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
            privileged.env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
        } else {
            say("not root and no sudo: the privileged tests will skip, each with its reason");
        }
    }
    run_tests("privileged integration tests", &mut privileged, &mut tally)?;

    let mut skips: Vec<String> = std::fs::read_to_string(&skip_log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    let _ = std::fs::remove_file(&skip_log);

    if !args.no_lint {
        let fmt = cargo().args(["fmt", "--all", "--", "--check"]).status()?;
        say(&format!(
            "lint: cargo fmt --check {}",
            if fmt.success() { "clean" } else { "FAILED" }
        ));
        let clippy = cargo()
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .status()?;
        say(&format!(
            "lint: cargo clippy -D warnings {}",
            if clippy.success() { "clean" } else { "FAILED" }
        ));
        tally.failed += u64::from(!fmt.success()) + u64::from(!clippy.success());
    }

    // A skipped test returned early and libtest counted it as passed: count it as skipped.
    let mut passed = tally.passed.saturating_sub(skips.len() as u64);
    if !args.no_lint {
        for checks in [supply_chain()?, proto_checks(root)?] {
            passed += checks.passed;
            tally.failed += checks.failed;
            skips.extend(checks.skipped);
        }
    }
    let skipped = skips.len() as u64;
    for s in &skips {
        say(&format!("skipped: {s}"));
    }
    if tally.ignored > 0 {
        say(&format!(
            "{} test(s) marked #[ignore] were not run",
            tally.ignored
        ));
    }
    println!(
        "{passed} passed, {} failed, {skipped} skipped",
        tally.failed
    );
    if tally.failed > 0 {
        bail!("tests or lints failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}
