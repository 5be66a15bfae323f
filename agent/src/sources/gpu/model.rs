//! What the GPU source hands on: per-device readings, processes attributed to containers, and
//! the health input (XID windows, lost GPUs, memory-health flags) that the health engine reads.
//! Units are in the field names; every reading keeps `NotSupported` apart from a value.

use std::{collections::BTreeMap, time::SystemTime};

use serde::Serialize;

use super::{reading::Reading, xid::WindowCounts};

/// Whether the source runs, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceStatus {
    /// Not started yet, or switched off by `gpu.enabled = false`.
    Disabled,
    /// NVML could not be loaded or initialised; the reason is shown to the operator.
    Unavailable(String),
    Running,
    /// NVML ran, then failed as a whole (it cannot count the GPUs): the source has shut it
    /// down and re-initialises it with back-off; the reason says what failed and when the
    /// next attempt is.
    Degraded(String),
}

/// Everything the source read in one poll.
#[derive(Debug, Clone, Serialize)]
pub struct GpuSnapshot {
    pub status: SourceStatus,
    pub driver_version: Reading<String>,
    pub nvml_version: Reading<String>,
    pub devices: Vec<DeviceStats>,
    /// Set when NVML could not even count the GPUs in this poll: `devices` and `health` are
    /// then empty because nothing could be read, not because all is well.
    pub poll_error: Option<String>,
    /// Failed `nvmlDeviceGetCount` calls since the source started, by error kind.
    pub count_errors_total: BTreeMap<String, u64>,
    /// Times the source shut NVML down and initialised it again after it failed as a whole,
    /// successful or not.
    pub reinit_attempts_total: u64,
    pub health: GpuHealthInput,
    /// When the poll finished.
    #[serde(with = "unix_seconds")]
    pub taken_at: SystemTime,
    /// How long the poll took, in microseconds.
    pub poll_micros: u64,
}

impl GpuSnapshot {
    pub fn empty(status: SourceStatus) -> Self {
        Self {
            status,
            driver_version: Reading::NotSupported,
            nvml_version: Reading::NotSupported,
            devices: Vec::new(),
            poll_error: None,
            count_errors_total: BTreeMap::new(),
            reinit_attempts_total: 0,
            health: GpuHealthInput::default(),
            taken_at: SystemTime::now(),
            poll_micros: 0,
        }
    }
}

/// One GPU.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStats {
    /// NVML's index (the order of `nvidia-smi`).
    pub index: u32,
    /// The GPU fell off the bus or needs a reset (`NVML_ERROR_GPU_IS_LOST`); the readings below
    /// are then errors, and `uuid`/`name` are the last ones seen.
    pub lost: bool,
    pub name: Reading<String>,
    pub uuid: Reading<String>,
    pub pci_bus_id: Reading<String>,
    /// Percent of time over the last sample period that a kernel ran on the SMs.
    pub utilization_gpu_percent: Reading<u32>,
    /// Percent of time that device memory was read or written.
    pub utilization_memory_percent: Reading<u32>,
    pub memory_used_bytes: Reading<u64>,
    pub memory_total_bytes: Reading<u64>,
    pub temperature_celsius: Reading<u32>,
    pub power_draw_milliwatts: Reading<u32>,
    pub power_limit_milliwatts: Reading<u32>,
    pub clocks_mhz: Clocks,
    /// Why the clocks are held down now ("clock event reasons"), as NVML's bit mask and names.
    pub throttle_reasons: Reading<ThrottleReasons>,
    pub ecc: Ecc,
    pub retired_pages: RetiredPages,
    pub row_remapping: Reading<RowRemapping>,
    pub pcie_replay_count: Reading<u32>,
    /// Error counters of the active NVLink links; `NotSupported` on GPUs without NVLink.
    pub nvlink: Reading<Vec<NvLinkErrors>>,
    pub media: Media,
    /// Compute and graphics processes with what they use, mapped to their cgroup.
    pub processes: Reading<Vec<GpuProcess>>,
    /// Whether MIG mode is on now; `NotSupported` on GPUs without MIG.
    pub mig_mode: Reading<bool>,
    /// The MIG devices of a GPU in MIG mode (empty when it is off), by their index on it.
    pub mig_devices: Vec<MigDeviceStats>,
    /// Failed NVML calls on this GPU since the source started, by error kind (`unknown`,
    /// `timeout`, `gpu_lost`, … see `reading::error_kind`); "not supported" is not counted.
    pub nvml_errors_total: BTreeMap<String, u64>,
}

/// One MIG device: a compute instance of a GPU instance, which the kubelet hands to a pod as a
/// device of its own (`nvidia.com/mig-<profile>`), named by its `MIG-…` UUID. NVML gives no
/// utilisation per MIG device: its memory is what it reports of its use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigDeviceStats {
    /// Its index on the parent GPU (`nvmlDeviceGetMigDeviceHandleByIndex`).
    pub index: u32,
    pub uuid: Reading<String>,
    pub name: Reading<String>,
    pub gpu_instance_id: Reading<u32>,
    pub compute_instance_id: Reading<u32>,
    pub memory_used_bytes: Reading<u64>,
    pub memory_total_bytes: Reading<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Clocks {
    pub graphics: Reading<u32>,
    pub sm: Reading<u32>,
    pub memory: Reading<u32>,
    pub video: Reading<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ThrottleReasons {
    pub mask: u64,
    pub names: Vec<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ecc {
    /// ECC is switched on now.
    pub enabled: Reading<bool>,
    /// Since the driver loaded.
    pub corrected_volatile: Reading<u64>,
    pub uncorrected_volatile: Reading<u64>,
    /// Over the GPU's lifetime (kept in the infoROM).
    pub corrected_aggregate: Reading<u64>,
    pub uncorrected_aggregate: Reading<u64>,
}

/// Page retirement (GPUs before Ampere; Ampere and later remap rows instead).
#[derive(Debug, Clone, Serialize)]
pub struct RetiredPages {
    /// Pages retired after multiple single-bit errors.
    pub single_bit: Reading<u32>,
    pub double_bit: Reading<u32>,
    /// A retirement waits for the next driver reload or GPU reset.
    pub pending: Reading<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RowRemapping {
    pub corrected_rows: u32,
    pub uncorrected_rows: u32,
    /// A remap waits for a GPU reset.
    pub pending: bool,
    /// A remap failed: the GPU should be replaced.
    pub failed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NvLinkErrors {
    pub link: u32,
    pub replay: Reading<u64>,
    pub recovery: Reading<u64>,
    pub crc_flit: Reading<u64>,
    pub crc_data: Reading<u64>,
}

/// The encoder and decoder engines that live-stream transcoders use.
#[derive(Debug, Clone, Serialize)]
pub struct Media {
    pub encoder_utilization_percent: Reading<u32>,
    pub decoder_utilization_percent: Reading<u32>,
    pub encoder_sessions: Reading<EncoderStats>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EncoderStats {
    pub session_count: u32,
    pub average_fps: u32,
    pub average_latency_micros: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessKind {
    Compute,
    Graphics,
}

/// A process on a GPU, with the cgroup (and so the container) it runs in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuProcess {
    pub pid: u32,
    pub kind: ProcessKind,
    /// `None` where the driver cannot tell (e.g. under WDDM).
    pub used_memory_bytes: Option<u64>,
    /// The latest utilisation sample since the previous poll; `None` when the process did not
    /// run in that time or the GPU offers no per-process samples.
    pub sample: Option<ProcessSample>,
    /// The process's cgroup v2 path (or v1 path of its memory/cpu controller), relative to the
    /// cgroup root; `None` when the process is gone or its cgroup is unreadable.
    pub cgroup: Option<String>,
    /// The container id found in that path, where it has one.
    pub container_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessSample {
    pub sm_percent: u32,
    pub memory_percent: u32,
    pub encoder_percent: u32,
    pub decoder_percent: u32,
}

/// What the health engine reads about GPUs. Sources never decide: the flags here are facts
/// (a drain-class XID was seen, a remap failed); the verdict is the health engine's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GpuHealthInput {
    /// Whether XID/ECC events are being watched; `Error` says why not.
    pub events_watched: Option<Reading<()>>,
    /// Device index → health facts, for every device seen.
    pub devices: BTreeMap<u32, GpuHealthDevice>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GpuHealthDevice {
    pub uuid: Option<String>,
    pub lost: bool,
    /// XIDs and ECC events within `gpu.xid_window`.
    pub window: WindowCounts,
    pub uncorrected_ecc_volatile: Option<u64>,
    pub retired_pages_pending: Option<bool>,
    pub row_remap_pending: Option<bool>,
    pub row_remap_failed: Option<bool>,
}

mod unix_seconds {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let secs = t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        s.serialize_f64(secs)
    }
}
