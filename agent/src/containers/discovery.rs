//! Which cgroup directories are workloads, remembered between scans: the hierarchies are walked
//! again only when a directory was created or removed in them since the last walk.
//!
//! Changes are learnt from inotify: every directory the walk lists gets a watch *before* it is
//! listed, so a child created after the listing is reported and one created before is in it.
//! cgroupfs directories are only ever made and removed by `mkdir`/`rmdir` (runtimes, systemd,
//! the kubelet), which notify the parent's watchers like on any filesystem, and every mount of
//! a hierarchy (the host's, a DaemonSet's host path, a cgroup namespace's root) shares its
//! inodes, so a watch sees changes made through any of them. The directories' own timestamps
//! cannot serve: kernfs only updates a directory's mtime when an attribute was once set on it.
//!
//! Where inotify is not available or a watch cannot be added (the per-user watch limit), the
//! next scan walks again, as if nothing were remembered. The hierarchies are also walked at
//! least every [`REWALK_EVERY`] whatever the watches say, so a change they missed cannot last.

use std::{
    collections::HashSet,
    os::{fd::OwnedFd, unix::fs::DirEntryExt as _},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{identify, Identity, Layout, MAX_DEPTH};

/// The longest the agent trusts its watches alone: past this since the last walk, the
/// hierarchies are walked again even without an event.
pub const REWALK_EVERY: Duration = Duration::from_secs(10);

/// A workload directory found in the walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Path relative to the hierarchy roots, without a leading `/`.
    pub path: String,
    pub identity: Identity,
    /// Inode of its v2 directory, when the v2 walk found it (readdir gives it without a stat).
    pub v2_inode: Option<u64>,
}

/// Walks every discovery root of `layout` and returns the workloads, sorted by path. `watch` is
/// called with each directory before it is listed; it returns `false` when the directory could
/// not be watched.
pub(super) fn walk_roots(layout: &Layout, watch: &mut dyn FnMut(&Path) -> bool) -> Vec<Found> {
    let mut found: Vec<Found> = Vec::new();
    let mut seen = HashSet::new();
    for root in layout.discovery_roots() {
        let is_v2 = Some(root) == layout.unified();
        walk(root, String::new(), 0, watch, &mut |rel, ino| {
            if seen.contains(rel) {
                return WalkAction::Skip;
            }
            match identify(rel) {
                Some(identity) => {
                    seen.insert(rel.to_owned());
                    found.push(Found {
                        path: rel.to_owned(),
                        identity,
                        v2_inode: is_v2.then_some(ino),
                    });
                    WalkAction::Skip
                }
                None => WalkAction::Descend,
            }
        });
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

enum WalkAction {
    Descend,
    Skip,
}

fn walk(
    dir: &Path,
    rel: String,
    depth: usize,
    watch: &mut dyn FnMut(&Path) -> bool,
    visit: &mut impl FnMut(&str, u64) -> WalkAction,
) {
    if depth >= MAX_DEPTH {
        return;
    }
    // Watched before it is listed: a child made in between is both listed and reported.
    watch(dir);
    // A directory that vanished since it was listed is simply not there any more.
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        // d_type from readdir: no stat per entry, and cgroup files are never directories.
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let child = if rel.is_empty() {
            name.to_owned()
        } else {
            format!("{rel}/{name}")
        };
        if let WalkAction::Descend = visit(&child, entry.ino()) {
            walk(&entry.path(), child, depth + 1, watch, visit);
        }
    }
}

/// The workloads of the last walk and the watches that say when it is out of date.
#[derive(Debug)]
pub struct Discovery {
    /// `None` when inotify is not available: every scan walks.
    inotify: Option<OwnedFd>,
    found: Arc<[Found]>,
    walked_at: Option<Instant>,
    /// A watch could not be added in the last walk: the next scan walks again.
    incomplete: bool,
    walks: u64,
    buf: Vec<u8>,
}

impl Default for Discovery {
    fn default() -> Self {
        Self::new()
    }
}

/// Events that can add or remove a workload directory below a watched one, or the watched one
/// itself.
fn watch_flags() -> rustix::fs::inotify::WatchFlags {
    use rustix::fs::inotify::WatchFlags as W;
    W::CREATE | W::DELETE | W::MOVED_FROM | W::MOVED_TO | W::DELETE_SELF | W::MOVE_SELF | W::ONLYDIR
}

impl Discovery {
    pub fn new() -> Self {
        use rustix::fs::inotify::{self, CreateFlags};
        let inotify = match inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::info!(error = %e, "no inotify: the cgroup hierarchies are walked on every scan");
                None
            }
        };
        Self {
            inotify,
            found: Arc::default(),
            walked_at: None,
            incomplete: false,
            walks: 0,
            buf: vec![0; 4096],
        }
    }

    /// A discovery that walks on every scan, as the agent did before it remembered (the
    /// benchmark's baseline).
    #[must_use]
    pub fn walking_every_scan() -> Self {
        Self {
            inotify: None,
            ..Self::new()
        }
    }

    /// How many times the hierarchies were walked.
    pub fn walks(&self) -> u64 {
        self.walks
    }

    /// The workloads under `layout`, walked again only when something changed (or
    /// [`REWALK_EVERY`] after the last walk).
    pub fn workloads(&mut self, layout: &Layout, now: Instant) -> Arc<[Found]> {
        if self.must_walk(now) {
            self.walks += 1;
            self.walked_at = Some(now);
            let mut complete = true;
            let inotify = self.inotify.as_ref();
            let flags = watch_flags();
            self.found = walk_roots(layout, &mut |dir| {
                let Some(fd) = inotify else { return false };
                match rustix::fs::inotify::add_watch(fd, dir, flags) {
                    Ok(_) => true,
                    // Gone since its parent was listed: nothing to watch, nothing missed.
                    Err(rustix::io::Errno::NOENT) => true,
                    Err(e) => {
                        if complete {
                            tracing::debug!(dir = %dir.display(), error = %e, "cannot watch a cgroup directory: walking on every scan");
                        }
                        complete = false;
                        false
                    }
                }
            })
            .into();
            self.incomplete = !complete;
        }
        Arc::clone(&self.found)
    }

    /// Whether the last walk may be out of date. Reads every pending event, so that the next
    /// call starts from a clean queue.
    fn must_walk(&mut self, now: Instant) -> bool {
        let Some(fd) = &self.inotify else {
            return true;
        };
        let mut changed = false;
        loop {
            match rustix::io::read(fd, &mut self.buf) {
                // Any event at all (a directory made or removed, a queue overflow, a watch
                // dropped because its directory went away) means the walk is out of date.
                Ok(n) if n > 0 => changed = true,
                Ok(_) => break,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "reading inotify events");
                    changed = true;
                    break;
                }
            }
        }
        changed
            || self.incomplete
            || self
                .walked_at
                .is_none_or(|at| now.saturating_duration_since(at) >= REWALK_EVERY)
    }
}
