//! How full the node's own filesystems are: the block-device filesystems in the host's mount
//! table (not tmpfs, overlay layers of containers, or pseudo filesystems), each device once.

use std::path::Path;

use procfs::{FromRead as _, MountEntry};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Filesystem {
    pub device: String,
    pub mount_point: String,
    pub fs_type: String,
    pub size_bytes: u64,
    /// Free to unprivileged users (what applications can still write).
    pub available_bytes: u64,
    /// Blocks in use (size less free blocks, reserved ones included).
    pub used_bytes: u64,
    /// `df`'s Use%: used / (used + available to users), 0-1.
    pub used_fraction: f64,
    pub inodes: u64,
    pub inodes_free: u64,
    /// Inodes in use / inodes, 0-1 (0 where the filesystem has no fixed inode count).
    pub inodes_used_fraction: f64,
}

/// Filesystem types that hold a node's data. Anything else (tmpfs, overlay, proc, cgroup...)
/// is either memory, a container's view of one of these, or not storage.
const DISK_FS: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "zfs", "f2fs", "jfs", "reiserfs",
];

/// The mount table entries worth reporting: disk filesystems, first mount of each device.
pub fn disk_mounts(mounts_text: &str) -> Result<Vec<MountEntry>, procfs::ProcError> {
    let all = Vec::<MountEntry>::from_read(mounts_text.as_bytes())?;
    let mut seen = std::collections::HashSet::new();
    Ok(all
        .into_iter()
        .filter(|m| DISK_FS.contains(&m.fs_vfstype.as_str()))
        .filter(|m| seen.insert(m.fs_spec.clone()))
        .collect())
}

/// `statvfs` of a mount point as seen under `host_root`; `None` if it cannot be read.
pub fn usage(host_root: &Path, m: &MountEntry) -> Option<Filesystem> {
    let path = host_root.join(m.fs_file.trim_start_matches('/'));
    let st = rustix::fs::statvfs(&path).ok()?;
    let (frsize, blocks, bfree, bavail, files, ffree) = (
        st.f_frsize,
        st.f_blocks,
        st.f_bfree,
        st.f_bavail,
        st.f_files,
        st.f_ffree,
    );
    let size = blocks.saturating_mul(frsize);
    // `df`'s Use%: used / (used + available to users), so reserved blocks count as full.
    let used = blocks.saturating_sub(bfree);
    let denom = used + bavail;
    Some(Filesystem {
        device: m.fs_spec.clone(),
        mount_point: m.fs_file.clone(),
        fs_type: m.fs_vfstype.clone(),
        size_bytes: size,
        available_bytes: bavail.saturating_mul(frsize),
        used_bytes: used.saturating_mul(frsize),
        used_fraction: if denom == 0 {
            0.0
        } else {
            used as f64 / denom as f64
        },
        inodes: files,
        inodes_free: ffree,
        inodes_used_fraction: if files == 0 {
            0.0
        } else {
            files.saturating_sub(ffree) as f64 / files as f64
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's mount table (trimmed): root and data disks, a bind mount of the data disk,
    /// container overlays, tmpfs and pseudo filesystems.
    const MOUNTS: &str = "/dev/vda1 / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /run tmpfs rw,nosuid,nodev,size=1620332k,nr_inodes=819200,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime 0 0
/dev/vdb /var/lib/containerd xfs rw,relatime,attr2,inode64,logbufs=8,logbsize=32k,noquota 0 0
/dev/vdb /var/lib/kubelet/pods/x/volumes xfs rw,relatime 0 0
overlay /run/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs overlay rw,relatime,lowerdir=/a,upperdir=/b,workdir=/c 0 0
/dev/vda15 /boot/efi vfat rw,relatime,fmask=0022,dmask=0022 0 0
";

    #[test]
    fn only_disk_filesystems_each_device_once() {
        let m = disk_mounts(MOUNTS).expect("valid mount table");
        let got: Vec<(&str, &str)> = m
            .iter()
            .map(|m| (m.fs_spec.as_str(), m.fs_file.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("/dev/vda1", "/"),
                ("/dev/vdb", "/var/lib/containerd"),
                ("/dev/vda15", "/boot/efi")
            ]
        );
    }

    #[test]
    fn root_filesystem_usage_matches_df() {
        let root = MountEntry {
            fs_spec: "rootfs".into(),
            fs_file: "/".into(),
            fs_vfstype: "ext4".into(),
            fs_mntops: Default::default(),
            fs_freq: 0,
            fs_passno: 0,
        };
        let fs = usage(Path::new("/"), &root).expect("statvfs /");
        assert!(fs.size_bytes > 0);
        assert!((0.0..=1.0).contains(&fs.used_fraction));
        assert!((0.0..=1.0).contains(&fs.inodes_used_fraction));
        assert!(fs.used_bytes <= fs.size_bytes);
        // Ground truth from an independent tool: df's available 1K-blocks for /.
        let Ok(out) = std::process::Command::new("df")
            .args(["-k", "--output=avail", "/"])
            .output()
        else {
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(avail_k) = text
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok())
        {
            let ours = fs.available_bytes / 1024;
            // The filesystem changes between the two calls; allow 64 MiB of drift.
            assert!(
                ours.abs_diff(avail_k) < 65_536,
                "ours {ours} KiB, df {avail_k} KiB"
            );
        }
    }
}
