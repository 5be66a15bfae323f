//! Which cgroup hierarchies exist under the configured root, found by the files that mark them
//! rather than by the filesystem type, so the same code reads the host's `/sys/fs/cgroup`, a
//! host tree mounted elsewhere in a DaemonSet, and a fixture tree in a temp directory.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// The v1 controller hierarchies the stats need, each where it is mounted (`cpu` and `cpuacct`
/// are often one hierarchy, `cpu,cpuacct`, with two symlinks).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct V1Dirs {
    pub cpu: Option<PathBuf>,
    pub cpuacct: Option<PathBuf>,
    pub memory: Option<PathBuf>,
    pub blkio: Option<PathBuf>,
    pub pids: Option<PathBuf>,
}

impl V1Dirs {
    fn find(root: &Path) -> Self {
        let first = |names: &[&str]| {
            names
                .iter()
                .map(|n| root.join(n))
                .find(|p| p.join("cgroup.procs").exists())
        };
        Self {
            cpu: first(&["cpu", "cpu,cpuacct", "cpuacct,cpu"]),
            cpuacct: first(&["cpuacct", "cpu,cpuacct", "cpuacct,cpu"]),
            memory: first(&["memory"]),
            blkio: first(&["blkio"]),
            pids: first(&["pids"]),
        }
    }

    fn any(&self) -> bool {
        self.cpu.is_some()
            || self.cpuacct.is_some()
            || self.memory.is_some()
            || self.blkio.is_some()
            || self.pids.is_some()
    }

    /// The hierarchy walked to discover workloads on v1: the one whose stats matter most.
    fn primary(&self) -> Option<&Path> {
        [
            &self.memory,
            &self.cpuacct,
            &self.cpu,
            &self.pids,
            &self.blkio,
        ]
        .into_iter()
        .find_map(|d| d.as_deref())
    }
}

/// How cgroups are laid out under the root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "layout", rename_all = "snake_case")]
pub enum Layout {
    /// Pure cgroup v2: every controller in one hierarchy.
    V2 { unified: PathBuf },
    /// v1 controllers, plus a v2 hierarchy (cgroup ids, PSI) usually without controllers.
    Hybrid { unified: PathBuf, v1: V1Dirs },
    /// v1 only: no cgroup ids, so eBPF attribution has to go through network namespaces.
    V1 { v1: V1Dirs },
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{0} holds no cgroup hierarchy (no cgroup.controllers, no v1 controller directories)")]
    NotACgroupRoot(PathBuf),
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::V2 { unified } => write!(f, "cgroup v2 at {}", unified.display()),
            Self::Hybrid { unified, .. } => {
                write!(f, "hybrid: v1 controllers, v2 at {}", unified.display())
            }
            Self::V1 { .. } => write!(f, "cgroup v1 only"),
        }
    }
}

impl Layout {
    /// Recognises pure v2 (`<root>/cgroup.controllers`), hybrid (`<root>/unified` beside v1
    /// controller directories) and v1.
    pub fn detect(root: &Path) -> Result<Self, LayoutError> {
        if root.join("cgroup.controllers").exists() {
            return Ok(Self::V2 {
                unified: root.to_path_buf(),
            });
        }
        let v1 = V1Dirs::find(root);
        let unified = root.join("unified");
        let has_unified = unified.join("cgroup.controllers").exists();
        match (has_unified, v1.any()) {
            (true, true) => Ok(Self::Hybrid { unified, v1 }),
            (true, false) => Ok(Self::V2 { unified }),
            (false, true) => Ok(Self::V1 { v1 }),
            (false, false) => Err(LayoutError::NotACgroupRoot(root.to_path_buf())),
        }
    }

    /// The v2 hierarchy, whose directory inode numbers are the cgroup ids eBPF reports.
    pub fn unified(&self) -> Option<&Path> {
        match self {
            Self::V2 { unified } | Self::Hybrid { unified, .. } => Some(unified),
            Self::V1 { .. } => None,
        }
    }

    pub fn v1(&self) -> Option<&V1Dirs> {
        match self {
            Self::Hybrid { v1, .. } | Self::V1 { v1 } => Some(v1),
            Self::V2 { .. } => None,
        }
    }

    /// The hierarchies walked to discover workloads: the v2 one (where systemd and the runtimes
    /// create every cgroup on hybrid hosts too) and the primary v1 one (where the cgroupfs
    /// driver may create them only).
    pub fn discovery_roots(&self) -> Vec<&Path> {
        let mut roots = Vec::new();
        if let Some(u) = self.unified() {
            roots.push(u);
        }
        if let Some(p) = self.v1().and_then(V1Dirs::primary) {
            roots.push(p);
        }
        roots
    }

    /// The directory of one workload in each hierarchy, given its path relative to the roots.
    pub fn dirs(&self, rel: &str) -> CgroupDirs {
        let at = |root: &Option<PathBuf>| root.as_ref().map(|r| r.join(rel));
        let unified = self.unified().map(|u| u.join(rel));
        match self.v1() {
            None => CgroupDirs {
                unified,
                ..CgroupDirs::default()
            },
            Some(v1) => CgroupDirs {
                unified,
                cpu: at(&v1.cpu),
                cpuacct: at(&v1.cpuacct),
                memory: at(&v1.memory),
                blkio: at(&v1.blkio),
                pids: at(&v1.pids),
            },
        }
    }
}

/// Where one workload's files are: the v2 directory and, on v1/hybrid hosts, one directory per
/// v1 controller. Any of them may be absent or may not exist (a controller not mounted, a
/// runtime that did not create the cgroup there).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupDirs {
    pub unified: Option<PathBuf>,
    pub cpu: Option<PathBuf>,
    pub cpuacct: Option<PathBuf>,
    pub memory: Option<PathBuf>,
    pub blkio: Option<PathBuf>,
    pub pids: Option<PathBuf>,
}

impl CgroupDirs {
    /// Whether the workload still exists in any hierarchy; a read that fails on a cgroup that
    /// no longer exists anywhere means it exited mid-scan, not that something is wrong.
    pub fn any_exists(&self) -> bool {
        [
            &self.unified,
            &self.cpu,
            &self.cpuacct,
            &self.memory,
            &self.blkio,
            &self.pids,
        ]
        .into_iter()
        .flatten()
        .any(|d| d.is_dir())
    }
}
