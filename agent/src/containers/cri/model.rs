//! What the container runtime says about each container, bounded and cleaned, and the pure
//! mapping from the CRI listings to it. Nothing here talks to a socket, so every rule is
//! tested on constructed CRI messages.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use super::pb;

/// Longest kept name, namespace, UID or image reference, in bytes.
pub const MAX_NAME: usize = 512;
/// Longest kept label key: a DNS-subdomain prefix (253), `/` and a 63-character name.
pub const MAX_LABEL_KEY: usize = 317;
/// Longest kept label value. Kubernetes allows 63; a runtime outside Kubernetes may carry more.
pub const MAX_LABEL_VALUE: usize = 256;
/// Labels kept per pod (the first ones in key order); Kubernetes pods rarely carry 30.
pub const MAX_LABELS: usize = 256;
/// Longest kept value of an allow-listed annotation.
pub const MAX_ANNOTATION_VALUE: usize = 4096;

/// One container as its runtime names it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodIdentity {
    /// The container's name in its pod (`metadata.name`).
    pub container_name: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub pod_uid: String,
    /// The image reference the container was created from.
    pub image: String,
    /// The pod's labels (from its sandbox), at most [`MAX_LABELS`]. Shared, not copied, with
    /// the store's [`crate::store::ContainerMeta`] of the container.
    pub labels: Arc<BTreeMap<String, String>>,
    /// The pod's annotations named in `containers.runtime_annotations`, and only those (shared
    /// like the labels).
    pub annotations: Arc<BTreeMap<String, String>>,
}

/// A string as the agent keeps it: control characters (a line feed in a label would forge a
/// log line or a CLI row) replaced by U+FFFD, cut at `max` bytes on a character boundary.
pub fn clean(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let c = if c.is_control() { '\u{fffd}' } else { c };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

/// The pod's labels, bounded: over-long keys are dropped (a cut key would be another key),
/// over-long values cut, at most [`MAX_LABELS`] kept in key order.
pub fn bounded_labels(labels: &HashMap<String, String>) -> BTreeMap<String, String> {
    let mut keys: Vec<&String> = labels
        .keys()
        .filter(|k| !k.is_empty() && k.len() <= MAX_LABEL_KEY)
        .collect();
    keys.sort();
    keys.into_iter()
        .take(MAX_LABELS)
        .map(|k| (clean(k, MAX_LABEL_KEY), clean(&labels[k], MAX_LABEL_VALUE)))
        .collect()
}

/// The allow-listed annotations, values bounded.
pub fn allowed_annotations(
    annotations: &HashMap<String, String>,
    allow: &[String],
) -> BTreeMap<String, String> {
    allow
        .iter()
        .filter_map(|k| {
            annotations
                .get(k)
                .map(|v| (k.clone(), clean(v, MAX_ANNOTATION_VALUE)))
        })
        .collect()
}

/// What a pod gives each of its containers' identity, cleaned once per pod: its containers
/// share the label and annotation maps.
#[derive(Debug, Clone, Default)]
pub struct Pod {
    name: String,
    namespace: String,
    uid: String,
    labels: Arc<BTreeMap<String, String>>,
    annotations: Arc<BTreeMap<String, String>>,
}

/// The runtime's sandboxes by sandbox id, reduced to what identity keeps (the decoded listing
/// can be dropped at once).
pub fn pods(sandboxes: &[pb::PodSandbox], annotation_allow: &[String]) -> HashMap<String, Pod> {
    sandboxes
        .iter()
        .map(|s| {
            let meta = s.metadata.as_ref();
            let pod = Pod {
                name: clean(meta.map_or("", |m| m.name.as_str()), MAX_NAME),
                namespace: clean(meta.map_or("", |m| m.namespace.as_str()), MAX_NAME),
                uid: clean(meta.map_or("", |m| m.uid.as_str()), MAX_NAME),
                labels: Arc::new(bounded_labels(&s.labels)),
                annotations: Arc::new(allowed_annotations(&s.annotations, annotation_allow)),
            };
            (s.id.clone(), pod)
        })
        .collect()
}

/// Joins the runtime's containers with their pods ([`pods`]): container id → identity. A
/// container whose sandbox is not listed (created between the two calls) still gets its own
/// name. The QoS class is not here: the cgroup path the container runs in says it (see
/// [`crate::containers::path`]), with either cgroup driver.
pub fn join(
    pods: &HashMap<String, Pod>,
    containers: &[pb::Container],
) -> HashMap<String, Arc<PodIdentity>> {
    let none = Pod::default();
    let mut table: HashMap<String, Arc<PodIdentity>> = containers
        .iter()
        .filter(|c| !c.id.is_empty())
        .map(|c| {
            let pod = pods.get(&c.pod_sandbox_id).unwrap_or(&none);
            let id = PodIdentity {
                container_name: clean(
                    c.metadata.as_ref().map_or("", |m| m.name.as_str()),
                    MAX_NAME,
                ),
                pod_name: pod.name.clone(),
                pod_namespace: pod.namespace.clone(),
                pod_uid: pod.uid.clone(),
                image: clean(&image_of(c), MAX_NAME),
                labels: pod.labels.clone(),
                annotations: pod.annotations.clone(),
            };
            (c.id.clone(), Arc::new(id))
        })
        .collect();
    // Kept until the next listing: no room for more.
    table.shrink_to_fit();
    table
}

/// [`pods`] and [`join`] in one step.
pub fn identities(
    sandboxes: &[pb::PodSandbox],
    containers: &[pb::Container],
    annotation_allow: &[String],
) -> HashMap<String, Arc<PodIdentity>> {
    join(&pods(sandboxes, annotation_allow), containers)
}

/// The image as the user wrote it where the runtime kept that, else the resolved reference.
fn image_of(c: &pb::Container) -> String {
    match c.image.as_ref().map(|i| i.image.as_str()) {
        Some(i) if !i.is_empty() => i.to_owned(),
        _ => c.image_ref.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str, name: &str, ns: &str, labels: &[(&str, &str)]) -> pb::PodSandbox {
        pb::PodSandbox {
            id: id.to_owned(),
            metadata: Some(pb::PodSandboxMetadata {
                name: name.to_owned(),
                uid: format!("uid-{name}"),
                namespace: ns.to_owned(),
                attempt: 0,
            }),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            annotations: HashMap::from([
                ("team".to_owned(), "media".to_owned()),
                ("secret".to_owned(), "x".to_owned()),
            ]),
            ..Default::default()
        }
    }

    fn container(id: &str, sandbox: &str, name: &str) -> pb::Container {
        pb::Container {
            id: id.to_owned(),
            pod_sandbox_id: sandbox.to_owned(),
            metadata: Some(pb::ContainerMetadata {
                name: name.to_owned(),
                attempt: 0,
            }),
            image: Some(pb::ImageSpec {
                image: "example/app:1".to_owned(),
                ..Default::default()
            }),
            image_ref: "sha256:abc".to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn containers_get_their_pods_names_labels_and_allowed_annotations() {
        let ids = identities(
            &[sandbox("s1", "web-0", "prod", &[("app", "web")])],
            &[container("c1", "s1", "nginx"), container("c2", "gone", "x")],
            &["team".to_owned()],
        );
        let c1 = &ids["c1"];
        assert_eq!(
            (
                c1.container_name.as_str(),
                c1.pod_name.as_str(),
                c1.pod_namespace.as_str(),
                c1.pod_uid.as_str(),
                c1.image.as_str()
            ),
            ("nginx", "web-0", "prod", "uid-web-0", "example/app:1")
        );
        assert_eq!(c1.labels["app"], "web");
        assert_eq!(
            c1.annotations.keys().collect::<Vec<_>>(),
            ["team"],
            "only allow-listed annotations are kept"
        );
        let c2 = &ids["c2"];
        assert_eq!(
            (c2.container_name.as_str(), c2.pod_name.as_str()),
            ("x", "")
        );
    }

    #[test]
    fn containers_of_one_pod_share_its_label_and_annotation_maps() {
        let ids = identities(
            &[sandbox("s1", "web-0", "prod", &[("app", "web")])],
            &[
                container("c1", "s1", "nginx"),
                container("c2", "s1", "sidecar"),
            ],
            &["team".to_owned()],
        );
        let (c1, c2) = (&ids["c1"], &ids["c2"]);
        assert_eq!(
            (c2.pod_name.as_str(), c2.labels["app"].as_str()),
            ("web-0", "web")
        );
        assert!(
            Arc::ptr_eq(&c1.labels, &c2.labels) && Arc::ptr_eq(&c1.annotations, &c2.annotations),
            "one map per pod, not per container"
        );
    }

    #[test]
    fn hostile_labels_are_bounded_and_cleaned() {
        let mut labels: HashMap<String, String> = (0..300)
            .map(|i| (format!("k{i:03}"), "v".repeat(63)))
            .collect();
        labels.insert("k000".to_owned(), "a\nb\"c".to_owned());
        labels.insert("x".repeat(MAX_LABEL_KEY + 1), "dropped".to_owned());
        labels.insert("a-long".to_owned(), "é".repeat(MAX_LABEL_VALUE));
        let kept = bounded_labels(&labels);
        assert_eq!(kept.len(), MAX_LABELS);
        assert_eq!(kept["k000"], "a\u{fffd}b\"c");
        assert!(kept.values().all(|v| v.len() <= MAX_LABEL_VALUE));
        assert!(kept.keys().all(|k| k.len() <= MAX_LABEL_KEY));
        assert_eq!(kept["a-long"].chars().count(), MAX_LABEL_VALUE / 2);
    }

    #[test]
    fn huge_annotation_values_are_cut() {
        let ann = HashMap::from([("big".to_owned(), "z".repeat(256 * 1024))]);
        let kept = allowed_annotations(&ann, &["big".to_owned(), "absent".to_owned()]);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept["big"].len(), MAX_ANNOTATION_VALUE);
    }
}
