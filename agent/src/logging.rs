//! Logging through `tracing`, plain or JSON, with the `log` records of aya (and any other
//! library that uses the `log` crate) bridged in.

use tracing_subscriber::{fmt, layer::SubscriberExt as _, util::SubscriberInitExt as _, EnvFilter};

use crate::config::{LogConfig, LogFormat};

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid log filter {filter:?}: {message}")]
    Filter { filter: String, message: String },
    #[error("a logger is already installed: {0}")]
    Init(String),
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(config: &LogConfig) -> Result<(), LoggingError> {
    let filter = EnvFilter::try_new(&config.filter).map_err(|e| LoggingError::Filter {
        filter: config.filter.clone(),
        message: e.to_string(),
    })?;
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
    result.map_err(|e| LoggingError::Init(e.to_string()))
}
