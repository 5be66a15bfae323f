use std::path::Path;

use super::*;
use crate::containers::{
    fixture::{write_tree, Driver, FixtureLayout, TempDir},
    Layout,
};

fn write(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("write");
    }
}

#[test]
fn v2_files_give_every_field_in_base_units() {
    let tmp = TempDir::new("nodeward-read-v2").expect("temp");
    write(
        &tmp.path,
        &[
            ("cpu.stat", "usage_usec 3000\nuser_usec 2000\nsystem_usec 1000\nnr_periods 10\nnr_throttled 2\nthrottled_usec 500\n"),
            ("memory.current", "1000000\n"),
            ("memory.max", "max\n"),
            ("memory.stat", "anon 600000\nfile 300000\ninactive_file 250000\n"),
            ("memory.events", "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n"),
            ("io.stat", "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n"),
            ("pids.current", "5\n"),
            ("pids.max", "100\n"),
            ("cpu.pressure", "some avg10=1.00 avg60=2.00 avg300=3.00 total=42\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=7\n"),
        ],
    );
    let s = Reader::default()
        .read(&v2_dirs(tmp.path.clone()), true)
        .expect("exists");
    assert_eq!(s.cpu.usage_ns, Some(3_000_000));
    assert_eq!(s.cpu.user_ns, Some(2_000_000));
    assert_eq!(s.cpu.system_ns, Some(1_000_000));
    assert_eq!(s.cpu.nr_throttled, Some(2));
    assert_eq!(s.cpu.throttled_ns, Some(500_000));
    assert_eq!(s.memory.current_bytes, Some(1_000_000));
    assert_eq!(s.memory.limit_bytes, None, "max is unlimited");
    assert_eq!(s.memory.working_set_bytes, Some(750_000));
    assert_eq!(
        (s.memory.oom_events, s.memory.oom_kill_events),
        (Some(2), Some(1))
    );
    assert_eq!(s.io[0].write_bytes, 8192);
    assert_eq!((s.pids.current, s.pids.limit), (Some(5), Some(100)));
    assert_eq!(s.psi.cpu.and_then(|p| p.full).map(|f| f.total_us), Some(7));
    assert_eq!(s.psi.memory, None, "missing pressure file");
}

#[test]
fn missing_empty_and_garbage_files_leave_fields_empty_without_failing() {
    let tmp = TempDir::new("nodeward-read-bad").expect("temp");
    write(
        &tmp.path,
        &[
            ("memory.current", ""),
            ("memory.max", "lots\n"),
            ("pids.current", "seven\n"),
            ("cpu.stat", "usage_usec banana\nuser_usec 5\n"),
        ],
    );
    let mut r = Reader::default();
    let s = r
        .read(&v2_dirs(tmp.path.clone()), true)
        .expect("dir exists");
    assert_eq!(s.memory.current_bytes, None);
    assert_eq!(s.memory.working_set_bytes, None);
    assert_eq!(s.pids.current, None);
    assert_eq!(s.cpu.usage_ns, None);
    assert_eq!(s.cpu.user_ns, Some(5000));
    assert_eq!(s.io, vec![]);
    assert_eq!(
        r.parse_errors, 3,
        "empty memory.current, bad memory.max, bad pids.current"
    );
}

#[test]
fn a_cgroup_that_vanished_is_skipped_not_reported_as_zero() {
    let tmp = TempDir::new("nodeward-read-gone").expect("temp");
    let gone = tmp.path.join("cri-containerd-gone.scope");
    assert!(Reader::default().read(&v2_dirs(gone), true).is_none());
}

#[test]
fn v1_files_give_the_same_fields_as_v2() {
    for layout in [FixtureLayout::V1, FixtureLayout::Hybrid] {
        let tmp = TempDir::new("nodeward-read-v1").expect("temp");
        let written = write_tree(&tmp.path, layout, Driver::Cgroupfs, 3, 0).expect("fixture");
        let l = Layout::detect(&tmp.path).expect("layout");
        let w = &written[2];
        let s = Reader::default()
            .read(&l.dirs(&w.path), false)
            .expect("exists");
        assert_eq!(s.cpu.usage_ns, Some(w.cpu_usage_ns), "{layout:?}");
        // 3 s in USER_HZ ticks, split 3:1.
        assert_eq!(s.cpu.user_ns, Some(w.cpu_usage_ns * 3 / 4), "{layout:?}");
        assert_eq!(s.cpu.throttled_ns, Some(35_000_000));
        assert_eq!(s.memory.current_bytes, Some(w.memory_bytes));
        assert_eq!(s.memory.limit_bytes, Some(w.memory_limit_bytes));
        assert_eq!(
            s.memory.working_set_bytes,
            Some(w.memory_bytes - w.inactive_file_bytes)
        );
        assert_eq!(s.memory.oom_kill_events, Some(1));
        assert_eq!(s.io[0].read_bytes, 4096);
        assert_eq!(s.io[0].write_ops, 2);
        assert_eq!(s.pids.limit, None);
        assert_eq!(
            s.psi.io.is_some(),
            layout == FixtureLayout::Hybrid,
            "PSI comes from the v2 directory"
        );
    }
}

#[test]
fn v1_unlimited_memory_sentinel_reads_as_no_limit() {
    let tmp = TempDir::new("nodeward-read-v1-limit").expect("temp");
    write(
        &tmp.path.join("memory/x"),
        &[
            ("memory.limit_in_bytes", "9223372036854771712\n"),
            ("memory.usage_in_bytes", "4096\n"),
        ],
    );
    let dirs = crate::containers::CgroupDirs {
        memory: Some(tmp.path.join("memory/x")),
        ..Default::default()
    };
    let s = Reader::default().read(&dirs, false).expect("exists");
    assert_eq!(
        (s.memory.current_bytes, s.memory.limit_bytes),
        (Some(4096), None)
    );
}

#[test]
fn a_file_larger_than_the_read_buffer_is_read_whole() {
    let tmp = TempDir::new("nodeward-read-big").expect("temp");
    let mut stat = String::new();
    for i in 0..2000 {
        stat.push_str(&format!("padding_key_{i} {i}\n"));
    }
    stat.push_str("anon 123\nfile 456\ninactive_file 7\n");
    assert!(stat.len() > 4 * INITIAL_BUF);
    write(
        &tmp.path,
        &[("memory.stat", stat.as_str()), ("memory.current", "1000\n")],
    );
    let s = Reader::default()
        .read(&v2_dirs(tmp.path.clone()), true)
        .expect("exists");
    assert_eq!(
        (s.memory.anon_bytes, s.memory.file_bytes),
        (Some(123), Some(456))
    );
    assert_eq!(s.memory.working_set_bytes, Some(993));
}
