//! Logging through `tracing`, plain or JSON, with the `log` records of aya (and any other
//! library that uses the `log` crate) bridged in.

use std::sync::OnceLock;

use tracing_subscriber::{
    fmt, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _, EnvFilter, Registry,
};

use crate::config::{LogConfig, LogFormat};

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid log filter {filter:?}: {message}")]
    Filter { filter: String, message: String },
    #[error("a logger is already installed: {0}")]
    Init(String),
    #[error("the log filter cannot be changed: {0}")]
    Reload(String),
}

/// The handle that swaps the filter of the installed subscriber (SIGHUP's `log.filter`).
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Replaces the log filter of the subscriber `init` installed.
pub fn set_filter(filter: &str) -> Result<(), LoggingError> {
    let new = EnvFilter::try_new(filter).map_err(|e| LoggingError::Filter {
        filter: filter.to_owned(),
        message: e.to_string(),
    })?;
    FILTER
        .get()
        .ok_or_else(|| LoggingError::Reload("no subscriber installed by nodeward".to_owned()))?
        .reload(new)
        .map_err(|e| LoggingError::Reload(e.to_string()))
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(config: &LogConfig) -> Result<(), LoggingError> {
    let filter = EnvFilter::try_new(&config.filter).map_err(|e| LoggingError::Filter {
        filter: config.filter.clone(),
        message: e.to_string(),
    })?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    // `try_init` also installs the `log` → `tracing` bridge (tracing-log feature), which is
    // how aya's own log records reach this output.
    let result = match config.format {
        LogFormat::Plain => registry
            .with(fmt::layer().with_writer(std::io::stderr).with_target(true))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    result.map_err(|e| LoggingError::Init(e.to_string()))?;
    // Only the first successful `init` gets here (a second one fails above).
    let _ = FILTER.set(handle);
    Ok(())
}
