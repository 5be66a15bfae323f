use super::*;

/// v2 `cpu.stat` of a throttled container (kernel 6.x).
const CPU_STAT_V2: &str = "usage_usec 349130320\nuser_usec 261240150\nsystem_usec 87890170\nnice_usec 0\ncore_sched.force_idle_usec 0\nnr_periods 5213\nnr_throttled 412\nthrottled_usec 20571203\nnr_bursts 0\nburst_usec 0\n";

/// v1 `cpu.stat` and `cpuacct.stat`, captured on this project's hybrid host.
const CPU_STAT_V1: &str =
    "nr_periods 0\nnr_throttled 0\nthrottled_time 0\nnr_bursts 0\nburst_time 0\n";
const CPUACCT_STAT_V1: &str = "user 26516\nsystem 8920\n";

/// v2 `memory.stat` (head) and `memory.events`.
const MEMORY_STAT_V2: &str = "anon 104857600\nfile 52428800\nkernel 3145728\nkernel_stack 163840\npagetables 421888\nsec_pagetables 0\npercpu 1440\nsock 0\nvmalloc 0\nshmem 0\nzswap 0\nzswapped 0\nfile_mapped 10485760\nfile_dirty 4096\nfile_writeback 0\nswapcached 0\nanon_thp 0\nfile_thp 0\nshmem_thp 0\ninactive_anon 104333312\nactive_anon 524288\ninactive_file 41943040\nactive_file 10485760\nunevictable 0\n";
const MEMORY_EVENTS_V2: &str = "low 0\nhigh 0\nmax 17\noom 2\noom_kill 1\noom_group_kill 0\n";

/// v1 `memory.oom_control`, captured on this host.
const OOM_CONTROL_V1: &str = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";

const IO_STAT_V2: &str = "253:0 rbytes=1609728 wbytes=4096 rios=94 wios=1 dbytes=0 dios=0\n8:0 rbytes=2932736 wbytes=0 rios=133 wios=0 dbytes=0 dios=0\n";

const BLKIO_BYTES_V1: &str = "8:0 Read 1609728\n8:0 Write 4096\n8:0 Sync 1613824\n8:0 Async 0\n8:0 Discard 0\n8:0 Total 1613824\nTotal 1613824\n";
const BLKIO_OPS_V1: &str =
    "8:0 Read 94\n8:0 Write 1\n8:0 Sync 95\n8:0 Async 0\n8:0 Discard 0\n8:0 Total 95\nTotal 95\n";

/// `io.pressure` of this host's v2 root.
const PSI_IO: &str = "some avg10=0.92 avg60=1.02 avg300=1.15 total=12214192\nfull avg10=0.74 avg60=0.83 avg300=0.95 total=10313649\n";

#[test]
fn single_values_reject_empty_and_non_numeric_text() {
    assert_eq!(u64_value("8384512\n"), Ok(8_384_512));
    assert_eq!(u64_value(""), Err(ParseError::Empty));
    assert_eq!(u64_value("\n"), Err(ParseError::Empty));
    assert!(matches!(u64_value("max\n"), Err(ParseError::NotANumber(_))));
    assert!(matches!(u64_value("12abc"), Err(ParseError::NotANumber(_))));
}

#[test]
fn limits_read_max_and_the_v1_sentinel_as_unlimited() {
    assert_eq!(limit("max\n"), Ok(None));
    assert_eq!(limit("9223372036854771712\n"), Ok(None));
    assert_eq!(limit("536870912\n"), Ok(Some(536_870_912)));
    assert_eq!(limit(""), Err(ParseError::Empty));
    assert!(matches!(limit("lots"), Err(ParseError::NotANumber(_))));
    assert!(matches!(limit("-1"), Err(ParseError::NotANumber(_))));
}

#[test]
fn keyed_files_pick_values_by_name() {
    assert_eq!(
        keyed_pick(
            CPU_STAT_V2,
            [
                "user_usec",
                "system_usec",
                "nr_periods",
                "nr_throttled",
                "throttled_usec"
            ]
        ),
        [
            Some(261_240_150),
            Some(87_890_170),
            Some(5213),
            Some(412),
            Some(20_571_203)
        ]
    );
    assert_eq!(
        keyed_pick(CPU_STAT_V1, ["throttled_time", "nr_periods"]),
        [Some(0), Some(0)]
    );
    assert_eq!(
        keyed_pick(CPUACCT_STAT_V1, ["user", "system"]),
        [Some(26516), Some(8920)]
    );
    assert_eq!(
        keyed_pick(MEMORY_STAT_V2, ["anon", "file", "inactive_file"]),
        [Some(104_857_600), Some(52_428_800), Some(41_943_040)]
    );
    assert_eq!(
        keyed_pick(MEMORY_EVENTS_V2, ["oom", "oom_kill"]),
        [Some(2), Some(1)]
    );
    assert_eq!(
        keyed_pick(OOM_CONTROL_V1, ["oom_kill", "under_oom"]),
        [Some(3), Some(0)]
    );
}

#[test]
fn keyed_files_skip_non_numeric_lines_and_report_absent_keys() {
    let text = "usage_usec 10\nweird_key notanumber\nlonely\n\nuser_usec 7\n";
    assert_eq!(
        keyed_pick(text, ["usage_usec", "weird_key", "user_usec", "missing"]),
        [Some(10), None, Some(7), None]
    );
    assert_eq!(keyed_pick("", ["usage_usec"]), [None]);
}

#[test]
fn io_stat_v2_reads_every_device() {
    let d = io_stat_v2(IO_STAT_V2).expect("valid io.stat");
    assert_eq!(d.len(), 2);
    assert_eq!(
        d[0],
        DeviceIo {
            major: 253,
            minor: 0,
            read_bytes: 1_609_728,
            write_bytes: 4096,
            read_ops: 94,
            write_ops: 1
        }
    );
    assert_eq!(d[1].read_bytes, 2_932_736);
    assert_eq!(io_stat_v2("").expect("empty is no devices"), vec![]);
    assert!(io_stat_v2("sda rbytes=1").is_err());
}

#[test]
fn blkio_v1_merges_bytes_and_ops_per_device() {
    let d = blkio_v1(BLKIO_BYTES_V1, BLKIO_OPS_V1).expect("valid blkio");
    assert_eq!(
        d,
        vec![DeviceIo {
            major: 8,
            minor: 0,
            read_bytes: 1_609_728,
            write_bytes: 4096,
            read_ops: 94,
            write_ops: 1
        }]
    );
    // A cgroup that did no IO: only the Total line (captured on this host).
    assert_eq!(blkio_v1("Total 0\n", "Total 0\n").expect("valid"), vec![]);
    assert!(blkio_v1("8:0 Read many\n", "").is_err());
}

#[test]
fn psi_reads_some_and_full() {
    let p = psi(PSI_IO).expect("valid psi");
    assert_eq!(
        p.some,
        PsiLine {
            avg10: 0.92,
            avg60: 1.02,
            avg300: 1.15,
            total_us: 12_214_192
        }
    );
    assert_eq!(p.full.map(|f| f.total_us), Some(10_313_649));
}

#[test]
fn psi_without_full_line_is_valid_and_garbage_is_not() {
    let p = psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n").expect("some only");
    assert_eq!(p.full, None);
    assert_eq!(psi(""), Err(ParseError::Empty));
    assert!(psi("some avg10=x avg60=0.00 avg300=0.00 total=0\n").is_err());
    assert!(psi("some avg10=0.00\n").is_err());
    assert!(psi("weird avg10=0.00 avg60=0.00 avg300=0.00 total=0\n").is_err());
}
