//! Where the service reads the time of day: the system's clock, or a manual one that tests move
//! forward themselves, so that what depends on the date (event ids remembered for days, keys
//! forgotten when idle, emails due later) is tested without sleeping.
//!
//! Durations measured for their own sake (a request's latency, a deadline) use
//! `std::time::Instant` or tokio's timers instead: they never depend on the date.

use chrono::{DateTime, TimeDelta, Utc};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// A source of the current time. Cheap to clone; clones of a manual clock share its time.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// `None` for the system's clock.
    manual: Option<Arc<Mutex<DateTime<Utc>>>>,
}

impl Clock {
    /// The system's clock.
    pub fn wall() -> Clock {
        Clock::default()
    }

    /// A clock that reads `at` until it is moved with [`Clock::advance`].
    pub fn manual(at: DateTime<Utc>) -> Clock {
        Clock {
            manual: Some(Arc::new(Mutex::new(at))),
        }
    }

    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        match &self.manual {
            Some(at) => *at.lock().unwrap_or_else(PoisonError::into_inner),
            None => Utc::now(),
        }
    }

    /// The current time in whole seconds since 1970 (0 before it).
    pub fn unix(&self) -> u64 {
        u64::try_from(self.now().timestamp()).unwrap_or(0)
    }

    /// Moves a manual clock forward by `by`; the system's clock cannot be moved and ignores it.
    pub fn advance(&self, by: Duration) {
        if let Some(at) = &self.manual {
            let mut at = at.lock().unwrap_or_else(PoisonError::into_inner);
            *at += TimeDelta::from_std(by).unwrap_or(TimeDelta::MAX);
        }
    }

    /// Moves a manual clock forward to `at`, if that is later than it reads (never back).
    pub fn advance_to(&self, at: DateTime<Utc>) {
        if let Some(now) = &self.manual {
            let mut now = now.lock().unwrap_or_else(PoisonError::into_inner);
            *now = (*now).max(at);
        }
    }

    /// How long until this clock reads `unix` seconds (zero if it already has).
    pub fn until_unix(&self, unix: u64) -> Duration {
        let now = self.now();
        let at = DateTime::from_timestamp(i64::try_from(unix).unwrap_or(i64::MAX), 0)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        (at - now).to_std().unwrap_or(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_its_clones_follow() {
        let start: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let clock = Clock::manual(start);
        let clone = clock.clone();
        assert_eq!(clock.now(), start);
        clock.advance(Duration::from_secs(90));
        assert_eq!(clone.unix(), start.timestamp() as u64 + 90);
        assert_eq!(clock.until_unix(clone.unix() + 5), Duration::from_secs(5));
        assert_eq!(clock.until_unix(0), Duration::ZERO);
        clock.advance_to(start);
        assert_eq!(clock.unix(), start.timestamp() as u64 + 90, "never back");
        clock.advance_to(start + TimeDelta::hours(1));
        assert_eq!(clone.now(), start + TimeDelta::hours(1));
        let wall = Clock::wall();
        assert!(wall.now() > start);
    }
}
