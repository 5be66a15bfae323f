//! Pure parsing of cgroup paths into workload identities: which pod (UID, QoS class), which
//! container (id, runtime), or which plain systemd service a cgroup directory belongs to.
//!
//! Nothing here touches the filesystem, so every layout and driver is tested on path strings.
//! Paths are relative to a hierarchy root and use `/` separators, e.g.
//! `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`
//! (kubelet systemd driver) or `kubepods/besteffort/pod<uid>/<id>` (cgroupfs driver).

use serde::Serialize;

/// The kubelet's Quality-of-Service class of a pod, read from where its cgroup sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Qos {
    /// Requests equal limits: the pod cgroup sits directly under `kubepods`.
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Guaranteed => "guaranteed",
            Self::Burstable => "burstable",
            Self::BestEffort => "besteffort",
        }
    }
}

/// The container runtime, recognised from the scope or directory name it creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    Isulad,
    /// The cgroupfs driver names a container's directory by its bare id, which does not say
    /// which runtime made it.
    Unknown,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
            Self::Docker => "docker",
            Self::Isulad => "isulad",
            Self::Unknown => "unknown",
        }
    }
}

/// What a recognised cgroup holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Identity {
    /// A container, inside a Kubernetes pod (`pod_uid` set) or run directly by a runtime.
    Container {
        /// The pod's UID in its canonical dashed form (the systemd driver's `_` turned back
        /// into `-`); `None` for a container outside Kubernetes.
        pod_uid: Option<String>,
        qos: Option<Qos>,
        container_id: String,
        runtime: Runtime,
    },
    /// A plain systemd service (`system.slice/<name>.service`): a workload without a pod.
    Service { unit: String },
}

/// Scope or directory prefixes the runtimes use, most specific first. CRI-O's `crio-conmon-`
/// scope holds the monitor process, not the container, and is rejected before this table.
const RUNTIME_PREFIXES: &[(&str, Runtime)] = &[
    ("cri-containerd-", Runtime::Containerd),
    ("crio-", Runtime::CriO),
    ("docker-", Runtime::Docker),
    ("isulad-", Runtime::Isulad),
];

/// Recognises the workload a cgroup path belongs to, or `None` for anything else (slices, pod
/// cgroups themselves, conmon scopes, user sessions, nested sub-cgroups of a container).
pub fn identify(path: &str) -> Option<Identity> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let (&leaf, parents) = parts.split_last()?;

    if let Some(kube_at) = parents.iter().position(|p| is_kubepods(p)) {
        return identify_pod_container(leaf, &parents[kube_at + 1..]);
    }
    if let Some((container_id, runtime)) = container_from_leaf(leaf, parents.last().copied()) {
        return Some(Identity::Container {
            pod_uid: None,
            qos: None,
            container_id,
            runtime,
        });
    }
    // Only services directly in system.slice: units nested deeper belong to something else
    // (a user session, a container's own systemd).
    if parents == ["system.slice"] {
        if let Some(unit) = leaf.strip_suffix(".service") {
            if !unit.is_empty() {
                return Some(Identity::Service {
                    unit: leaf.to_owned(),
                });
            }
        }
    }
    None
}

fn is_kubepods(segment: &str) -> bool {
    segment == "kubepods" || segment == "kubepods.slice"
}

/// `between` is what lies between `kubepods[.slice]` and the leaf: an optional QoS level, then
/// exactly the pod's own cgroup.
fn identify_pod_container(leaf: &str, between: &[&str]) -> Option<Identity> {
    let (qos, pod_segment) = match between {
        [pod] => (Qos::Guaranteed, *pod),
        [level, pod] => (qos_of_level(level)?, *pod),
        _ => return None,
    };
    let pod_uid = pod_uid_of(pod_segment)?;
    let (container_id, runtime) = container_from_leaf(leaf, None)
        .or_else(|| is_container_id(leaf).then(|| (leaf.to_owned(), Runtime::Unknown)))?;
    Some(Identity::Container {
        pod_uid: Some(pod_uid),
        qos: Some(qos),
        container_id,
        runtime,
    })
}

fn qos_of_level(segment: &str) -> Option<Qos> {
    match segment {
        "burstable" | "kubepods-burstable.slice" => Some(Qos::Burstable),
        "besteffort" | "kubepods-besteffort.slice" => Some(Qos::BestEffort),
        _ => None,
    }
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid_of(segment: &str) -> Option<String> {
    let raw = if let Some(slice) = segment.strip_suffix(".slice") {
        let at = slice.rfind("-pod")?;
        if !slice.starts_with("kubepods") {
            return None;
        }
        // systemd reserves `-` as the slice hierarchy separator, so the kubelet writes the
        // UID's dashes as underscores.
        slice[at + 4..].replace('_', "-")
    } else {
        segment.strip_prefix("pod")?.to_owned()
    };
    let valid = !raw.is_empty() && raw.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    valid.then_some(raw)
}

/// `<prefix><id>.scope` (systemd driver), or `<prefix><id>` / `<runtime>/<id>` (cgroupfs driver
/// outside Kubernetes: Docker's `docker/<id>`, iSulad's `isulad/<id>`).
fn container_from_leaf(leaf: &str, parent: Option<&str>) -> Option<(String, Runtime)> {
    if leaf.starts_with("crio-conmon-") {
        return None;
    }
    let name = leaf.strip_suffix(".scope").unwrap_or(leaf);
    for (prefix, runtime) in RUNTIME_PREFIXES {
        if let Some(id) = name.strip_prefix(prefix) {
            if is_container_id(id) {
                return Some((id.to_owned(), *runtime));
            }
        }
    }
    let runtime = match parent? {
        "docker" => Runtime::Docker,
        "isulad" => Runtime::Isulad,
        _ => return None,
    };
    is_container_id(leaf).then(|| (leaf.to_owned(), runtime))
}

/// Runtimes name containers by 64 lowercase hex digits; shorter ids (down to 12, Docker's
/// short form) are accepted for hand-made setups, but not arbitrary words.
fn is_container_id(s: &str) -> bool {
    (12..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
#[path = "path_tests.rs"]
mod tests;
