//! GPU processes → cgroup → container. NVML names processes by host PID; `/proc/<pid>/cgroup`
//! names the cgroup, and the cgroup path names the container. The container discovery module
//! will refine the last step (pod and container names); until then the path and the container
//! id found in it are what the source reports, behind [`container_for_cgroup`].

use std::path::Path;

use crate::containers::proc_cgroup::ProcCgroup;

/// The cgroup a process runs in, from the text of `/proc/<pid>/cgroup`.
///
/// On a pure cgroup v2 host that is the `0::` line. On a hybrid host the `0::` line may say
/// only `/`, while the v1 controllers carry the container's path: then the `memory` (or `cpu`)
/// controller's path is used ([`ProcCgroup::path`], the parser container discovery uses too).
pub fn cgroup_path_from_proc(text: &str) -> Option<String> {
    ProcCgroup::parse(text).path()
}

/// Reads the cgroup of `pid` under `proc_root` (the host's `/proc` in a DaemonSet).
pub fn cgroup_of_pid(proc_root: &Path, pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    cgroup_path_from_proc(&text)
}

/// The container id in a cgroup path, if it has one: the 64-hex id that containerd, CRI-O,
/// Docker and Podman put in the last segments (`cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `docker-<id>.scope`, `libpod-<id>.scope`, or a bare `<id>` with the cgroupfs driver).
pub fn container_for_cgroup(path: &str) -> Option<String> {
    path.rsplit('/').find_map(|segment| {
        let segment = segment.strip_suffix(".scope").unwrap_or(segment);
        // `crio-conmon-<id>` is the monitor process, not the container.
        if segment.contains("conmon") {
            return None;
        }
        let id = segment.rsplit('-').next().unwrap_or(segment);
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c3ba5e8a5a1b6f3d6a0c2c8f9e7d6b5a4c3b2a1f0e9d8c7b6a5f4e3d2c1b0";

    #[test]
    fn pure_v2_systemd_driver_containerd() {
        let text = format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0c2d9d3e_7a8b_4c6d_9e0f_1a2b3c4d5e6f.slice/cri-containerd-{ID}.scope\n");
        let path = cgroup_path_from_proc(&text).expect("a path");
        assert!(
            path.ends_with(&format!("cri-containerd-{ID}.scope")),
            "{path}"
        );
        assert_eq!(container_for_cgroup(&path).as_deref(), Some(ID));
    }

    #[test]
    fn hybrid_host_uses_the_memory_controller_when_the_unified_path_is_root() {
        // Shape of /proc/<pid>/cgroup on a hybrid (v1 + unified) host, cgroupfs driver.
        let text = format!(
            "12:pids:/kubepods/besteffort/pod6b2f/{ID}\n\
             11:cpu,cpuacct:/kubepods/besteffort/pod6b2f/{ID}\n\
             4:memory:/kubepods/besteffort/pod6b2f/{ID}\n\
             1:name=systemd:/kubepods/besteffort/pod6b2f/{ID}\n\
             0::/\n"
        );
        let path = cgroup_path_from_proc(&text).expect("a path");
        assert_eq!(path, format!("/kubepods/besteffort/pod6b2f/{ID}"));
        assert_eq!(container_for_cgroup(&path).as_deref(), Some(ID));
    }

    #[test]
    fn docker_crio_and_podman_scopes() {
        for prefix in ["docker", "crio", "libpod"] {
            let path = format!("/system.slice/{prefix}-{ID}.scope");
            assert_eq!(container_for_cgroup(&path).as_deref(), Some(ID), "{path}");
        }
        assert_eq!(
            container_for_cgroup(&format!("/machine.slice/crio-conmon-{ID}.scope")),
            None
        );
    }

    #[test]
    fn a_host_process_has_a_cgroup_but_no_container() {
        let path = cgroup_path_from_proc("0::/system.slice/sshd.service\n").expect("a path");
        assert_eq!(path, "/system.slice/sshd.service");
        assert_eq!(container_for_cgroup(&path), None);
        assert_eq!(cgroup_path_from_proc("0::/\n").as_deref(), Some("/"));
        assert_eq!(cgroup_path_from_proc(""), None);
    }

    /// Inside a DaemonSet pod with a private cgroup namespace, a host service and another
    /// pod's container read relative to the agent's own cgroup.
    #[test]
    fn paths_read_from_a_private_cgroup_namespace_name_the_service_and_container() {
        let svc =
            cgroup_path_from_proc("0::/../../../../system.slice/sshd.service\n").expect("a path");
        assert_eq!(svc, "/system.slice/sshd.service", "the unit's host path");
        let path = cgroup_path_from_proc(&format!("0::/../../pod6b2f/{ID}\n")).expect("a path");
        assert_eq!(container_for_cgroup(&path).as_deref(), Some(ID));
    }

    #[test]
    fn reads_the_file_under_a_proc_root() {
        let dir = std::env::temp_dir().join(format!("nodeward-procs-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("4242")).expect("mkdir");
        std::fs::write(
            dir.join("4242/cgroup"),
            format!("0::/x/docker-{ID}.scope\n"),
        )
        .expect("write");
        assert_eq!(
            cgroup_of_pid(&dir, 4242),
            Some(format!("/x/docker-{ID}.scope"))
        );
        assert_eq!(cgroup_of_pid(&dir, 4243), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
