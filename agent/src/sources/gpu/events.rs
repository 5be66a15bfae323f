//! Critical XID errors and ECC events from an NVML event set. `nvmlEventSetWait` blocks, so it
//! runs on a thread of its own with a short timeout, and checks the cancellation token between
//! waits: the tokio runtime never blocks on it, and shutdown waits at most one timeout.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nvml_wrapper::{
    bitmasks::event::EventTypes,
    enums::event::XidError,
    error::{nvml_sym, nvml_try, NvmlError},
    Nvml,
};
use tokio_util::sync::CancellationToken;

use super::{
    reading::{is_lost, Reading},
    xid::{EventWindow, GpuEvent},
};

/// The events watched: what a node must be drained for.
fn wanted() -> EventTypes {
    EventTypes::CRITICAL_XID_ERROR
        | EventTypes::SINGLE_BIT_ECC_ERROR
        | EventTypes::DOUBLE_BIT_ECC_ERROR
}

/// Shared between the event thread and the poller.
#[derive(Debug)]
pub struct EventState {
    pub window: Mutex<EventWindow>,
    /// Whether events are being watched, once the thread has tried.
    pub watched: Mutex<Option<Reading<()>>>,
}

/// Starts the event thread. It ends when `cancel` fires, or at once when the driver cannot
/// deliver events (the reason is left in `state.watched`).
pub fn spawn(
    nvml: Arc<Nvml>,
    state: Arc<EventState>,
    cancel: CancellationToken,
    wait: Duration,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("nodeward-gpu-events".to_owned())
        .spawn(move || watch(&nvml, &state, &cancel, wait))
}

fn set_watched(state: &EventState, r: Reading<()>) {
    if let Ok(mut w) = state.watched.lock() {
        *w = Some(r);
    }
}

fn watch(nvml: &Nvml, state: &EventState, cancel: &CancellationToken, wait: Duration) {
    let set = match nvml.create_event_set() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "GPU events unavailable: cannot create an NVML event set");
            set_watched(state, Reading::from_nvml(Err(e)));
            return;
        }
    };
    let devices = match register_all(nvml, &set) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "GPU events unavailable");
            set_watched(state, Reading::from_nvml(Err(e)));
            return;
        }
    };
    tracing::debug!(devices = devices.len(), "watching GPU XID and ECC events");
    set_watched(state, Reading::Supported(()));

    let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
    let mut last_error: Option<String> = None;
    while !cancel.is_cancelled() {
        match set.wait(wait_ms) {
            Ok(data) => {
                // SAFETY: the handle is only compared with the ones registered above.
                let handle = unsafe { data.device.handle() } as usize;
                // Handles are stable pointers in the drivers seen so far; should one differ,
                // the device's index still names it.
                let Some(index) = devices
                    .get(&handle)
                    .copied()
                    .or_else(|| data.device.index().ok())
                else {
                    continue;
                };
                let now = Instant::now();
                let record = |event| {
                    if let Ok(mut w) = state.window.lock() {
                        w.record(index, event, now);
                    }
                };
                if data.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                    let xid = match data.event_data {
                        Some(XidError::Value(x)) => x,
                        Some(XidError::Unknown) | None => 999,
                    };
                    tracing::warn!(device = index, xid, "GPU XID error");
                    record(GpuEvent::Xid(xid));
                }
                if data.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
                    tracing::warn!(device = index, "GPU double-bit ECC error");
                    record(GpuEvent::DoubleBitEcc);
                }
                if data.event_type.contains(EventTypes::SINGLE_BIT_ECC_ERROR) {
                    record(GpuEvent::SingleBitEcc);
                }
                last_error = None;
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                // A lost GPU makes every wait fail at once; the poller reports which GPU.
                let message = e.to_string();
                if last_error.as_deref() != Some(message.as_str()) {
                    if is_lost(&e) {
                        tracing::warn!("GPU event wait: a GPU has fallen off the bus");
                    } else {
                        tracing::warn!(error = %e, "GPU event wait failed");
                    }
                    last_error = Some(message);
                }
                std::thread::sleep(wait);
            }
        }
    }
    tracing::debug!("GPU event thread stopped");
}

/// Registers every device for the wanted events it supports. Returns handle → device index.
/// A device that supports none is skipped; failing on every device is an error.
fn register_all(
    nvml: &Nvml,
    set: &nvml_wrapper::EventSet<'_>,
) -> Result<BTreeMap<usize, u32>, NvmlError> {
    let register = nvml_sym(nvml.lib().nvmlDeviceRegisterEvents.as_ref())?;
    let mut devices = BTreeMap::new();
    let mut last_err = NvmlError::NotSupported;
    for index in 0..nvml.device_count()? {
        let device = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                last_err = e;
                continue;
            }
        };
        let types = match device.supported_event_types() {
            Ok(t) => t & wanted(),
            // Older drivers cannot say; try the whole set.
            Err(NvmlError::NotSupported) | Err(NvmlError::FailedToLoadSymbol(_)) => wanted(),
            Err(e) => {
                last_err = e;
                continue;
            }
        };
        if types.is_empty() {
            continue;
        }
        // nvml-wrapper's `register_events` frees the whole set when one device refuses, which
        // would drop the devices already registered; the raw call leaves the set alone.
        // SAFETY: both handles are valid while `nvml` and `set` live.
        let code = unsafe { register(device.handle(), types.bits(), set.handle()) };
        match nvml_try(code) {
            Ok(()) => {
                // SAFETY: the handle is only kept as a key to compare with event data.
                devices.insert(unsafe { device.handle() } as usize, index);
            }
            Err(e) => {
                tracing::debug!(device = index, error = %e, "cannot register GPU events");
                last_err = e;
            }
        }
    }
    if devices.is_empty() {
        Err(last_err)
    } else {
        Ok(devices)
    }
}
