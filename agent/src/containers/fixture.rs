//! A fake cgroup filesystem of N workloads written to a directory, for tests and for the scan
//! benchmark (100, 1,000 and 5,000 containers). Every container gets stat files whose values
//! are derived from its index, and the generator returns what it wrote, so a scan of the tree
//! can be checked against the injected values rather than against itself.

use std::{
    io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use super::path::{Qos, Runtime};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixtureLayout {
    V2,
    V1,
    Hybrid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// One container as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub path: String,
    pub pod_uid: String,
    pub qos: Qos,
    pub container_id: String,
    pub runtime: Runtime,
    /// Injected values: CPU usage (ns), memory usage, inactive file, limit (bytes).
    pub cpu_usage_ns: u64,
    pub memory_bytes: u64,
    pub inactive_file_bytes: u64,
    pub memory_limit_bytes: u64,
}

/// A directory under the system temp dir, removed with everything in it on drop.
#[derive(Debug)]
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(stem: &str) -> io::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "{stem}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

const RUNTIMES: [(Runtime, &str); 4] = [
    (Runtime::Containerd, "cri-containerd-"),
    (Runtime::CriO, "crio-"),
    (Runtime::Docker, "docker-"),
    (Runtime::Isulad, "isulad-"),
];
const QOS: [Qos; 3] = [Qos::Guaranteed, Qos::Burstable, Qos::BestEffort];
const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "blkio", "pids"];

/// Writes `containers` containers (two per pod, QoS classes and runtimes taken in turn) plus
/// `services` systemd services into `root`, laid out as `layout` with the kubelet's `driver`.
pub fn write_tree(
    root: &Path,
    layout: FixtureLayout,
    driver: Driver,
    containers: usize,
    services: usize,
) -> io::Result<Vec<Written>> {
    let (unified, v1) = match layout {
        FixtureLayout::V2 => (Some(root.to_path_buf()), false),
        FixtureLayout::V1 => (None, true),
        FixtureLayout::Hybrid => (Some(root.join("unified")), true),
    };
    if let Some(u) = &unified {
        std::fs::create_dir_all(u)?;
        std::fs::write(
            u.join("cgroup.controllers"),
            if v1 { "" } else { "cpu io memory pids\n" },
        )?;
        std::fs::write(u.join("cgroup.procs"), "")?;
    }
    if v1 {
        for c in V1_CONTROLLERS {
            std::fs::create_dir_all(root.join(c))?;
            std::fs::write(root.join(c).join("cgroup.procs"), "")?;
        }
    }

    let mut written = Vec::with_capacity(containers);
    for i in 0..containers {
        let w = container(i, driver);
        if let Some(u) = &unified {
            let dir = u.join(&w.path);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("cgroup.procs"), "")?;
            write_psi(&dir)?;
            if !v1 {
                write_v2(&dir, &w)?;
            }
        }
        if v1 {
            for c in V1_CONTROLLERS {
                let dir = root.join(c).join(&w.path);
                std::fs::create_dir_all(&dir)?;
                std::fs::write(dir.join("cgroup.procs"), "")?;
            }
            write_v1(root, &w)?;
        }
        written.push(w);
    }
    for s in 0..services {
        let rel = format!("system.slice/fixture-{s}.service");
        for base in unified
            .iter()
            .cloned()
            .chain(V1_CONTROLLERS.iter().filter(|_| v1).map(|c| root.join(c)))
        {
            std::fs::create_dir_all(base.join(&rel))?;
            std::fs::write(base.join(&rel).join("cgroup.procs"), "")?;
        }
    }
    Ok(written)
}

fn container(i: usize, driver: Driver) -> Written {
    let pod = i / 2;
    let qos = QOS[pod % QOS.len()];
    let (runtime, prefix) = RUNTIMES[i % RUNTIMES.len()];
    let pod_uid = format!("{:08x}-0000-4000-8000-{:012x}", pod, pod);
    let container_id = format!("{:064x}", 0xc0ff_ee00_u64 + i as u64);
    let path = match driver {
        Driver::Systemd => {
            let uid = pod_uid.replace('-', "_");
            let pod_slice = match qos {
                Qos::Guaranteed => format!("kubepods.slice/kubepods-pod{uid}.slice"),
                q => format!(
                    "kubepods.slice/kubepods-{0}.slice/kubepods-{0}-pod{uid}.slice",
                    q.as_str()
                ),
            };
            format!("{pod_slice}/{prefix}{container_id}.scope")
        }
        Driver::Cgroupfs => match qos {
            Qos::Guaranteed => format!("kubepods/pod{pod_uid}/{container_id}"),
            q => format!("kubepods/{}/pod{pod_uid}/{container_id}", q.as_str()),
        },
    };
    let n = i as u64 + 1;
    Written {
        path,
        pod_uid,
        qos,
        container_id,
        runtime: match driver {
            Driver::Systemd => runtime,
            Driver::Cgroupfs => Runtime::Unknown,
        },
        cpu_usage_ns: n * 1_000_000_000,
        memory_bytes: (n * 10) << 20,
        inactive_file_bytes: n << 20,
        memory_limit_bytes: 1 << 30,
    }
}

fn write_psi(dir: &Path) -> io::Result<()> {
    let psi = "some avg10=1.50 avg60=0.75 avg300=0.25 total=123456\nfull avg10=0.50 avg60=0.25 avg300=0.10 total=65432\n";
    for f in ["cpu.pressure", "memory.pressure", "io.pressure"] {
        std::fs::write(dir.join(f), psi)?;
    }
    Ok(())
}

fn write_v2(dir: &Path, w: &Written) -> io::Result<()> {
    let usec = w.cpu_usage_ns / 1000;
    std::fs::write(
        dir.join("cpu.stat"),
        format!(
            "usage_usec {usec}\nuser_usec {}\nsystem_usec {}\nnr_periods 100\nnr_throttled 7\nthrottled_usec 35000\n",
            usec * 3 / 4,
            usec / 4
        ),
    )?;
    std::fs::write(dir.join("memory.current"), format!("{}\n", w.memory_bytes))?;
    std::fs::write(
        dir.join("memory.max"),
        format!("{}\n", w.memory_limit_bytes),
    )?;
    std::fs::write(
        dir.join("memory.stat"),
        format!(
            "anon {}\nfile {}\ninactive_file {}\nactive_file 0\n",
            w.memory_bytes / 2,
            w.memory_bytes / 2,
            w.inactive_file_bytes
        ),
    )?;
    std::fs::write(
        dir.join("memory.events"),
        "low 0\nhigh 0\nmax 0\noom 1\noom_kill 1\n",
    )?;
    std::fs::write(
        dir.join("io.stat"),
        "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n",
    )?;
    std::fs::write(dir.join("pids.current"), "3\n")?;
    std::fs::write(dir.join("pids.max"), "max\n")
}

fn write_v1(root: &Path, w: &Written) -> io::Result<()> {
    let at = |c: &str, f: &str| root.join(c).join(&w.path).join(f);
    std::fs::write(
        at("cpuacct", "cpuacct.usage"),
        format!("{}\n", w.cpu_usage_ns),
    )?;
    let ticks = w.cpu_usage_ns / 10_000_000;
    std::fs::write(
        at("cpuacct", "cpuacct.stat"),
        format!("user {}\nsystem {}\n", ticks * 3 / 4, ticks / 4),
    )?;
    std::fs::write(
        at("cpu", "cpu.stat"),
        "nr_periods 100\nnr_throttled 7\nthrottled_time 35000000\nnr_bursts 0\nburst_time 0\n",
    )?;
    std::fs::write(
        at("memory", "memory.usage_in_bytes"),
        format!("{}\n", w.memory_bytes),
    )?;
    std::fs::write(
        at("memory", "memory.limit_in_bytes"),
        format!("{}\n", w.memory_limit_bytes),
    )?;
    std::fs::write(
        at("memory", "memory.stat"),
        format!(
            "cache {0}\nrss {0}\ntotal_cache {0}\ntotal_rss {0}\ntotal_shmem 0\ntotal_inactive_file {1}\n",
            w.memory_bytes / 2,
            w.inactive_file_bytes
        ),
    )?;
    std::fs::write(
        at("memory", "memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
    )?;
    std::fs::write(
        at("blkio", "blkio.throttle.io_service_bytes"),
        "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Async 0\n8:0 Discard 0\n8:0 Total 12288\nTotal 12288\n",
    )?;
    std::fs::write(
        at("blkio", "blkio.throttle.io_serviced"),
        "8:0 Read 1\n8:0 Write 2\n8:0 Sync 0\n8:0 Async 0\n8:0 Discard 0\n8:0 Total 3\nTotal 3\n",
    )?;
    std::fs::write(at("pids", "pids.current"), "3\n")?;
    std::fs::write(at("pids", "pids.max"), "max\n")
}
