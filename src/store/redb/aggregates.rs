//! `[aggregate]` counts in redb (see `store/aggregates.rs` for what they are).
//!
//! Tables:
//! - `aggregate_days`: (rule, day, group) → its [`DayRow`] (events, conversions, the sketch;
//!   from 8 bytes to about 3 KB);
//! - `aggregate_users`: (rule, day, group, user hash) → (), the row's exact users, up to
//!   [`EXACT_PER_DAY`];
//! - `aggregate_members`: (distinct id, rule) → (group, the day they converted), so that a
//!   person's conversion counts once, in their group, and so that erasing them finds it;
//! - `aggregate_members_by_day`: (rule, the day they were last counted, distinct id), to forget
//!   people not seen for as long as the rule keeps its days;
//! - `aggregate_rules`: rule → how many days it keeps, so that the days of a rule removed since
//!   are still forgotten in time.

use redb::{ReadableTable, TableDefinition};
use std::collections::HashMap;

use super::err;
use crate::store::StoreError;
use crate::store::aggregates::{
    Counted, DayData, DayRow, EXACT_PER_DAY, MAX_GROUPS_PER_DAY, Membership, OTHER_GROUP, Sketch,
    exact_fits, user_hash,
};

pub(super) const DAYS: TableDefinition<(&str, i32, &str), &[u8]> =
    TableDefinition::new("aggregate_days");
pub(super) const USERS: TableDefinition<(&str, i32, &str, u64), ()> =
    TableDefinition::new("aggregate_users");
/// (distinct id, rule) → (group, the day they converted, the day they were last counted).
pub(super) const MEMBERS: TableDefinition<(&str, &str), (&str, Option<i32>, i32)> =
    TableDefinition::new("aggregate_members");
pub(super) const MEMBERS_BY_DAY: TableDefinition<(&str, i32, &str), ()> =
    TableDefinition::new("aggregate_members_by_day");
pub(super) const RULES: TableDefinition<&str, u32> = TableDefinition::new("aggregate_rules");

/// Creates the tables, so that readers never meet a missing one.
pub(super) fn create(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(DAYS).map_err(err)?;
    txn.open_table(USERS).map_err(err)?;
    txn.open_table(MEMBERS).map_err(err)?;
    txn.open_table(MEMBERS_BY_DAY).map_err(err)?;
    txn.open_table(RULES).map_err(err)?;
    Ok(())
}

/// The day rows a batch changed, written once when it commits: a busy row (today's, for a
/// group) is decoded and encoded once a batch, not once an event (its sketch is up to 3 KB).
#[derive(Default)]
pub(super) struct Rows(HashMap<(String, i32, String), Cached>);

struct Cached {
    row: DayRow,
    /// Whether the table had it when it was read (else it is a group new that day).
    stored: bool,
}

impl Rows {
    /// The row, read from the table the first time in the batch.
    fn get(
        &mut self,
        days: &impl ReadableTable<(&'static str, i32, &'static str), &'static [u8]>,
        rule: &str,
        day: i32,
        group: &str,
    ) -> Result<&mut DayRow, StoreError> {
        let key = (rule.to_string(), day, group.to_string());
        if !self.0.contains_key(&key) {
            let (row, stored) = match days.get((rule, day, group)).map_err(err)? {
                Some(bytes) => (
                    DayRow::decode(bytes.value()).map_err(StoreError::Unavailable)?,
                    true,
                ),
                None => (DayRow::default(), false),
            };
            self.0.insert(key.clone(), Cached { row, stored });
        }
        Ok(&mut self.0.get_mut(&key).expect("inserted above").row)
    }

    /// Whether the batch has the row already.
    fn has(&self, rule: &str, day: i32, group: &str) -> bool {
        self.0
            .contains_key(&(rule.to_string(), day, group.to_string()))
    }

    /// How many groups new that day the batch holds for `rule`.
    fn new_groups(&self, rule: &str, day: i32) -> usize {
        (self.0.iter())
            .filter(|((r, d, _), c)| r == rule && *d == day && !c.stored)
            .count()
    }

    /// Writes every row of the batch.
    pub(super) fn flush(&mut self, txn: &redb::WriteTransaction) -> Result<(), StoreError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut days = txn.open_table(DAYS).map_err(err)?;
        for ((rule, day, group), cached) in self.0.drain() {
            days.insert(
                (rule.as_str(), day, group.as_str()),
                cached.row.encode().as_slice(),
            )
            .map_err(err)?;
        }
        Ok(())
    }
}

/// Counts `c` (see `Batch::aggregate`); its day rows are written by [`Rows::flush`].
pub(super) fn count(
    txn: &redb::WriteTransaction,
    rows: &mut Rows,
    c: &Counted,
) -> Result<bool, StoreError> {
    let (who, rule) = (c.distinct_id.as_str(), c.rule.as_str());
    let mut members = txn.open_table(MEMBERS).map_err(err)?;
    let member = members.get((who, rule)).map_err(err)?.map(|m| {
        let (group, converted, last) = m.value();
        (group.to_string(), converted, last)
    });
    let Some(group) = c.group.clone().or(member.as_ref().map(|m| m.0.clone())) else {
        return Ok(false);
    };
    let days = txn.open_table(DAYS).map_err(err)?;
    let group = bounded_group(&days, rows, rule, c.day, group)?;
    let hash = user_hash(who);

    let mut users = txn.open_table(USERS).map_err(err)?;
    let row = rows.get(&days, rule, c.day, &group)?;
    row.events += 1;
    add_user(&mut users, row, (rule, c.day, &group), hash)?;

    // The person's group is the group of their first counted event.
    let new_member = member.is_none();
    let (member_group, mut converted, last_day) = member.unwrap_or((group.clone(), None, c.day));
    let converts = c.conversion && converted.is_none();
    if converts {
        converted = Some(c.day);
        // Counted in their group, where they are a user that day too (an event whose field
        // says another group counts in that one): no group converts more people than it has.
        let theirs = bounded_group(&days, rows, rule, c.day, member_group.clone())?;
        let row = rows.get(&days, rule, c.day, &theirs)?;
        row.conversions += 1;
        add_user(&mut users, row, (rule, c.day, &theirs), hash)?;
    }

    let seen_day = last_day.max(c.day);
    if new_member || converts || seen_day != last_day {
        members
            .insert((who, rule), (member_group.as_str(), converted, seen_day))
            .map_err(err)?;
        let mut by_day = txn.open_table(MEMBERS_BY_DAY).map_err(err)?;
        by_day.remove((rule, last_day, who)).map_err(err)?;
        by_day.insert((rule, seen_day, who), ()).map_err(err)?;
    }
    let mut rules = txn.open_table(RULES).map_err(err)?;
    if rules.get(rule).map_err(err)?.map(|k| k.value()) != Some(c.keep_days) {
        rules.insert(rule, c.keep_days).map_err(err)?;
    }
    Ok(true)
}

/// Adds the person `hash` to the users of `row` (rule, day, group): its sketch, and its exact
/// set while it has room.
fn add_user(
    users: &mut redb::Table<(&'static str, i32, &'static str, u64), ()>,
    row: &mut DayRow,
    (rule, day, group): (&str, i32, &str),
    hash: u64,
) -> Result<(), StoreError> {
    row.sketch.insert_hash(hash);
    if row.overflowed || users.get((rule, day, group, hash)).map_err(err)?.is_some() {
        return Ok(());
    }
    if row.exact < EXACT_PER_DAY {
        users.insert((rule, day, group, hash), ()).map_err(err)?;
        row.exact += 1;
    } else {
        row.overflowed = true;
    }
    Ok(())
}

/// `group`, or [`OTHER_GROUP`] when the rule already counts [`MAX_GROUPS_PER_DAY`] groups that
/// day (looked at only for a group new that day).
fn bounded_group(
    days: &impl ReadableTable<(&'static str, i32, &'static str), &'static [u8]>,
    rows: &Rows,
    rule: &str,
    day: i32,
    group: String,
) -> Result<String, StoreError> {
    if rows.has(rule, day, &group)
        || days
            .get((rule, day, group.as_str()))
            .map_err(err)?
            .is_some()
    {
        return Ok(group);
    }
    let stored = days
        .range((rule, day, "")..=(rule, day, "\u{10ffff}"))
        .map_err(err)?
        .take(MAX_GROUPS_PER_DAY)
        .count();
    Ok(
        if stored + rows.new_groups(rule, day) >= MAX_GROUPS_PER_DAY {
            OTHER_GROUP.to_string()
        } else {
            group
        },
    )
}

/// The rows of `rule` from day `from` to day `to`, in day order, with their users' hashes when
/// the range can be counted exactly (see [`exact_fits`]).
pub(super) fn range(
    txn: &redb::ReadTransaction,
    rule: &str,
    from: i32,
    to: i32,
) -> Result<Vec<DayData>, StoreError> {
    let days = txn.open_table(DAYS).map_err(err)?;
    let mut rows = Vec::new();
    for entry in days
        .range((rule, from, "")..=(rule, to, "\u{10ffff}"))
        .map_err(err)?
    {
        let (k, v) = entry.map_err(err)?;
        let (_, day, group) = k.value();
        rows.push(DayData {
            day,
            group: group.to_string(),
            row: DayRow::decode(v.value()).map_err(StoreError::Unavailable)?,
            users: None,
        });
    }
    if exact_fits(rows.iter().map(|d| &d.row)) {
        let users = txn.open_table(USERS).map_err(err)?;
        for d in &mut rows {
            let range =
                (rule, d.day, d.group.as_str(), 0)..=(rule, d.day, d.group.as_str(), u64::MAX);
            let hashes = users.range(range).map_err(err)?;
            d.users = Some(
                hashes
                    .map(|r| r.map(|(k, _)| k.value().3).map_err(err))
                    .collect::<Result<_, _>>()?,
            );
        }
    }
    Ok(rows)
}

/// The groups `who` is counted in, by rule.
pub(super) fn memberships(
    txn: &redb::ReadTransaction,
    who: &str,
) -> Result<Vec<Membership>, StoreError> {
    let members = txn.open_table(MEMBERS).map_err(err)?;
    members
        .range((who, "")..=(who, "\u{10ffff}"))
        .map_err(err)?
        .map(|row| {
            let (k, v) = row.map_err(err)?;
            let (group, converted, _) = v.value();
            Ok(Membership {
                rule: k.value().1.to_string(),
                group: group.to_string(),
                converted,
            })
        })
        .collect()
}

/// Forgets which group `who` is in and whether they converted, for every rule, and takes them
/// out of the exact users of every day they were counted on (a day that kept its users exactly
/// has its sketch made again from those left, so that it holds nothing of them either); returns
/// how many rules had them. Events and conversions stay, as numbers.
pub(super) fn forget_member(
    txn: &redb::WriteTransaction,
    rows: &mut Rows,
    who: &str,
) -> Result<u64, StoreError> {
    rows.flush(txn)?;
    let mut members = txn.open_table(MEMBERS).map_err(err)?;
    let mut by_day = txn.open_table(MEMBERS_BY_DAY).map_err(err)?;
    let theirs: Vec<(String, i32)> = members
        .range((who, "")..=(who, "\u{10ffff}"))
        .map_err(err)?
        .map(|row| {
            let (k, v) = row.map_err(err)?;
            Ok((k.value().1.to_string(), v.value().2))
        })
        .collect::<Result<_, StoreError>>()?;
    for (rule, last) in &theirs {
        members.remove((who, rule.as_str())).map_err(err)?;
        by_day.remove((rule.as_str(), *last, who)).map_err(err)?;
    }
    let hash = user_hash(who);
    let counted = kept_rules(&txn.open_table(RULES).map_err(err)?)?;
    let mut days = txn.open_table(DAYS).map_err(err)?;
    let mut users = txn.open_table(USERS).map_err(err)?;
    for (rule, _) in &counted {
        let rule = rule.as_str();
        let keys: Vec<(i32, String)> = days
            .range((rule, i32::MIN, "")..=(rule, i32::MAX, "\u{10ffff}"))
            .map_err(err)?
            .map(|r| {
                r.map(|(k, _)| (k.value().1, k.value().2.to_string()))
                    .map_err(err)
            })
            .collect::<Result<_, _>>()?;
        for (day, group) in &keys {
            let group = group.as_str();
            if users
                .remove((rule, *day, group, hash))
                .map_err(err)?
                .is_none()
            {
                continue;
            }
            let mut row = read_row(&days, rule, *day, group)?;
            row.exact = row.exact.saturating_sub(1);
            if !row.overflowed {
                row.sketch = Sketch::new();
                for h in users
                    .range((rule, *day, group, 0)..=(rule, *day, group, u64::MAX))
                    .map_err(err)?
                {
                    row.sketch.insert_hash(h.map_err(err)?.0.value().3);
                }
            }
            days.insert((rule, *day, group), row.encode().as_slice())
                .map_err(err)?;
        }
    }
    Ok(theirs.len() as u64)
}

fn read_row(
    days: &impl ReadableTable<(&'static str, i32, &'static str), &'static [u8]>,
    rule: &str,
    day: i32,
    group: &str,
) -> Result<DayRow, StoreError> {
    match days.get((rule, day, group)).map_err(err)? {
        Some(bytes) => DayRow::decode(bytes.value()).map_err(StoreError::Unavailable),
        None => Ok(DayRow::default()),
    }
}

/// Every rule with counts kept (some perhaps removed from the rule files since).
pub(super) fn rules(txn: &redb::ReadTransaction) -> Result<Vec<String>, StoreError> {
    let rules = kept_rules(&txn.open_table(RULES).map_err(err)?)?;
    Ok(rules.into_iter().map(|(rule, _)| rule).collect())
}

/// Forgets, for each rule, at most `max` days (with their users) and people last counted before
/// `today` less the days the rule keeps; returns how many rows went.
pub(super) fn expire(
    txn: &redb::WriteTransaction,
    rows: &mut Rows,
    today: i32,
    max: usize,
) -> Result<usize, StoreError> {
    // A row the batch changed may be one that goes.
    rows.flush(txn)?;
    let rules = kept_rules(&txn.open_table(RULES).map_err(err)?)?;
    let mut days = txn.open_table(DAYS).map_err(err)?;
    let mut users = txn.open_table(USERS).map_err(err)?;
    let mut members = txn.open_table(MEMBERS).map_err(err)?;
    let mut by_day = txn.open_table(MEMBERS_BY_DAY).map_err(err)?;
    let mut gone = 0;
    for (rule, keep_days) in &rules {
        let rule = rule.as_str();
        let cutoff = today.saturating_sub(i32::try_from(*keep_days).unwrap_or(i32::MAX));
        let old = before(&days, rule, cutoff, max - gone)?;
        for (day, group) in &old {
            let group = group.as_str();
            let hashes: Vec<u64> = users
                .range((rule, *day, group, 0)..=(rule, *day, group, u64::MAX))
                .map_err(err)?
                .take(max - gone)
                .map(|r| r.map(|(k, _)| k.value().3).map_err(err))
                .collect::<Result<_, _>>()?;
            for h in &hashes {
                users.remove((rule, *day, group, *h)).map_err(err)?;
            }
            gone += hashes.len();
            if gone >= max {
                return Ok(gone);
            }
            // Its users are all gone: the row goes too.
            days.remove((rule, *day, group)).map_err(err)?;
            gone += 1;
        }
        let people = before(&by_day, rule, cutoff, max - gone)?;
        for (day, who) in &people {
            by_day.remove((rule, *day, who.as_str())).map_err(err)?;
            members.remove((who.as_str(), rule)).map_err(err)?;
        }
        gone += people.len();
        if gone >= max {
            return Ok(gone);
        }
    }
    Ok(gone)
}

/// At most `take` keys (rule, day, text) of `table` for `rule` before day `cutoff`: the day and
/// the text (a group, a person).
fn before<V: redb::Value + 'static>(
    table: &impl ReadableTable<(&'static str, i32, &'static str), V>,
    rule: &str,
    cutoff: i32,
    take: usize,
) -> Result<Vec<(i32, String)>, StoreError> {
    table
        .range((rule, i32::MIN, "")..(rule, cutoff, ""))
        .map_err(err)?
        .take(take)
        .map(|r| {
            r.map(|(k, _)| (k.value().1, k.value().2.to_string()))
                .map_err(err)
        })
        .collect()
}

/// Every rule with counts, and how many days it keeps them.
fn kept_rules(
    table: &impl ReadableTable<&'static str, u32>,
) -> Result<Vec<(String, u32)>, StoreError> {
    table
        .iter()
        .map_err(err)?
        .map(|r| {
            r.map(|(k, v)| (k.value().to_string(), v.value()))
                .map_err(err)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::store::Backend;
    use crate::store::aggregates::{
        Counted, EXACT_PER_DAY, MAX_GROUPS_PER_DAY, OTHER_GROUP, summarize,
    };
    use crate::store::redb::Db;

    fn event(who: &str, day: i32, group: Option<&str>, conversion: bool) -> Counted {
        Counted {
            rule: "ab".into(),
            distinct_id: who.into(),
            day,
            group: group.map(Into::into),
            conversion,
            keep_days: 30,
        }
    }

    /// Counts each of `events` in one batch; returns whether each was counted.
    fn count(db: &Db, events: &[Counted]) -> Vec<bool> {
        let mut txn = db.begin().unwrap();
        let done = events.iter().map(|c| txn.aggregate(c).unwrap()).collect();
        txn.commit().unwrap();
        done
    }

    #[test]
    fn a_person_converts_once_in_the_group_of_their_first_event() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let done = count(
            &db,
            &[
                event("dana", 100, Some("A"), false),
                event("dana", 100, Some("A"), false),
                event("lee", 100, Some("B"), false),
                // No group on the event: the person's.
                event("dana", 101, None, false),
                // A stranger without a group is not counted.
                event("sam", 101, None, true),
                // Dana converts on an event that says B: it counts for A, once.
                event("dana", 102, Some("B"), true),
                event("dana", 102, None, true),
            ],
        );
        assert_eq!(done, [true, true, true, true, false, true, true]);
        let s = summarize(&db.aggregates("ab", 0, 1000).unwrap());
        assert!(s.exact);
        assert_eq!((s.all.events, s.all.users, s.all.conversions), (6, 2, 1));
        assert_eq!((s.groups["A"].events, s.groups["A"].users), (4, 1));
        assert_eq!(s.groups["A"].conversions, 1);
        // Dana's B event counts in B's events and users, her conversion in A.
        assert_eq!((s.groups["B"].events, s.groups["B"].users), (2, 2));
        assert_eq!(s.groups["B"].conversions, 0);
        assert_eq!(s.days.len(), 3);
        let day_102 = summarize(&db.aggregates("ab", 102, 102).unwrap());
        assert_eq!(day_102.groups["A"].conversions, 1);
        assert_eq!(day_102.groups["A"].events, 1);

        // Her conversion, told B by its event, counts in A, where she is a user that day too.
        assert_eq!(day_102.groups["A"].users, 1);

        let dana = db.person("dana").unwrap().groups;
        assert_eq!((dana.len(), dana[0].group.as_str()), (1, "A"));
        assert_eq!(dana[0].converted, Some(102));
        let mut txn = db.begin().unwrap();
        assert_eq!(txn.forget_person("dana").unwrap().groups, 1);
        txn.commit().unwrap();
        assert!(db.person("dana").unwrap().groups.is_empty());
        // Out of every day's users, exact sets and sketches alike; her events stay.
        let rows = db.aggregates("ab", 0, 1000).unwrap();
        let s = summarize(&rows);
        assert_eq!((s.all.users, s.all.events, s.all.conversions), (1, 6, 1));
        assert!(
            rows.iter()
                .all(|d| d.row.exact as usize == d.users.as_ref().unwrap().len())
        );
        assert!(
            rows.iter()
                .all(|d| d.row.sketch.estimate() == d.row.exact as usize)
        );
        // Forgotten, she starts again: her next event's group is hers.
        count(&db, &[event("dana", 103, Some("B"), true)]);
        assert_eq!(db.person("dana").unwrap().groups[0].group, "B");
    }

    #[test]
    fn a_crowded_day_is_estimated_and_endless_groups_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let n = EXACT_PER_DAY as usize + 500;
        let crowd: Vec<Counted> = (0..n)
            .map(|i| event(&format!("u{i}"), 5, Some("A"), false))
            .collect();
        count(&db, &crowd);
        let rows = db.aggregates("ab", 5, 5).unwrap();
        assert!(rows[0].row.overflowed && rows[0].users.is_none());
        let s = summarize(&rows);
        assert!(!s.exact);
        let error = (s.all.users as f64 - n as f64).abs() / n as f64;
        assert!(error < 0.05, "{} estimated for {n}", s.all.users);
        assert_eq!(s.all.events, n as u64);

        let groups: Vec<Counted> = (0..MAX_GROUPS_PER_DAY + 5)
            .map(|i| event(&format!("g{i}"), 6, Some(&format!("v{i}")), false))
            .collect();
        count(&db, &groups);
        let s = summarize(&db.aggregates("ab", 6, 6).unwrap());
        assert_eq!(s.groups.len(), MAX_GROUPS_PER_DAY + 1);
        assert_eq!(s.groups[OTHER_GROUP].users, 5);
    }

    #[test]
    fn days_and_people_older_than_the_rule_keeps_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        count(
            &db,
            &[
                event("old", 100, Some("A"), false),
                event("both", 100, Some("A"), false),
                event("both", 125, Some("A"), false),
            ],
        );
        let mut txn = db.begin().unwrap();
        // Day 135 keeps days from 105 on: day 100 (its row and 2 users) and "old" go.
        let gone = txn.expire_aggregates(135, 1000).unwrap();
        txn.commit().unwrap();
        assert_eq!(gone, 2 + 1 + 1);
        let s = summarize(&db.aggregates("ab", 0, 1000).unwrap());
        assert_eq!((s.first_day, s.all.users), (Some(125), 1));
        assert!(db.person("old").unwrap().groups.is_empty());
        assert_eq!(db.person("both").unwrap().groups.len(), 1);
        // Bounded: one row at a time.
        let mut txn = db.begin().unwrap();
        assert_eq!(txn.expire_aggregates(1000, 1).unwrap(), 1);
    }
}
