//! The harness of nodeward's privileged integration tests: throw-away cgroups and network
//! namespaces that clean up after themselves, processes started inside them, the agent binary,
//! and a skip that says why.
//!
//! Tests need root and a kernel that loads eBPF. A test whose requirement is missing calls
//! [`skip`], which prints the reason and records it in the file named by `NODEWARD_SKIP_LOG`,
//! so `cargo xtask test` can report every skip: a skipped test is never counted as passed.
//! Helpers panic with a message rather than return errors: a failing set-up is a failing test.

use std::{
    collections::BTreeSet,
    io::Write as _,
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub mod api;
pub mod containerd;
pub mod cri_server;
pub mod drain;
pub mod rtp;

use nodeward::probe::cgroup_layout;

pub mod fake_nvml;
pub mod fleet;
pub mod image;
pub mod kube;
pub mod kubeapi;
pub mod mirrors;
pub mod net;
pub mod pingpong;
pub mod pki;
pub mod podresources;
pub mod rpm;

/// `name` on PATH: the tests look tools up rather than assume them.
pub fn tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// A command's stdout and stderr together, for messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Records a skipped test and says why. Call it and `return` from the test.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
    if let Ok(path) = std::env::var("NODEWARD_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{test}: {reason}");
        }
    }
}

/// Whether the tests run as root; privileged tests skip (with the reason) when not.
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

/// Skips the calling test unless running as root. Use as `require_root!("name");`.
#[macro_export]
macro_rules! require_root {
    ($test:expr) => {
        if !$crate::is_root() {
            $crate::skip($test, "needs root (eBPF, cgroups, network namespaces)");
            return;
        }
    };
}

fn unique(stem: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{stem}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The cgroup v2 hierarchy of this host (pure v2 or hybrid), if any.
pub fn cgroup_v2_root() -> Option<PathBuf> {
    cgroup_layout(Path::new("/sys/fs/cgroup"))
        .unified()
        .map(Path::to_path_buf)
}

/// A cgroup v2 directory made for one test; its processes are moved out and the directory
/// removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
    root: PathBuf,
}

impl Cgroup {
    /// Creates `<v2 root>/nodeward-test-<stem>-<pid>-<n>`. Panics where there is no cgroup v2.
    pub fn new(stem: &str) -> Self {
        let root = cgroup_v2_root().expect("this host has no cgroup v2 hierarchy");
        let path = root.join(unique(&format!("nodeward-test-{stem}")));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        Self { path, root }
    }

    /// The cgroup id eBPF reports: the inode number of the directory.
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display()))
            .ino()
    }

    /// Starts `command` with the child already inside this cgroup (it moves itself between
    /// fork and exec), so everything it does is attributed here from its first instruction.
    pub fn spawn(&self, command: &mut Command) -> Child {
        let procs = self.path.join("cgroup.procs");
        let procs = std::ffi::CString::new(procs.as_os_str().as_encoded_bytes())
            .expect("cgroup path has no NUL");
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
        // (open, write, close: plain system calls, no allocation) on memory prepared before.
        unsafe {
            command.pre_exec(move || join_cgroup(&procs));
        }
        command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?} in {}: {e}", self.path.display()))
    }

    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = send_signal(pid, rustix::process::Signal::Kill);
            let _ = std::fs::write(self.root.join("cgroup.procs"), format!("{pid}\n"));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A network namespace made for one test (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(stem: &str) -> Self {
        let name = unique(&format!("nw-{stem}"));
        run(Command::new("ip").args(["netns", "add", &name]));
        run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        Self { name }
    }

    /// A command that runs inside this namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs a set-up command and panics with its output if it fails.
pub fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `nodeward` binary next to the test executable (`target/<profile>/nodeward`), built by
/// `cargo xtask test` before the tests run.
pub fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("nodeward");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build -p nodeward, or cargo xtask test)",
        bin.display()
    );
    bin
}

/// BPF objects a process holds open, read from `/proc/<pid>/fdinfo`: `(prog ids, link ids)`.
pub fn bpf_objects_of(pid: u32) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let mut progs = BTreeSet::new();
    let mut links = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return (progs, links);
    };
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text.lines() {
            if let Some(id) = line.strip_prefix("prog_id:") {
                if let Ok(id) = id.trim().parse() {
                    progs.insert(id);
                }
            } else if let Some(id) = line.strip_prefix("link_id:") {
                if let Ok(id) = id.trim().parse() {
                    links.insert(id);
                }
            }
        }
    }
    (progs, links)
}

/// Names of the eBPF programs process `pid` holds, asked of `bpftool` (the kernel cuts a name
/// to its first 15 bytes).
pub fn programs_held(pid: u32) -> Vec<String> {
    bpf_objects_of(pid)
        .0
        .iter()
        .filter_map(|id| {
            let out = Command::new("bpftool")
                .args(["prog", "show", "id", &id.to_string(), "--json"])
                .output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v.get("name")?.as_str().map(str::to_owned)
        })
        .collect()
}

/// How many of `held` (from [`programs_held`]) are program `name`, matched on the kernel's cut
/// of the name.
pub fn program_count(held: &[String], name: &str) -> usize {
    held.iter()
        .filter(|h| !h.is_empty() && name.starts_with(h.as_str()))
        .count()
}

/// Whether a BPF program or link with this id still exists, asked of `bpftool`.
pub fn bpftool_has(kind: &str, id: u32) -> bool {
    Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or_else(|e| panic!("bpftool is needed by this test: {e}"))
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One cgroup path created in several hierarchies at once (v1 controllers such as `cpuacct`
/// and `memory`, and the v2 one), as a container runtime does on a v1 or hybrid host. Parent
/// directories the guard had to create are removed with it, deepest first.
#[derive(Debug)]
pub struct CgroupTree {
    /// `(hierarchy root, directory)` for each hierarchy, in the order given.
    pub dirs: Vec<(PathBuf, PathBuf)>,
    created: Vec<PathBuf>,
}

impl CgroupTree {
    /// Creates `<root>/<rel>` under each root. Panics if one cannot be made.
    pub fn new(rel: &str, roots: &[PathBuf]) -> Self {
        let mut created = Vec::new();
        let mut dirs = Vec::new();
        for root in roots {
            let mut dir = root.clone();
            for part in rel.split('/').filter(|p| !p.is_empty()) {
                dir.push(part);
                if !dir.exists() {
                    std::fs::create_dir(&dir)
                        .unwrap_or_else(|e| panic!("create cgroup {}: {e}", dir.display()));
                    created.push(dir.clone());
                }
            }
            dirs.push((root.clone(), dir));
        }
        Self { dirs, created }
    }

    /// The directory of this cgroup in hierarchy `root`.
    pub fn dir_in(&self, root: &Path) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(r, _)| r == root)
            .map(|(_, d)| d.as_path())
    }

    /// Starts `command` already inside this cgroup in every hierarchy (it moves itself between
    /// fork and exec).
    pub fn spawn(&self, command: &mut Command) -> Child {
        let procs: Vec<std::ffi::CString> = self
            .dirs
            .iter()
            .map(|(_, d)| {
                std::ffi::CString::new(d.join("cgroup.procs").as_os_str().as_encoded_bytes())
                    .expect("cgroup path has no NUL")
            })
            .collect();
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
        // (open, write, close: plain system calls, no allocation) on memory prepared before.
        unsafe {
            command.pre_exec(move || procs.iter().try_for_each(|p| join_cgroup(p)));
        }
        command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?} in {:?}: {e}", self.dirs))
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        for (root, dir) in &self.dirs {
            let pids = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in pids.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                let _ = send_signal(pid, rustix::process::Signal::Kill);
                let _ = std::fs::write(root.join("cgroup.procs"), format!("{pid}\n"));
            }
        }
        for dir in self.created.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs` ("0" is the
/// caller). Safe to call between fork and exec: system calls only, nothing allocated.
fn join_cgroup(procs: &std::ffi::CStr) -> std::io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(procs, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
    match rustix::io::write(&fd, b"0\n")? {
        2 => Ok(()),
        _ => Err(std::io::ErrorKind::WriteZero.into()),
    }
}

/// A process's own CPU time, user + system, from `/proc/<pid>/stat`, in seconds.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .expect("stat has a command name");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after `) `.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let hz = rustix::param::clock_ticks_per_second() as f64;
    ticks as f64 / hz
}

/// This process's bounding set, by capability number.
pub fn own_bounding_set() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// The number of the capabilities the agent's unit and DaemonSet name (`CAP_` form).
pub fn cap_number(name: &str) -> Option<u32> {
    Some(match name {
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        _ => return None,
    })
}

/// Splits capabilities (`CAP_BPF` or `BPF` form) into those this process can hand on — as a
/// `setpriv` list such as `+bpf,+perfmon` — and those it lacks itself (a sandbox's bounding set
/// may be smaller than a real node's).
pub fn grantable_caps(names: &[&str]) -> (String, Vec<String>) {
    let ours = own_bounding_set();
    let mut granted = Vec::new();
    let mut missing = Vec::new();
    for name in names {
        let full = if name.starts_with("CAP_") {
            (*name).to_owned()
        } else {
            format!("CAP_{name}")
        };
        match cap_number(&full) {
            Some(n) if ours & (1 << n) != 0 => granted.push(format!(
                "+{}",
                full.trim_start_matches("CAP_").to_lowercase()
            )),
            _ => missing.push(full),
        }
    }
    (granted.join(","), missing)
}

/// Whether python3 with grpcio and grpcio-reflection is there; prints the skip line if not.
pub fn python_grpcio(test: &str) -> bool {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_reflection, google.protobuf"])
        .output();
    match probe {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            skip(
                test,
                &format!(
                    "python grpcio/grpcio-reflection not importable (pip install -r tests/requirements.txt): {}",
                    String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or_default()
                ),
            );
            false
        }
        Err(e) => {
            skip(test, &format!("python3 not found: {e}"));
            false
        }
    }
}

/// Feeds a scrape to `promtool check metrics` and fails on a line it cannot parse (its lint
/// advice on names is not an error); skips, with `test` named, where promtool is not installed.
pub fn promtool_accepts(test: &str, body: &str) {
    use std::io::Write;
    let Ok(mut p) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        skip(&format!("{test} promtool check"), "promtool not installed");
        return;
    };
    p.stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("feed promtool");
    let out = p.wait_with_output().expect("promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("error while linting") && !text.contains("text format parsing error"),
        "promtool: {text}"
    );
}
