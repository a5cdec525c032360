//! Time, injectable so tests can move it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mediastore_core::Timestamp;
use parking_lot::Mutex;

/// A source of wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;

    /// The current time as the core counts it. Engines call this on every
    /// registration; override it when the clock can answer faster than
    /// through `SystemTime`.
    fn timestamp(&self) -> Timestamp {
        Timestamp::from_system(self.now())
    }
}

/// The system's real-time clock, read through `CLOCK_REALTIME_COARSE`.
///
/// The coarse clock is the kernel's last tick (a few milliseconds of
/// resolution) and costs a few nanoseconds instead of tens: registrations
/// read it on the hot path, and hold lifetimes are minutes to days.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        self.timestamp().to_system()
    }

    fn timestamp(&self) -> Timestamp {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
        let secs = u64::try_from(t.tv_sec).unwrap_or(0);
        let nanos = u64::try_from(t.tv_nsec).unwrap_or(0);
        Timestamp(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
    }
}

/// A clock that only moves when told to; clones share the same time.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use mediastore::{Clock, ManualClock};
/// let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(100));
/// clock.advance(Duration::from_secs(5));
/// assert_eq!(clock.now(), UNIX_EPOCH + Duration::from_secs(105));
/// ```
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    /// A clock stopped at `at`.
    pub fn new(at: SystemTime) -> Self {
        Self(Arc::new(Mutex::new(at)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        *self.0.lock() += by;
    }

    /// Sets the clock, also backwards.
    pub fn set(&self, at: SystemTime) {
        *self.0.lock() = at;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new(SystemTime::now())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_is_close_to_std() {
        let ours = SystemClock.now();
        let std = SystemTime::now();
        let gap = std.duration_since(ours).unwrap_or_else(|e| e.duration());
        // Coarse resolution is a tick; allow generously for a loaded machine.
        assert!(gap < Duration::from_millis(100), "{gap:?}");
    }
}
