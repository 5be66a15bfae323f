//! GPUs tied to pods by device assignment: where NVML attributes no process of a GPU to a
//! container, the one container the kubelet assigned it to (`containers::podresources`) holds
//! it, keyed like every other container (its runtime id where the runtime names the same
//! container, so that its GPU series join its other ones). A GPU in MIG mode is handed out by
//! its MIG devices, each matched by its `MIG-…` UUID (or the `MIG-<GPU UUID>/<gi>/<ci>` id of
//! older device plugins): each holder gets its MIG device, never the whole GPU.

use crate::{
    containers::{
        cri::Identities,
        podresources::{Assignments, Holder},
    },
    store::{GpuAssignment, GpuDevice},
};

/// Sets [`GpuDevice::assigned`] on each GPU, and `assigned` on each of its MIG devices, that
/// has a sole holder in `assignments`.
pub fn assign(gpus: &mut [GpuDevice], assignments: &Assignments, runtime: Option<&Identities>) {
    for g in gpus {
        g.assigned = assignments
            .sole_holder(&g.uuid)
            .map(|h| assignment(h, runtime));
        for m in &mut g.mig_devices {
            let by_uuid = (!m.uuid.is_empty())
                .then(|| assignments.sole_holder(&m.uuid))
                .flatten();
            let holder = by_uuid.or_else(|| {
                m.legacy_id(&g.uuid)
                    .and_then(|id| assignments.sole_holder(&id))
            });
            m.assigned = holder.map(|h| assignment(h, runtime));
        }
    }
}

/// The store's record of a holder, keyed by the runtime's id for the same container where the
/// runtime names it.
fn assignment(h: &Holder, runtime: Option<&Identities>) -> GpuAssignment {
    let id = runtime.and_then(|r| {
        r.by_container.iter().find_map(|(id, p)| {
            (p.pod_namespace == h.namespace
                && p.pod_name == h.pod
                && p.container_name == h.container)
                .then(|| id.clone())
        })
    });
    GpuAssignment {
        key: id
            .unwrap_or_else(|| format!("pod-resources:{}/{}/{}", h.namespace, h.pod, h.container)),
        namespace: h.namespace.clone(),
        pod: h.pod.clone(),
        container: h.container.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, path::PathBuf, sync::Arc};

    use super::*;
    use crate::{
        containers::{
            cri::{PodIdentity, Status as CriStatus},
            podresources::{Holder, Status},
        },
        store::{GpuAttribution, GpuMigDevice, GpuProcess, GpuReading},
    };

    fn assignments() -> Assignments {
        let holder = |pod: &str| Holder {
            namespace: "media".to_owned(),
            pod: pod.to_owned(),
            container: "ffmpeg".to_owned(),
            resource: "nvidia.com/gpu".to_owned(),
        };
        Assignments {
            status: Status::Connected {
                path: PathBuf::from("/k.sock"),
            },
            by_device: HashMap::from([
                ("GPU-a".to_owned(), vec![holder("transcode-0")]),
                ("GPU-b".to_owned(), vec![holder("transcode-1")]),
            ]),
        }
    }

    fn gpu(uuid: &str) -> GpuDevice {
        GpuDevice {
            uuid: uuid.to_owned(),
            utilization_percent: 87.0,
            memory_used_bytes: 3 << 30,
            encoder_utilization_percent: Some(40),
            decoder_utilization_percent: Some(12),
            ..GpuDevice::default()
        }
    }

    #[test]
    fn a_gpu_without_processes_gives_its_figures_to_its_assigned_container() {
        let runtime = Identities {
            status: CriStatus::Disabled,
            by_container: HashMap::from([(
                "c1".to_owned(),
                Arc::new(PodIdentity {
                    container_name: "ffmpeg".to_owned(),
                    pod_name: "transcode-0".to_owned(),
                    pod_namespace: "media".to_owned(),
                    ..PodIdentity::default()
                }),
            )]),
        };
        let mut gpus = vec![gpu("GPU-a"), gpu("GPU-b"), gpu("GPU-c")];
        assign(&mut gpus, &assignments(), Some(&runtime));
        let a = gpus[0].by_container();
        let u = a.get("c1").expect("keyed by the runtime's container id");
        assert_eq!(
            (
                u.sm_percent,
                u.encoder_percent,
                u.decoder_percent,
                u.used_memory_bytes
            ),
            (87, 40, 12, 3 << 30)
        );
        assert_eq!(u.attribution, GpuAttribution::DeviceAssignment);
        assert!(u.sampled);
        let b = gpus[1].by_container();
        assert!(
            b.contains_key("pod-resources:media/transcode-1/ffmpeg"),
            "unknown to the runtime: keyed by its names: {b:?}"
        );
        assert!(gpus[2].by_container().is_empty(), "no holder, no usage");
    }

    #[test]
    fn process_samples_win_over_the_assignment_and_unread_utilisation_is_unsampled() {
        let mut gpus = vec![gpu("GPU-a"), gpu("GPU-b")];
        gpus[0].processes.push(GpuProcess {
            pid: 7,
            container_id: "c9".to_owned(),
            ..GpuProcess::default()
        });
        gpus[1].unreadable.push(GpuReading::Utilization);
        assign(&mut gpus, &assignments(), None);
        let a = gpus[0].by_container();
        assert_eq!(a.keys().copied().collect::<Vec<_>>(), ["c9"]);
        assert_eq!(a["c9"].attribution, GpuAttribution::ProcessSamples);
        let b = gpus[1].by_container();
        assert!(!b["pod-resources:media/transcode-1/ffmpeg"].sampled);
    }

    #[test]
    fn each_mig_device_goes_to_its_own_holder_and_the_parent_to_none() {
        let holder = |pod: &str| Holder {
            namespace: "media".to_owned(),
            pod: pod.to_owned(),
            container: "ffmpeg".to_owned(),
            resource: "nvidia.com/mig-1g.10gb".to_owned(),
        };
        let kubelet = Assignments {
            status: Status::Connected {
                path: PathBuf::from("/k.sock"),
            },
            by_device: HashMap::from([
                ("MIG-aaaa".to_owned(), vec![holder("transcode-0")]),
                // An older device plugin's id for the MIG device with no UUID read.
                ("MIG-GPU-m/2/0".to_owned(), vec![holder("transcode-1")]),
            ]),
        };
        let mig = |index: u32, uuid: &str, gi: u32| GpuMigDevice {
            index,
            uuid: uuid.to_owned(),
            gpu_instance_id: Some(gi),
            compute_instance_id: Some(0),
            memory_used_bytes: Some(1 << 30),
            ..GpuMigDevice::default()
        };
        let mut gpus = vec![GpuDevice {
            mig_enabled: Some(true),
            mig_devices: vec![mig(0, "MIG-aaaa", 1), mig(1, "", 2), mig(2, "MIG-cccc", 3)],
            ..gpu("GPU-m")
        }];
        assign(&mut gpus, &kubelet, None);
        let g = &gpus[0];
        assert_eq!(g.assigned, None, "the GPU itself is nobody's");
        assert!(g.by_container().is_empty(), "no whole-GPU credit: {g:?}");
        let pods: Vec<_> = g
            .mig_devices
            .iter()
            .map(|m| m.assigned.as_ref().map(|a| a.pod.as_str()))
            .collect();
        assert_eq!(pods, [Some("transcode-0"), Some("transcode-1"), None]);
        assert_eq!(
            g.mig_devices[0].assigned.as_ref().map(|a| a.key.as_str()),
            Some("pod-resources:media/transcode-0/ffmpeg")
        );
    }
}
