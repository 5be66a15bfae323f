//! GPUs tied to pods by device assignment: where NVML attributes no process of a GPU to a
//! container, the one container the kubelet assigned it to (`containers::podresources`) holds
//! it, keyed like every other container (its runtime id where the runtime names the same
//! container, so that its GPU series join its other ones).

use crate::{
    containers::{cri::Identities, podresources::Assignments},
    store::{GpuAssignment, GpuDevice},
};

/// Sets [`GpuDevice::assigned`] on each GPU with a sole holder in `assignments`.
pub fn assign(gpus: &mut [GpuDevice], assignments: &Assignments, runtime: Option<&Identities>) {
    for g in gpus {
        let Some(h) = assignments.sole_holder(&g.uuid) else {
            continue;
        };
        let id = runtime.and_then(|r| {
            r.by_container.iter().find_map(|(id, p)| {
                (p.pod_namespace == h.namespace
                    && p.pod_name == h.pod
                    && p.container_name == h.container)
                    .then(|| id.clone())
            })
        });
        g.assigned = Some(GpuAssignment {
            key: id.unwrap_or_else(|| {
                format!("pod-resources:{}/{}/{}", h.namespace, h.pod, h.container)
            }),
            namespace: h.namespace.clone(),
            pod: h.pod.clone(),
            container: h.container.clone(),
        });
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
        store::{GpuAttribution, GpuProcess, GpuReading},
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
}
