//! Real cgroups, real processes: the agent's scanner finds a container the test creates (in
//! the kubelet cgroupfs driver's layout) and reports the CPU it burns and the memory it holds
//! within 10% of the truth, which comes from the process itself (`/proc/<pid>/stat`) and from
//! what the test allocated.
//!
//! On this project's hybrid hosts the v2 hierarchy has no controllers, so CPU and memory come
//! from the v1 `cpuacct`, `cpu` and `memory` hierarchies; the test creates the container's
//! cgroup in each, and in the v2 hierarchy for its cgroup id.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use nodeward::{
    config::Config,
    containers::{Identity, Layout, Qos},
    sources::cgroup::{Scanner, Snapshot, Workload},
};
use nodeward_tests::{process_cpu_seconds, require_root, skip, CgroupTree};

const ROOT: &str = "/sys/fs/cgroup";

/// The tests share the `kubepods` parent directories; they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A container path in the cgroupfs driver's layout, unique to this test run.
fn container_path(n: u32) -> (String, String, String) {
    let pid = std::process::id();
    let uid = format!("{pid:08x}-0000-4000-8000-{n:012x}");
    let id = format!("{:056x}{n:08x}", u64::from(pid));
    (format!("kubepods/besteffort/pod{uid}/{id}"), uid, id)
}

/// The hierarchies a test needs, or the reason it cannot run here.
/// What every test here needs: the host's cgroup layout and the hierarchies holding
/// `controllers` (and python3, for the memory tests), or the reason to skip.
fn prerequisites(
    controllers: &[&str],
    needs_python: bool,
) -> Result<(Layout, Vec<PathBuf>), String> {
    let layout = Layout::detect(Path::new(ROOT)).map_err(|e| e.to_string())?;
    let roots = hierarchies(&layout, controllers)?;
    let python_ok = || {
        Command::new("python3")
            .arg("-c")
            .arg("pass")
            .status()
            .is_ok_and(|s| s.success())
    };
    if needs_python && !python_ok() {
        return Err("python3 is needed to allocate memory".to_owned());
    }
    Ok((layout, roots))
}

fn hierarchies(layout: &Layout, controllers: &[&str]) -> Result<Vec<PathBuf>, String> {
    let mut roots: Vec<PathBuf> = layout
        .unified()
        .map(Path::to_path_buf)
        .into_iter()
        .collect();
    match layout.v1() {
        Some(v1) => {
            for c in controllers {
                let dir = match *c {
                    "cpu" => &v1.cpu,
                    "cpuacct" => &v1.cpuacct,
                    "memory" => &v1.memory,
                    _ => &None,
                };
                let dir = dir
                    .clone()
                    .ok_or_else(|| format!("no v1 {c} controller mounted"))?;
                if !roots.contains(&dir) {
                    roots.push(dir);
                }
            }
        }
        None => {
            let root = layout.unified().ok_or("no cgroup hierarchy")?;
            let enabled =
                std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
            for c in controllers
                .iter()
                .map(|c| if *c == "cpuacct" { "cpu" } else { c })
            {
                if !enabled.split_whitespace().any(|e| e == c) {
                    return Err(format!("the {c} controller is not enabled in the v2 root"));
                }
            }
        }
    }
    Ok(roots)
}

/// On pure v2 the controllers must be passed down each level the test created.
fn enable_v2_controllers(layout: &Layout, tree: &CgroupTree) {
    if !matches!(layout, Layout::V2 { .. }) {
        return;
    }
    for (_, dir) in &tree.dirs {
        for parent in dir.ancestors().skip(1) {
            if Some(parent) == layout.unified() {
                break;
            }
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+cpu +memory");
        }
    }
}

fn scanner() -> Scanner {
    let mut config = Config::default();
    config.paths.cgroup_root = PathBuf::from(ROOT);
    config.node.enabled = false;
    Scanner::new(&config.containers, &config.node, &config.paths).expect("the host's cgroup root")
}

fn find<'a>(snap: &'a Snapshot, container_id: &str) -> &'a Workload {
    snap.workloads
        .iter()
        .find(|w| matches!(&w.container.identity, Identity::Container { container_id: c, .. } if c == container_id))
        .unwrap_or_else(|| panic!("container {container_id} not found among {} workloads", snap.workloads.len()))
}

fn within(actual: f64, truth: f64, tolerance: f64) -> bool {
    (actual - truth).abs() <= tolerance * truth
}

/// A busy loop in a container cgroup: the agent finds it (pod UID, QoS, container id, cgroup
/// id) and its CPU rate is within 10% of the process's own user + system time over the same
/// interval.
#[test]
fn cpu_rate_of_a_busy_container_matches_the_process_own_cpu_time() {
    const TEST: &str = "cpu_rate_of_a_busy_container_matches_the_process_own_cpu_time";
    require_root!(TEST);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (layout, roots) = match prerequisites(&["cpuacct", "cpu"], false) {
        Ok(p) => p,
        Err(reason) => return skip(TEST, &reason),
    };
    let (rel, uid, id) = container_path(1);
    let tree = CgroupTree::new(&rel, &roots);
    enable_v2_controllers(&layout, &tree);
    let mut busy = tree.spawn(Command::new("sh").args(["-c", "while :; do :; done"]));
    let pid = busy.id();
    let mut s = scanner();

    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let cpu0 = process_cpu_seconds(pid);
    let first = s.scan(t0);
    std::thread::sleep(Duration::from_secs(3));
    let t1 = Instant::now();
    let cpu1 = process_cpu_seconds(pid);
    let second = s.scan(t1);
    let _ = busy.kill();
    let _ = busy.wait();

    let w = find(&second, &id);
    assert_eq!(
        w.container.identity,
        Identity::Container {
            pod_uid: Some(uid),
            qos: Some(Qos::BestEffort),
            container_id: id.clone(),
            runtime: nodeward::containers::Runtime::Unknown,
        }
    );
    if let Some(unified) = layout.unified() {
        let ino = std::fs::metadata(unified.join(&rel))
            .expect("stat v2 dir")
            .ino();
        assert_eq!(w.container.cgroup_id, Some(ino));
        assert_eq!(
            second.inventory.by_cgroup_id(ino).map(|c| c.path.as_str()),
            Some(rel.as_str())
        );
    }
    assert_eq!(
        second
            .inventory
            .by_pid(pid, Path::new("/proc"))
            .map(|c| c.path.as_str()),
        Some(rel.as_str()),
        "lookup by PID"
    );
    let truth = (cpu1 - cpu0) / (t1 - t0).as_secs_f64();
    let agent = w.rates.cpu[0].expect("a CPU rate after two scans");
    eprintln!("busy loop: agent {agent:.3} cores, /proc/{pid}/stat {truth:.3} cores");
    assert!(
        truth > 0.2,
        "the busy loop barely ran ({truth:.3} cores): the test proves nothing"
    );
    assert!(
        within(agent, truth, 0.10),
        "agent {agent:.3} vs truth {truth:.3} cores"
    );
    // user + system add up to the total (v1 splits in 10 ms ticks, so allow the same 10%).
    let split = w.rates.cpu_user[0].unwrap_or(0.0) + w.rates.cpu_system[0].unwrap_or(0.0);
    assert!(
        within(split, agent, 0.10),
        "user+system {split:.3} vs total {agent:.3}"
    );
    assert!(find(&first, &id).stats.cpu.usage_ns.is_some());
}

/// A CFS quota of 20% of a core on a busy loop: the agent reports throttled periods and
/// throttled time, and a CPU rate near the quota and within 10% of the process's own.
#[test]
fn a_cpu_quota_shows_as_throttling() {
    const TEST: &str = "a_cpu_quota_shows_as_throttling";
    require_root!(TEST);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (layout, roots) = match prerequisites(&["cpuacct", "cpu"], false) {
        Ok(p) => p,
        Err(reason) => return skip(TEST, &reason),
    };
    let (rel, _uid, id) = container_path(2);
    let tree = CgroupTree::new(&rel, &roots);
    enable_v2_controllers(&layout, &tree);
    let quota_set = match layout.v1().and_then(|v| v.cpu.clone()) {
        Some(cpu) => std::fs::write(cpu.join(&rel).join("cpu.cfs_quota_us"), "20000"),
        None => std::fs::write(
            layout.unified().expect("v2").join(&rel).join("cpu.max"),
            "20000 100000",
        ),
    };
    if let Err(e) = quota_set {
        return skip(TEST, &format!("cannot set a CPU quota: {e}"));
    }
    let mut busy = tree.spawn(Command::new("sh").args(["-c", "while :; do :; done"]));
    let pid = busy.id();
    let mut s = scanner();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let cpu0 = process_cpu_seconds(pid);
    s.scan(t0);
    std::thread::sleep(Duration::from_secs(3));
    let t1 = Instant::now();
    let cpu1 = process_cpu_seconds(pid);
    let snap = s.scan(t1);
    let _ = busy.kill();
    let _ = busy.wait();

    let w = find(&snap, &id);
    let truth = (cpu1 - cpu0) / (t1 - t0).as_secs_f64();
    let agent = w.rates.cpu[0].expect("CPU rate");
    eprintln!(
        "quota 0.2: agent {agent:.3} cores, truth {truth:.3}, throttled {:?}",
        w.stats.cpu.nr_throttled
    );
    assert!(
        within(agent, truth, 0.10),
        "agent {agent:.3} vs truth {truth:.3}"
    );
    assert!(agent < 0.25, "a 20% quota let {agent:.3} cores through");
    assert!(
        w.stats.cpu.nr_throttled.unwrap_or(0) > 0,
        "{:?}",
        w.stats.cpu
    );
    assert!(w.stats.cpu.nr_periods.unwrap_or(0) >= w.stats.cpu.nr_throttled.unwrap_or(0));
    assert!(
        w.rates.throttled[0].unwrap_or(0.0) > 0.0,
        "throttled seconds per second"
    );
    // A loop that always wants a full core under a 20% quota is throttled in nearly every
    // period it runs in.
    let ratio = w.rates.throttled_periods_ratio[0].expect("throttled share of periods");
    assert!(
        ratio > 0.5 && ratio <= 1.0,
        "throttled in {ratio:.2} of periods"
    );
}

/// A process that allocates and touches 256 MiB: the agent's memory usage, working set and
/// anonymous memory are within 10% of that, and the limit the test set is reported exactly.
#[test]
fn memory_of_a_container_matches_what_it_allocated() {
    const TEST: &str = "memory_of_a_container_matches_what_it_allocated";
    const MIB: u64 = 256;
    const LIMIT: u64 = 1 << 30;
    require_root!(TEST);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (layout, roots) = match prerequisites(&["memory"], true) {
        Ok(p) => p,
        Err(reason) => return skip(TEST, &reason),
    };
    let (rel, _uid, id) = container_path(3);
    let tree = CgroupTree::new(&rel, &roots);
    enable_v2_controllers(&layout, &tree);
    let limit_file = match layout.v1().and_then(|v| v.memory.clone()) {
        Some(m) => m.join(&rel).join("memory.limit_in_bytes"),
        None => layout.unified().expect("v2").join(&rel).join("memory.max"),
    };
    std::fs::write(&limit_file, LIMIT.to_string()).expect("set memory limit");

    // Writing every byte (not just reserving address space) makes the pages resident.
    let script = format!(
        "import sys, time\nb = b'\\x01' * ({MIB} << 20)\nprint('ready', flush=True)\ntime.sleep(60)\n"
    );
    let mut child = tree.spawn(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .stdout(Stdio::piped()),
    );
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read ready");
    assert_eq!(line.trim(), "ready");

    let snap = scanner().scan(Instant::now());
    let _ = child.kill();
    let _ = child.wait();

    let m = &find(&snap, &id).stats.memory;
    let truth = (MIB << 20) as f64;
    eprintln!("allocated {MIB} MiB: agent {m:?}");
    for (name, v) in [
        ("usage", m.current_bytes),
        ("working set", m.working_set_bytes),
        ("anon", m.anon_bytes),
    ] {
        let v = v.unwrap_or_else(|| panic!("{name} missing"));
        assert!(
            within(v as f64, truth, 0.10),
            "{name} {} MiB vs {MIB} MiB",
            v >> 20
        );
    }
    assert_eq!(m.limit_bytes, Some(LIMIT));
}

/// A process that allocates past its cgroup's memory limit is killed by the kernel's OOM
/// killer; the agent counts the kill for that container, and none for a sibling.
#[test]
fn an_oom_kill_is_counted_for_its_container() {
    const TEST: &str = "an_oom_kill_is_counted_for_its_container";
    require_root!(TEST);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (layout, roots) = match prerequisites(&["memory"], true) {
        Ok(p) => p,
        Err(reason) => return skip(TEST, &reason),
    };
    let (rel, _uid, id) = container_path(4);
    let (sibling_rel, _, sibling_id) = container_path(5);
    let tree = CgroupTree::new(&rel, &roots);
    let sibling = CgroupTree::new(&sibling_rel, &roots);
    enable_v2_controllers(&layout, &tree);
    let limit_file = match layout.v1().and_then(|v| v.memory.clone()) {
        Some(m) => m.join(&rel).join("memory.limit_in_bytes"),
        None => layout.unified().expect("v2").join(&rel).join("memory.max"),
    };
    std::fs::write(&limit_file, (32u64 << 20).to_string()).expect("set memory limit");
    // Swap would let the process page out instead of dying; v1 caps memory+swap separately.
    if let Some(m) = layout.v1().and_then(|v| v.memory.clone()) {
        let _ = std::fs::write(
            m.join(&rel).join("memory.memsw.limit_in_bytes"),
            (32u64 << 20).to_string(),
        );
    } else {
        let _ = std::fs::write(
            layout
                .unified()
                .expect("v2")
                .join(&rel)
                .join("memory.swap.max"),
            "0",
        );
    }

    let status = tree
        .spawn(
            Command::new("python3")
                .arg("-c")
                .arg("b = b'\\x01' * (128 << 20)"),
        )
        .wait()
        .expect("wait for the allocating process");
    use std::os::unix::process::ExitStatusExt as _;
    if status.signal() != Some(libc::SIGKILL) {
        return skip(
            TEST,
            &format!("the kernel did not OOM-kill the process ({status}): nothing to count"),
        );
    }
    let snap = scanner().scan(Instant::now());
    let m = &find(&snap, &id).stats.memory;
    eprintln!("OOM: {m:?}");
    assert!(m.oom_kill_events.unwrap_or(0) >= 1, "{m:?}");
    assert_eq!(
        find(&snap, &sibling_id).stats.memory.oom_kill_events,
        Some(0)
    );
    drop(sibling);
}

/// The v2 files on a real kernel: with the root pointed at a cgroup v2 hierarchy (the host's
/// `unified` one on hybrid hosts, which has `cpu.stat` even without controllers), the CPU rate
/// comes from v2 `cpu.stat` and is within 10% of the process's own CPU time.
#[test]
fn cpu_rate_from_v2_files_matches_the_process_own_cpu_time() {
    const TEST: &str = "cpu_rate_from_v2_files_matches_the_process_own_cpu_time";
    require_root!(TEST);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(unified) = Layout::detect(Path::new(ROOT))
        .ok()
        .and_then(|l| l.unified().map(Path::to_path_buf))
    else {
        return skip(TEST, "no cgroup v2 hierarchy");
    };
    if !unified.join("cpu.stat").exists() {
        return skip(TEST, "this kernel's cgroup v2 has no cpu.stat");
    }
    let (rel, _uid, id) = container_path(6);
    let tree = CgroupTree::new(&rel, std::slice::from_ref(&unified));
    let mut busy = tree.spawn(Command::new("sh").args(["-c", "while :; do :; done"]));
    let pid = busy.id();
    let mut config = Config::default();
    config.paths.cgroup_root = unified.clone();
    config.node.enabled = false;
    let mut s = Scanner::new(&config.containers, &config.node, &config.paths).expect("v2 root");
    assert!(
        matches!(s.layout(), Some(Layout::V2 { .. })),
        "{:?}",
        s.layout()
    );

    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let cpu0 = process_cpu_seconds(pid);
    s.scan(t0);
    std::thread::sleep(Duration::from_secs(2));
    let t1 = Instant::now();
    let cpu1 = process_cpu_seconds(pid);
    let snap = s.scan(t1);
    let _ = busy.kill();
    let _ = busy.wait();

    let w = find(&snap, &id);
    let truth = (cpu1 - cpu0) / (t1 - t0).as_secs_f64();
    let agent = w.rates.cpu[0].expect("CPU rate from v2 cpu.stat");
    eprintln!("v2 busy loop: agent {agent:.3} cores, truth {truth:.3}");
    assert!(truth > 0.2, "the busy loop barely ran ({truth:.3} cores)");
    assert!(
        within(agent, truth, 0.10),
        "agent {agent:.3} vs truth {truth:.3}"
    );
    assert!(w.stats.psi.cpu.is_some() || !unified.join(&rel).join("cpu.pressure").exists());
}
