//! MIG devices of a GPU in the store: the parts of a GPU that the kubelet hands to pods as
//! devices of their own, each with the container it is assigned to.

use super::types::GpuAssignment;

/// One MIG device (a compute instance of a GPU instance) of a GPU in MIG mode. NVML gives no
/// utilisation per MIG device; the `Option`s are `None` where NVML did not give the reading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuMigDevice {
    /// Its index on the parent GPU.
    pub index: u32,
    /// `MIG-…`; empty where NVML could not read it (such a device cannot be matched to a pod).
    pub uuid: String,
    /// NVML's name, e.g. "NVIDIA A100-SXM4-40GB MIG 1g.5gb"; empty where not read.
    pub name: String,
    pub gpu_instance_id: Option<u32>,
    pub compute_instance_id: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    /// The one container the kubelet assigned this MIG device to (pod-resources), where known.
    pub assigned: Option<GpuAssignment>,
}

impl GpuMigDevice {
    /// The id older NVIDIA device plugins gave a MIG device in place of its UUID,
    /// `MIG-<parent GPU UUID>/<GPU instance>/<compute instance>`; `None` without both ids.
    pub fn legacy_id(&self, parent_uuid: &str) -> Option<String> {
        Some(format!(
            "MIG-{parent_uuid}/{}/{}",
            self.gpu_instance_id?, self.compute_instance_id?
        ))
    }
}
