//! Cgroup id → path below the cgroup v2 root, for sources that only see ids (eBPF).
//!
//! The id of a v2 cgroup is the inode number of its directory. Unknown ids trigger one walk of
//! the hierarchy at most per refresh interval, so a burst of short-lived cgroups costs one walk.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[derive(Debug)]
pub struct CgroupPaths {
    root: PathBuf,
    by_id: HashMap<u64, String>,
    last_walk: Option<Instant>,
    min_interval: Duration,
}

impl CgroupPaths {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            by_id: HashMap::new(),
            last_walk: None,
            min_interval: Duration::from_secs(1),
        }
    }

    /// The path of `id` relative to the root (`/` for the root itself), if it exists.
    pub fn lookup(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.by_id.get(&id) {
            return Some(p.clone());
        }
        let due = self
            .last_walk
            .is_none_or(|t| t.elapsed() >= self.min_interval);
        if due {
            self.walk();
        }
        self.by_id.get(&id).cloned()
    }

    fn walk(&mut self) {
        self.last_walk = Some(Instant::now());
        let mut found = HashMap::new();
        let mut stack = vec![(self.root.clone(), 0u32)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let rel = dir
                .strip_prefix(&self.root)
                .map(|r| format!("/{}", r.display()))
                .unwrap_or_else(|_| dir.display().to_string());
            found.insert(meta.ino(), rel);
            if depth >= 32 {
                continue;
            }
            // A cgroup that vanishes mid-walk is simply not found.
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
        self.by_id = found;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_directories_by_inode() {
        let root = std::env::temp_dir().join(format!("nodeward-cgpaths-{}", std::process::id()));
        let child = root.join("kubepods.slice").join("pod1");
        std::fs::create_dir_all(&child).expect("mkdir");
        let id = std::fs::metadata(&child).expect("stat").ino();
        let mut paths = CgroupPaths::new(&root);
        assert_eq!(paths.lookup(id).as_deref(), Some("/kubepods.slice/pod1"));
        assert_eq!(paths.lookup(u64::MAX), None);
        let _ = std::fs::remove_dir_all(&root);
    }
}
