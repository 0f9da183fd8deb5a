//! `[aggregate]` counts on PostgreSQL: the same rows and arithmetic as redb's
//! (`store/aggregates.rs`), counted a batch at a time.
//!
//! A batch keeps the events it counts ([`Counting`]) and counts them when it commits, in one
//! round trip more: it locks each (rule, day) and (person, rule) it touches (advisory locks, in
//! order, so that instances counting the same day take turns), reads those days' rows, the
//! people's groups and which of them are already users of those days, counts in memory, and
//! writes what changed with the commit.

use std::collections::{HashMap, HashSet};
use tokio_postgres::Row;

use super::{Params, boxed, lock_id};
use crate::store::StoreError;
use crate::store::aggregates::{
    Counted, DayData, DayRow, EXACT_PER_DAY, MAX_GROUPS_PER_DAY, Membership, OTHER_GROUP,
    exact_fits, user_hash,
};

/// The events a batch counts, in order.
#[derive(Default)]
pub(super) struct Counting(Vec<Counted>);

/// A person's place in a rule's counts, as stored.
struct Member {
    group: String,
    converted: Option<i32>,
    last_day: i32,
}

/// A day row, and whether the table has it.
struct Cached {
    row: DayRow,
    changed: bool,
}

impl Counting {
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the batch counts an event of `who` for `rule` with a group already (so that the
    /// person has one by the time a later event of theirs without a group is counted).
    pub(super) fn has_group(&self, who: &str, rule: &str) -> bool {
        (self.0.iter()).any(|c| c.distinct_id == who && c.rule == rule && c.group.is_some())
    }

    pub(super) fn push(&mut self, counted: Counted) {
        self.0.push(counted);
    }

    /// The statements that lock and read what the batch's events count into.
    pub(super) fn reads(&self) -> Vec<(&'static str, Params)> {
        let mut locks: Vec<i64> = Vec::new();
        let (mut days_rule, mut days_day) = (Vec::new(), Vec::new());
        let (mut who, mut rules) = (Vec::new(), Vec::new());
        let (mut users_rule, mut users_day, mut users_hash) = (Vec::new(), Vec::new(), Vec::new());
        let mut seen_days = HashSet::new();
        for c in &self.0 {
            if seen_days.insert((c.rule.as_str(), c.day)) {
                locks.push(lock_id(
                    "aggregate day",
                    &format!("{}\u{1f}{}", c.rule, c.day),
                ));
                days_rule.push(c.rule.clone());
                days_day.push(c.day);
            }
            locks.push(lock_id(
                "aggregate member",
                &format!("{}\u{1f}{}", c.distinct_id, c.rule),
            ));
            who.push(c.distinct_id.clone());
            rules.push(c.rule.clone());
            users_rule.push(c.rule.clone());
            users_day.push(c.day);
            users_hash.push(user_hash(&c.distinct_id) as i64);
        }
        locks.sort_unstable();
        locks.dedup();
        vec![
            (
                "SELECT pg_advisory_xact_lock(id) FROM unnest($1::int8[]) AS id",
                vec![boxed(locks)],
            ),
            (
                "SELECT m.who, m.rule, m.grp, m.converted, m.last_day FROM aggregate_members m \
                 JOIN unnest($1::text[], $2::text[]) AS u(who, rule) \
                 ON m.who = u.who AND m.rule = u.rule",
                vec![boxed(who), boxed(rules)],
            ),
            (
                "SELECT d.rule, d.day, d.grp, d.row_data FROM aggregate_days d \
                 JOIN unnest($1::text[], $2::int4[]) AS u(rule, day) \
                 ON d.rule = u.rule AND d.day = u.day",
                vec![boxed(days_rule), boxed(days_day)],
            ),
            (
                "SELECT DISTINCT a.rule, a.day, a.hash, a.grp FROM aggregate_users a \
                 JOIN unnest($1::text[], $2::int4[], $3::int8[]) AS u(rule, day, hash) \
                 ON a.rule = u.rule AND a.day = u.day AND a.hash = u.hash",
                vec![boxed(users_rule), boxed(users_day), boxed(users_hash)],
            ),
        ]
    }

    /// Counts the batch's events on what [`Counting::reads`] read (`rows`, its statements'
    /// rows in order), as redb's `count` does each, and returns the statements that write the
    /// result.
    pub(super) fn count(
        &self,
        rows: &[Vec<Row>],
    ) -> Result<Vec<(&'static str, Params)>, StoreError> {
        let mut members: HashMap<(String, String), (Member, bool)> = HashMap::new();
        for r in &rows[1] {
            let member = Member {
                group: r.get(2),
                converted: r.get(3),
                last_day: r.get(4),
            };
            members.insert((r.get(0), r.get(1)), (member, false));
        }
        let mut days: HashMap<(String, i32, String), Cached> = HashMap::new();
        for r in &rows[2] {
            let row = DayRow::decode(r.get(3)).map_err(StoreError::Unavailable)?;
            days.insert(
                (r.get(0), r.get(1), r.get(2)),
                Cached {
                    row,
                    changed: false,
                },
            );
        }
        let mut users: HashSet<(String, i32, i64, String)> = HashSet::new();
        for r in &rows[3] {
            users.insert((r.get(0), r.get(1), r.get(2), r.get(3)));
        }
        let mut new_users: Vec<(String, i32, i64, String)> = Vec::new();
        let mut kept: HashMap<String, u32> = HashMap::new();
        for c in &self.0 {
            let (who, rule) = (c.distinct_id.clone(), c.rule.clone());
            let member = members.get(&(who.clone(), rule.clone())).map(|(m, _)| m);
            let Some(group) = c.group.clone().or(member.map(|m| m.group.clone())) else {
                continue;
            };
            let hash = user_hash(&who) as i64;
            let group = bounded_group(&days, &rule, c.day, group);
            let mut add_user = |days: &mut HashMap<_, Cached>, group: &str, conversion: bool| {
                let cached = days
                    .entry((rule.clone(), c.day, group.to_string()))
                    .or_insert_with(|| Cached {
                        row: DayRow::default(),
                        changed: true,
                    });
                cached.changed = true;
                let row = &mut cached.row;
                match conversion {
                    true => row.conversions += 1,
                    false => row.events += 1,
                }
                row.sketch.insert_hash(hash as u64);
                let user = (rule.clone(), c.day, hash, group.to_string());
                if row.overflowed || users.contains(&user) {
                    return;
                }
                if row.exact < EXACT_PER_DAY {
                    users.insert(user.clone());
                    new_users.push(user);
                    row.exact += 1;
                } else {
                    row.overflowed = true;
                }
            };
            add_user(&mut days, &group, false);
            // The person's group is the group of their first counted event.
            let (member_group, mut converted, last_day, new_member) = match member {
                Some(m) => (m.group.clone(), m.converted, m.last_day, false),
                None => (group.clone(), None, c.day, true),
            };
            let converts = c.conversion && converted.is_none();
            if converts {
                converted = Some(c.day);
                // Counted in their group, where they are a user that day too.
                let theirs = bounded_group(&days, &rule, c.day, member_group.clone());
                add_user(&mut days, &theirs, true);
            }
            let seen_day = last_day.max(c.day);
            if new_member || converts || seen_day != last_day {
                let member = Member {
                    group: member_group,
                    converted,
                    last_day: seen_day,
                };
                members.insert((who, rule.clone()), (member, true));
            }
            kept.insert(rule, c.keep_days);
        }
        let mut out = Vec::new();
        let changed: Vec<_> = days.into_iter().filter(|(_, c)| c.changed).collect();
        if !changed.is_empty() {
            let (mut r, mut d, mut g, mut data) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((rule, day, group), cached) in changed {
                r.push(rule);
                d.push(day);
                g.push(group);
                data.push(cached.row.encode());
            }
            out.push((
                "INSERT INTO aggregate_days (rule, day, grp, row_data) \
                 SELECT * FROM unnest($1::text[], $2::int4[], $3::text[], $4::bytea[]) \
                 ON CONFLICT (rule, day, grp) DO UPDATE SET row_data = EXCLUDED.row_data",
                vec![boxed(r), boxed(d), boxed(g), boxed(data)],
            ));
        }
        if !new_users.is_empty() {
            let (mut r, mut d, mut h, mut g) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (rule, day, hash, group) in new_users {
                r.push(rule);
                d.push(day);
                h.push(hash);
                g.push(group);
            }
            out.push((
                "INSERT INTO aggregate_users (rule, day, hash, grp) \
                 SELECT * FROM unnest($1::text[], $2::int4[], $3::int8[], $4::text[]) \
                 ON CONFLICT DO NOTHING",
                vec![boxed(r), boxed(d), boxed(h), boxed(g)],
            ));
        }
        let changed: Vec<_> = members.into_iter().filter(|(_, (_, c))| *c).collect();
        if !changed.is_empty() {
            let (mut w, mut r, mut g, mut conv, mut last) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((who, rule), (m, _)) in changed {
                w.push(who);
                r.push(rule);
                g.push(m.group);
                conv.push(m.converted);
                last.push(m.last_day);
            }
            out.push((
                "INSERT INTO aggregate_members (who, rule, grp, converted, last_day) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::int4[]) \
                 ON CONFLICT (who, rule) DO UPDATE SET grp = EXCLUDED.grp, \
                 converted = EXCLUDED.converted, last_day = EXCLUDED.last_day",
                vec![boxed(w), boxed(r), boxed(g), boxed(conv), boxed(last)],
            ));
        }
        if !kept.is_empty() {
            let (r, k): (Vec<String>, Vec<i32>) = kept
                .into_iter()
                .map(|(rule, days)| (rule, i32::try_from(days).unwrap_or(i32::MAX)))
                .unzip();
            out.push((
                "INSERT INTO aggregate_rules (rule, keep_days) \
                 SELECT * FROM unnest($1::text[], $2::int4[]) \
                 ON CONFLICT (rule) DO UPDATE SET keep_days = EXCLUDED.keep_days \
                 WHERE aggregate_rules.keep_days <> EXCLUDED.keep_days",
                vec![boxed(r), boxed(k)],
            ));
        }
        Ok(out)
    }
}

/// `group`, or [`OTHER_GROUP`] when the rule already counts [`MAX_GROUPS_PER_DAY`] groups that
/// day.
fn bounded_group(
    days: &HashMap<(String, i32, String), Cached>,
    rule: &str,
    day: i32,
    group: String,
) -> String {
    if days.contains_key(&(rule.to_string(), day, group.clone())) {
        return group;
    }
    let groups = (days.keys())
        .filter(|(r, d, _)| r == rule && *d == day)
        .count();
    match groups >= MAX_GROUPS_PER_DAY {
        true => OTHER_GROUP.to_string(),
        false => group,
    }
}

/// The day rows of `rule` from `from` to `to` as read (`rule, day, grp, row_data`).
pub(super) fn day_data(rows: &[Row]) -> Result<Vec<DayData>, StoreError> {
    rows.iter()
        .map(|r| {
            Ok(DayData {
                day: r.get(1),
                group: r.get(2),
                row: DayRow::decode(r.get(3)).map_err(StoreError::Unavailable)?,
                users: None,
            })
        })
        .collect()
}

/// Whether the users' hashes of `days` are read too (see [`exact_fits`]).
pub(super) fn wants_users(days: &[DayData]) -> bool {
    exact_fits(days.iter().map(|d| &d.row))
}

/// Fills in the users of each of `days` from rows `(day, grp, hash)`.
pub(super) fn add_users(days: &mut [DayData], rows: &[Row]) {
    let mut by_row: HashMap<(i32, String), Vec<u64>> = HashMap::new();
    for r in rows {
        let hash: i64 = r.get(2);
        by_row
            .entry((r.get(0), r.get(1)))
            .or_default()
            .push(hash as u64);
    }
    for d in days {
        d.users = Some(by_row.remove(&(d.day, d.group.clone())).unwrap_or_default());
    }
}

/// Memberships from rows `(rule, grp, converted)`.
pub(super) fn memberships(rows: &[Row]) -> Vec<Membership> {
    rows.iter()
        .map(|r| Membership {
            rule: r.get(0),
            group: r.get(1),
            converted: r.get(2),
        })
        .collect()
}

/// The statements that take `who` out of every day they were counted on, from rows
/// `(rule, day, grp, row_data, hashes left)` of those days read after their hash was removed:
/// each row's exact count loses one, and a row that kept its users exactly has its sketch made
/// again from those left, so that it holds nothing of them either.
pub(super) fn without_user(rows: &[Row]) -> Result<Vec<(&'static str, Params)>, StoreError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let (mut r, mut d, mut g, mut data) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        let mut day = DayRow::decode(row.get(3)).map_err(StoreError::Unavailable)?;
        day.exact = day.exact.saturating_sub(1);
        if !day.overflowed {
            day.sketch = crate::store::aggregates::Sketch::new();
            for hash in row.get::<_, Vec<i64>>(4) {
                day.sketch.insert_hash(hash as u64);
            }
        }
        r.push(row.get::<_, String>(0));
        d.push(row.get::<_, i32>(1));
        g.push(row.get::<_, String>(2));
        data.push(day.encode());
    }
    Ok(vec![(
        "UPDATE aggregate_days d SET row_data = u.data \
         FROM unnest($1::text[], $2::int4[], $3::text[], $4::bytea[]) AS u(rule, day, grp, data) \
         WHERE d.rule = u.rule AND d.day = u.day AND d.grp = u.grp",
        vec![boxed(r), boxed(d), boxed(g), boxed(data)],
    )])
}
