//! What each rule did lately, for the status page (`GET /status`): counts per minute over the
//! last hour and per hour over the last day, and the latest times rules acted. Kept in memory by
//! the committer as it records what each batch did: it starts again with the service (the page
//! says since when), and costs a few kilobytes per rule that did something.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use crate::engine::{About, Outcome};

/// How many of the latest firings are kept.
pub const RECENT: usize = 50;

/// What rules did, counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Events whose `[when]` held.
    pub matched: u64,
    pub fired: u64,
    /// Counted, below `at_least`.
    pub counting: u64,
    /// Held back by `[limits]`, and by a cap group.
    pub limited: u64,
    pub capped: u64,
    /// Actions that could not be made.
    pub failed: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.matched += other.matched;
        self.fired += other.fired;
        self.counting += other.counting;
        self.limited += other.limited;
        self.capped += other.capped;
        self.failed += other.failed;
    }
}

/// One time a rule acted.
#[derive(Debug, Clone)]
pub struct Firing {
    pub at_ms: i64,
    pub rule: String,
    /// The event it acted on (for a wait, the one that started it), for `GET /explain`.
    pub uuid: Option<String>,
}

/// A rule's counts: the last 60 minutes and the last 24 hours, each slot with the minute or
/// hour (since 1970) it counts, so that an old slot is known as such.
struct Slots {
    minutes: [(i64, Counts); 60],
    hours: [(i64, Counts); 24],
}

impl Default for Slots {
    fn default() -> Slots {
        Slots {
            minutes: [(-1, Counts::default()); 60],
            hours: [(-1, Counts::default()); 24],
        }
    }
}

/// Rules' activity since the service started.
pub struct Activity {
    started_ms: i64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    rules: HashMap<String, Slots>,
    recent: VecDeque<Firing>,
}

/// A rule's counts over the last hour and the last day.
#[derive(Debug, Clone)]
pub struct RuleActivity {
    pub rule: String,
    pub hour: Counts,
    pub day: Counts,
}

impl Activity {
    pub fn new(started_ms: i64) -> Activity {
        Activity {
            started_ms,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// When counting began.
    pub fn started_ms(&self) -> i64 {
        self.started_ms
    }

    /// Counts what `rule` did at `now_ms`: `matched` when the outcome is of an event whose
    /// `[when]` held (not of a wait ending).
    pub fn record(&self, now_ms: i64, rule: &str, outcome: &Outcome, about: &About, matched: bool) {
        let mut counts = Counts {
            matched: u64::from(matched),
            ..Counts::default()
        };
        match outcome {
            o if o.acted() => counts.fired = 1,
            Outcome::Counting { .. } => counts.counting = 1,
            Outcome::Suppressed { .. } => counts.limited = 1,
            Outcome::Capped { .. } => counts.capped = 1,
            _ => {}
        }
        if matches!(
            outcome,
            Outcome::Failed { .. } | Outcome::PartlyFailed { .. } | Outcome::WaitRefused { .. }
        ) {
            counts.failed = 1;
        }
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (minute, hour) = (now_ms.div_euclid(60_000), now_ms.div_euclid(3_600_000));
        if !inner.rules.contains_key(rule) {
            // Rules renamed or removed a day ago and more are forgotten as others come.
            inner
                .rules
                .retain(|_, slots| slots.hours.iter().any(|(at, _)| *at > hour - 24));
            inner.rules.insert(rule.to_string(), Slots::default());
        }
        let slots = inner.rules.get_mut(rule).expect("inserted above");
        for (slot, at) in [
            (&mut slots.minutes[minute.rem_euclid(60) as usize], minute),
            (&mut slots.hours[hour.rem_euclid(24) as usize], hour),
        ] {
            if slot.0 != at {
                *slot = (at, Counts::default());
            }
            slot.1.add(&counts);
        }
        if outcome.acted() {
            if inner.recent.len() == RECENT {
                inner.recent.pop_front();
            }
            inner.recent.push_back(Firing {
                at_ms: now_ms,
                rule: rule.to_string(),
                uuid: about.uuid.clone(),
            });
        }
    }

    /// Every rule that did something in the last day, by name, with its last hour and day at
    /// `now_ms`; and the latest firings, newest first.
    pub fn snapshot(&self, now_ms: i64) -> (Vec<RuleActivity>, Vec<Firing>) {
        let (minute, hour) = (now_ms.div_euclid(60_000), now_ms.div_euclid(3_600_000));
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rules: Vec<RuleActivity> = (inner.rules.iter())
            .map(|(rule, slots)| {
                let mut a = RuleActivity {
                    rule: rule.clone(),
                    hour: Counts::default(),
                    day: Counts::default(),
                };
                for (at, c) in &slots.minutes {
                    if (minute - 59..=minute).contains(at) {
                        a.hour.add(c);
                    }
                }
                for (at, c) in &slots.hours {
                    if (hour - 23..=hour).contains(at) {
                        a.day.add(c);
                    }
                }
                a
            })
            .filter(|a| a.day != Counts::default())
            .collect();
        rules.sort_by(|a, b| a.rule.cmp(&b.rule));
        let recent = inner.recent.iter().rev().cloned().collect();
        (rules, recent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_hour_and_day_slide_with_the_clock() {
        let activity = Activity::new(0);
        let about = About {
            uuid: Some("e1".into()),
            ..About::default()
        };
        let h = 3_600_000;
        activity.record(10 * h, "r", &Outcome::Fired, &about, true);
        activity.record(
            10 * h + 60_000,
            "r",
            &Outcome::Counting { count: 1 },
            &about,
            true,
        );
        let (rules, recent) = activity.snapshot(10 * h + 120_000);
        assert_eq!(
            (
                rules[0].hour.fired,
                rules[0].hour.counting,
                rules[0].hour.matched
            ),
            (1, 1, 2)
        );
        assert_eq!(recent[0].uuid.as_deref(), Some("e1"));
        // Two hours later: out of the hour, still in the day.
        let (rules, _) = activity.snapshot(12 * h);
        assert_eq!((rules[0].hour.matched, rules[0].day.matched), (0, 2));
        // A day later: gone, and its slot counts afresh.
        assert!(activity.snapshot(35 * h).0.is_empty());
        activity.record(34 * h, "r", &Outcome::Fired, &about, true);
        assert_eq!(activity.snapshot(34 * h).0[0].day.fired, 1);
        // A rule idle for a day is forgotten when another one comes.
        activity.record(60 * h, "s", &Outcome::Fired, &about, true);
        let inner = activity.inner.lock().unwrap();
        assert!(!inner.rules.contains_key("r") && inner.rules.contains_key("s"));
    }
}
