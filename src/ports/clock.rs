//! Time, injected so that rules about expiry and leases can be tested without sleeping.

use time::OffsetDateTime;

use crate::domain::audit::truncate_to_micros;

pub trait Clock: Send + Sync {
    fn now(&self) -> OffsetDateTime;
}

/// The wall clock, in UTC, to the microsecond: the precision both databases store, so a value
/// reads back exactly as it was written.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        truncate_to_micros(OffsetDateTime::now_utc())
    }
}

/// The wall clock plus an offset that only grows: tests move time forward (to expire a key or a
/// lease) without sleeping, while time still passes as usual between the jumps.
#[derive(Debug, Default)]
pub struct ManualClock {
    offset: std::sync::Mutex<time::Duration>,
}

impl ManualClock {
    pub fn advance(&self, by: std::time::Duration) {
        *self.offset.lock().expect("clock lock is never poisoned") += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        SystemClock.now() + *self.offset.lock().expect("clock lock is never poisoned")
    }
}
