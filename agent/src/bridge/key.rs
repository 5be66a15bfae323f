//! How containers are named in the store, the same way for every source: the runtime's
//! container id where the inventory knows the workload, else the cgroup path (`/`-prefixed,
//! relative to the cgroup v2 root), else the raw id the kernel gave.

use std::collections::BTreeMap;

use crate::{
    containers::{cri::Identities, Container, Identity, Inventory},
    store::ContainerMeta,
};

/// What the ids in a network snapshot are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyedBy {
    /// cgroup v2 ids (inodes of the cgroup directories).
    CgroupId,
    /// Network-namespace cookies (the TCP source's fallback on cgroup-v1 hosts): no cgroup.
    NetnsCookie,
}

/// The store key of an inventory workload.
pub fn workload_key(c: &Container) -> String {
    match &c.identity {
        Identity::Container { container_id, .. } => container_id.clone(),
        Identity::Service { .. } => format!("/{}", c.path.trim_start_matches('/')),
    }
}

/// The store key of a container an eBPF source reports by id.
pub fn network_key(id: u64, path: Option<&str>, keyed: KeyedBy, inventory: &Inventory) -> String {
    match keyed {
        KeyedBy::NetnsCookie => format!("netns-cookie:{id}"),
        KeyedBy::CgroupId => {
            if let Some(c) = inventory.by_cgroup_id(id) {
                return workload_key(c);
            }
            match path {
                Some(p) if !p.is_empty() => format!("/{}", p.trim_start_matches('/')),
                _ => format!("cgroup-id:{id}"),
            }
        }
    }
}

/// The store's identity table for the inventory's workloads. Pod and container names,
/// namespaces and labels come from the container runtime's table where it knows the container
/// id (the cgroup tree does not reveal them); else only what the cgroup path says (pod UID,
/// a service's unit) is filled.
pub fn container_meta(
    inventory: &Inventory,
    runtime: Option<&Identities>,
) -> BTreeMap<String, ContainerMeta> {
    inventory
        .containers
        .iter()
        .map(|c| {
            let key = workload_key(c);
            let mut meta = ContainerMeta {
                id: key.clone(),
                cgroup_path: c.path.clone(),
                cgroup_id: c.cgroup_id.unwrap_or(0),
                ..ContainerMeta::default()
            };
            match &c.identity {
                Identity::Container {
                    pod_uid,
                    qos,
                    container_id,
                    ..
                } => {
                    meta.pod_uid = pod_uid.clone().unwrap_or_default();
                    meta.qos = *qos;
                    if let Some(p) = runtime.and_then(|r| r.get(container_id)) {
                        meta.name.clone_from(&p.container_name);
                        meta.pod_name.clone_from(&p.pod_name);
                        meta.pod_namespace.clone_from(&p.pod_namespace);
                        if !p.pod_uid.is_empty() {
                            meta.pod_uid.clone_from(&p.pod_uid);
                        }
                        meta.labels.clone_from(&p.labels);
                        meta.image.clone_from(&p.image);
                        meta.annotations.clone_from(&p.annotations);
                    }
                }
                Identity::Service { unit } => meta.name.clone_from(unit),
            }
            (key, meta)
        })
        .collect()
}

/// Adds an identity for a container only the network sources know (no inventory entry).
pub fn add_network_meta(
    meta: &mut BTreeMap<String, ContainerMeta>,
    key: &str,
    cgroup_id: u64,
    path: Option<&str>,
) {
    meta.entry(key.to_owned()).or_insert_with(|| ContainerMeta {
        id: key.to_owned(),
        cgroup_path: path.unwrap_or_default().trim_start_matches('/').to_owned(),
        cgroup_id,
        ..ContainerMeta::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containers::{Qos, Runtime};

    fn inventory() -> Inventory {
        Inventory::from_containers(vec![
            Container {
                path: "kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope".to_owned(),
                identity: Identity::Container {
                    pod_uid: Some("1".to_owned()),
                    qos: Some(Qos::Guaranteed),
                    container_id: "abc".to_owned(),
                    runtime: Runtime::Containerd,
                },
                cgroup_id: Some(42),
                netns: None,
            },
            Container {
                path: "system.slice/sshd.service".to_owned(),
                identity: Identity::Service {
                    unit: "sshd.service".to_owned(),
                },
                cgroup_id: Some(7),
                netns: None,
            },
        ])
    }

    #[test]
    fn known_cgroup_ids_are_keyed_by_container_id_or_service_path() {
        let inv = inventory();
        assert_eq!(network_key(42, None, KeyedBy::CgroupId, &inv), "abc");
        assert_eq!(
            network_key(7, Some("/elsewhere"), KeyedBy::CgroupId, &inv),
            "/system.slice/sshd.service"
        );
    }

    #[test]
    fn unknown_cgroups_fall_back_to_path_then_raw_id() {
        let inv = inventory();
        assert_eq!(
            network_key(9, Some("/test/rx"), KeyedBy::CgroupId, &inv),
            "/test/rx"
        );
        assert_eq!(network_key(9, None, KeyedBy::CgroupId, &inv), "cgroup-id:9");
        assert_eq!(
            network_key(42, None, KeyedBy::NetnsCookie, &inv),
            "netns-cookie:42",
            "a cookie is never looked up as a cgroup id"
        );
    }

    #[test]
    fn meta_carries_pod_uid_cgroup_id_and_service_unit() {
        let meta = container_meta(&inventory(), None);
        let c = &meta["abc"];
        assert_eq!((c.pod_uid.as_str(), c.cgroup_id), ("1", 42));
        assert_eq!(
            c.qos,
            Some(Qos::Guaranteed),
            "the QoS class the cgroup path says"
        );
        assert_eq!(meta["/system.slice/sshd.service"].qos, None);
        assert_eq!(c.pod_name, "", "no runtime: no pod name");
        assert_eq!(meta["/system.slice/sshd.service"].name, "sshd.service");
    }

    #[test]
    fn runtime_identity_names_the_container_with_the_same_id() {
        use std::sync::Arc;

        use crate::containers::cri::{PodIdentity, Status};
        let runtime = Identities {
            status: Status::Disabled,
            by_container: std::collections::HashMap::from([(
                "abc".to_owned(),
                Arc::new(PodIdentity {
                    container_name: "nginx".to_owned(),
                    pod_name: "web-0".to_owned(),
                    pod_namespace: "prod".to_owned(),
                    pod_uid: "1".to_owned(),
                    labels: Arc::new(BTreeMap::from([("app".to_owned(), "web".to_owned())])),
                    image: "example/web:2".to_owned(),
                    annotations: Arc::new(BTreeMap::from([(
                        "team".to_owned(),
                        "media".to_owned(),
                    )])),
                }),
            )]),
        };
        let meta = container_meta(&inventory(), Some(&runtime));
        let c = &meta["abc"];
        assert_eq!(
            (
                c.name.as_str(),
                c.pod_name.as_str(),
                c.pod_namespace.as_str()
            ),
            ("nginx", "web-0", "prod")
        );
        assert_eq!(c.labels["app"], "web");
        assert_eq!(c.image, "example/web:2");
        assert_eq!(c.annotations["team"], "media");
        let p = &runtime.by_container["abc"];
        assert!(
            Arc::ptr_eq(&c.labels, &p.labels) && Arc::ptr_eq(&c.annotations, &p.annotations),
            "the store shares the runtime table's label and annotation maps, not copies"
        );
        assert_eq!(meta["/system.slice/sshd.service"].pod_name, "");
    }
}
