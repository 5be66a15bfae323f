//! Time as the health engine and the drain handshake see it. Injected so that tests drive time
//! by hand instead of sleeping.

use std::{
    sync::{Mutex, OnceLock},
    time::{Duration, Instant, SystemTime},
};

/// A source of wall-clock time, and of time that never steps.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> SystemTime;

    /// Time since an arbitrary origin on a clock that only moves forward (`CLOCK_MONOTONIC`):
    /// what deadlines inside one run are measured on, so that a step of the wall clock (NTP,
    /// an operator's `date -s`) can neither end nor extend them.
    fn monotonic(&self) -> Duration {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed()
    }
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    /// (wall clock, monotonic clock).
    now: Mutex<(SystemTime, Duration)>,
}

impl ManualClock {
    pub fn new(start: SystemTime) -> Self {
        Self {
            now: Mutex::new((start, Duration::ZERO)),
        }
    }

    /// Time passes: both clocks move.
    pub fn advance(&self, by: Duration) {
        let mut g = self.now.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += by;
        g.1 += by;
    }

    /// The wall clock is stepped (forwards or backwards); the monotonic clock does not move.
    pub fn set(&self, to: SystemTime) {
        self.now.lock().unwrap_or_else(|p| p.into_inner()).0 = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        self.now.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    fn monotonic(&self) -> Duration {
        self.now.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `later - earlier`, or zero when the clock went backwards.
pub fn elapsed(earlier: SystemTime, later: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or(Duration::ZERO)
}
