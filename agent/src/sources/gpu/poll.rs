//! One poll of every GPU: NVML calls on a blocking thread (they can take milliseconds on a
//! busy driver), each reading kept as value, not supported or error, and a GPU that fell off
//! the bus reported as lost with the identity it had when last seen.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use nvml_wrapper::{
    enum_wrappers::{
        device::{Clock, EccCounter, MemoryError, RetirementCause, TemperatureSensor},
        nv_link::ErrorCounter,
    },
    enums::device::UsedGpuMemory,
    error::{nvml_sym, nvml_try, NvmlError},
    Device, Nvml,
};

use super::{
    mig,
    model::{
        Clocks, DeviceStats, Ecc, EncoderStats, GpuProcess, Media, NvLinkErrors, ProcessKind,
        ProcessSample, RetiredPages, RowRemapping, ThrottleReasons,
    },
    procs,
    reading::{error_kind, is_lost, is_not_supported, Reading},
};

/// NVLink links a device can have (`NVML_NVLINK_MAX_LINKS`).
const NVLINK_MAX_LINKS: u32 = 18;

/// NVML's clock event ("throttle") reason bits and the names nodeward reports them by.
const THROTTLE_REASONS: &[(u64, &str)] = &[
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

pub fn throttle_names(mask: u64) -> Vec<&'static str> {
    THROTTLE_REASONS
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, name)| *name)
        .collect()
}

/// Reads every device; owns what must survive between polls.
#[derive(Debug)]
pub struct Poller {
    nvml: Arc<Nvml>,
    proc_root: PathBuf,
    /// Identity per device index, to name a GPU that can no longer answer.
    last_identity: BTreeMap<u32, (String, String)>,
    /// Newest per-process utilisation sample seen, per device, so each poll asks only for
    /// samples taken since.
    last_sample_at: BTreeMap<u32, u64>,
    /// Failed NVML calls per device index and error kind, since the source started.
    errors_total: BTreeMap<u32, BTreeMap<&'static str, u64>>,
    /// Failed `nvmlDeviceGetCount` calls (the whole library failing), by error kind.
    count_errors_total: BTreeMap<&'static str, u64>,
}

/// What a poller remembers that must outlive a re-initialisation of NVML: the identities that
/// name a lost GPU, and the error counters (which must not reset).
#[derive(Debug, Default)]
pub struct Kept {
    last_identity: BTreeMap<u32, (String, String)>,
    errors_total: BTreeMap<u32, BTreeMap<&'static str, u64>>,
    count_errors_total: BTreeMap<&'static str, u64>,
}

/// Tracks whether any call on a device said the GPU is lost, and counts the failed calls.
pub(super) struct Calls {
    lost: bool,
    errors: BTreeMap<&'static str, u64>,
}

impl Calls {
    fn new() -> Self {
        Self {
            lost: false,
            errors: BTreeMap::new(),
        }
    }

    pub(super) fn get<T>(&mut self, result: Result<T, NvmlError>) -> Reading<T> {
        if let Err(e) = &result {
            self.failed(e);
        }
        Reading::from_nvml(result)
    }

    /// Notes a failed call; "not supported" is an answer, not a failure.
    pub(super) fn failed(&mut self, e: &NvmlError) {
        self.lost |= is_lost(e);
        if let Some(kind) = error_kind(e) {
            *self.errors.entry(kind).or_default() += 1;
        }
    }
}

impl Poller {
    pub fn new(nvml: Arc<Nvml>, proc_root: PathBuf) -> Self {
        Self {
            nvml,
            proc_root,
            last_identity: BTreeMap::new(),
            last_sample_at: BTreeMap::new(),
            errors_total: BTreeMap::new(),
            count_errors_total: BTreeMap::new(),
        }
    }

    /// Hands over what must survive a re-initialisation (see [`Poller::restore`]).
    pub fn keep(&mut self) -> Kept {
        Kept {
            last_identity: std::mem::take(&mut self.last_identity),
            errors_total: std::mem::take(&mut self.errors_total),
            count_errors_total: std::mem::take(&mut self.count_errors_total),
        }
    }

    /// Takes back what a previous poller kept.
    pub fn restore(&mut self, kept: Kept) {
        self.last_identity = kept.last_identity;
        self.errors_total = kept.errors_total;
        self.count_errors_total = kept.count_errors_total;
    }

    /// Failed `nvmlDeviceGetCount` calls so far, by error kind.
    pub fn count_errors_total(&self) -> BTreeMap<String, u64> {
        self.count_errors_total
            .iter()
            .map(|(k, n)| ((*k).to_owned(), *n))
            .collect()
    }

    /// Adds one device's failed calls of this poll to its totals and returns the totals.
    fn count_errors(&mut self, index: u32, calls: &Calls) -> BTreeMap<String, u64> {
        let totals = self.errors_total.entry(index).or_default();
        for (kind, n) in &calls.errors {
            *totals.entry(kind).or_default() += n;
        }
        totals.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect()
    }

    pub fn nvml(&self) -> &Arc<Nvml> {
        &self.nvml
    }

    /// Reads all devices. Fails only when NVML cannot even count them (counted by kind).
    pub fn poll(&mut self) -> Result<Vec<DeviceStats>, NvmlError> {
        let count = match self.nvml.device_count() {
            Ok(n) => n,
            Err(e) => {
                let kind = error_kind(&e).unwrap_or("not_supported");
                *self.count_errors_total.entry(kind).or_default() += 1;
                return Err(e);
            }
        };
        Ok((0..count).map(|i| self.read_device(i)).collect())
    }

    fn read_device(&mut self, index: u32) -> DeviceStats {
        let nvml = Arc::clone(&self.nvml);
        let mut calls = Calls::new();
        let device = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                calls.failed(&e);
                return self.unreadable(index, &e, &calls);
            }
        };
        let uuid = calls.get(device.uuid());
        if calls.lost {
            if let Reading::Error(_) = uuid {
                return self.unreadable(index, &NvmlError::GpuLost, &calls);
            }
        }
        let name = calls.get(device.name());
        let pci_bus_id = calls.get(device.pci_info().map(|p| p.bus_id));
        let utilization = calls.get(device.utilization_rates());
        let memory = calls.get(device.memory_info());
        let mut stats = DeviceStats {
            index,
            lost: false,
            name,
            uuid,
            pci_bus_id,
            utilization_gpu_percent: utilization.clone().map(|u| u.gpu),
            utilization_memory_percent: utilization.map(|u| u.memory),
            memory_used_bytes: memory.clone().map(|m| m.used),
            memory_total_bytes: memory.map(|m| m.total),
            temperature_celsius: calls.get(device.temperature(TemperatureSensor::Gpu)),
            power_draw_milliwatts: calls.get(device.power_usage()),
            power_limit_milliwatts: calls.get(device.enforced_power_limit()),
            clocks_mhz: Clocks {
                graphics: calls.get(device.clock_info(Clock::Graphics)),
                sm: calls.get(device.clock_info(Clock::SM)),
                memory: calls.get(device.clock_info(Clock::Memory)),
                video: calls.get(device.clock_info(Clock::Video)),
            },
            throttle_reasons: calls.get(device.current_throttle_reasons()).map(|r| {
                let mask = r.bits();
                ThrottleReasons {
                    mask,
                    names: throttle_names(mask),
                }
            }),
            ecc: Ecc {
                enabled: calls
                    .get(device.is_ecc_enabled())
                    .map(|m| m.currently_enabled),
                corrected_volatile: calls
                    .get(device.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)),
                uncorrected_volatile: calls
                    .get(device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)),
                corrected_aggregate: calls
                    .get(device.total_ecc_errors(MemoryError::Corrected, EccCounter::Aggregate)),
                uncorrected_aggregate: calls
                    .get(device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate)),
            },
            retired_pages: RetiredPages {
                single_bit: calls
                    .get(device.retired_pages(RetirementCause::MultipleSingleBitEccErrors))
                    .map(|p| u32::try_from(p.len()).unwrap_or(u32::MAX)),
                double_bit: calls
                    .get(device.retired_pages(RetirementCause::DoubleBitEccError))
                    .map(|p| u32::try_from(p.len()).unwrap_or(u32::MAX)),
                pending: calls.get(device.are_pages_pending_retired()),
            },
            row_remapping: calls.get(remapped_rows(&device)),
            pcie_replay_count: calls.get(device.pcie_replay_counter()),
            nvlink: nvlink_errors(&device, &mut calls),
            media: Media {
                encoder_utilization_percent: calls
                    .get(device.encoder_utilization())
                    .map(|u| u.utilization),
                decoder_utilization_percent: calls
                    .get(device.decoder_utilization())
                    .map(|u| u.utilization),
                encoder_sessions: calls.get(device.encoder_stats()).map(|s| EncoderStats {
                    session_count: s.session_count,
                    average_fps: s.average_fps,
                    average_latency_micros: s.average_latency,
                }),
            },
            processes: Reading::NotSupported,
            mig_mode: Reading::NotSupported,
            mig_devices: Vec::new(),
            nvml_errors_total: BTreeMap::new(),
        };
        stats.processes = self.processes(index, &device, &mut calls);
        (stats.mig_mode, stats.mig_devices) = mig::read(&device, &mut calls);
        stats.lost = calls.lost;
        stats.nvml_errors_total = self.count_errors(index, &calls);
        if let (Some(uuid), Some(name)) = (stats.uuid.value(), stats.name.value()) {
            self.last_identity
                .insert(index, (uuid.clone(), name.clone()));
        }
        stats
    }

    /// A device that cannot be read at all: lost, or its handle failed.
    fn unreadable(&mut self, index: u32, e: &NvmlError, calls: &Calls) -> DeviceStats {
        let nvml_errors_total = self.count_errors(index, calls);
        fn err<T>(message: &str) -> Reading<T> {
            Reading::Error(message.to_owned())
        }
        let msg = e.to_string();
        let (uuid, name) = match self.last_identity.get(&index) {
            Some((u, n)) => (Reading::Supported(u.clone()), Reading::Supported(n.clone())),
            None => (err(&msg), err(&msg)),
        };
        DeviceStats {
            index,
            lost: is_lost(e),
            name,
            uuid,
            pci_bus_id: err(&msg),
            utilization_gpu_percent: err(&msg),
            utilization_memory_percent: err(&msg),
            memory_used_bytes: err(&msg),
            memory_total_bytes: err(&msg),
            temperature_celsius: err(&msg),
            power_draw_milliwatts: err(&msg),
            power_limit_milliwatts: err(&msg),
            clocks_mhz: Clocks {
                graphics: err(&msg),
                sm: err(&msg),
                memory: err(&msg),
                video: err(&msg),
            },
            throttle_reasons: err(&msg),
            ecc: Ecc {
                enabled: err(&msg),
                corrected_volatile: err(&msg),
                uncorrected_volatile: err(&msg),
                corrected_aggregate: err(&msg),
                uncorrected_aggregate: err(&msg),
            },
            retired_pages: RetiredPages {
                single_bit: err(&msg),
                double_bit: err(&msg),
                pending: err(&msg),
            },
            row_remapping: err(&msg),
            pcie_replay_count: err(&msg),
            nvlink: err(&msg),
            media: Media {
                encoder_utilization_percent: err(&msg),
                decoder_utilization_percent: err(&msg),
                encoder_sessions: err(&msg),
            },
            processes: err(&msg),
            mig_mode: err(&msg),
            mig_devices: Vec::new(),
            nvml_errors_total,
        }
    }

    /// Compute and graphics processes, their latest utilisation samples, and their cgroups.
    fn processes(
        &mut self,
        index: u32,
        device: &Device<'_>,
        calls: &mut Calls,
    ) -> Reading<Vec<GpuProcess>> {
        let compute = calls.get(device.running_compute_processes());
        let graphics = calls.get(device.running_graphics_processes());
        let listed: Vec<_> = [
            (ProcessKind::Compute, &compute),
            (ProcessKind::Graphics, &graphics),
        ]
        .into_iter()
        .filter_map(|(kind, r)| r.value().map(|v| (kind, v)))
        .flat_map(|(kind, v)| v.iter().map(move |p| (kind, p)))
        .collect();
        if !compute.is_supported() && !graphics.is_supported() {
            return match (compute, graphics) {
                (Reading::Error(e), _) | (_, Reading::Error(e)) => Reading::Error(e),
                _ => Reading::NotSupported,
            };
        }

        if listed.is_empty() {
            return Reading::Supported(Vec::new());
        }
        let since = self.last_sample_at.get(&index).copied();
        let samples = match device.process_utilization_stats(since) {
            Ok(s) => s,
            // NOT_FOUND: no process ran since `since`; no samples is the answer.
            Err(NvmlError::NotFound) => Vec::new(),
            Err(e) => {
                if !is_not_supported(&e) {
                    tracing::debug!(device = index, error = %e, "per-process GPU utilisation unreadable");
                }
                calls.failed(&e);
                Vec::new()
            }
        };
        let mut latest: BTreeMap<u32, (u64, ProcessSample)> = BTreeMap::new();
        for s in samples {
            let sample = ProcessSample {
                sm_percent: s.sm_util,
                memory_percent: s.mem_util,
                encoder_percent: s.enc_util,
                decoder_percent: s.dec_util,
            };
            if latest.get(&s.pid).is_none_or(|(t, _)| s.timestamp >= *t) {
                latest.insert(s.pid, (s.timestamp, sample));
            }
        }
        if let Some(newest) = latest.values().map(|(t, _)| *t).max() {
            self.last_sample_at.insert(index, newest);
        }

        Reading::Supported(
            listed
                .into_iter()
                .map(|(kind, p)| {
                    let cgroup = procs::cgroup_of_pid(&self.proc_root, p.pid);
                    GpuProcess {
                        pid: p.pid,
                        kind,
                        used_memory_bytes: match p.used_gpu_memory {
                            UsedGpuMemory::Used(b) => Some(b),
                            UsedGpuMemory::Unavailable => None,
                        },
                        sample: latest.get(&p.pid).map(|(_, s)| s.clone()),
                        container_id: cgroup.as_deref().and_then(procs::container_for_cgroup),
                        cgroup,
                    }
                })
                .collect(),
        )
    }
}

/// Row remapping (Ampere and later); nvml-wrapper has no safe call for it.
fn remapped_rows(device: &Device<'_>) -> Result<RowRemapping, NvmlError> {
    let sym = nvml_sym(device.nvml().lib().nvmlDeviceGetRemappedRows.as_ref())?;
    let (mut corrected, mut uncorrected, mut pending, mut failed) = (0u32, 0u32, 0u32, 0u32);
    // SAFETY: the handle is valid while `device` (and so NVML) lives; the four pointers are
    // to live locals of the type the C function writes.
    let code = unsafe {
        sym(
            device.handle(),
            &mut corrected,
            &mut uncorrected,
            &mut pending,
            &mut failed,
        )
    };
    nvml_try(code)?;
    Ok(RowRemapping {
        corrected_rows: corrected,
        uncorrected_rows: uncorrected,
        pending: pending != 0,
        failed: failed != 0,
    })
}

/// Error counters of each active NVLink link. Link 0 answering "not supported" means the GPU
/// has no NVLink; a later link doing so (or "invalid argument") is past its last link.
fn nvlink_errors(device: &Device<'_>, calls: &mut Calls) -> Reading<Vec<NvLinkErrors>> {
    let mut links = Vec::new();
    for link in 0..NVLINK_MAX_LINKS {
        let wrapper = device.link_wrapper_for(link);
        match wrapper.is_active() {
            Ok(true) => links.push(NvLinkErrors {
                link,
                replay: calls.get(wrapper.error_counter(ErrorCounter::DlReplay)),
                recovery: calls.get(wrapper.error_counter(ErrorCounter::DlRecovery)),
                crc_flit: calls.get(wrapper.error_counter(ErrorCounter::DlCrcFlit)),
                crc_data: calls.get(wrapper.error_counter(ErrorCounter::DlCrcData)),
            }),
            Ok(false) => {}
            Err(e) if link == 0 => return calls.get(Err(e)),
            Err(NvmlError::InvalidArg) => break,
            Err(e) if is_not_supported(&e) => break,
            Err(e) => return calls.get(Err(e)),
        }
    }
    Reading::Supported(links)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_bits_are_named() {
        assert_eq!(
            throttle_names(0x4 | 0x40),
            vec!["sw_power_cap", "hw_thermal_slowdown"]
        );
        assert!(throttle_names(0).is_empty());
        // Bits NVML adds later are kept in the mask but get no name.
        assert!(throttle_names(0x8000_0000).is_empty());
    }
}
