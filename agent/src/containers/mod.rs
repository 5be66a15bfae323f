//! Every workload on the node, found in the cgroup filesystem: Kubernetes containers (pod UID,
//! QoS class, container id, runtime; kubelet systemd and cgroupfs drivers), containers run
//! directly by a runtime, and plain systemd services. Works on pure v2, v1 and hybrid layouts
//! under a configurable root.
//!
//! [`Inventory`] is rebuilt on every scan and answers the questions other collectors ask:
//! which workload owns this cgroup id (the v2 directory inode eBPF reports), this PID, this
//! network namespace.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use serde::Serialize;

// The fake cgroupfs of the unit tests, the integration tests and the scan benchmark: never in
// the shipped binary (the tests crate turns the feature on; release builds leave it off).
pub mod cri;
pub mod discovery;
#[cfg(any(test, feature = "test-fixtures"))]
pub mod fixture;
pub mod layout;
pub mod path;
pub mod podresources;
pub mod proc_cgroup;
pub mod selector;

pub use discovery::{Discovery, Found};
pub use layout::{CgroupDirs, Layout, LayoutError};
pub use path::{identify, Identity, Qos, Runtime};

/// Directories deeper than this below a hierarchy root are not walked: the deepest workload
/// (`kubepods.slice/<qos>.slice/<pod>.slice/<container>.scope`) is at depth 4, and walking
/// into every sub-cgroup would make a scan cost grow with what containers do inside.
const MAX_DEPTH: usize = 4;

/// `[containers]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainersConfig {
    /// Discover workloads under `paths.cgroup_root` and read their cgroup stats every tick.
    pub enabled: bool,
    /// The container runtime's CRI socket (path or `unix://` URL); empty = the first of
    /// containerd's and CRI-O's default sockets that exists; `"none"` = no runtime lookups.
    pub runtime_endpoint: String,
    /// How often the runtime's pods and containers are listed again.
    #[serde(with = "humantime_serde")]
    pub runtime_resync: std::time::Duration,
    /// How long names from the last listing are kept once the runtime stops answering.
    #[serde(with = "humantime_serde")]
    pub runtime_keep_names: std::time::Duration,
    /// Pod annotations copied into the identity (all others are ignored).
    pub runtime_annotations: Vec<String>,
    /// The kubelet's pod-resources socket (path or `unix://` URL), listed every
    /// `runtime_resync` to tie GPUs to the pods they are assigned to where NVML lists no
    /// processes; `"none"` = not used.
    pub pod_resources_socket: String,
}

impl Default for ContainersConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            runtime_endpoint: String::new(),
            runtime_resync: std::time::Duration::from_secs(10),
            runtime_keep_names: std::time::Duration::from_secs(300),
            runtime_annotations: Vec::new(),
            pod_resources_socket: podresources::DEFAULT_SOCKET.to_owned(),
        }
    }
}

impl ContainersConfig {
    /// What the runtime identity task reads.
    pub fn runtime(&self) -> cri::Settings {
        cri::Settings {
            endpoint: self.runtime_endpoint.clone(),
            // A zero period would spin on the runtime.
            resync: self.runtime_resync.max(std::time::Duration::from_secs(1)),
            keep_names: self.runtime_keep_names,
            annotations: self.runtime_annotations.clone(),
        }
    }
}

/// One workload found on this scan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Container {
    /// Path relative to the hierarchy roots, without a leading `/`.
    pub path: String,
    #[serde(flatten)]
    pub identity: Identity,
    /// Inode of the v2 directory: what `bpf_get_current_cgroup_id` and friends return.
    pub cgroup_id: Option<u64>,
    /// Inode of the network namespace its first process is in.
    pub netns: Option<u64>,
}

/// The workloads of one scan and the lookups into them.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub containers: Vec<Container>,
    by_path: HashMap<String, usize>,
    by_cgroup_id: HashMap<u64, usize>,
    by_pid: HashMap<u32, usize>,
    by_netns: HashMap<u64, Vec<usize>>,
}

impl Inventory {
    /// Walks the hierarchies under `layout` and records every recognised workload, its cgroup
    /// id, its processes and their network namespace (read under `proc_root`). A workload that
    /// exits while it is being looked at is left out or recorded without the missing parts.
    pub fn scan(layout: &Layout, proc_root: &Path) -> Self {
        let found = discovery::walk_roots(layout, &mut |_| true);
        let mut b = InventoryBuilder::new(proc_root);
        for f in &found {
            let dirs = layout.dirs(&f.path);
            let procs = b.read_procs(&dirs);
            b.push(f, &dirs, procs);
        }
        b.finish()
    }

    /// Builds an inventory from already-known workloads (tests, other sources' fixtures).
    pub fn from_containers(containers: Vec<Container>) -> Self {
        let mut inv = Self::default();
        for c in containers {
            let index = inv.containers.len();
            inv.by_path.insert(c.path.clone(), index);
            if let Some(id) = c.cgroup_id {
                inv.by_cgroup_id.insert(id, index);
            }
            if let Some(ns) = c.netns {
                inv.by_netns.entry(ns).or_default().push(index);
            }
            inv.containers.push(c);
        }
        inv
    }

    pub fn len(&self) -> usize {
        self.containers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
    }

    /// The workload whose v2 directory has this inode number.
    pub fn by_cgroup_id(&self, id: u64) -> Option<&Container> {
        self.by_cgroup_id.get(&id).map(|&i| &self.containers[i])
    }

    /// The workload at this path relative to the hierarchy roots, or the nearest workload
    /// above it (a process in a container's own sub-cgroup belongs to the container).
    pub fn by_path(&self, path: &str) -> Option<&Container> {
        let mut p = path.trim_matches('/');
        loop {
            if let Some(&i) = self.by_path.get(p) {
                return Some(&self.containers[i]);
            }
            p = &p[..p.rfind('/')?];
        }
    }

    /// The workload a process belongs to: from this scan's `cgroup.procs`, else from
    /// `<proc_root>/<pid>/cgroup` (a process started since the scan).
    pub fn by_pid(&self, pid: u32, proc_root: &Path) -> Option<&Container> {
        if let Some(&i) = self.by_pid.get(&pid) {
            return Some(&self.containers[i]);
        }
        let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
        let cg = proc_cgroup::ProcCgroup::parse(&text);
        if let Some(c) = cg.candidate_paths().find_map(|p| self.by_path(p)) {
            return Some(c);
        }
        // Read from a private cgroup namespace below the common ancestor: a tail of the path.
        cg.outside_namespace
            .then(|| cg.candidate_paths().find_map(|p| self.by_path_tail(p)))
            .flatten()
    }

    /// The workload whose path ends with `tail` (whole segments), or with the nearest prefix
    /// of it: the one it names when `tail` is a path below a common ancestor.
    fn by_path_tail(&self, tail: &str) -> Option<&Container> {
        let mut p = tail.trim_matches('/');
        loop {
            let suffix = format!("/{p}");
            if let Some(c) = self
                .containers
                .iter()
                .find(|c| c.path == p || c.path.ends_with(&suffix))
            {
                return Some(c);
            }
            p = &p[..p.rfind('/')?];
        }
    }

    /// The workloads in this network namespace: all containers of one pod share it.
    pub fn by_netns(&self, inode: u64) -> impl Iterator<Item = &Container> {
        self.by_netns
            .get(&inode)
            .into_iter()
            .flatten()
            .map(|&i| &self.containers[i])
    }
}

/// A workload's processes, from its `cgroup.procs`, and the network namespace of the first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Procs {
    pub pids: Vec<u32>,
    pub netns: Option<u64>,
}

/// Builds an [`Inventory`] one workload at a time, from a walk's [`Found`] entries, reading
/// each one's processes or taking them from the caller (who knows they cannot have changed).
#[derive(Debug)]
pub struct InventoryBuilder {
    inv: Inventory,
    proc_root: PathBuf,
    host_netns: Option<u64>,
}

impl InventoryBuilder {
    pub fn new(proc_root: &Path) -> Self {
        Self {
            inv: Inventory::default(),
            proc_root: proc_root.to_path_buf(),
            host_netns: netns_of(proc_root, 1),
        }
    }

    /// The workload's processes (`cgroup.procs`) and the network namespace of the first.
    pub fn read_procs(&self, dirs: &CgroupDirs) -> Procs {
        let pids = procs_of(dirs);
        let netns = pids.iter().find_map(|&pid| netns_of(&self.proc_root, pid));
        Procs { pids, netns }
    }

    pub fn push(&mut self, found: &Found, dirs: &CgroupDirs, procs: Procs) -> &Container {
        let inv = &mut self.inv;
        let cgroup_id = found.v2_inode.or_else(|| {
            // Found in the v1 walk only: the runtime may still have a v2 directory.
            let d = dirs.unified.as_deref()?;
            std::fs::metadata(d).ok().map(|m| m.ino())
        });
        let index = inv.containers.len();
        inv.by_path.insert(found.path.clone(), index);
        if let Some(id) = cgroup_id {
            inv.by_cgroup_id.insert(id, index);
        }
        for &pid in &procs.pids {
            inv.by_pid.insert(pid, index);
        }
        // The host's namespace is shared by every host-network pod and every service: it
        // names no single workload.
        if let Some(ns) = procs.netns.filter(|ns| Some(*ns) != self.host_netns) {
            inv.by_netns.entry(ns).or_default().push(index);
        }
        inv.containers.push(Container {
            path: found.path.clone(),
            identity: found.identity.clone(),
            cgroup_id,
            netns: procs.netns,
        });
        &inv.containers[index]
    }

    pub fn finish(self) -> Inventory {
        self.inv
    }
}

/// The processes of a workload, from the v2 directory where it exists, else a v1 one.
fn procs_of(dirs: &CgroupDirs) -> Vec<u32> {
    let candidates = [
        &dirs.unified,
        &dirs.memory,
        &dirs.cpuacct,
        &dirs.cpu,
        &dirs.pids,
    ];
    for dir in candidates.into_iter().flatten() {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            return text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        }
    }
    Vec::new()
}

fn netns_of(proc_root: &Path, pid: u32) -> Option<u64> {
    std::fs::metadata(proc_root.join(pid.to_string()).join("ns/net"))
        .ok()
        .map(|m| m.ino())
}

#[cfg(test)]
mod tests;
