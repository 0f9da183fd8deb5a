//! Where the service reads the time of day: the system's clock, or a manual one that tests move
//! forward themselves, so that what depends on the date (event ids remembered for days, keys
//! forgotten when idle, emails due later) is tested without sleeping.
//!
//! Durations measured for their own sake (a request's latency, a deadline) use
//! `std::time::Instant` or tokio's timers instead: they never depend on the date.

use chrono::{DateTime, TimeDelta, Utc};
use std::time::Duration;
use tokio::sync::watch;

/// A source of the current time. Cheap to clone; clones of a manual clock share its time.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// `None` for the system's clock. A watch channel, so that what sleeps until a time on a
    /// manual clock can wake when a test moves it ([`Clock::moved`]).
    manual: Option<watch::Sender<DateTime<Utc>>>,
}

impl Clock {
    /// The system's clock.
    pub fn wall() -> Clock {
        Clock::default()
    }

    /// A clock that reads `at` until it is moved with [`Clock::advance`].
    pub fn manual(at: DateTime<Utc>) -> Clock {
        Clock {
            manual: Some(watch::Sender::new(at)),
        }
    }

    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        match &self.manual {
            Some(at) => *at.borrow(),
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
            at.send_modify(|at| *at += TimeDelta::from_std(by).unwrap_or(TimeDelta::MAX));
        }
    }

    /// Moves a manual clock forward to `at`, if that is later than it reads (never back).
    pub fn advance_to(&self, at: DateTime<Utc>) {
        if let Some(now) = &self.manual {
            now.send_if_modified(|now| {
                let later = at > *now;
                *now = (*now).max(at);
                later
            });
        }
    }

    /// Waits until `at` (milliseconds since 1970) by this clock: a sleep on the system's clock;
    /// on a manual clock, until it is moved there.
    pub async fn sleep_until_ms(&self, at: i64) {
        let Some(manual) = &self.manual else {
            let now = Utc::now().timestamp_millis();
            let ms = u64::try_from(at.saturating_sub(now)).unwrap_or(0);
            return tokio::time::sleep(Duration::from_millis(ms)).await;
        };
        let mut moved = manual.subscribe();
        // Only fails when the clock is dropped, which this `&self` prevents.
        let _ = moved.wait_for(|now| now.timestamp_millis() >= at).await;
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
