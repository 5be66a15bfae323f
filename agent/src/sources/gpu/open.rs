//! Opening NVML without letting it hold the agent up. `nvmlInit` can block for ever (a driver
//! stuck in the kernel, a wedged GPU), and the GPU source's first start runs while the daemon
//! starts: a hung call there would keep the API and `/metrics` from ever answering. So NVML is
//! opened on a thread of its own; start-up waits for it at most [`OPEN_WAIT`] and then goes on,
//! leaving the source's run to wait for the rest. Meanwhile the source has not reported, and the
//! health engine's first-report bound (`health.source_first_report_timeout`) shows it
//! unavailable with that reason instead of holding the verdict at `Unknown`.
//!
//! A thread blocked in `nvmlInit` cannot be stopped from outside; it is left behind (one per
//! start that timed out) and its result, should it ever come, is used by the run waiting for it.

use std::{path::Path, time::Duration};

use tokio::sync::oneshot;

use super::{Gpu, GpuConfig, GpuError};

/// How long start-up waits for NVML. A missing library or an unloaded driver answers at once
/// (the source is then unavailable with the reason, before the agent reports ready); NVML
/// taking longer than this is waited for by the source's run.
pub const OPEN_WAIT: Duration = Duration::from_secs(2);

/// NVML, opened or still being opened.
#[derive(Debug)]
pub enum Opening {
    Open(Gpu),
    /// `nvmlInit` had not returned within [`OPEN_WAIT`]; the thread sends its result here.
    Waiting(oneshot::Receiver<Result<Gpu, GpuError>>),
}

/// Opens NVML on a thread of its own, waiting at most `wait` for it. Fails when NVML answered
/// within `wait` with an error (the reason the source cannot run here).
pub fn open(config: &GpuConfig, proc_root: &Path, wait: Duration) -> Result<Opening, GpuError> {
    let (tx, mut rx) = oneshot::channel();
    // A second channel only to wait with a timeout: the oneshot can be awaited by the run but
    // not waited on with a timeout outside the runtime.
    let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let (config, root) = (config.clone(), proc_root.to_path_buf());
    std::thread::Builder::new()
        .name("nvml-init".to_owned())
        .spawn(move || {
            let _ = tx.send(Gpu::open(&config, &root));
            let _ = done_tx.send(());
        })
        .map_err(GpuError::InitThread)?;
    // Timed out or done: either way the oneshot says which.
    let _ = done_rx.recv_timeout(wait);
    match rx.try_recv() {
        Ok(opened) => opened.map(Opening::Open),
        Err(oneshot::error::TryRecvError::Empty) => {
            tracing::warn!(
                waited = ?wait,
                "NVML has not initialised yet (nvmlInit has not returned); the agent starts \
                 without it and the GPU source waits for it"
            );
            Ok(Opening::Waiting(rx))
        }
        Err(oneshot::error::TryRecvError::Closed) => Err(GpuError::Join(
            "the NVML initialisation thread panicked".to_owned(),
        )),
    }
}

/// Waits for NVML to finish opening, or for `cancel`. `Ok(None)`: cancelled first.
pub async fn finish(
    opening: Opening,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Option<Gpu>, GpuError> {
    let rx = match opening {
        Opening::Open(gpu) => return Ok(Some(gpu)),
        Opening::Waiting(rx) => rx,
    };
    tokio::select! {
        () = cancel.cancelled() => Ok(None),
        opened = rx => match opened {
            Ok(opened) => {
                if opened.is_ok() {
                    tracing::info!("NVML initialised late; the GPU source starts polling");
                }
                opened.map(Some)
            }
            Err(_) => Err(GpuError::Join(
                "the NVML initialisation thread panicked".to_owned(),
            )),
        },
    }
}
