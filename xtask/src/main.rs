//! `cargo xtask`: nodeward's build automation. `run` and `test` are the README's two commands;
//! both install what is missing on a fresh machine first (see `setup.rs`) and say what they do.

mod bench;
mod bundled;
mod image;
mod rpm;
mod setup;
mod srpm;
mod test;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "nodeward build automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (system packages, rust-src, bpf-linker).
    Setup,
    /// Build the agent and run it as root with built-in defaults; extra arguments go to `nodeward`.
    Run {
        /// Build with --release.
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Unit tests, then the privileged integration tests, then lints.
    Test(test::TestArgs),
    /// Measure what the agent costs, A/B against a baseline, into docs/BENCHMARKS.md (root).
    Bench(bench::BenchArgs),
    /// On a machine with an NVIDIA GPU: read every GPU through the real driver and print it.
    GpuCheck,
    /// Build the binary RPM (rpmbuild, from the spec and the binary cargo built); prints its path.
    Rpm(rpm::RpmArgs),
    /// Build the container image offline with buildah from the release binary.
    Image(image::ImageArgs),
    /// Build the source RPM (spec, source and vendored crates) that rebuilds offline.
    Srpm(srpm::SrpmArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root).context("cd to the workspace root")?;
    match cli.command {
        Cmd::Setup => setup::ensure_all(&root),
        Cmd::Run { release, args } => {
            setup::ensure_build_tools()?;
            let mut build = cargo();
            build.args(["build", "-p", "nodeward"]);
            if release {
                build.arg("--release");
            }
            step("building nodeward", &mut build)?;
            let bin = root
                .join("target")
                .join(if release { "release" } else { "debug" })
                .join("nodeward");
            let mut cmd = as_root(&bin)?;
            cmd.args(&args);
            say(&format!(
                "starting {} {} (Ctrl-C stops it)",
                bin.display(),
                args.join(" ")
            ));
            // Ctrl-C reaches the agent too (same process group): let it shut down and report
            // its own exit instead of xtask dying first. A caught signal resets to default on
            // exec, so the agent starts with the default disposition and installs its own.
            extern "C" fn wait_for_child(_: libc::c_int) {}
            // SAFETY: the handler does nothing, so it is async-signal-safe.
            unsafe {
                libc::signal(
                    libc::SIGINT,
                    wait_for_child as *const () as libc::sighandler_t,
                );
                libc::signal(
                    libc::SIGTERM,
                    wait_for_child as *const () as libc::sighandler_t,
                );
            }
            let status = cmd
                .status()
                .with_context(|| format!("start {}", bin.display()))?;
            if !status.success() {
                bail!("nodeward exited with {status}");
            }
            Ok(())
        }
        Cmd::Test(args) => test::run(&root, &args),
        Cmd::Bench(args) => bench::run(&root, &args),
        Cmd::Rpm(args) => rpm::run(&root, &args),
        Cmd::Image(args) => image::run(&root, &args),
        Cmd::Srpm(args) => srpm::run(&root, &args),
        Cmd::GpuCheck => {
            setup::ensure_build_tools()?;
            step(
                "building nodeward",
                cargo().args(["build", "-p", "nodeward"]),
            )?;
            let bin = root.join("target/debug/nodeward");
            let status = Command::new(&bin).arg("gpu-check").status()?;
            if !status.success() {
                bail!("gpu-check failed: {status}");
            }
            Ok(())
        }
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// `cargo` with the environment cargo gave us (so `cargo xtask` under rustup keeps its toolchain).
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Sends `signal` to `pid` (`kill(2)`).
pub fn send_signal(pid: u32, signal: rustix::process::Signal) -> std::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or(std::io::ErrorKind::InvalidInput)?;
    Ok(rustix::process::kill_process(pid, signal)?)
}

/// A command that runs `program` as root: directly when we are root, else through sudo.
pub fn as_root(program: &Path) -> anyhow::Result<Command> {
    if is_root() {
        return Ok(Command::new(program));
    }
    if which("sudo").is_none() {
        bail!("{} needs root and sudo is not installed", program.display());
    }
    let mut c = Command::new("sudo");
    c.arg("-E").arg(program);
    Ok(c)
}

pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

pub fn say(msg: &str) {
    eprintln!("xtask: {msg}");
}

/// Runs a step, echoing it, and fails with the step's name.
pub fn step(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    say(&format!("{what}: {cmd:?}"));
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
