//! cgroup v2 id → path, for the sources that only see ids (eBPF): the id of a v2 cgroup is the
//! inode number of its directory, so a miss walks the unified hierarchy.
//!
//! Results are cached; a miss triggers at most one walk per tick (a burst of new cgroups costs
//! one walk, which resolves all of them), and each tick forgets ids no longer in use.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug)]
pub struct CgroupPaths {
    root: Option<PathBuf>,
    cache: HashMap<u64, String>,
    walked_this_tick: bool,
}

impl CgroupPaths {
    pub fn new(root: Option<PathBuf>) -> Self {
        Self {
            root,
            cache: HashMap::new(),
            walked_this_tick: false,
        }
    }

    /// Call once per tick: allows one more walk, and forgets ids that were not asked about.
    pub fn next_tick(&mut self, live: &[u64]) {
        self.walked_this_tick = false;
        self.cache.retain(|id, _| live.contains(id));
    }

    /// The path relative to the hierarchy root (`/` for the root itself).
    pub fn resolve(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.cache.get(&id) {
            return Some(p.clone());
        }
        if self.walked_this_tick {
            return None;
        }
        self.walked_this_tick = true;
        let root = self.root.clone()?;
        let mut found = HashMap::new();
        walk(&root, &root, &mut found, 0);
        let out = found.get(&id).cloned();
        // Keep everything the walk found: other new ids of this tick resolve without another
        // walk, and `next_tick` drops what is not in use.
        self.cache.extend(found);
        out
    }
}

fn walk(root: &Path, dir: &Path, out: &mut HashMap<u64, String>, depth: u32) {
    // Kubernetes nests 4–6 levels; 32 guards against a pathological tree.
    if depth > 32 {
        return;
    }
    if let Ok(meta) = std::fs::metadata(dir) {
        let rel = dir.strip_prefix(root).map_or_else(
            |_| dir.display().to_string(),
            |r| format!("/{}", r.display()),
        );
        out.insert(meta.ino(), rel);
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &e.path(), out, depth + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_inode_resolves_to_its_relative_path() {
        let root = std::env::temp_dir().join(format!("nodeward-cgpath-{}", std::process::id()));
        let child = root.join("kubepods").join("pod1");
        std::fs::create_dir_all(&child).expect("mkdir");
        let ino = std::fs::metadata(&child).expect("stat").ino();
        let mut paths = CgroupPaths::new(Some(root.clone()));
        assert_eq!(paths.resolve(ino).as_deref(), Some("/kubepods/pod1"));
        std::fs::remove_dir_all(&root).expect("cleanup");
    }
}
