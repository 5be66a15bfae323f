use super::*;

/// `/proc/stat` head of this project's 2-core build host (USER_HZ 100).
const STAT: &str = "cpu  72760 0 18631 107889 2483 0 186 879 0 0
cpu0 34914 0 8124 57075 853 0 21 432 0 0
cpu1 37845 0 10506 50813 1630 0 165 446 0 0
intr 698254 0 0 0
ctxt 902062
btime 1795312018
processes 29220
procs_running 1
procs_blocked 0
";

/// `/proc/diskstats` of the same host (kernel 6.18: 20 fields).
const DISKSTATS: &str = "   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 254       0 vda 231382 16442 21258642 647198 21838 58154 25958624 143792 0 44900 796515 12100 38 3179752 5474 755 49
 253       0 zram0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
";

/// `/proc/net/dev` of the same host, with drops and errors injected on eth0.
const NET_DEV: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:   20997     356    0    0    0     0          0         0    20997     356    0    0    0     0       0          0
  eth0: 256580186    8783    3   17    0     0          0         0   485435    5097    1    2    0     0       0          0
";

/// `/proc/meminfo` of the same host.
const MEMINFO: &str = "MemTotal:       24684084 kB
MemFree:        21080696 kB
MemAvailable:   23957000 kB
Buffers:           13212 kB
Cached:          2961264 kB
SwapCached:            0 kB
Active:          1522236 kB
Inactive:        1634108 kB
Active(anon):       1576 kB
Inactive(anon):   189164 kB
Active(file):    1520660 kB
Inactive(file):  1444944 kB
Unevictable:       15340 kB
Mlocked:           14320 kB
SwapTotal:             0 kB
SwapFree:              0 kB
Zswap:                 0 kB
Zswapped:              0 kB
Dirty:            186480 kB
Writeback:             0 kB
AnonPages:        197328 kB
Mapped:           292720 kB
Shmem:              8872 kB
KReclaimable:     226672 kB
Slab:             262088 kB
SReclaimable:     226672 kB
SUnreclaim:        35416 kB
KernelStack:        1872 kB
PageTables:         4104 kB
SecPageTables:         0 kB
NFS_Unstable:          0 kB
Bounce:                0 kB
WritebackTmp:          0 kB
CommitLimit:    12342040 kB
Committed_AS:     338788 kB
VmallocTotal:   34359738367 kB
VmallocUsed:       18884 kB
VmallocChunk:          0 kB
Percpu:              768 kB
AnonHugePages:         0 kB
ShmemHugePages:        0 kB
ShmemPmdMapped:        0 kB
FileHugePages:         0 kB
FilePmdMapped:         0 kB
Balloon:               0 kB
HugePages_Total:       0
HugePages_Free:        0
HugePages_Rsvd:        0
HugePages_Surp:        0
Hugepagesize:       2048 kB
Hugetlb:               0 kB
DirectMap4k:       30720 kB
DirectMap2M:     2066432 kB
DirectMap1G:    25165824 kB
";

#[test]
fn cpu_times_are_summed_over_cores_in_nanoseconds() {
    let c = parse_cpu(STAT, 100).expect("valid /proc/stat");
    assert_eq!(c.cores, 2);
    assert_eq!(c.user_ns, 727_600_000_000);
    assert_eq!(c.system_ns, 186_310_000_000);
    assert_eq!(c.idle_ns, 1_078_890_000_000);
    assert_eq!(c.iowait_ns, 24_830_000_000);
    assert_eq!(c.steal_ns, 8_790_000_000);
    // user + system + irq + softirq + steal, in ticks: 72760 + 18631 + 0 + 186 + 879.
    assert_eq!(c.busy_ns, (72_760 + 18_631 + 186 + 879) * 10_000_000);
    assert!(parse_cpu("", 100).is_err());
}

#[test]
fn disks_in_bytes_without_loop_devices() {
    let d = parse_disks(DISKSTATS).expect("valid diskstats");
    let names: Vec<&str> = d.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["vda", "zram0"]);
    assert_eq!(d[0].read_bytes, 21_258_642 * 512);
    assert_eq!(d[0].write_bytes, 25_958_624 * 512);
    assert_eq!(
        (d[0].reads, d[0].writes, d[0].io_ms),
        (231_382, 21_838, 44_900)
    );
}

#[test]
fn nic_errors_and_drops_per_interface() {
    let n = parse_nics(NET_DEV).expect("valid net/dev");
    assert_eq!(n.len(), 2);
    let eth0 = &n[0];
    assert_eq!(eth0.name, "eth0");
    assert_eq!(
        (
            eth0.rx_errors,
            eth0.rx_dropped,
            eth0.tx_errors,
            eth0.tx_dropped
        ),
        (3, 17, 1, 2)
    );
    assert_eq!(eth0.rx_bytes, 256_580_186);
}

#[test]
fn meminfo_through_procfs_is_in_bytes() {
    use procfs::FromRead as _;
    let m = procfs::Meminfo::from_read(MEMINFO.as_bytes()).expect("valid meminfo");
    let kb: u64 = MEMINFO
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal line");
    assert_eq!(m.mem_total, kb * 1024);
}

#[test]
fn a_missing_proc_root_names_every_part_and_does_not_fail() {
    let config = NodeConfig {
        os_release: PathBuf::from("/nonexistent/os-release"),
        ..NodeConfig::default()
    };
    let s = collect(Path::new("/nonexistent/proc"), &config);
    assert!(s.load.is_none() && s.memory.is_none() && s.cpu.is_none());
    for part in [
        "loadavg",
        "meminfo",
        "cpu",
        "diskstats",
        "net/dev",
        "mounts",
        "pressure/io",
    ] {
        assert!(
            s.unavailable.iter().any(|u| u.starts_with(part)),
            "{part} not named in {:?}",
            s.unavailable
        );
    }
}

#[test]
fn this_host_reads_like_its_own_tools_say() {
    let s = collect(Path::new("/proc"), &NodeConfig::default());
    let mem = s.memory.expect("meminfo");
    // Ground truth from the kernel through another door: sysinfo(2).
    let si = rustix::system::sysinfo();
    let total = si.totalram as u64 * u64::from(si.mem_unit);
    assert_eq!(mem.total_bytes, total);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    assert_eq!(s.cpu.map(|c| c.cores), Some(cores));
    assert!(s.kernel_release.as_deref().is_some_and(|k| !k.is_empty()));
    assert!(
        s.filesystems.iter().any(|f| f.mount_point == "/"),
        "{:?}",
        s.filesystems
    );
    assert!(s.clock.is_some());
}

#[test]
fn node_pressure_keeps_the_kernels_stall_totals() {
    // /proc/pressure of a 6.18 host: CPU has a `full` line the kernel zeroes system-wide.
    let root = std::env::temp_dir().join(format!("nodeward-psi-{}", std::process::id()));
    std::fs::create_dir_all(root.join("pressure")).expect("create fake /proc");
    for (file, text) in [
        (
            "cpu",
            "some avg10=1.50 avg60=0.90 avg300=0.40 total=48214377\n\
             full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        ),
        (
            "memory",
            "some avg10=0.00 avg60=0.02 avg300=0.00 total=912345\n\
             full avg10=0.00 avg60=0.01 avg300=0.00 total=701234\n",
        ),
        (
            "io",
            "some avg10=0.92 avg60=1.02 avg300=1.15 total=12214192\n\
             full avg10=0.74 avg60=0.83 avg300=0.95 total=10313649\n",
        ),
    ] {
        std::fs::write(root.join("pressure").join(file), text).expect("write pressure file");
    }
    let mut unavailable = Vec::new();
    let psi = read_psi(&root, &mut unavailable);
    let _ = std::fs::remove_dir_all(&root);
    assert!(unavailable.is_empty(), "{unavailable:?}");
    let totals = |p: Option<Psi>| p.map(|p| (p.some.total_us, p.full.map(|f| f.total_us)));
    assert_eq!(totals(psi.cpu), Some((48_214_377, None)));
    assert_eq!(totals(psi.memory), Some((912_345, Some(701_234))));
    assert_eq!(totals(psi.io), Some((12_214_192, Some(10_313_649))));
}
