//! Whether the system clock is synchronised, from the kernel's NTP state (`adjtimex`).
//!
//! A live-streaming node whose clock drifts produces timestamps that do not line up with its
//! peers', so an unsynchronised clock is a health problem. The rule is systemd's
//! (`timedatectl`'s "System clock synchronized"): the clock is synchronised while the kernel's
//! maximum error estimate is below a limit (16 s, the kernel's NTP_PHASE_LIMIT, which it
//! reaches when no daemon has disciplined the clock for a while). `STA_UNSYNC` is reported but
//! not decisive on its own: chronyd without `rtcsync` keeps it set on a synchronised clock so
//! that the kernel leaves the RTC alone.

use std::time::Duration;

use serde::Serialize;

/// The parts of `struct timex` the decision uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClockReading {
    /// adjtimex's return value: TIME_OK (0) .. TIME_ERROR (5).
    pub state: i32,
    /// `timex.status` flags.
    pub status: i32,
    /// Maximum error estimate, microseconds.
    pub maxerror_us: i64,
    /// Estimated error, microseconds.
    pub esterror_us: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClockSync {
    pub synchronized: bool,
    /// `STA_UNSYNC` as the kernel reports it.
    pub sta_unsync: bool,
    pub maxerror_us: i64,
    pub esterror_us: i64,
    /// Why the clock counts as unsynchronised; empty when it is synchronised.
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("adjtimex failed: {0}")]
    Adjtimex(std::io::Error),
}

const STA_UNSYNC: i32 = 0x0040;
const TIME_ERROR: i32 = 5;

/// Reads the kernel's NTP state without changing it (`modes = 0`).
pub fn read() -> Result<ClockReading, ClockError> {
    // SAFETY: an all-zero timex (modes = 0) is a valid read-only request.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: `tx` is a valid, exclusively borrowed timex for the duration of the call.
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state < 0 {
        return Err(ClockError::Adjtimex(std::io::Error::last_os_error()));
    }
    Ok(ClockReading {
        state,
        status: tx.status,
        maxerror_us: tx.maxerror,
        esterror_us: tx.esterror,
    })
}

/// The decision: synchronised while the maximum error is below `max_error`.
pub fn assess(r: &ClockReading, max_error: Duration) -> ClockSync {
    let limit_us = i64::try_from(max_error.as_micros()).unwrap_or(i64::MAX);
    let sta_unsync = r.status & STA_UNSYNC != 0;
    let synchronized = r.maxerror_us < limit_us;
    let reason = if synchronized {
        String::new()
    } else {
        let state = if r.state == TIME_ERROR {
            ", kernel state TIME_ERROR"
        } else {
            ""
        };
        format!(
            "maximum clock error {} ms is not below {} ms{}{state}",
            r.maxerror_us / 1000,
            limit_us / 1000,
            if sta_unsync { ", STA_UNSYNC set" } else { "" }
        )
    };
    ClockSync {
        synchronized,
        sta_unsync,
        maxerror_us: r.maxerror_us,
        esterror_us: r.esterror_us,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(16);

    fn reading(state: i32, status: i32, maxerror_us: i64) -> ClockReading {
        ClockReading {
            state,
            status,
            maxerror_us,
            esterror_us: 0,
        }
    }

    #[test]
    fn ntp_disciplined_clock_is_synchronized() {
        // chronyd with rtcsync: STA_PLL set, small error.
        let s = assess(&reading(0, 0x0001, 1_500), LIMIT);
        assert!(s.synchronized);
        assert!(s.reason.is_empty());
    }

    #[test]
    fn no_ntp_daemon_is_unsynchronized_with_a_reason() {
        // What a kernel reports when nothing disciplines the clock: STA_UNSYNC, TIME_ERROR,
        // maxerror at NTP_PHASE_LIMIT.
        let s = assess(&reading(5, 0x0040, 16_000_000), LIMIT);
        assert!(!s.synchronized);
        assert!(s.sta_unsync);
        assert!(s.reason.contains("16000 ms"), "{}", s.reason);
        assert!(s.reason.contains("STA_UNSYNC"), "{}", s.reason);
    }

    #[test]
    fn sta_unsync_alone_with_a_small_error_is_still_synchronized() {
        let s = assess(&reading(5, 0x0040, 2_000), LIMIT);
        assert!(s.synchronized);
        assert!(s.sta_unsync);
    }

    #[test]
    fn a_stricter_limit_flags_a_drifting_clock() {
        let s = assess(&reading(0, 0, 250_000), Duration::from_millis(100));
        assert!(!s.synchronized);
        assert!(assess(&reading(0, 0, 99_999), Duration::from_millis(100)).synchronized);
    }

    #[test]
    fn this_host_answers_adjtimex() {
        let r = read().expect("adjtimex with modes = 0 needs no privilege");
        assert!((0..=5).contains(&r.state), "{r:?}");
        assert!(r.maxerror_us >= 0);
    }
}
