//! `nodeward`: the agent daemon (`nodeward run`, the default) and its command-line tools.

use std::process::ExitCode;

use nodeward::{
    cli::{Command, ConfigCommand},
    config, daemon, logging,
    probe::Capabilities,
    EXIT_SOFTWARE, EXIT_USAGE,
};

fn main() -> ExitCode {
    let cli = nodeward::cli::parse();
    if !matches!(cli.command, None | Some(Command::Run | Command::Fleet(_))) {
        // The command-line tools end quietly when their reader goes away (`nodeward status |
        // head`), as Unix tools do, instead of panicking on EPIPE. The daemon keeps SIGPIPE
        // ignored: a client hanging up is an error on that connection only. So does `fleet`:
        // an agent that refuses its TLS client (no certificate, another CA) closes the
        // connection, and a write to it would kill the whole table by SIGPIPE instead of
        // making that node's row UNREACHABLE with the reason.
        // SAFETY: sets a signal disposition before any other thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let source = config::Source {
        explicit_path: cli.config.config.as_deref(),
        flags: &cli.config.set,
    };
    let config = match config::load(&source, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nodeward: invalid configuration: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Config(ConfigCommand::Check) => {
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Command::Config(ConfigCommand::Show) => {
            print!("{}", config::to_toml(&config));
            ExitCode::SUCCESS
        }
        Command::Probe { json, verify: true } => verify(&config, json),
        Command::Probe {
            json,
            verify: false,
        } => {
            let caps = Capabilities::probe(&config.paths);
            if json {
                match serde_json::to_string_pretty(&caps) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("nodeward: {e}");
                        return ExitCode::from(EXIT_SOFTWARE);
                    }
                }
            } else {
                println!("{}", caps.summary());
            }
            ExitCode::SUCCESS
        }
        Command::GpuCheck { json, events } => {
            nodeward::sources::gpu::check::main(&config.gpu, &config.paths, json, events)
        }
        Command::Run => {
            let reloader = nodeward::reload::Reloader::new(
                cli.config.config.clone(),
                cli.config.set.clone(),
                config.clone(),
            );
            run(config, reloader)
        }
        Command::Status(conn) => client(&config, |socket| async move {
            nodeward::client::status(&conn, &socket).await
        }),
        Command::Watch(args) => client(&config, |socket| async move {
            nodeward::client::watch(&args, &socket).await
        }),
        Command::Containers(args) => client(&config, |socket| async move {
            nodeward::client::containers(&args, &socket).await
        }),
        Command::Gpus(conn) => client(&config, |socket| async move {
            nodeward::client::gpus(&conn, &socket).await
        }),
        Command::Drain(cmd) => client(&config, |socket| async move {
            nodeward::client::drain(&cmd, &socket).await
        }),
        Command::Fleet(cmd) => fleet(&cmd),
        Command::Certs(cmd) => match nodeward::client::certs::run(&cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nodeward: {e}");
                e.exit_code()
            }
        },
    }
}

/// `nodeward probe --verify`: exit 0 when every chosen hook path produced its data, 1 when one
/// did not, 70 when the check itself could not run.
fn verify(config: &config::Config, json: bool) -> ExitCode {
    let report = match nodeward::verify::run(config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nodeward: {e}");
            return ExitCode::from(EXIT_SOFTWARE);
        }
    };
    if json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("nodeward: {e}");
                return ExitCode::from(EXIT_SOFTWARE);
            }
        }
    } else {
        println!("{}", report.summary());
    }
    if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs one client subcommand against the agent (default address: the configured socket).
fn client<F, Fut>(config: &config::Config, f: F) -> ExitCode
where
    F: FnOnce(std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<(), nodeward::client::ClientError>>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodeward: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_SOFTWARE);
        }
    };
    match runtime.block_on(f(config.api.unix_socket.clone())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodeward: {e}");
            e.exit_code()
        }
    }
}

/// `nodeward fleet …` (also `kubectl-nodeward …`).
fn fleet(cmd: &nodeward::client::fleet::FleetCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodeward: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_SOFTWARE);
        }
    };
    match runtime.block_on(nodeward::client::fleet::run(cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodeward: {e}");
            e.exit_code()
        }
    }
}

/// Fixes glibc malloc's mmap threshold at 256 KiB. Left dynamic, it rises to the size of
/// each large block freed (up to 32 MiB); the TCP source's and the bridge's per-tick buffers
/// (tens of MiB each at 100,000 connections) then come from the heap arenas, one per thread
/// that allocates, and stay resident after they are freed: the agent's resident memory was
/// about twice its live heap (heaptrack: 178 MiB peak heap, 340 MiB RSS; drain_scale at
/// 100,000 connections peaked at 353-430 MiB against the DaemonSet's 256 MiB limit, 194 MiB
/// with the threshold fixed; docs/BENCHMARKS.md, issue 15). Blocks over the threshold get
/// mappings of their own, returned to the kernel when freed. Called before any thread starts
/// (`mallopt` is not thread-safe).
fn keep_freed_large_blocks_unmapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: no other thread exists yet; mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

fn run(config: config::Config, reloader: nodeward::reload::Reloader) -> ExitCode {
    keep_freed_large_blocks_unmapped();
    if let Err(e) = logging::init(&config.log) {
        eprintln!("nodeward: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let caps = Capabilities::probe(&config.paths);
    for line in caps.summary().lines() {
        tracing::info!(target: "nodeward::probe", "{line}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("nodeward")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(EXIT_SOFTWARE);
        }
    };
    // Installed before the daemon reports itself running: SIGHUP's default action is to exit.
    let hangup = {
        let _rt = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    };
    match hangup {
        Ok(h) => {
            runtime.spawn(nodeward::reload::on_sighup(reloader, h));
        }
        Err(e) => tracing::warn!(error = %e, "no SIGHUP handler: config reload unavailable"),
    }
    match runtime.block_on(daemon::run(config, caps)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "nodeward stopped with an error");
            ExitCode::from(EXIT_SOFTWARE)
        }
    }
}
