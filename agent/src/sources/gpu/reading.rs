//! One NVML reading and what became of it. A device that lacks a feature answers
//! `NotSupported`, which is not a fault and must never be shown as 0; a call that fails is kept
//! with its message, and a GPU that fell off the bus is told apart from both.

use nvml_wrapper::error::NvmlError;
use serde::Serialize;

/// The outcome of one NVML call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reading<T> {
    /// The device answered.
    Supported(T),
    /// The device or driver does not offer this reading (`NVML_ERROR_NOT_SUPPORTED`, or a
    /// driver too old to have the function at all).
    NotSupported,
    /// The call failed; the message says how.
    Error(String),
}

impl<T> Reading<T> {
    /// Classifies an NVML result.
    pub fn from_nvml(result: Result<T, NvmlError>) -> Self {
        match result {
            Ok(v) => Self::Supported(v),
            Err(e) if is_not_supported(&e) => Self::NotSupported,
            Err(e) => Self::Error(e.to_string()),
        }
    }

    /// The value, if the device answered.
    pub fn value(&self) -> Option<&T> {
        match self {
            Self::Supported(v) => Some(v),
            _ => None,
        }
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Reading<U> {
        match self {
            Self::Supported(v) => Reading::Supported(f(v)),
            Self::NotSupported => Reading::NotSupported,
            Self::Error(e) => Reading::Error(e),
        }
    }

    pub fn is_supported(&self) -> bool {
        matches!(self, Self::Supported(_))
    }
}

impl<T: std::fmt::Display> Reading<T> {
    /// `value unit`, `not supported` or `error: message`, for the diagnostic's text output.
    pub fn show(&self, unit: &str) -> String {
        match self {
            Self::Supported(v) if unit.is_empty() => v.to_string(),
            Self::Supported(v) => format!("{v} {unit}"),
            Self::NotSupported => "not supported".to_owned(),
            Self::Error(e) => format!("error: {e}"),
        }
    }
}

/// A missing function (an older driver) is, to the operator, the same as an unsupported one.
pub fn is_not_supported(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_) | NvmlError::FunctionNotFound
    )
}

/// Whether an error means the GPU has fallen off the bus or needs a reset to answer again.
pub fn is_lost(e: &NvmlError) -> bool {
    matches!(e, NvmlError::GpuLost | NvmlError::ResetRequired)
}

/// A short, stable name for a failed NVML call, the `error` label of
/// `nodeward_gpu_nvml_errors_total`; `None` for "not supported", which is not a failure.
pub fn error_kind(e: &NvmlError) -> Option<&'static str> {
    Some(match e {
        e if is_not_supported(e) => return None,
        NvmlError::Unknown => "unknown",
        NvmlError::Timeout => "timeout",
        NvmlError::GpuLost => "gpu_lost",
        NvmlError::ResetRequired => "reset_required",
        NvmlError::Uninitialized => "uninitialized",
        NvmlError::NoPermission => "no_permission",
        NvmlError::DriverNotLoaded => "driver_not_loaded",
        NvmlError::LibRmVersionMismatch => "lib_rm_version_mismatch",
        NvmlError::InvalidArg => "invalid_argument",
        NvmlError::NotFound => "not_found",
        NvmlError::InsufficientSize(_) => "insufficient_size",
        NvmlError::InsufficientMemory => "insufficient_memory",
        NvmlError::IrqIssue => "irq_issue",
        NvmlError::CorruptedInfoROM => "corrupted_inforom",
        NvmlError::OperatingSystem => "operating_system",
        NvmlError::InUse => "in_use",
        NvmlError::NoData => "no_data",
        _ => "other",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_supported_is_neither_a_value_nor_an_error() {
        let r: Reading<u32> = Reading::from_nvml(Err(NvmlError::NotSupported));
        assert_eq!(r, Reading::NotSupported);
        assert_eq!(r.value(), None);
        assert_eq!(r.show("W"), "not supported");
    }

    #[test]
    fn a_missing_driver_function_counts_as_not_supported() {
        let r: Reading<u32> = Reading::from_nvml(Err(NvmlError::FailedToLoadSymbol(
            "undefined symbol".into(),
        )));
        assert_eq!(r, Reading::NotSupported);
    }

    #[test]
    fn other_failures_keep_their_message() {
        let r: Reading<u32> = Reading::from_nvml(Err(NvmlError::NoPermission));
        assert!(
            matches!(&r, Reading::Error(m) if m.contains("permission")),
            "{r:?}"
        );
        assert_eq!(Reading::from_nvml(Ok::<u32, NvmlError>(7)).show("C"), "7 C");
    }

    #[test]
    fn error_kinds_name_failures_and_leave_not_supported_out() {
        assert_eq!(error_kind(&NvmlError::Unknown), Some("unknown"));
        assert_eq!(error_kind(&NvmlError::Timeout), Some("timeout"));
        assert_eq!(error_kind(&NvmlError::GpuLost), Some("gpu_lost"));
        assert_eq!(
            error_kind(&NvmlError::UnexpectedVariant(12345)),
            Some("other")
        );
        assert_eq!(error_kind(&NvmlError::NotSupported), None);
        assert_eq!(error_kind(&NvmlError::FunctionNotFound), None);
    }

    #[test]
    fn serialises_so_that_not_supported_cannot_be_read_as_zero() {
        let json = serde_json::to_string(&vec![
            Reading::Supported(0u32),
            Reading::NotSupported,
            Reading::Error("x".into()),
        ])
        .expect("serialise");
        assert_eq!(json, r#"[{"supported":0},"not_supported",{"error":"x"}]"#);
    }
}
