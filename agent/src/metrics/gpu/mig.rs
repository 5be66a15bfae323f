//! MIG devices on `/metrics`: one memory series per MIG device, labelled with its parent GPU,
//! its own UUID and instance ids, and the pod and container the kubelet assigned it to (empty
//! labels when no one container holds it). At most `sources::gpu::mig::MAX_MIG_DEVICES` per
//! GPU are read, which bounds the series. NVML gives no utilisation per MIG device, so there is
//! no utilisation series for them.

use super::{flag, Metrics};
use crate::store::GpuDevice;

const USED: &str = "nodeward_gpu_mig_memory_used_bytes";
const USED_HELP: &str = "Memory in use on a MIG device of a GPU in MIG mode, in bytes, with the pod and container the kubelet assigned the MIG device to (empty when no one container holds it).";
const TOTAL: &str = "nodeward_gpu_mig_memory_total_bytes";
const TOTAL_HELP: &str = "Memory of a MIG device of a GPU in MIG mode, in bytes, with the pod and container the kubelet assigned the MIG device to (empty when no one container holds it).";

/// Writes a GPU's MIG mode and its MIG devices.
pub(super) fn encode(d: &GpuDevice, m: &mut Metrics) {
    let index = d.index.to_string();
    if let Some(on) = d.mig_enabled {
        m.gauge(
            "nodeward_gpu_mig_enabled",
            "1 when the GPU is in MIG mode (split into MIG devices, which the kubelet hands out in place of the GPU; NVML then gives no utilisation of the GPU); 0 when MIG mode is off. Absent on GPUs without MIG.",
            &[("gpu", &index), ("uuid", &d.uuid)],
            flag(on),
        );
    }
    for mig in &d.mig_devices {
        let (gi, ci) = (
            mig.gpu_instance_id
                .map(|i| i.to_string())
                .unwrap_or_default(),
            mig.compute_instance_id
                .map(|i| i.to_string())
                .unwrap_or_default(),
        );
        let holder = mig.assigned.as_ref();
        let labels = [
            ("gpu", index.as_str()),
            ("uuid", d.uuid.as_str()),
            ("mig_uuid", mig.uuid.as_str()),
            ("gpu_instance_id", gi.as_str()),
            ("compute_instance_id", ci.as_str()),
            ("container_id", holder.map_or("", |a| a.key.as_str())),
            ("container", holder.map_or("", |a| a.container.as_str())),
            ("pod", holder.map_or("", |a| a.pod.as_str())),
            ("namespace", holder.map_or("", |a| a.namespace.as_str())),
        ];
        #[expect(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
        for (name, help, value) in [
            (USED, USED_HELP, mig.memory_used_bytes),
            (TOTAL, TOTAL_HELP, mig.memory_total_bytes),
        ] {
            if let Some(v) = value {
                m.gauge(name, help, &labels, v as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{GpuAssignment, GpuMigDevice};

    fn render(d: &GpuDevice) -> Vec<String> {
        let mut m = Metrics::new();
        encode(d, &mut m);
        m.render()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn each_mig_device_is_a_series_with_its_holders_pod_and_unread_memory_is_left_out() {
        let gpu = GpuDevice {
            index: 1,
            uuid: "GPU-p".to_owned(),
            mig_enabled: Some(true),
            mig_devices: vec![
                GpuMigDevice {
                    index: 0,
                    uuid: "MIG-a".to_owned(),
                    gpu_instance_id: Some(7),
                    compute_instance_id: Some(0),
                    memory_used_bytes: Some(512),
                    memory_total_bytes: Some(4096),
                    assigned: Some(GpuAssignment {
                        key: "pod-resources:media/t-0/ffmpeg".to_owned(),
                        namespace: "media".to_owned(),
                        pod: "t-0".to_owned(),
                        container: "ffmpeg".to_owned(),
                    }),
                    ..GpuMigDevice::default()
                },
                GpuMigDevice {
                    index: 1,
                    uuid: "MIG-b".to_owned(),
                    memory_total_bytes: Some(4096),
                    ..GpuMigDevice::default()
                },
            ],
            ..GpuDevice::default()
        };
        let lines = render(&gpu);
        let held = r#"{gpu="1",uuid="GPU-p",mig_uuid="MIG-a",gpu_instance_id="7",compute_instance_id="0",container_id="pod-resources:media/t-0/ffmpeg",container="ffmpeg",pod="t-0",namespace="media"}"#;
        let free = r#"{gpu="1",uuid="GPU-p",mig_uuid="MIG-b",gpu_instance_id="",compute_instance_id="",container_id="",container="",pod="",namespace=""}"#;
        assert_eq!(
            lines,
            [
                r#"nodeward_gpu_mig_enabled{gpu="1",uuid="GPU-p"} 1"#.to_owned(),
                format!("nodeward_gpu_mig_memory_total_bytes{held} 4096"),
                format!("nodeward_gpu_mig_memory_total_bytes{free} 4096"),
                format!("nodeward_gpu_mig_memory_used_bytes{held} 512"),
            ]
        );
    }

    #[test]
    fn a_gpu_without_mig_has_no_mig_series_and_mig_off_says_so() {
        assert!(render(&GpuDevice::default()).is_empty());
        let off = GpuDevice {
            mig_enabled: Some(false),
            uuid: "GPU-q".to_owned(),
            ..GpuDevice::default()
        };
        assert_eq!(
            render(&off),
            [r#"nodeward_gpu_mig_enabled{gpu="0",uuid="GPU-q"} 0"#]
        );
    }
}
