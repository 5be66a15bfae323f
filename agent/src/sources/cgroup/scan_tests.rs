use super::*;
use crate::config::Config;
use crate::containers::fixture::{write_tree, Driver, FixtureLayout, TempDir};

#[test]
fn partitions_are_recognised_by_their_disk() {
    let all = ["vda", "vda1", "nvme0n1", "nvme0n1p2", "sdb"];
    assert!(is_partition("vda1", all.iter().copied()));
    assert!(is_partition("nvme0n1p2", all.iter().copied()));
    assert!(!is_partition("nvme0n1", all.iter().copied()));
    assert!(!is_partition("sdb", all.iter().copied()));
}

fn scanner(c: &Config) -> Result<Scanner, ScanError> {
    Scanner::new(&c.containers, &c.node, &c.paths)
}

fn config_for(root: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.paths.cgroup_root = root.to_path_buf();
    c.paths.proc_root = root.join("proc");
    c.node.enabled = false;
    c
}

#[test]
fn a_fixture_tree_scan_reports_injected_values_and_rates() {
    let dir = TempDir::new("nodeward-scan").expect("temp");
    let written = write_tree(&dir.path, FixtureLayout::V2, Driver::Systemd, 6, 1).expect("fixture");
    let mut s = scanner(&config_for(&dir.path)).expect("scanner");
    let t0 = Instant::now();
    let first = s.scan(t0);
    assert_eq!(first.workloads.len(), 7);
    // One CPU second more for container 0, two seconds later: 0.5 cores.
    let w = &written[0];
    let cpu_stat = dir.path.join(&w.path).join("cpu.stat");
    let usec = w.cpu_usage_ns / 1000;
    let (user, system) = (usec * 3 / 4 + 1_000_000, usec / 4);
    let usec = usec + 1_000_000;
    std::fs::write(
        &cpu_stat,
        format!("usage_usec {usec}\nuser_usec {user}\nsystem_usec {system}\n"),
    )
    .expect("write");
    let second = s.scan(t0 + Duration::from_secs(2));
    let got = second
        .workloads
        .iter()
        .find(|x| x.container.path == w.path)
        .expect("container 0");
    assert_eq!(got.stats.memory.current_bytes, Some(w.memory_bytes));
    // Stamped when the reads began: microseconds after the tick given here.
    let near = |v: Option<f64>, want: f64| v.is_some_and(|v| (v - want).abs() < 1e-3);
    assert!(near(got.rates.cpu[0], 0.5), "{:?}", got.rates.cpu);
    assert!(near(got.rates.cpu_user[0], 0.5), "{:?}", got.rates.cpu_user);
    assert_eq!(got.rates.cpu_system[0], Some(0.0));
    // The container restarts under the same name: counters start again near zero.
    std::fs::write(&cpu_stat, "usage_usec 10\nuser_usec 5\nsystem_usec 5\n").expect("write");
    let third = s.scan(t0 + Duration::from_secs(3));
    let got = third
        .workloads
        .iter()
        .find(|x| x.container.path == w.path)
        .expect("container 0");
    assert_eq!(
        got.rates.cpu, [None; 3],
        "a new baseline, not a negative rate"
    );
}

#[test]
fn a_quiet_container_is_read_in_full_only_when_its_cpu_moves_or_its_read_ages() {
    let dir = TempDir::new("nodeward-scan-quiet").expect("temp");
    let written = write_tree(&dir.path, FixtureLayout::V2, Driver::Systemd, 3, 0).expect("fixture");
    let mut s = scanner(&config_for(&dir.path)).expect("scanner");
    let memory_of = |snap: &Snapshot, path: &str| {
        snap.workloads
            .iter()
            .find(|x| x.container.path == path)
            .and_then(|x| x.stats.memory.current_bytes)
    };
    let t0 = Instant::now();
    let first = s.scan(t0);
    assert_eq!((first.workloads.len(), first.quiet), (3, 0));
    let w = &written[0];
    let cgroup = dir.path.join(&w.path);
    std::fs::write(cgroup.join("memory.current"), "4096\n").expect("write");
    // No CPU used: the last full read stands, only the CPU counter was read.
    let second = s.scan(t0 + Duration::from_secs(1));
    assert_eq!(second.quiet, 3);
    assert_eq!(memory_of(&second, &w.path), Some(w.memory_bytes));
    // Once the read is FULL_READ_EVERY old, everything is read again.
    let third = s.scan(t0 + FULL_READ_EVERY);
    assert_eq!(third.quiet, 0);
    assert_eq!(memory_of(&third, &w.path), Some(4096));
    // CPU used: read in full at once.
    std::fs::write(cgroup.join("memory.current"), "8192\n").expect("write");
    let usec = w.cpu_usage_ns / 1000 + 1;
    std::fs::write(
        cgroup.join("cpu.stat"),
        format!("usage_usec {usec}\nuser_usec {usec}\nsystem_usec 0\n"),
    )
    .expect("write");
    let fourth = s.scan(t0 + FULL_READ_EVERY + Duration::from_secs(1));
    assert_eq!(fourth.quiet, 2);
    assert_eq!(memory_of(&fourth, &w.path), Some(8192));
    // A container that went away is forgotten, and one that comes back is read in full.
    let gone = &written[1];
    let saved = dir.path.join("saved");
    std::fs::rename(dir.path.join(&gone.path), &saved).expect("move away");
    let fifth = s.scan(t0 + FULL_READ_EVERY + Duration::from_secs(2));
    assert_eq!(fifth.workloads.len(), 2);
    std::fs::write(saved.join("memory.current"), "12288\n").expect("write");
    std::fs::rename(&saved, dir.path.join(&gone.path)).expect("move back");
    let sixth = s.scan(t0 + FULL_READ_EVERY + Duration::from_secs(3));
    assert_eq!(sixth.quiet, 2, "{:?}", sixth.workloads.len());
    assert_eq!(memory_of(&sixth, &gone.path), Some(12288));
}

#[test]
fn quiet_containers_are_recognised_on_every_layout() {
    for layout in [FixtureLayout::V2, FixtureLayout::Hybrid, FixtureLayout::V1] {
        let dir = TempDir::new("nodeward-scan-quiet-layouts").expect("temp");
        write_tree(&dir.path, layout, Driver::Cgroupfs, 2, 0).expect("fixture");
        let mut s = scanner(&config_for(&dir.path)).expect("scanner");
        let t0 = Instant::now();
        let first = s.scan(t0);
        let second = s.scan(t0 + Duration::from_secs(1));
        let stats = |s: &Snapshot| s.workloads.iter().map(|w| w.stats.clone()).collect();
        let (a, b): (Vec<_>, Vec<_>) = (stats(&first), stats(&second));
        assert_eq!((first.quiet, second.quiet), (0, 2), "{layout:?}");
        assert_eq!(a, b, "{layout:?}: the figures of the last full read");
    }
}

#[test]
fn a_snapshot_serialises_with_flat_identity_fields() {
    let dir = TempDir::new("nodeward-scan-json").expect("temp");
    let written =
        write_tree(&dir.path, FixtureLayout::Hybrid, Driver::Systemd, 1, 1).expect("fixture");
    let snap = scanner(&config_for(&dir.path))
        .expect("scanner")
        .scan(Instant::now());
    let v = serde_json::to_value(&snap).expect("snapshot serialises");
    let w = &v["workloads"][0];
    assert_eq!(w["kind"], "container");
    assert_eq!(w["pod_uid"], written[0].pod_uid.as_str());
    assert_eq!(w["qos"], "guaranteed");
    assert_eq!(w["runtime"], "containerd");
    assert_eq!(
        w["stats"]["memory"]["current_bytes"],
        written[0].memory_bytes
    );
    assert_eq!(v["workloads"][1]["kind"], "service");
    assert_eq!(v["layout"]["layout"], "hybrid");
}

#[test]
fn a_container_removed_between_walk_and_read_is_skipped() {
    let dir = TempDir::new("nodeward-scan-gone").expect("temp");
    write_tree(&dir.path, FixtureLayout::V2, Driver::Cgroupfs, 2, 0).expect("fixture");
    let layout = Layout::detect(&dir.path).expect("layout");
    let inv = Inventory::scan(&layout, &dir.path);
    std::fs::remove_dir_all(dir.path.join(&inv.containers[0].path)).expect("remove");
    let mut reader = Reader::default();
    let read: Vec<_> = inv
        .containers
        .iter()
        .filter_map(|c| reader.read(&layout.dirs(&c.path), true))
        .collect();
    assert_eq!(read.len(), 1);
    assert_eq!(reader.parse_errors, 0, "a vanished cgroup is not an error");
}

#[test]
fn a_missing_cgroup_root_is_an_error_only_when_containers_are_enabled() {
    let mut c = Config::default();
    c.paths.cgroup_root = PathBuf::from("/nonexistent/cgroup");
    assert!(scanner(&c).is_err());
    c.containers.enabled = false;
    assert!(scanner(&c).is_ok());
}

/// Sorted paths of the workloads a scan found.
fn paths(snap: &Snapshot) -> Vec<&str> {
    snap.workloads
        .iter()
        .map(|w| w.container.path.as_str())
        .collect()
}

#[test]
fn an_unchanged_tree_is_not_walked_again_and_a_change_is_seen_on_the_next_scan() {
    let dir = TempDir::new("nodeward-scan-discovery").expect("temp");
    let written = write_tree(&dir.path, FixtureLayout::V2, Driver::Systemd, 4, 0).expect("fixture");
    let mut s = scanner(&config_for(&dir.path)).expect("scanner");
    let t0 = Instant::now();
    assert_eq!(s.scan(t0).workloads.len(), 4);
    let second = s.scan(t0 + Duration::from_secs(1));
    assert_eq!(second.workloads.len(), 4);
    assert_eq!(s.walks(), 1, "nothing changed: the last walk stands");

    // A container made after the walk, in a pod that already exists: found on the next scan.
    let pod = std::path::Path::new(&written[0].path)
        .parent()
        .expect("a container is in its pod");
    let added = pod.join(
        "cri-containerd-00000000000000000000000000000000000000000000000000000000000000aa.scope",
    );
    let added = added.to_str().expect("UTF-8");
    std::fs::create_dir(dir.path.join(added)).expect("mkdir");
    let third = s.scan(t0 + Duration::from_secs(2));
    assert!(paths(&third).contains(&added), "{:?}", paths(&third));
    assert_eq!(third.workloads.len(), 5);

    // A new pod and its container, made together: both levels are watched after the walk.
    let new_pod = "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0000beef_0000_4000_8000_00000000beef.slice";
    let in_new_pod = format!("{new_pod}/cri-containerd-00000000000000000000000000000000000000000000000000000000000000bb.scope");
    std::fs::create_dir_all(dir.path.join(&in_new_pod)).expect("mkdir -p");
    let fourth = s.scan(t0 + Duration::from_secs(3));
    assert!(
        paths(&fourth).contains(&in_new_pod.as_str()),
        "{:?}",
        paths(&fourth)
    );

    // A container removed: gone on the next scan.
    std::fs::remove_dir_all(dir.path.join(&written[1].path)).expect("rm");
    let fifth = s.scan(t0 + Duration::from_secs(4));
    assert!(!paths(&fifth).contains(&written[1].path.as_str()));
    assert_eq!(fifth.workloads.len(), 5);
    assert!(fifth.inventory.by_path(&written[1].path).is_none());
}

#[test]
fn a_container_made_in_a_pod_found_after_the_walk_is_found() {
    // The pod's directory appears in one scan's walk before its container does: the walk
    // watched the pod's directory when it listed it, so the container is seen next.
    let dir = TempDir::new("nodeward-scan-late-container").expect("temp");
    write_tree(&dir.path, FixtureLayout::V2, Driver::Systemd, 1, 0).expect("fixture");
    let mut s = scanner(&config_for(&dir.path)).expect("scanner");
    let t0 = Instant::now();
    s.scan(t0);
    let pod = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0000cafe_0000_4000_8000_00000000cafe.slice";
    std::fs::create_dir_all(dir.path.join(pod)).expect("mkdir pod");
    assert_eq!(s.scan(t0 + Duration::from_secs(1)).workloads.len(), 1);
    let container = format!("{pod}/cri-containerd-00000000000000000000000000000000000000000000000000000000000000cc.scope");
    std::fs::create_dir(dir.path.join(&container)).expect("mkdir container");
    let snap = s.scan(t0 + Duration::from_secs(2));
    assert!(
        paths(&snap).contains(&container.as_str()),
        "{:?}",
        paths(&snap)
    );
}

#[test]
fn the_tree_is_walked_again_after_rewalk_every_even_without_an_event() {
    let dir = TempDir::new("nodeward-scan-rewalk").expect("temp");
    write_tree(&dir.path, FixtureLayout::V2, Driver::Systemd, 2, 0).expect("fixture");
    let mut s = scanner(&config_for(&dir.path)).expect("scanner");
    let t0 = Instant::now();
    s.scan(t0);
    s.scan(t0 + crate::containers::discovery::REWALK_EVERY - Duration::from_millis(1));
    assert_eq!(s.walks(), 1);
    s.scan(t0 + crate::containers::discovery::REWALK_EVERY);
    assert_eq!(s.walks(), 2);
}

#[test]
fn walking_every_scan_walks_every_scan() {
    let dir = TempDir::new("nodeward-scan-walk-always").expect("temp");
    write_tree(&dir.path, FixtureLayout::Hybrid, Driver::Cgroupfs, 2, 0).expect("fixture");
    let mut s = scanner(&config_for(&dir.path))
        .expect("scanner")
        .walking_every_scan();
    let t0 = Instant::now();
    for i in 0..3 {
        assert_eq!(s.scan(t0 + Duration::from_secs(i)).workloads.len(), 2);
    }
    assert_eq!(s.walks(), 3);
}

#[test]
fn a_quiet_containers_processes_are_read_again_once_its_cpu_moves() {
    let dir = TempDir::new("nodeward-scan-procs").expect("temp");
    let written = write_tree(&dir.path, FixtureLayout::V2, Driver::Systemd, 2, 0).expect("fixture");
    let mut s = scanner(&config_for(&dir.path)).expect("scanner");
    let no_proc = dir.path.join("no-proc");
    let w = &written[0];
    let cgroup = dir.path.join(&w.path);
    let t0 = Instant::now();
    let first = s.scan(t0);
    assert!(first.inventory.by_pid(4242, &no_proc).is_none());
    // A process appears while the CPU counter stands still: the processes read with the last
    // full read stand (a process that runs moves the counter).
    std::fs::write(cgroup.join("cgroup.procs"), "4242\n").expect("write");
    let second = s.scan(t0 + Duration::from_secs(1));
    assert_eq!(second.quiet, 2);
    assert!(second.inventory.by_pid(4242, &no_proc).is_none());
    // Its CPU moved: read again.
    let usec = w.cpu_usage_ns / 1000 + 1;
    std::fs::write(
        cgroup.join("cpu.stat"),
        format!("usage_usec {usec}\nuser_usec {usec}\nsystem_usec 0\n"),
    )
    .expect("write");
    let third = s.scan(t0 + Duration::from_secs(2));
    assert_eq!(third.quiet, 1);
    let found = third
        .inventory
        .by_pid(4242, &no_proc)
        .map(|c| c.path.as_str());
    assert_eq!(found, Some(w.path.as_str()));
    // And kept while it is quiet again.
    let fourth = s.scan(t0 + Duration::from_secs(3));
    assert_eq!(fourth.quiet, 2);
    let found = fourth
        .inventory
        .by_pid(4242, &no_proc)
        .map(|c| c.path.as_str());
    assert_eq!(found, Some(w.path.as_str()));
}
