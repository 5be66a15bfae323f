//! Kernel text: cgroup files (keyed, limits, PSI, io.stat, blkio),
//! `/proc/stat`, `/proc/diskstats`, `/proc/net/dev`, `/proc/mounts`, os-release,
//! `/proc/<pid>/cgroup` and cgroup paths.

use nodeward::{
    containers::{
        path::{identify, Identity},
        proc_cgroup::ProcCgroup,
    },
    sources::{
        cgroup::parse,
        node::{self, fs::disk_mounts, OsRelease},
    },
};
use proptest::prelude::*;

use crate::{cases, corpus, truncations};

/// Runs `check` on every corpus file and on every truncation of it; `check` gets the file name
/// (the prefix says what is expected) and whether the text is the whole file.
fn sweep(target: &str, mut check: impl FnMut(&str, &str, bool)) {
    for (name, text) in corpus(target) {
        check(&name, &text, true);
        for cut in truncations(&text) {
            check(&name, cut, false);
        }
    }
}

#[test]
fn cgroup_corpus_parsers_accept_real_files_and_reject_malformed_ones() {
    sweep("cgroup_keyed", |name, text, whole| {
        let n = parse::keyed(text).count();
        if whole && name.starts_with("ok-") {
            assert!(n > 0, "{name}: no keys");
        }
    });
    sweep("cgroup_psi", |name, text, whole| {
        let r = parse::psi(text);
        if whole && name.starts_with("ok-") {
            assert!(r.is_ok(), "{name}: {r:?}");
        } else if whole && name.starts_with("bad-") {
            assert!(r.is_err(), "{name}: accepted {r:?}");
        }
    });
    sweep("cgroup_io_stat", |name, text, whole| {
        let r = parse::io_stat_v2(text);
        if whole && name.starts_with("ok-") {
            assert!(r.is_ok(), "{name}: {r:?}");
        } else if whole && name.starts_with("bad-") {
            assert!(r.is_err(), "{name}: accepted {r:?}");
        }
    });
    sweep("cgroup_blkio", |name, text, whole| {
        // The bytes and the ops file share one format: feed the sample as either.
        let r = parse::blkio_v1(text, "");
        let r2 = parse::blkio_v1("", text);
        if whole && name.starts_with("ok-") {
            assert!(r.is_ok() && r2.is_ok(), "{name}: {r:?} {r2:?}");
        } else if whole && name.starts_with("bad-") {
            assert!(r.is_err() && r2.is_err(), "{name}: accepted {r:?}");
        }
    });
    sweep("cgroup_limit", |name, text, whole| {
        let r = parse::limit(text);
        if whole && name.starts_with("ok-") {
            assert!(r.is_ok(), "{name}: {r:?}");
        } else if whole && name.starts_with("bad-") {
            assert!(r.is_err(), "{name}: accepted {r:?}");
        }
    });
}

#[test]
fn node_corpus_parsers_accept_real_proc_files() {
    sweep("node_stat", |name, text, whole| {
        let r = node::parse_cpu(text, 100);
        if whole && name.starts_with("ok-") {
            let cpu = r.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(cpu.cores > 0 && cpu.idle_ns > 0, "{name}: {cpu:?}");
        } else if whole && name.starts_with("bad-") {
            assert!(r.is_err(), "{name}: accepted");
        }
    });
    sweep("node_diskstats", |name, text, whole| {
        let r = node::parse_disks(text);
        if whole && name.starts_with("ok-") {
            assert!(r.is_ok(), "{name}: {r:?}");
        } else if whole && name.starts_with("bad-") {
            assert!(r.is_err(), "{name}: accepted {r:?}");
        }
    });
    sweep("node_netdev", |name, text, whole| {
        let r = node::parse_nics(text);
        if whole && name.starts_with("ok-") {
            let nics = r.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(nics.iter().any(|n| n.name == "lo"), "{name}: no lo");
        } else if whole && name.starts_with("bad-") {
            assert!(r.is_err(), "{name}: accepted {r:?}");
        }
    });
    sweep("node_mounts", |name, text, whole| {
        let r = disk_mounts(text);
        if whole && name.starts_with("ok-") {
            let m = r.unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut devices: Vec<_> = m.iter().map(|m| m.fs_spec.as_str()).collect();
            let n = devices.len();
            devices.dedup();
            assert_eq!(devices.len(), n, "{name}: a device reported twice");
        }
    });
    sweep("os_release", |name, text, whole| {
        let os = OsRelease::parse(text);
        let _ = os.describe();
        if whole && name.starts_with("ok-") {
            assert!(!os.id.is_empty(), "{name}: no ID");
        }
    });
}

#[test]
fn cgroup_path_corpus_recognises_containers_and_nothing_else() {
    for (name, text) in corpus("container_path") {
        for line in text.lines() {
            let id = identify(line);
            if name.starts_with("ok-") {
                assert!(id.is_some(), "{name}: {line:?} not recognised");
            } else if name.starts_with("none-") {
                assert!(id.is_none(), "{name}: {line:?} recognised as {id:?}");
            }
            for cut in truncations(line) {
                let _ = identify(cut);
            }
        }
    }
    sweep("proc_cgroup", |name, text, whole| {
        let p = ProcCgroup::parse(text);
        let paths: Vec<&str> = p.candidate_paths().collect();
        assert!(paths.iter().all(|p| !p.is_empty()), "{name}: empty path");
        if whole && name.starts_with("ok-") {
            assert!(p.unified.is_some(), "{name}: no v2 line");
        }
    });
}

/// Text that looks like kernel output: lines of words, numbers, `key=value`, separators and odd
/// bytes, so that the parsers get past their first checks.
fn kernelish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        "[a-z_]{1,8}",
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[0-9]{1,3}:[0-9]{1,3}",
        "[a-z0-9]{1,6}=[0-9.]{0,6}",
        Just("max".to_owned()),
        Just("some".to_owned()),
        Just("full".to_owned()),
        Just("field:".to_owned()),
        Just(";".to_owned()),
        "\\PC{0,4}",
    ];
    let line = prop::collection::vec(token, 0..10).prop_map(|t| t.join(" "));
    prop::collection::vec(line, 0..12).prop_map(|l| l.join("\n"))
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn no_kernel_text_parser_panics_on_any_input(text in prop_oneof![kernelish(), "\\PC*"]) {
        let _ = parse::u64_value(&text);
        let _ = parse::limit(&text);
        let _ = parse::keyed(&text).count();
        let _ = parse::keyed_pick(&text, ["usage_usec", "nr_throttled"]);
        let _ = parse::io_stat_v2(&text);
        let _ = parse::blkio_v1(&text, &text);
        let _ = parse::psi(&text);
        let _ = node::parse_cpu(&text, 100);
        let _ = node::parse_disks(&text);
        let _ = node::parse_nics(&text);
        let _ = disk_mounts(&text);
        let _ = OsRelease::parse(&text).describe();
        let _ = ProcCgroup::parse(&text).candidate_paths().count();
        let _ = identify(&text);
    }

    #[test]
    fn proc_stat_cpu_line_with_any_counters_parses_without_overflow(
        counters in prop::collection::vec(any::<u64>(), 10),
        ticks in 1u64..10_000,
    ) {
        let line: Vec<String> = counters.iter().map(u64::to_string).collect();
        let text = format!(
            "cpu  {0}\ncpu0 {0}\nctxt 1\nbtime 1\nprocesses 1\nprocs_running 1\nprocs_blocked 0\n",
            line.join(" ")
        );
        if let Ok(cpu) = node::parse_cpu(&text, ticks) {
            prop_assert_eq!(cpu.cores, 1);
        }
    }

    #[test]
    fn keyed_io_stat_and_psi_round_trip(
        pairs in prop::collection::vec(("[a-z_]{1,12}", any::<u64>()), 0..20),
        devices in prop::collection::vec((any::<u32>(), any::<u32>(), any::<[u64; 4]>()), 0..8),
        psi in prop::collection::vec((0u32..100_000, any::<u64>()), 2),
    ) {
        let text: String = pairs.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
        let got: Vec<(String, u64)> = parse::keyed(&text).map(|(k, v)| (k.to_owned(), v)).collect();
        prop_assert_eq!(&got, &pairs);

        let text: String = devices
            .iter()
            .map(|(ma, mi, [rb, wb, ri, wi])| {
                format!("{ma}:{mi} rbytes={rb} wbytes={wb} rios={ri} wios={wi} dbytes=0 dios=0\n")
            })
            .collect();
        let got = parse::io_stat_v2(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got.len(), devices.len());
        for (d, (ma, mi, [rb, wb, ri, wi])) in got.iter().zip(&devices) {
            prop_assert_eq!(
                (d.major, d.minor, d.read_bytes, d.write_bytes, d.read_ops, d.write_ops),
                (*ma, *mi, *rb, *wb, *ri, *wi)
            );
        }

        let line = |kind: &str, (centi, total): (u32, u64)| {
            let pct = format!("{}.{:02}", centi / 100, centi % 100);
            format!("{kind} avg10={pct} avg60={pct} avg300={pct} total={total}\n")
        };
        let text = line("some", (psi[0].0, psi[0].1)) + &line("full", (psi[1].0, psi[1].1));
        let p = parse::psi(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(p.some.total_us, psi[0].1);
        prop_assert_eq!(p.full.map(|f| f.total_us), Some(psi[1].1));
        prop_assert!((p.some.avg10 - f64::from(psi[0].0) / 100.0).abs() < 1e-9);
    }

    #[test]
    fn limits_below_the_v1_sentinel_are_kept_and_above_are_unlimited(v in any::<u64>()) {
        let got = parse::limit(&format!("{v}\n")).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, (v < 1 << 62).then_some(v));
    }

    #[test]
    fn os_release_quoted_values_round_trip(
        id in "[a-z0-9._-]{1,16}",
        pretty in "[A-Za-z0-9 .()-]{0,40}",
    ) {
        let os = OsRelease::parse(&format!("# comment\nID={id}\nPRETTY_NAME=\"{pretty}\"\n"));
        prop_assert_eq!(&os.id, &id);
        prop_assert_eq!(&os.pretty_name, &pretty);
    }

    #[test]
    fn kubernetes_cgroup_paths_give_back_their_pod_and_container(
        uid in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        id in "[0-9a-f]{12,64}",
        qos in prop::sample::select(vec!["", "burstable", "besteffort"]),
        systemd in any::<bool>(),
        runtime in prop::sample::select(vec!["cri-containerd-", "crio-", "docker-", "isulad-"]),
        lead in prop::sample::select(vec!["", "/", "/sys/fs/cgroup/"]),
    ) {
        let path = if systemd {
            let level = if qos.is_empty() { String::new() } else { format!("kubepods-{qos}.slice/") };
            let pod = if qos.is_empty() { "kubepods".to_owned() } else { format!("kubepods-{qos}") };
            format!("{lead}kubepods.slice/{level}{pod}-pod{}.slice/{runtime}{id}.scope", uid.replace('-', "_"))
        } else {
            let level = if qos.is_empty() { String::new() } else { format!("{qos}/") };
            format!("{lead}kubepods/{level}pod{uid}/{id}")
        };
        match identify(&path) {
            Some(Identity::Container { pod_uid, container_id, .. }) => {
                prop_assert_eq!(pod_uid.as_deref(), Some(uid.as_str()));
                prop_assert_eq!(container_id, id);
            }
            other => prop_assert!(false, "{path}: {other:?}"),
        }
    }
}
