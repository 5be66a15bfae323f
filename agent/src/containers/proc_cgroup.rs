//! `/proc/<pid>/cgroup`: which cgroup a process is in, in each hierarchy.

/// One process's cgroup membership.
///
/// The kernel writes each path relative to the reader's cgroup namespace root. An agent in a
/// private cgroup namespace (a DaemonSet pod) reads a host process's cgroup as
/// `/../../../system.slice/sshd.service`: the `..` steps climb from its own cgroup to the
/// common ancestor. They are dropped here and [`ProcCgroup::outside_namespace`] set: the rest is
/// the host path below that ancestor — the whole host path where the ancestor is the root (every
/// host service, seen from a pod under `kubepods`), else a tail of it that still ends in the
/// pod and container segments (`pod<uid>/<id>`), which [`crate::containers::Inventory::by_pid`]
/// matches as a suffix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcCgroup {
    /// The v2 path (the `0::` line), without the leading `/` (or `..` steps).
    pub unified: Option<String>,
    /// `(controllers, path)` for each v1 line, e.g. `("cpu,cpuacct", "kubepods/...")`.
    pub v1: Vec<(String, String)>,
    /// Some path climbed above the reader's cgroup namespace root (had leading `..` steps).
    pub outside_namespace: bool,
}

/// The path without its leading `/` and `..` steps, and whether it had any such step.
fn below_common_ancestor(path: &str) -> (String, bool) {
    let mut rest = path.trim().trim_start_matches('/');
    let mut climbed = false;
    while let Some(r) = rest
        .strip_prefix("..")
        .filter(|r| r.is_empty() || r.starts_with('/'))
    {
        climbed = true;
        rest = r.trim_start_matches('/');
    }
    (rest.to_owned(), climbed)
}

impl ProcCgroup {
    /// Parses lines `hierarchy-id:controller-list:path`; malformed lines are ignored.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (path, climbed) = below_common_ancestor(path);
            out.outside_namespace |= climbed;
            if id == "0" && controllers.is_empty() {
                out.unified = Some(path);
            } else if !controllers.is_empty() {
                out.v1.push((controllers.to_owned(), path));
            }
        }
        out
    }

    /// Paths to try, most telling first: the v2 path, then the v1 controllers the stats use.
    /// The root (`""`) is never a workload and is left out.
    pub fn candidate_paths(&self) -> impl Iterator<Item = &str> {
        let v1 = ["memory", "cpuacct", "cpu", "pids", "blkio"]
            .into_iter()
            .flat_map(|want| {
                self.v1
                    .iter()
                    .filter(move |(c, _)| c.split(',').any(|c| c == want))
                    .map(|(_, p)| p.as_str())
            });
        self.unified
            .as_deref()
            .into_iter()
            .chain(v1)
            .filter(|p| !p.is_empty())
    }

    /// The cgroup the process runs in, as an absolute path (`/kubepods/...`): the first of
    /// [`Self::candidate_paths`], else `/` when the v2 line puts it at the root; `None` when
    /// the text names no useful cgroup at all.
    pub fn path(&self) -> Option<String> {
        match self.candidate_paths().next() {
            Some(p) => Some(format!("/{p}")),
            None => self.unified.as_ref().map(|_| "/".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured on this project's hybrid host (kernel 6.18).
    const HYBRID: &str = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n6:freezer:/\n5:devices:/\n4:memory:/process_api/2e992bab960331be0d707fe78346e218\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    #[test]
    fn hybrid_host_lines_give_the_memory_path_and_skip_roots() {
        let p = ProcCgroup::parse(HYBRID);
        assert_eq!(p.unified.as_deref(), Some(""));
        let c: Vec<&str> = p.candidate_paths().collect();
        assert_eq!(c, ["process_api/2e992bab960331be0d707fe78346e218"]);
    }

    #[test]
    fn pure_v2_line() {
        let p =
            ProcCgroup::parse("0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-ab.scope\n");
        assert_eq!(
            p.candidate_paths().collect::<Vec<_>>(),
            ["kubepods.slice/kubepods-pod1.slice/cri-containerd-ab.scope"]
        );
    }

    #[test]
    fn path_is_absolute_and_falls_back_to_the_root_only_with_a_v2_line() {
        assert_eq!(
            ProcCgroup::parse(HYBRID).path().as_deref(),
            Some("/process_api/2e992bab960331be0d707fe78346e218")
        );
        assert_eq!(ProcCgroup::parse("0::/\n").path().as_deref(), Some("/"));
        assert_eq!(ProcCgroup::parse("4:memory:/\n").path(), None);
        assert_eq!(ProcCgroup::parse("").path(), None);
    }

    /// Read by an agent in a private cgroup namespace whose own cgroup is
    /// `/kubepods/burstable/pod<a>/<agent-id>` on the host.
    #[test]
    fn paths_above_a_private_namespace_root_lose_their_climb_and_say_so() {
        let svc = ProcCgroup::parse("0::/../../../../system.slice/sshd.service\n");
        assert!(svc.outside_namespace);
        assert_eq!(svc.path().as_deref(), Some("/system.slice/sshd.service"));
        let id = "a".repeat(64);
        let sibling = ProcCgroup::parse(&format!("0::/../../podb/{id}\n"));
        assert!(sibling.outside_namespace);
        assert_eq!(sibling.path(), Some(format!("/podb/{id}")));
        let own = ProcCgroup::parse("0::/\n");
        assert!(!own.outside_namespace);
        assert_eq!(own.path().as_deref(), Some("/"));
        // A name that only starts with two dots is a name, not a step.
        let odd = ProcCgroup::parse("0::/..odd/x\n");
        assert!(!odd.outside_namespace);
        assert_eq!(odd.path().as_deref(), Some("/..odd/x"));
    }

    #[test]
    fn combined_v1_controllers_are_matched_by_member() {
        let p = ProcCgroup::parse("3:cpu,cpuacct:/kubepods/pod1/abc\ngarbage\n");
        assert_eq!(
            p.candidate_paths().collect::<Vec<_>>(),
            ["kubepods/pod1/abc", "kubepods/pod1/abc"]
        );
    }
}
