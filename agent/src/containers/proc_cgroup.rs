//! `/proc/<pid>/cgroup`: which cgroup a process is in, in each hierarchy.

/// One process's cgroup membership.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcCgroup {
    /// The v2 path (the `0::` line), without the leading `/`.
    pub unified: Option<String>,
    /// `(controllers, path)` for each v1 line, e.g. `("cpu,cpuacct", "kubepods/...")`.
    pub v1: Vec<(String, String)>,
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
            let path = path.trim().trim_start_matches('/').to_owned();
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

    #[test]
    fn combined_v1_controllers_are_matched_by_member() {
        let p = ProcCgroup::parse("3:cpu,cpuacct:/kubepods/pod1/abc\ngarbage\n");
        assert_eq!(
            p.candidate_paths().collect::<Vec<_>>(),
            ["kubepods/pod1/abc", "kubepods/pod1/abc"]
        );
    }
}
