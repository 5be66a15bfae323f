use std::os::unix::fs::MetadataExt as _;

use super::{
    fixture::{write_tree, Driver, FixtureLayout, TempDir},
    *,
};

fn scan_fixture(
    layout: FixtureLayout,
    driver: Driver,
    n: usize,
) -> (TempDir, Vec<fixture::Written>, Inventory) {
    let dir = TempDir::new("nodeward-containers").expect("temp dir");
    let written = write_tree(&dir.path, layout, driver, n, 2).expect("write fixture");
    let detected = Layout::detect(&dir.path).expect("fixture is a cgroup root");
    let inv = Inventory::scan(&detected, &dir.path.join("no-proc"));
    (dir, written, inv)
}

fn check_every_layout_and_driver(layout: FixtureLayout) {
    for driver in [Driver::Systemd, Driver::Cgroupfs] {
        let (_dir, written, inv) = scan_fixture(layout, driver, 12);
        let containers: Vec<&Container> = inv
            .containers
            .iter()
            .filter(|c| matches!(c.identity, Identity::Container { .. }))
            .collect();
        assert_eq!(containers.len(), written.len(), "{layout:?} {driver:?}");
        for w in &written {
            let c = inv
                .by_path(&w.path)
                .unwrap_or_else(|| panic!("{} not found", w.path));
            assert_eq!(
                c.identity,
                Identity::Container {
                    pod_uid: Some(w.pod_uid.clone()),
                    qos: Some(w.qos),
                    container_id: w.container_id.clone(),
                    runtime: w.runtime,
                },
                "{layout:?} {driver:?} {}",
                w.path
            );
        }
        let services: Vec<&str> = inv
            .containers
            .iter()
            .filter_map(|c| match &c.identity {
                Identity::Service { unit } => Some(unit.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            services,
            ["fixture-0.service", "fixture-1.service"],
            "{layout:?} {driver:?}"
        );
    }
}

#[test]
fn pure_v2_fixture_yields_exact_pod_uid_qos_and_container_id() {
    check_every_layout_and_driver(FixtureLayout::V2);
}

#[test]
fn v1_fixture_yields_exact_pod_uid_qos_and_container_id() {
    check_every_layout_and_driver(FixtureLayout::V1);
}

#[test]
fn hybrid_fixture_yields_exact_pod_uid_qos_and_container_id() {
    check_every_layout_and_driver(FixtureLayout::Hybrid);
}

#[test]
fn layouts_are_detected_from_marker_files() {
    for (layout, expect_unified, expect_v1) in [
        (FixtureLayout::V2, true, false),
        (FixtureLayout::V1, false, true),
        (FixtureLayout::Hybrid, true, true),
    ] {
        let dir = TempDir::new("nodeward-layout").expect("temp dir");
        write_tree(&dir.path, layout, Driver::Systemd, 0, 0).expect("write");
        let l = Layout::detect(&dir.path).expect("detected");
        assert_eq!(l.unified().is_some(), expect_unified, "{layout:?}");
        assert_eq!(l.v1().is_some(), expect_v1, "{layout:?}");
    }
    let empty = TempDir::new("nodeward-layout-empty").expect("temp dir");
    assert!(Layout::detect(&empty.path).is_err());
}

#[test]
fn cgroup_id_lookup_uses_the_v2_directory_inode() {
    let (dir, written, inv) = scan_fixture(FixtureLayout::Hybrid, Driver::Systemd, 4);
    for w in &written {
        let ino = std::fs::metadata(dir.path.join("unified").join(&w.path))
            .expect("stat fixture dir")
            .ino();
        let c = inv.by_cgroup_id(ino).expect("found by inode");
        assert_eq!(c.path, w.path);
    }
    assert!(inv.by_cgroup_id(1).is_none());
}

#[test]
fn v1_only_has_no_cgroup_ids() {
    let (_dir, _written, inv) = scan_fixture(FixtureLayout::V1, Driver::Cgroupfs, 2);
    assert!(inv.containers.iter().all(|c| c.cgroup_id.is_none()));
}

#[test]
fn a_sub_cgroup_belongs_to_the_container_above_it() {
    let (_dir, written, inv) = scan_fixture(FixtureLayout::V2, Driver::Systemd, 2);
    let c = inv
        .by_path(&format!("/{}/container/deeper", written[1].path))
        .expect("nearest ancestor");
    assert_eq!(c.path, written[1].path);
    assert!(inv.by_path("kubepods.slice").is_none());
}

/// A fake /proc: `<pid>/cgroup` and `<pid>/ns/net` (a plain file: only its inode matters).
fn fake_proc(root: &Path, pid: u32, cgroup: &str, netns_file: &str) {
    let p = root.join(pid.to_string());
    std::fs::create_dir_all(p.join("ns")).expect("mkdir");
    std::fs::write(p.join("cgroup"), cgroup).expect("write cgroup");
    let shared = root.join(netns_file);
    if !shared.exists() {
        std::fs::write(&shared, "").expect("netns file");
    }
    std::fs::hard_link(&shared, p.join("ns/net")).expect("link netns");
}

#[test]
fn pid_and_netns_lookups_follow_cgroup_procs_and_proc() {
    let dir = TempDir::new("nodeward-lookup").expect("temp dir");
    let written = write_tree(&dir.path, FixtureLayout::V2, Driver::Systemd, 4, 0).expect("write");
    let proc_root = dir.path.join("proc");
    // Containers 0 and 1 are one pod: they share a network namespace; 2 is on the host's.
    fake_proc(&proc_root, 1, "0::/init.scope\n", "host-ns");
    for (i, pid, ns) in [
        (0, 100, "pod0-ns"),
        (1, 101, "pod0-ns"),
        (2, 102, "host-ns"),
    ] {
        std::fs::write(
            dir.path.join(&written[i].path).join("cgroup.procs"),
            format!("{pid}\n"),
        )
        .expect("procs");
        fake_proc(&proc_root, pid, &format!("0::/{}\n", written[i].path), ns);
    }
    // A process that started after the scan, in a sub-cgroup of container 3.
    fake_proc(
        &proc_root,
        200,
        &format!("0::/{}/sub\n", written[3].path),
        "other-ns",
    );

    let layout = Layout::detect(&dir.path).expect("layout");
    let inv = Inventory::scan(&layout, &proc_root);
    assert_eq!(
        inv.by_pid(101, &proc_root).map(|c| c.path.as_str()),
        Some(written[1].path.as_str())
    );
    assert_eq!(
        inv.by_pid(200, &proc_root).map(|c| c.path.as_str()),
        Some(written[3].path.as_str())
    );
    assert!(inv.by_pid(999, &proc_root).is_none());
    // Read from a private cgroup namespace (a DaemonSet pod's): a process started since the
    // scan in container 2, seen as a climb to the common ancestor plus the tail below it.
    let tail = written[2]
        .path
        .split('/')
        .skip(2)
        .collect::<Vec<_>>()
        .join("/");
    fake_proc(&proc_root, 300, &format!("0::/../../{tail}\n"), "other-ns");
    assert_eq!(
        inv.by_pid(300, &proc_root).map(|c| c.path.as_str()),
        Some(written[2].path.as_str()),
        "tail {tail}"
    );

    let pod_ns = std::fs::metadata(proc_root.join("pod0-ns"))
        .expect("stat")
        .ino();
    let mut in_pod: Vec<&str> = inv.by_netns(pod_ns).map(|c| c.path.as_str()).collect();
    in_pod.sort_unstable();
    assert_eq!(in_pod, [written[0].path.as_str(), written[1].path.as_str()]);
    let host_ns = std::fs::metadata(proc_root.join("host-ns"))
        .expect("stat")
        .ino();
    assert_eq!(
        inv.by_netns(host_ns).count(),
        0,
        "the host namespace names no workload"
    );
    assert_eq!(
        inv.containers[inv.by_path[&written[2].path]].netns,
        Some(host_ns)
    );
}

#[test]
fn a_removed_container_disappears_on_the_next_scan() {
    let dir = TempDir::new("nodeward-churn").expect("temp dir");
    let written = write_tree(&dir.path, FixtureLayout::V2, Driver::Cgroupfs, 3, 0).expect("write");
    let layout = Layout::detect(&dir.path).expect("layout");
    assert_eq!(Inventory::scan(&layout, &dir.path).len(), 3);
    std::fs::remove_dir_all(dir.path.join(&written[1].path)).expect("remove");
    let inv = Inventory::scan(&layout, &dir.path);
    assert_eq!(inv.len(), 2);
    assert!(inv.by_path(&written[1].path).is_none());
}
