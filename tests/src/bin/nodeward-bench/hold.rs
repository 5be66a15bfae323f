//! Many established loopback connections, held by child processes (`nodeward-bench hold`) of
//! at most `PER_PROCESS` connections each: both ends of a connection are in the holder, so it
//! needs two descriptors per connection, under the usual hard open-file limit of 20,000, which
//! a container without `CAP_SYS_RESOURCE` cannot raise.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
};

use clap::Args;

use crate::fail;

/// Connections per holder process.
pub const PER_PROCESS: usize = 9_000;

#[derive(Debug, Clone, Args)]
pub struct HoldArgs {
    /// Connections to open and hold (at most `PER_PROCESS`).
    #[arg(long)]
    pub connections: usize,
    /// Bind the listener inside this cgroup (v2 directory), so that the accepted ends are its
    /// sockets; the clients' ends stay in this process's own cgroup.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
}

/// Raises the soft open-file limit to the hard one.
fn raise_nofile() -> std::io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// This process's cgroup (v2), as a directory under `root`.
fn own_cgroup(root: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(root.join(rel.trim_start_matches('/')))
}

fn join(cgroup: &Path) -> std::io::Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
}

/// A loopback listener, bound inside `cgroup` when given (this process, one thread so far,
/// visits it and comes back).
fn listener(cgroup: Option<&Path>) -> std::io::Result<TcpListener> {
    let Some(cgroup) = cgroup else {
        return TcpListener::bind("127.0.0.1:0");
    };
    let root = cgroup
        .parent()
        .ok_or_else(|| std::io::Error::other("a cgroup directory has a parent"))?;
    let home = own_cgroup(root).ok_or_else(|| std::io::Error::other("no cgroup v2 of our own"))?;
    join(cgroup)?;
    let l = TcpListener::bind("127.0.0.1:0");
    join(&home)?;
    l
}

fn open(n: usize, cgroup: Option<&Path>) -> std::io::Result<Vec<TcpStream>> {
    raise_nofile()?;
    let listener = listener(cgroup)?;
    let addr = listener.local_addr()?;
    let acceptor = std::thread::spawn(move || -> std::io::Result<Vec<TcpStream>> {
        (0..n).map(|_| listener.accept().map(|(s, _)| s)).collect()
    });
    let mut held = Vec::with_capacity(2 * n);
    for _ in 0..n {
        held.push(TcpStream::connect(addr)?);
    }
    let accepted = acceptor
        .join()
        .map_err(|_| std::io::Error::other("the accepting thread panicked"))??;
    held.extend(accepted);
    Ok(held)
}

/// `nodeward-bench hold`: opens the connections, says `ready`, holds them until stdin closes.
pub fn hold(args: &HoldArgs) -> ExitCode {
    let held = match open(args.connections, args.cgroup.as_deref()) {
        Ok(h) => h,
        Err(e) => return fail(format!("open {} connections: {e}", args.connections)),
    };
    println!("ready");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(held);
    ExitCode::SUCCESS
}

/// Holders of `n` connections in all; dropping them (their stdin closes) closes every one.
pub struct Holders(Vec<Child>);

impl Holders {
    pub fn start(n: usize, cgroup: Option<&Path>) -> std::io::Result<Self> {
        let me = std::env::current_exe()?;
        let mut holders = Self(Vec::new());
        let mut left = n;
        while left > 0 {
            let count = left.min(PER_PROCESS);
            let mut cmd = Command::new(&me);
            cmd.args(["hold", "--connections", &count.to_string()]);
            if let Some(c) = cgroup {
                cmd.arg("--cgroup").arg(c);
            }
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            let mut line = String::new();
            if let Some(out) = child.stdout.take() {
                BufReader::new(out).read_line(&mut line)?;
            }
            holders.0.push(child);
            if line.trim() != "ready" {
                return Err(std::io::Error::other(
                    "a holder could not open its connections",
                ));
            }
            left -= count;
        }
        Ok(holders)
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for c in &mut self.0 {
            drop(c.stdin.take());
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}
