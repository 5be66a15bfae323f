//! NVIDIA GPUs through NVML: per-device readings (utilisation, memory, thermals, power, clocks
//! and their throttle reasons, ECC, retired pages and remapped rows, PCIe replays, NVLink
//! errors, the media engines), processes attributed to cgroups and containers, and health
//! input (XID errors and ECC events in a window that clears by itself, lost GPUs).
//!
//! `libnvidia-ml.so.1` is loaded at run time from `gpu.library`, so the agent runs on nodes
//! without a driver: the source then reports "GPU source unavailable: <reason>" and the other
//! sources keep working. NVML calls block, so polls run on tokio's blocking pool and events on
//! a thread of their own; a call a device does not support is recorded as such, never as 0.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use nvml_wrapper::{error::NvmlError, Nvml};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub mod check;
pub mod events;
pub mod mig;
pub mod model;
pub mod open;
pub mod poll;
pub mod procs;
pub mod reading;
mod recover;
pub mod xid;

pub use model::{GpuHealthInput, GpuSnapshot, SourceStatus};
pub use reading::Reading;
pub use xid::DRAIN_XIDS;

pub const NAME: &str = "gpu";

/// How long one `nvmlEventSetWait` may block: also the longest the event thread takes to
/// notice shutdown.
const EVENT_WAIT: Duration = Duration::from_millis(500);

/// The `[gpu]` config section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// Read GPUs through NVML. With `false` the source is not started.
    pub enabled: bool,
    /// The NVML library: a file name searched the usual way (`ld.so`), or a path.
    pub library: String,
    /// How often GPUs are polled; `0s` means every `agent.tick`.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// XIDs and ECC events count towards health for this long after they happen.
    #[serde(with = "humantime_serde")]
    pub xid_window: Duration,
    /// XID codes that mean "drain this node" (see [`DRAIN_XIDS`]).
    pub drain_xids: Vec<u64>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            library: "libnvidia-ml.so.1".to_owned(),
            poll_interval: Duration::ZERO,
            xid_window: Duration::from_secs(600),
            drain_xids: DRAIN_XIDS.to_vec(),
        }
    }
}

/// A `[gpu]` key whose value is out of range; the config loader adds where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}` = {value}: {allowed}")]
pub struct GpuConfigError {
    /// The full key, e.g. `gpu.poll_interval`.
    pub key: &'static str,
    pub value: String,
    pub allowed: &'static str,
}

/// Range checks of the `[gpu]` section.
pub fn validate(gpu: &GpuConfig) -> Result<(), GpuConfigError> {
    let invalid = |key: &'static str, value: String, allowed: &'static str| GpuConfigError {
        key,
        value,
        allowed,
    };
    let shown = |d: Duration| format!("\"{}\"", humantime::format_duration(d));
    let p = gpu.poll_interval;
    if !p.is_zero() && !(Duration::from_millis(100)..=Duration::from_secs(300)).contains(&p) {
        return Err(invalid(
            "gpu.poll_interval",
            shown(p),
            "must be 0s (every agent.tick) or between 100ms and 5m",
        ));
    }
    let w = gpu.xid_window;
    if !(Duration::from_secs(1)..=Duration::from_secs(7 * 24 * 3600)).contains(&w) {
        return Err(invalid(
            "gpu.xid_window",
            shown(w),
            "must be between 1s and 7days",
        ));
    }
    if gpu.library.trim().is_empty() {
        return Err(invalid(
            "gpu.library",
            "\"\"".to_owned(),
            "must name the NVML library, e.g. \"libnvidia-ml.so.1\"",
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("GPU source unavailable: {0}")]
    Unavailable(String),
    #[error("cannot start the GPU event thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot start the NVML initialisation thread: {0}")]
    InitThread(std::io::Error),
    #[error("GPU poll task failed: {0}")]
    Join(String),
}

/// Says, for an operator, why NVML could not be opened.
pub fn explain(library: &str, e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(inner) => format!(
            "cannot load the NVML library {library}: {inner} (is the NVIDIA driver installed? \
             set gpu.library to its path)"
        ),
        NvmlError::FailedToLoadSymbol(inner) => format!(
            "{library} lacks a function NVML must have ({inner}): not an NVML library, or one \
             too old"
        ),
        NvmlError::LibRmVersionMismatch => format!(
            "driver/library version mismatch: {library} does not match the loaded NVIDIA kernel \
             driver (reload the nvidia kernel module or reboot after a driver update)"
        ),
        NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded".to_owned(),
        NvmlError::NoPermission => {
            "no permission to talk to the NVIDIA driver (check access to /dev/nvidia*)".to_owned()
        }
        other => format!("NVML initialisation failed: {other}"),
    }
}

/// An opened NVML library and what the source keeps between polls.
#[derive(Debug)]
pub struct Gpu {
    poller: poll::Poller,
    events: Arc<events::EventState>,
    driver_version: Reading<String>,
    nvml_version: Reading<String>,
}

impl Gpu {
    /// Loads and initialises NVML; fails with the reason when there is no usable driver or GPU.
    pub fn open(config: &GpuConfig, proc_root: &Path) -> Result<Self, GpuError> {
        let nvml = Nvml::builder()
            .lib_path(OsStr::new(&config.library))
            .init()
            .map_err(|e| GpuError::Unavailable(explain(&config.library, &e)))?;
        match nvml.device_count() {
            Ok(0) => return Err(GpuError::Unavailable("no NVIDIA GPU found".to_owned())),
            Ok(_) => {}
            Err(e) => {
                return Err(GpuError::Unavailable(format!("cannot count the GPUs: {e}")));
            }
        }
        let driver_version = Reading::from_nvml(nvml.sys_driver_version());
        let nvml_version = Reading::from_nvml(nvml.sys_nvml_version());
        Ok(Self {
            poller: poll::Poller::new(Arc::new(nvml), proc_root.to_path_buf()),
            events: Arc::new(events::EventState {
                window: Mutex::new(xid::EventWindow::new(config.xid_window, &config.drain_xids)),
                watched: Mutex::new(None),
            }),
            driver_version,
            nvml_version,
        })
    }

    /// Starts the thread that reads XID and ECC events until `cancel` fires.
    pub fn watch_events(
        &self,
        cancel: CancellationToken,
    ) -> Result<std::thread::JoinHandle<()>, GpuError> {
        events::spawn(
            Arc::clone(self.poller.nvml()),
            Arc::clone(&self.events),
            cancel,
            EVENT_WAIT,
        )
        .map_err(GpuError::Thread)
    }

    /// What must outlive this NVML instance when it is shut down to be initialised again:
    /// error counters, GPU identities, the XID/ECC window.
    pub fn keep(&mut self) -> (poll::Kept, Arc<events::EventState>) {
        (self.poller.keep(), Arc::clone(&self.events))
    }

    /// Takes over what a previous instance kept (see [`Gpu::keep`]).
    pub fn restore(&mut self, (kept, events): (poll::Kept, Arc<events::EventState>)) {
        self.poller.restore(kept);
        self.events = events;
    }

    /// Reads every GPU once (blocking: call it from a blocking thread).
    pub fn poll(&mut self) -> GpuSnapshot {
        let started = Instant::now();
        let mut snapshot = GpuSnapshot::empty(SourceStatus::Running);
        snapshot.driver_version = self.driver_version.clone();
        snapshot.nvml_version = self.nvml_version.clone();
        match self.poller.poll() {
            Ok(devices) => snapshot.devices = devices,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count the GPUs");
                snapshot.poll_error = Some(e.to_string());
            }
        }
        snapshot.count_errors_total = self.poller.count_errors_total();
        snapshot.health = self.health_input(&snapshot.devices);
        snapshot.taken_at = SystemTime::now();
        snapshot.poll_micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        snapshot
    }

    fn health_input(&self, devices: &[model::DeviceStats]) -> GpuHealthInput {
        let mut counts = self
            .events
            .window
            .lock()
            .map(|mut w| w.counts(Instant::now()))
            .unwrap_or_default();
        let watched = self.events.watched.lock().ok().and_then(|w| w.clone());
        let devices = devices
            .iter()
            .map(|d| {
                let remap = d.row_remapping.value();
                let health = model::GpuHealthDevice {
                    uuid: d.uuid.value().cloned(),
                    lost: d.lost,
                    window: counts.remove(&d.index).unwrap_or_default(),
                    uncorrected_ecc_volatile: d.ecc.uncorrected_volatile.value().copied(),
                    retired_pages_pending: d.retired_pages.pending.value().copied(),
                    row_remap_pending: remap.map(|r| r.pending),
                    row_remap_failed: remap.map(|r| r.failed),
                };
                (d.index, health)
            })
            .collect();
        GpuHealthInput {
            events_watched: watched,
            devices,
        }
    }
}

/// The running source: polls on every interval and publishes each snapshot.
#[derive(Debug)]
pub struct Source {
    gpu: open::Opening,
    config: GpuConfig,
    proc_root: PathBuf,
    interval: Duration,
    tx: watch::Sender<GpuSnapshot>,
}

impl Source {
    /// Opens NVML, or says why the GPU source cannot run on this node. Waits for NVML at most
    /// [`open::OPEN_WAIT`]: past that the run waits for it (see [`open`]).
    pub fn start(config: &GpuConfig, shared: &crate::sources::Shared) -> Result<Self, GpuError> {
        let gpu = open::open(config, &shared.paths.proc_root, open::OPEN_WAIT)?;
        let interval = if config.poll_interval.is_zero() {
            shared.tick
        } else {
            config.poll_interval
        };
        let (tx, _) = watch::channel(GpuSnapshot::empty(SourceStatus::Running));
        Ok(Self {
            gpu,
            config: config.clone(),
            proc_root: shared.paths.proc_root.clone(),
            interval,
            tx,
        })
    }

    /// The latest snapshot, for the health engine, the API and the metrics.
    pub fn subscribe(&self) -> watch::Receiver<GpuSnapshot> {
        self.tx.subscribe()
    }

    /// Publishes into `tx` instead of the source's own channel, so that a restarted source
    /// feeds the readers of the one before it.
    pub fn publish_into(self, tx: watch::Sender<GpuSnapshot>) -> Self {
        Self { tx, ..self }
    }

    /// Polls until cancelled; the event thread stops with it. When NVML fails as a whole
    /// (it cannot count the GPUs), the source reports itself degraded, shuts NVML down and
    /// initialises it again with back-off until it answers; it never ends the agent for that
    /// (see [`recover`]).
    pub async fn run(self, cancel: CancellationToken) -> Result<(), String> {
        let Self {
            gpu,
            config,
            proc_root,
            interval,
            tx,
        } = self;
        let gpu = match open::finish(gpu, &cancel).await {
            Ok(Some(gpu)) => gpu,
            Ok(None) => return Ok(()),
            // NVML answered late, and said it cannot run here: the same as answering at once.
            Err(e @ GpuError::Unavailable(_)) => {
                tracing::warn!(reason = %e, "source unavailable");
                tx.send_replace(GpuSnapshot::empty(SourceStatus::Unavailable(e.to_string())));
                cancel.cancelled().await;
                return Ok(());
            }
            Err(e) => return Err(e.to_string()),
        };
        recover::poll_loop(gpu, &config, &proc_root, interval, &tx, &cancel).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_init_failure_gets_an_operator_reason() {
        let lib = "libnvidia-ml.so.1";
        assert!(explain(lib, &NvmlError::DriverNotLoaded).contains("kernel driver is not loaded"));
        assert!(explain(lib, &NvmlError::NoPermission).contains("/dev/nvidia"));
        assert!(explain(lib, &NvmlError::LibRmVersionMismatch)
            .starts_with("driver/library version mismatch"));
        assert!(explain(lib, &NvmlError::Unknown).starts_with("NVML initialisation failed"));
    }

    #[test]
    fn defaults_are_valid_and_bad_intervals_are_rejected_with_the_key() {
        let ok = GpuConfig::default();
        assert!(validate(&ok).is_ok());
        let fast = GpuConfig {
            poll_interval: Duration::from_millis(5),
            ..GpuConfig::default()
        };
        let err = validate(&fast).expect_err("5ms is too fast");
        assert!(err.to_string().contains("gpu.poll_interval"), "{err}");
        let never = GpuConfig {
            xid_window: Duration::ZERO,
            ..GpuConfig::default()
        };
        let err = validate(&never).expect_err("a zero window counts nothing");
        assert!(err.to_string().contains("gpu.xid_window"), "{err}");
    }
}
