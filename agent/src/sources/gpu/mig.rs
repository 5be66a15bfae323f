//! MIG (Multi-Instance GPU): a GPU in MIG mode is split into GPU instances, each with compute
//! instances; NVML presents each compute instance as a MIG device with a handle and a `MIG-…`
//! UUID of its own. The kubelet's device plugin hands these UUIDs to pods
//! (`nvidia.com/mig-<profile>`), so they are what device assignment matches (see
//! `bridge::gpu_pods`). NVML gives no utilisation of a MIG device, and none of the parent
//! while MIG mode is on (device and per-process utilisation both answer "not supported"):
//! memory is what is read of each MIG device's use.

use nvml_wrapper::{
    error::{nvml_sym, nvml_try, NvmlError},
    Device,
};

use super::{model::MigDeviceStats, poll::Calls, reading::Reading};

/// At most this many MIG devices are read per GPU, whatever the driver says its maximum is
/// (7 on the GPUs that have MIG today): it bounds the per-MIG-device series on `/metrics`.
pub const MAX_MIG_DEVICES: u32 = 16;

/// `NVML_DEVICE_MIG_ENABLE`: the value of `MigMode::current` with MIG mode on.
const MIG_ENABLED: u32 = 1;

/// The GPU's MIG mode and, when it is on, its MIG devices. Failed calls count on the parent
/// GPU; an index without an instance (`NVML_ERROR_NOT_FOUND`) is no failure, MIG devices need
/// not be numbered without gaps.
pub(super) fn read(device: &Device<'_>, calls: &mut Calls) -> (Reading<bool>, Vec<MigDeviceStats>) {
    let mode = calls.get(device.mig_mode().map(|m| m.current == MIG_ENABLED));
    if mode.value() != Some(&true) {
        return (mode, Vec::new());
    }
    let Some(max) = calls.get(device.mig_device_count()).value().copied() else {
        return (mode, Vec::new());
    };
    let mut out = Vec::new();
    for index in 0..max.min(MAX_MIG_DEVICES) {
        let mig = match device.mig_device_by_index(index) {
            Ok(m) => m,
            Err(NvmlError::NotFound) => continue,
            Err(e) => {
                calls.failed(&e);
                continue;
            }
        };
        let memory = calls.get(mig.memory_info());
        out.push(MigDeviceStats {
            index,
            uuid: calls.get(mig.uuid()),
            name: calls.get(mig.name()),
            gpu_instance_id: calls.get(instance_id(&mig, Instance::Gpu)),
            compute_instance_id: calls.get(instance_id(&mig, Instance::Compute)),
            memory_used_bytes: memory.clone().map(|m| m.used),
            memory_total_bytes: memory.map(|m| m.total),
        });
    }
    (mode, out)
}

#[derive(Debug, Clone, Copy)]
enum Instance {
    Gpu,
    Compute,
}

/// The GPU or compute instance id of a MIG device; nvml-wrapper has no safe call for them.
fn instance_id(mig: &Device<'_>, which: Instance) -> Result<u32, NvmlError> {
    let lib = mig.nvml().lib();
    let sym = match which {
        Instance::Gpu => nvml_sym(lib.nvmlDeviceGetGpuInstanceId.as_ref())?,
        Instance::Compute => nvml_sym(lib.nvmlDeviceGetComputeInstanceId.as_ref())?,
    };
    let mut id = 0u32;
    // SAFETY: the handle is valid while `mig` (and so NVML) lives; the pointer is to a live
    // local of the type the C function writes.
    nvml_try(unsafe { sym(mig.handle(), &mut id) })?;
    Ok(id)
}
