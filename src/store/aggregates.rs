//! What `[aggregate]` rules count (see `actions/aggregate/`), and the arithmetic of a summary
//! over a range of days: the same for every store.
//!
//! A store keeps, per (rule, day, group), a [`DayRow`]: the events, the users who converted
//! that day, and the users, both exactly (their [`user_hash`], up to [`EXACT_PER_DAY`] per row,
//! in a table of their own) and as a HyperLogLog++ sketch (Cloudflare's
//! `cardinality-estimator`: exact up to 128, then about 1.6% error in 3 KB). A person's group is
//! the group of their first counted event, so a conversion counts once, for that group.
//! Distinct users over a range are the union of the days' exact sets when every day is exact
//! and they hold at most [`MAX_EXACT_UNION`] hashes together, else the merge of the sketches.

use cardinality_estimator::CardinalityEstimator;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};

/// The users of a day as a sketch: HyperLogLog++ with 2^12 registers of 6 bits (about 1.6%
/// error), exact (but for hash collisions) up to 128 users.
pub type Sketch = CardinalityEstimator<u64>;

/// The most users a (rule, day, group) row keeps exactly; beyond, the sketch alone counts them.
pub const EXACT_PER_DAY: u32 = 10_000;

/// The most exact user hashes one summary reads: a range holding more is estimated.
pub const MAX_EXACT_UNION: u64 = 100_000;

/// The most groups a rule counts per day; the events of further groups count under
/// [`OTHER_GROUP`], so that a `by` field with endless values cannot fill the disk.
pub const MAX_GROUPS_PER_DAY: usize = 100;

/// Where events of groups beyond [`MAX_GROUPS_PER_DAY`] are counted.
pub const OTHER_GROUP: &str = "(other)";

/// The longest group name kept, in characters: longer values are cut.
pub const MAX_GROUP_CHARS: usize = 100;

/// One event an `[aggregate]` rule counts, as its action makes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Counted {
    pub rule: String,
    pub distinct_id: String,
    /// The event's day where the rule counts (see [`day_number`]).
    pub day: i32,
    /// The event's group (its `by` field); `None` counts it in the person's group, if they have
    /// one.
    pub group: Option<String>,
    /// Whether it is the rule's conversion event.
    pub conversion: bool,
    /// How many days the rule's counts are kept.
    pub keep_days: u32,
}

impl Counted {
    /// How it reads in `tripline test` and `replay`: who, in which group, whether it converts.
    pub fn describe(&self) -> String {
        let group = match &self.group {
            Some(g) => format!("in group {g:?}"),
            None => "in their group (the event has no `by` field)".into(),
        };
        let conversion = if self.conversion {
            ", a conversion"
        } else {
            ""
        };
        let who: String = self.distinct_id.chars().take(60).collect();
        format!("counted for {who} {group}{conversion}")
    }
}

/// What a store keeps for one (rule, day, group).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct DayRow {
    pub events: u64,
    /// People whose first conversion was that day, counted in their group.
    pub conversions: u64,
    /// How many users the exact table holds for this row.
    pub exact: u32,
    /// Whether more users came than the exact table holds: only the sketch counts them all.
    pub overflowed: bool,
    pub sketch: Sketch,
}

impl DayRow {
    /// Its distinct users: exact unless it overflowed.
    pub fn users(&self) -> u64 {
        if self.overflowed {
            self.sketch.estimate() as u64
        } else {
            u64::from(self.exact)
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a row always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<DayRow, String> {
        postcard::from_bytes(bytes).map_err(|e| format!("an unreadable aggregate row: {e}"))
    }
}

/// A person's place in a rule's counts: their group (from their first counted event), and the
/// day they converted, if they did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub rule: String,
    pub group: String,
    pub converted: Option<i32>,
}

/// The 8 bytes a person is counted by: the start of the SHA-256 of their `distinct_id`, the same
/// in every version and store (at a million people, the chance that two share one is about
/// 3 in 100 million).
pub fn user_hash(distinct_id: &str) -> u64 {
    let digest = Sha256::digest(distinct_id.as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("a digest is 32 bytes"))
}

/// A date as the number a store keeps it by (days since 0001-01-01, chrono's count).
pub fn day_number(date: chrono::NaiveDate) -> i32 {
    chrono::Datelike::num_days_from_ce(&date)
}

/// The date of a [`day_number`].
pub fn day_date(day: i32) -> chrono::NaiveDate {
    chrono::NaiveDate::from_num_days_from_ce_opt(day).unwrap_or_default()
}

/// A group name as kept: cut at [`MAX_GROUP_CHARS`].
pub fn group_name(value: &serde_json::Value) -> Option<String> {
    let text = match value {
        serde_json::Value::Null => return None,
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Some(text.chars().take(MAX_GROUP_CHARS).collect())
}

/// One row of a range as a store read it, with its users' hashes when the summary is exact.
#[derive(Debug)]
pub struct DayData {
    pub day: i32,
    pub group: String,
    pub row: DayRow,
    /// The row's exact users, read only when the whole range is exact (see [`exact_fits`]).
    pub users: Option<Vec<u64>>,
}

/// Whether the users of `rows` can be counted exactly: none overflowed, and their exact sets
/// hold at most [`MAX_EXACT_UNION`] hashes together.
pub fn exact_fits<'a>(rows: impl IntoIterator<Item = &'a DayRow>) -> bool {
    let mut total = 0u64;
    for row in rows {
        if row.overflowed {
            return false;
        }
        total += u64::from(row.exact);
    }
    total <= MAX_EXACT_UNION
}

/// The counts of one group, or of every group, over some days.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Totals {
    pub events: u64,
    pub users: u64,
    pub conversions: u64,
}

/// A summary over a range of days.
#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    pub all: Totals,
    /// Whether the users are counted exactly (else estimated from the sketches).
    pub exact: bool,
    pub groups: BTreeMap<String, Totals>,
    /// Each day with any events, with its groups.
    pub days: Vec<(i32, BTreeMap<String, Totals>)>,
    /// The first and last day with any events.
    pub first_day: Option<i32>,
    pub last_day: Option<i32>,
}

/// Sums `rows` (every row of a range, in day order): events and conversions add up; users are
/// the union of the rows' exact sets when every row has them, else the merged sketches.
pub fn summarize(rows: &[DayData]) -> Summary {
    let exact = rows.iter().all(|d| d.users.is_some());
    let mut summary = Summary {
        exact,
        first_day: rows.first().map(|d| d.day),
        last_day: rows.last().map(|d| d.day),
        ..Summary::default()
    };
    // Users per group and in all, as exact sets or merged sketches.
    let mut sets: BTreeMap<&str, HashSet<u64>> = BTreeMap::new();
    let mut sketches: BTreeMap<&str, Sketch> = BTreeMap::new();
    let mut all_set: HashSet<u64> = HashSet::new();
    let mut all_sketch = Sketch::new();
    for d in rows {
        let totals = summary.groups.entry(d.group.clone()).or_default();
        totals.events += d.row.events;
        totals.conversions += d.row.conversions;
        summary.all.events += d.row.events;
        summary.all.conversions += d.row.conversions;
        match &d.users {
            Some(users) if exact => {
                let set = sets.entry(&d.group).or_default();
                set.extend(users);
                all_set.extend(users);
            }
            _ => {
                sketches.entry(&d.group).or_default().merge(&d.row.sketch);
                all_sketch.merge(&d.row.sketch);
            }
        }
        let day_totals = Totals {
            events: d.row.events,
            users: d.row.users(),
            conversions: d.row.conversions,
        };
        match summary.days.last_mut() {
            Some((day, groups)) if *day == d.day => {
                groups.insert(d.group.clone(), day_totals);
            }
            _ => summary
                .days
                .push((d.day, BTreeMap::from([(d.group.clone(), day_totals)]))),
        }
    }
    for (group, totals) in &mut summary.groups {
        totals.users = if exact {
            sets.get(group.as_str()).map_or(0, |s| s.len() as u64)
        } else {
            sketches
                .get(group.as_str())
                .map_or(0, |s| s.estimate() as u64)
        };
    }
    summary.all.users = if exact {
        all_set.len() as u64
    } else {
        all_sketch.estimate() as u64
    };
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of `users` (hashes `from..from + users`), `events` events and `conversions`.
    fn row(day: i32, group: &str, from: u64, users: u64, exact: bool) -> DayData {
        let mut row = DayRow {
            events: users * 2,
            conversions: users / 10,
            ..DayRow::default()
        };
        let hashes: Vec<u64> = (from..from + users)
            .map(|u| user_hash(&u.to_string()))
            .collect();
        for h in &hashes {
            row.sketch.insert_hash(*h);
        }
        row.exact = users.min(u64::from(EXACT_PER_DAY)) as u32;
        row.overflowed = users > u64::from(EXACT_PER_DAY);
        DayData {
            day,
            group: group.into(),
            row,
            users: exact.then_some(hashes),
        }
    }

    #[test]
    fn exact_ranges_count_each_person_once_across_days_and_groups() {
        // Users 0..100 in A on day 1, 50..150 in A on day 2, 1000..1010 in B on day 2.
        let rows = [
            row(1, "A", 0, 100, true),
            row(2, "A", 50, 100, true),
            row(2, "B", 1000, 10, true),
        ];
        let s = summarize(&rows);
        assert!(s.exact);
        assert_eq!(s.groups["A"].users, 150);
        assert_eq!(s.groups["A"].events, 400);
        assert_eq!(s.groups["A"].conversions, 20);
        assert_eq!(s.groups["B"].users, 10);
        assert_eq!(s.all.users, 160);
        assert_eq!(s.all.events, 420);
        assert_eq!(s.days.len(), 2);
        assert_eq!(s.days[1].1["A"].users, 100);
        assert_eq!((s.first_day, s.last_day), (Some(1), Some(2)));
    }

    #[test]
    fn large_ranges_are_estimated_within_the_stated_error() {
        // 30 days of 20,000 users each, half of them the same people every day: 310,000 in all.
        let rows: Vec<DayData> = (0..30)
            .map(|d| {
                let mut r = row(d, "A", 0, 10_000, false);
                let other = row(d, "A", 1_000_000 + d as u64 * 10_000, 10_000, false);
                r.row.sketch.merge(&other.row.sketch);
                r.row.overflowed = true;
                r
            })
            .collect();
        assert!(!exact_fits(rows.iter().map(|d| &d.row)));
        let s = summarize(&rows);
        assert!(!s.exact);
        let error = (s.all.users as f64 - 310_000.0).abs() / 310_000.0;
        assert!(error < 0.05, "{} users estimated", s.all.users);
        assert!((s.days[0].1["A"].users as f64 - 20_000.0).abs() < 1_000.0);
    }

    #[test]
    fn an_exact_range_is_bounded_by_how_many_hashes_it_reads() {
        let small = row(1, "A", 0, 10, false).row;
        assert!(exact_fits([&small]));
        let full = DayRow {
            exact: EXACT_PER_DAY,
            ..DayRow::default()
        };
        let many = vec![full; (MAX_EXACT_UNION / u64::from(EXACT_PER_DAY)) as usize + 1];
        assert!(!exact_fits(&many));
        assert!(exact_fits(&many[1..]));
    }

    #[test]
    fn a_row_reads_back_what_was_written() {
        let r = row(1, "A", 0, 500, false).row;
        let back = DayRow::decode(&r.encode()).unwrap();
        assert_eq!(back.events, r.events);
        assert_eq!(back.sketch.estimate(), r.sketch.estimate());
        assert!(DayRow::decode(b"\xff\xff").is_err());
    }

    #[test]
    fn a_person_hashes_the_same_always() {
        // Stored: a change would count everyone twice.
        // The first 8 bytes of its SHA-256 (as Python's hashlib gives them), little-endian.
        assert_eq!(user_hash("dana@example.com"), 0x0ea8_0e4b_39f1_e207);
    }
}
