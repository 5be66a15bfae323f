//! Unit tests of the hook chain: which path `plan` picks from the probe, and the order
//! `chain` falls back in.

use std::collections::BTreeMap;

use super::*;
use crate::probe::{CgroupLayout, Feature};

fn caps(helpers: &[&str]) -> Capabilities {
    let yes = |d: &str| Feature {
        available: true,
        detail: d.to_owned(),
    };
    let types = ["sock_ops", "cgroup_sock", "cgroup_skb"];
    Capabilities {
        kernel_release: "test".to_owned(),
        is_root: true,
        btf: yes("test"),
        tracefs: None,
        kprobes: yes("test"),
        cgroup: CgroupLayout::V2 {
            unified: "/sys/fs/cgroup".into(),
        },
        program_types: types
            .iter()
            .map(|t| ((*t).to_owned(), yes("loads")))
            .collect(),
        helpers: helpers
            .iter()
            .map(|h| ((*h).to_owned(), yes("available")))
            .collect(),
        tracepoints: BTreeMap::new(),
        bpf_stats_enabled: yes("test"),
        cgroup_link: yes("test"),
    }
}

const SOCK_OPS: &str = "sock_ops/sk_storage_get";
const CREATE: [&str; 2] = [
    "cgroup_sock/sk_storage_get",
    "cgroup_sock/get_current_cgroup_id",
];
const EGRESS: [&str; 2] = ["cgroup_skb/sk_storage_get", "cgroup_skb/skb_cgroup_id"];
const CURRENT: &str = "sock_ops/get_current_cgroup_id";

#[test]
fn auto_prefers_listen_tagging_then_sock_create_and_falls_back_to_egress_like_5_10() {
    let newest = caps(&[
        SOCK_OPS, CURRENT, CREATE[0], CREATE[1], EGRESS[0], EGRESS[1],
    ]);
    let (_, p) = plan(&newest, Attribution::Auto).expect("plan");
    assert_eq!(p.path(), "sock_ops+listen_cb+cgroup_skb_egress");
    assert_eq!(
        p.programs(),
        [crate::ebpf::tcp::TAG_EGRESS, crate::ebpf::tcp::SOCK_OPS],
        "no cgroup/sock_create program"
    );
    assert!(p.count_foreign_context);
    let (_, p) = plan(&newest, Attribution::SockCreate).expect("plan");
    assert_eq!(p.path(), "sock_ops+sock_create");
    // Listen tagging needs the egress program for every socket that is not a listener's.
    let no_egress = caps(&[SOCK_OPS, CURRENT, CREATE[0], CREATE[1]]);
    let (_, p) = plan(&no_egress, Attribution::Auto).expect("plan");
    assert_eq!(p.path(), "sock_ops+sock_create");
    assert!(plan(&no_egress, Attribution::Listen).is_err());
    // sock_ops that may not read the current cgroup: sock_create beside egress.
    let full = caps(&[SOCK_OPS, CREATE[0], CREATE[1], EGRESS[0], EGRESS[1]]);
    let (_, p) = plan(&full, Attribution::Auto).expect("plan");
    assert_eq!(p.path(), "sock_ops+sock_create+cgroup_skb_egress");
    let err = plan(&full, Attribution::Listen).expect_err("no current cgroup in sock_ops");
    assert!(err.to_string().contains("sock_ops"), "{err}");
    let (_, p) = plan(&full, Attribution::SockCreate).expect("plan");
    assert_eq!(p.path(), "sock_ops+sock_create");
    // 5.10: no socket storage in cgroup/sock programs, nor get_current_cgroup_id in sock_ops.
    let old = caps(&[SOCK_OPS, CREATE[1], EGRESS[0], EGRESS[1]]);
    let (_, p) = plan(&old, Attribution::Auto).expect("plan");
    assert_eq!(p.path(), "sock_ops+cgroup_skb_egress");
    assert!(!p.count_foreign_context);
}

fn paths(chain: &[(std::path::PathBuf, Plan)]) -> Vec<&'static str> {
    chain.iter().map(|(_, p)| p.path()).collect()
}

#[test]
fn the_auto_chain_runs_from_the_chosen_path_down_to_sock_diag_in_order() {
    let all = [
        SOCK_OPS,
        CREATE[0],
        CREATE[1],
        EGRESS[0],
        EGRESS[1],
        "sock_ops/get_netns_cookie",
    ];
    let full = caps(&all);
    assert_eq!(
        paths(&chain(&full, Attribution::Auto).expect("chain")),
        [
            "sock_ops+sock_create+cgroup_skb_egress",
            "sock_ops+sock_create",
            "sock_ops+cgroup_skb_egress",
            "sock_ops+netns_cookie",
            "sock_diag_poll",
        ]
    );
    // 5.10-like: no sock_create storage, no netns cookie: the paths the probe rules out
    // are left out, never tried.
    let old = caps(&[SOCK_OPS, CREATE[1], EGRESS[0], EGRESS[1]]);
    assert_eq!(
        paths(&chain(&old, Attribution::Auto).expect("chain")),
        ["sock_ops+cgroup_skb_egress", "sock_diag_poll"]
    );
    // cgroup v1: netns cookies on a mounted cgroup2, then sock_diag.
    let mut v1 = caps(&all);
    v1.cgroup = CgroupLayout::V1;
    let v1_chain = chain(&v1, Attribution::Auto).expect("chain");
    assert_eq!(
        paths(&v1_chain),
        ["sock_ops+netns_cookie", "sock_diag_poll"]
    );
    assert!(v1_chain[0].1.mount_cgroup2);
    // Where sock_ops may read the current cgroup, listen tagging first, then the rest.
    let mut newest = all.to_vec();
    newest.push(CURRENT);
    assert_eq!(
        paths(&chain(&caps(&newest), Attribution::Auto).expect("chain")),
        [
            "sock_ops+listen_cb+cgroup_skb_egress",
            "sock_ops+sock_create+cgroup_skb_egress",
            "sock_ops+sock_create",
            "sock_ops+cgroup_skb_egress",
            "sock_ops+netns_cookie",
            "sock_diag_poll",
        ]
    );
    // Each path names the programs it loads; a later path never needs more of them.
    assert_eq!(
        chain(&full, Attribution::Auto).expect("chain")[2]
            .1
            .programs(),
        [crate::ebpf::tcp::TAG_EGRESS, crate::ebpf::tcp::SOCK_OPS]
    );
}

#[test]
fn a_configured_path_is_its_own_chain_without_fallback() {
    let all = [
        SOCK_OPS, CURRENT, CREATE[0], CREATE[1], EGRESS[0], EGRESS[1],
    ];
    for (a, path) in [
        (Attribution::Listen, "sock_ops+listen_cb+cgroup_skb_egress"),
        (Attribution::SockCreate, "sock_ops+sock_create"),
        (Attribution::Egress, "sock_ops+cgroup_skb_egress"),
        (Attribution::SockDiag, "sock_diag_poll"),
    ] {
        assert_eq!(paths(&chain(&caps(&all), a).expect("chain")), [path]);
    }
    assert!(chain(&caps(&[]), Attribution::Egress).is_err());
}

#[test]
fn cgroup_v1_hosts_fall_back_to_network_namespaces_on_a_mounted_cgroup2() {
    let mut v1 = caps(&[SOCK_OPS, "sock_ops/get_netns_cookie"]);
    v1.cgroup = CgroupLayout::V1;
    let (root, p) = plan(&v1, Attribution::Auto).expect("plan");
    assert_eq!((p.path(), p.mount_cgroup2), ("sock_ops+netns_cookie", true));
    assert_eq!(root, std::path::PathBuf::from(CGROUP2_FALLBACK_MOUNT));
    assert!(matches!(
        plan(&v1, Attribution::Egress),
        Err(TcpError::NoCgroupV2)
    ));
}

#[test]
fn a_forced_path_the_kernel_lacks_is_refused_with_the_reason() {
    let old = caps(&[SOCK_OPS, EGRESS[0], EGRESS[1]]);
    let err = plan(&old, Attribution::SockCreate).expect_err("no sock_create storage");
    assert!(err.to_string().contains("cgroup/sock_create"), "{err}");
    let none = caps(&[]);
    let err = plan(&none, Attribution::Egress).expect_err("no sock_ops storage");
    assert!(err.to_string().contains("sock_ops"), "{err}");
}

#[test]
fn auto_falls_back_to_sock_diag_where_no_ebpf_path_fits_but_never_without_root() {
    let none = caps(&[]);
    let (_, p) = plan(&none, Attribution::Auto).expect("plan");
    assert_eq!(p.path(), "sock_diag_poll");
    let mut unprivileged = caps(&[]);
    unprivileged.is_root = false;
    assert!(matches!(
        plan(&unprivileged, Attribution::Auto),
        Err(TcpError::NotRoot)
    ));
}

#[test]
fn a_kernel_without_cgroup_links_polls_sock_diag_or_refuses_a_forced_ebpf_path() {
    let mut old = caps(&[SOCK_OPS, CREATE[0], CREATE[1]]);
    old.cgroup_link = Feature {
        available: false,
        detail: "kernel 4.19 has no bpf_link for cgroup programs".to_owned(),
    };
    let err = plan(&old, Attribution::SockCreate).expect_err("no cgroup links");
    assert!(matches!(err, TcpError::NoCgroupLink(_)), "{err}");
    let (_, p) = plan(&old, Attribution::Auto).expect("plan");
    assert_eq!(p.path(), "sock_diag_poll");
}

#[test]
fn cgroup_v1_hosts_without_netns_cookies_poll_sock_diag_or_refuse_a_forced_netns() {
    let mut v1 = caps(&[SOCK_OPS, CREATE[0], CREATE[1]]);
    v1.cgroup = CgroupLayout::V1;
    let err = plan(&v1, Attribution::Netns).expect_err("no netns cookie");
    assert!(err.to_string().contains("netns"), "{err}");
    let (_, p) = plan(&v1, Attribution::Auto).expect("plan");
    assert_eq!(p.path(), "sock_diag_poll");
}
