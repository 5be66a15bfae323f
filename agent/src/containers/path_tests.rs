use super::*;

const ID: &str = "4e2b8a3f7c1d9e6b5a0f8c7d6e5b4a3928171615141312111009080706050403";
const UID: &str = "8d5a1c2e-3f4b-4c6d-8e9f-0a1b2c3d4e5f";
const UID_SYSTEMD: &str = "8d5a1c2e_3f4b_4c6d_8e9f_0a1b2c3d4e5f";

fn pod(uid: &str, qos: Qos, id: &str, runtime: Runtime) -> Option<Identity> {
    Some(Identity::Container {
        pod_uid: Some(uid.to_owned()),
        qos: Some(qos),
        container_id: id.to_owned(),
        runtime,
    })
}

#[test]
fn systemd_driver_burstable_containerd_converts_underscores_in_the_pod_uid() {
    let p = format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
    );
    assert_eq!(
        identify(&p),
        pod(UID, Qos::Burstable, ID, Runtime::Containerd)
    );
}

#[test]
fn systemd_driver_besteffort_crio() {
    let p = format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/crio-{ID}.scope"
    );
    assert_eq!(identify(&p), pod(UID, Qos::BestEffort, ID, Runtime::CriO));
}

#[test]
fn systemd_driver_guaranteed_pod_has_no_qos_level() {
    let p = format!("kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/docker-{ID}.scope");
    assert_eq!(identify(&p), pod(UID, Qos::Guaranteed, ID, Runtime::Docker));
}

#[test]
fn systemd_driver_isulad_scope() {
    let p = format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/isulad-{ID}.scope");
    assert_eq!(identify(&p), pod(UID, Qos::Burstable, ID, Runtime::Isulad));
}

#[test]
fn cgroupfs_driver_besteffort_bare_id_has_unknown_runtime() {
    let p = format!("kubepods/besteffort/pod{UID}/{ID}");
    assert_eq!(
        identify(&p),
        pod(UID, Qos::BestEffort, ID, Runtime::Unknown)
    );
}

#[test]
fn cgroupfs_driver_burstable_and_guaranteed() {
    assert_eq!(
        identify(&format!("kubepods/burstable/pod{UID}/{ID}")),
        pod(UID, Qos::Burstable, ID, Runtime::Unknown)
    );
    assert_eq!(
        identify(&format!("/kubepods/pod{UID}/{ID}")),
        pod(UID, Qos::Guaranteed, ID, Runtime::Unknown)
    );
}

#[test]
fn cgroupfs_driver_with_crio_prefix_names_the_runtime() {
    let p = format!("kubepods/burstable/pod{UID}/crio-{ID}");
    assert_eq!(identify(&p), pod(UID, Qos::Burstable, ID, Runtime::CriO));
}

#[test]
fn pod_cgroups_slices_and_conmon_are_not_containers() {
    for p in [
        "kubepods.slice".to_owned(),
        "kubepods.slice/kubepods-burstable.slice".to_owned(),
        format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice"
        ),
        format!("kubepods/besteffort/pod{UID}"),
        format!("kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/crio-conmon-{ID}.scope"),
        // CRI-O's systemd driver nests the workload one level down; the scope is the container.
        format!("kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/crio-{ID}.scope/container"),
        // An unknown QoS level is not guessed at.
        format!("kubepods/silver/pod{UID}/{ID}"),
        "user.slice/user-0.slice/session-1.scope".to_owned(),
        "".to_owned(),
    ] {
        assert_eq!(identify(&p), None, "{p}");
    }
}

#[test]
fn a_pod_segment_with_a_non_hex_uid_is_rejected() {
    assert_eq!(identify(&format!("kubepods/podnot-a-uid!/{ID}")), None);
}

#[test]
fn system_services_are_non_pod_workloads() {
    assert_eq!(
        identify("system.slice/containerd.service"),
        Some(Identity::Service {
            unit: "containerd.service".to_owned()
        })
    );
    assert_eq!(identify("system.slice/foo.socket"), None);
    assert_eq!(identify("system.slice/x.service/sub"), None);
    assert_eq!(identify("user.slice/foo.service"), None);
}

#[test]
fn docker_outside_kubernetes_has_no_pod() {
    let expected = Some(Identity::Container {
        pod_uid: None,
        qos: None,
        container_id: ID.to_owned(),
        runtime: Runtime::Docker,
    });
    assert_eq!(
        identify(&format!("system.slice/docker-{ID}.scope")),
        expected
    );
    assert_eq!(identify(&format!("docker/{ID}")), expected);
}

#[test]
fn isulad_cgroupfs_outside_kubernetes() {
    assert_eq!(
        identify(&format!("isulad/{ID}")),
        Some(Identity::Container {
            pod_uid: None,
            qos: None,
            container_id: ID.to_owned(),
            runtime: Runtime::Isulad,
        })
    );
}

#[test]
fn words_are_not_container_ids() {
    assert_eq!(identify("docker/notacontainer"), None);
    assert_eq!(identify("system.slice/docker-short.scope"), None);
}
