//! Whether cgroup programs can be attached so that they go away with the agent.
//!
//! Every program nodeward attaches to a cgroup (sock_ops, cgroup_skb, cgroup/sock_create) must
//! be held by a `bpf_link`: a link lives as long as a file descriptor of the agent, so a crash or
//! a SIGKILL detaches it, and it coexists with other programs on the cgroup. Linux added links
//! for cgroups in 5.7 (`BPF_LINK_CREATE`). On older kernels aya falls back to `BPF_PROG_ATTACH`,
//! which belongs to the cgroup, not to the agent: the program stays attached after a SIGKILL
//! and, in the mode aya uses, takes the cgroup's attach point from any other program. The agent
//! refuses such kernels instead of attaching.
//!
//! aya chooses the link path by kernel version (5.7 and later), so the decision needs both:
//! that version, and a feature probe of the running kernel (`BPF_LINK_CREATE` with a cgroup
//! attach type), which catches a kernel whose version string claims more than it has.

use aya::util::KernelVersion;

/// The first kernel with `bpf_link` for cgroups, and the one from which aya uses it.
pub const FIRST_CGROUP_LINK_KERNEL: (u8, u8) = (5, 7);

/// `BPF_LINK_CREATE` in `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_CGROUP_INET_INGRESS` in `enum bpf_attach_type`.
const BPF_CGROUP_INET_INGRESS: u32 = 0;

/// What the running kernel answered to `BPF_LINK_CREATE` for a cgroup attach type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkProbe {
    /// The command exists and takes cgroup attach types (it got as far as the program fd).
    Supported,
    /// `EINVAL`: no `BPF_LINK_CREATE`, or not for cgroups (a kernel before 5.7).
    Unsupported,
    /// Any other answer (`EPERM` without the privilege to use bpf(2), seccomp, ...).
    Unknown(String),
}

/// The decision: attach, or refuse with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupAttach {
    /// Programs are attached through links that end with the agent.
    Link,
    /// Refused: the sentence says what is missing and which kernel is needed.
    Refused(String),
}

/// Asks the kernel for a cgroup link with an invalid program fd: a kernel that has cgroup links
/// checks the attach type first (5.7–6.x) or the fd first (later ones) and fails with `EBADF`;
/// an older one does not know the command or the attach type and fails with `EINVAL`. Nothing
/// is created either way.
pub fn probe_link_create() -> LinkProbe {
    // union bpf_attr's link_create: prog_fd, target_fd, attach_type, flags.
    let attr: [u32; 4] = [u32::MAX, u32::MAX, BPF_CGROUP_INET_INGRESS, 0];
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes from a pointer to a live array; the
    // kernel zero-extends a short attribute and writes nothing back for this command.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if ret >= 0 {
        // Cannot happen with an invalid fd; close whatever it is rather than leak it.
        if let Ok(fd) = i32::try_from(ret) {
            // SAFETY: the kernel just returned this fd to us and nothing else holds it.
            unsafe { libc::close(fd) };
        }
        return LinkProbe::Supported;
    }
    interpret(std::io::Error::last_os_error().raw_os_error())
}

fn interpret(errno: Option<i32>) -> LinkProbe {
    match errno {
        Some(libc::EBADF) => LinkProbe::Supported,
        Some(libc::EINVAL) => LinkProbe::Unsupported,
        Some(e) => LinkProbe::Unknown(std::io::Error::from_raw_os_error(e).to_string()),
        None => LinkProbe::Unknown("no error code".to_owned()),
    }
}

/// Whether aya takes the link path here: the same test aya makes (an unreadable version counts
/// as old, as it does for aya).
pub fn aya_uses_links(version: Option<KernelVersion>) -> bool {
    let (major, minor) = FIRST_CGROUP_LINK_KERNEL;
    version.is_some_and(|v| v >= KernelVersion::new(major, minor, 0))
}

/// The decision from what aya will do and what the kernel answered.
pub fn decide(release: &str, aya_links: bool, probe: &LinkProbe) -> CgroupAttach {
    let (major, minor) = FIRST_CGROUP_LINK_KERNEL;
    let need = format!(
        "Linux {major}.{minor} or later is needed: before it cgroup programs can only be attached \
         with BPF_PROG_ATTACH, which outlives the agent (even a SIGKILL) and can displace other \
         programs on the cgroup"
    );
    match (aya_links, probe) {
        (true, LinkProbe::Supported) => CgroupAttach::Link,
        // Not privileged enough to ask, or a filter in the way: the attach itself will say.
        (true, LinkProbe::Unknown(_)) => CgroupAttach::Link,
        (true, LinkProbe::Unsupported) => CgroupAttach::Refused(format!(
            "kernel {release} rejects BPF_LINK_CREATE for cgroup programs (EINVAL); {need}"
        )),
        (false, LinkProbe::Supported) => CgroupAttach::Refused(format!(
            "kernel {release} has cgroup links (a backport), but its version is below \
             {major}.{minor}, so the eBPF library would attach with BPF_PROG_ATTACH; {need}"
        )),
        (false, _) => CgroupAttach::Refused(format!(
            "kernel {release} has no bpf_link for cgroup programs (BPF_LINK_CREATE); {need}"
        )),
    }
}

/// The decision for the running kernel.
pub fn check() -> CgroupAttach {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "(unknown release)".to_owned());
    let version = KernelVersion::current().ok();
    decide(&release, aya_uses_links(version), &probe_link_create())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_with_cgroup_links_attaches() {
        assert_eq!(
            decide("6.6.0", true, &LinkProbe::Supported),
            CgroupAttach::Link
        );
    }

    #[test]
    fn a_kernel_before_5_7_is_refused_naming_what_is_missing_and_the_kernel_needed() {
        let CgroupAttach::Refused(why) = decide("4.19.91-27.an7", false, &LinkProbe::Unsupported)
        else {
            panic!("a 4.19 kernel must be refused");
        };
        for part in [
            "4.19.91-27.an7",
            "BPF_LINK_CREATE",
            "Linux 5.7 or later",
            "SIGKILL",
        ] {
            assert!(why.contains(part), "`{part}` missing from: {why}");
        }
    }

    #[test]
    fn a_backport_below_5_7_is_refused_because_aya_would_not_use_it() {
        assert!(matches!(
            decide("4.18.0-348.el8", false, &LinkProbe::Supported),
            CgroupAttach::Refused(why) if why.contains("backport")
        ));
    }

    #[test]
    fn a_version_that_claims_5_7_without_the_feature_is_refused() {
        assert!(matches!(
            decide("5.10.0-custom", true, &LinkProbe::Unsupported),
            CgroupAttach::Refused(why) if why.contains("EINVAL")
        ));
    }

    #[test]
    fn the_probe_reads_ebadf_as_supported_and_einval_as_missing() {
        assert_eq!(interpret(Some(libc::EBADF)), LinkProbe::Supported);
        assert_eq!(interpret(Some(libc::EINVAL)), LinkProbe::Unsupported);
        assert!(matches!(
            interpret(Some(libc::EPERM)),
            LinkProbe::Unknown(_)
        ));
    }

    #[test]
    fn aya_takes_the_link_path_from_5_7_and_not_without_a_version() {
        assert!(!aya_uses_links(Some(KernelVersion::new(5, 6, 19))));
        assert!(aya_uses_links(Some(KernelVersion::new(5, 7, 0))));
        assert!(aya_uses_links(Some(KernelVersion::new(6, 18, 0))));
        assert!(!aya_uses_links(None));
    }

    /// This machine's kernel (6.x, root in CI) has cgroup links; run unprivileged the probe
    /// may only say it cannot tell, never that they are missing.
    #[test]
    fn the_running_kernel_is_not_refused() {
        let probe = probe_link_create();
        assert_ne!(probe, LinkProbe::Unsupported);
        assert_eq!(check(), CgroupAttach::Link);
    }
}
