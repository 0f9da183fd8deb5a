//! One redb write transaction as a [`Batch`]: rule state loaded and saved a batch at a time, the
//! delivery queue, handled ids and output lengths. Nothing is visible or durable until
//! [`Batch::commit`].

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{
    DAY, DELIVERY_IDS, DELIVERY_IDS_BY_TIME, FILES, Indexed, KEEP_FAILED, KEEP_FINISHED, KEYS,
    LINES, META, OUTBOX, OUTBOX_DONE, OUTBOX_DUE, OUTBOX_FAILED, OUTBOX_LANES, REMEMBERED,
    REMEMBERED_COUNT, REMEMBERED_EXPIRY, SEEN, SEEN_BY_TIME, USER_DELIVERIES, USER_KEYS,
    USER_RECORD, USER_WAIT, WAITING, WAITS, WAITS_DUE, err, record,
};
use super::{aggregates, explained};
use crate::store::aggregates::Counted;
use crate::store::queue::{OutboxRecord, Retry, Status};
use crate::store::remembered::Remembered;
use crate::store::{Batch, Erased, Pending, RuleState, State, StateKey, StoreError, Wants};
use std::ops::Bound;

/// One write transaction.
pub struct WriteTxn {
    pub(super) txn: redb::WriteTransaction,
    /// Set when the commit fails, so that the database is reopened before the next one.
    pub(super) failed: Arc<AtomicBool>,
    /// The last key looked at for idleness (see `forget_idle`), shared by every transaction.
    pub(super) idle_cursor: Arc<std::sync::Mutex<Option<String>>>,
    /// The first delivery id not yet durable, raised by each durable commit.
    pub(super) durable_next_id: Arc<AtomicU64>,
    /// The `[aggregate]` rows the batch changed, written when it commits.
    pub(super) aggregate_rows: aggregates::Rows,
}

impl RuleState for WriteTxn {
    fn load(&mut self, wants: &Wants) -> Result<State, StoreError> {
        let mut state = State::default();
        if !wants.uuids.is_empty() {
            let seen = self.txn.open_table(SEEN).map_err(err)?;
            for &uuid in &wants.uuids {
                if seen.get(uuid).map_err(err)?.is_some() {
                    state.load_seen(uuid);
                }
            }
        }
        if !wants.keys.is_empty() {
            let table = self.txn.open_table(KEYS).map_err(err)?;
            for &key in &wants.keys {
                if let Some(bytes) = table.get(key.as_str()).map_err(err)? {
                    // One unreadable record must not stop every batch that reaches its key: it
                    // is read as a key never used, and said so.
                    match record::decode(bytes.value()) {
                        Ok(record) => state.load_key(key, record),
                        Err(e) => tracing::error!(key = key.as_str(), "{e}; counting afresh"),
                    }
                }
            }
        }
        if !wants.waits.is_empty() {
            let table = self.txn.open_table(WAITS).map_err(err)?;
            for &key in &wants.waits {
                if let Some(json) = table.get(key.as_str()).map_err(err)? {
                    state.load_wait(key, serde_json::from_str(json.value()).map_err(err)?);
                }
            }
        }
        if !wants.waiting.is_empty() {
            let table = self.txn.open_table(WAITING).map_err(err)?;
            for &rule in &wants.waiting {
                if let Some(n) = table.get(rule).map_err(err)? {
                    state.load_waiting(rule, n.value());
                }
            }
        }
        Ok(state)
    }

    fn due_waits(
        &mut self,
        until_ms: i64,
        max: usize,
    ) -> Result<Vec<(StateKey, Pending)>, StoreError> {
        let mut due = self.txn.open_table(WAITS_DUE).map_err(err)?;
        let waits = self.txn.open_table(WAITS).map_err(err)?;
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for row in due.iter().map_err(err)?.take(max) {
            let (k, _) = row.map_err(err)?;
            let (at, key) = k.value();
            if at > until_ms {
                break;
            }
            // Written in the same transactions as the index, so the wait is there; an entry
            // without one could never end, and would keep the timer busy: it goes.
            match waits.get(key).map_err(err)? {
                Some(json) => out.push((
                    StateKey::stored(key),
                    serde_json::from_str(json.value()).map_err(err)?,
                )),
                None => stale.push((at, key.to_string())),
            }
        }
        for (at, key) in &stale {
            tracing::warn!(key, "removed a due-index entry that had no wait");
            due.remove((*at, key.as_str())).map_err(err)?;
        }
        Ok(out)
    }

    fn save(&mut self, state: State, now_unix: u64) -> Result<(), StoreError> {
        let changes = state.changes();
        if !changes.seen.is_empty() {
            let mut seen = self.txn.open_table(SEEN).map_err(err)?;
            let mut by_time = self.txn.open_table(SEEN_BY_TIME).map_err(err)?;
            for uuid in changes.seen {
                seen.insert(uuid, now_unix).map_err(err)?;
                by_time.insert((now_unix, uuid), ()).map_err(err)?;
            }
        }
        if !changes.keys.is_empty() {
            // One record per key, written when it changed, or at most once a day when an event
            // only used it (the day keeps it from being forgotten as idle).
            let today = now_unix / DAY;
            let mut table = self.txn.open_table(KEYS).map_err(err)?;
            let mut people = self.txn.open_table(USER_KEYS).map_err(err)?;
            let mut bytes = Vec::new();
            for change in &changes.keys {
                if !change.changed && change.day == Some(today) {
                    continue;
                }
                // A new key is listed as its person's (the store did not have it).
                if let (None, Some(owner)) = (change.day, change.owner) {
                    people
                        .insert((owner, change.key.as_str()), USER_RECORD)
                        .map_err(err)?;
                }
                let (count, window, acted) = (change.count, change.window, change.acted);
                record::encode(count, window, acted, today, &mut bytes);
                table
                    .insert(change.key.as_str(), bytes.as_slice())
                    .map_err(err)?;
            }
        }
        if !changes.waits.is_empty() {
            let mut waits = self.txn.open_table(WAITS).map_err(err)?;
            let mut due = self.txn.open_table(WAITS_DUE).map_err(err)?;
            for change in &changes.waits {
                let key = change.key.as_str();
                if let Some(before) = change.stored_deadline {
                    due.remove((before, key)).map_err(err)?;
                }
                match change.now {
                    Some(wait) => {
                        // Only a wait that is this person's (its `same` values hold their id);
                        // written each time it is set, so that one from before the index is
                        // listed too.
                        if let Some(who) = wait.trigger.distinct_id.as_str()
                            && change.key.holds(who)
                        {
                            (self.txn.open_table(USER_KEYS).map_err(err)?)
                                .insert((who, key), USER_WAIT)
                                .map_err(err)?;
                        }
                        let json = serde_json::to_string(wait).map_err(err)?;
                        waits.insert(key, json.as_str()).map_err(err)?;
                        due.insert((wait.deadline_ms, key), ()).map_err(err)?;
                    }
                    None => {
                        waits.remove(key).map_err(err)?;
                        unlist(&self.txn, key)?;
                    }
                }
            }
        }
        if !changes.waiting.is_empty() {
            let mut table = self.txn.open_table(WAITING).map_err(err)?;
            for (rule, n) in &changes.waiting {
                match n {
                    0 => table.remove(*rule).map_err(err)?,
                    n => table.insert(*rule, n).map_err(err)?,
                };
            }
        }
        Ok(())
    }
}

impl Batch for WriteTxn {
    fn first_signed_delivery(
        &mut self,
        source: &str,
        id: &str,
        now_unix: u64,
    ) -> Result<bool, StoreError> {
        let mut ids = self.txn.open_table(DELIVERY_IDS).map_err(err)?;
        if ids.get((source, id)).map_err(err)?.is_some() {
            return Ok(false);
        }
        ids.insert((source, id), now_unix).map_err(err)?;
        self.txn
            .open_table(DELIVERY_IDS_BY_TIME)
            .map_err(err)?
            .insert((now_unix, source, id), ())
            .map_err(err)?;
        Ok(true)
    }

    fn start_file(&mut self, file: &str, len: u64) -> Result<(), StoreError> {
        let mut table = self.txn.open_table(FILES).map_err(err)?;
        if table.get(file).map_err(err)?.is_none() {
            table.insert(file, (len, 0, 1)).map_err(err)?;
        }
        Ok(())
    }

    fn queue_lines(&mut self, file: &str, text: &str, at_ms: i64) -> Result<u64, StoreError> {
        let mut files = self.txn.open_table(FILES).map_err(err)?;
        let (len, applied, seq) = files
            .get(file)
            .map_err(err)?
            .map_or((0, 0, 1), |v| v.value());
        files.insert(file, (len, applied, seq + 1)).map_err(err)?;
        let mut lines = self.txn.open_table(LINES).map_err(err)?;
        lines.insert((file, seq), (at_ms, text)).map_err(err)?;
        Ok(seq)
    }

    fn applied(&mut self, file: &str, applied: u64, len: u64) -> Result<(), StoreError> {
        let mut files = self.txn.open_table(FILES).map_err(err)?;
        let next = files
            .get(file)
            .map_err(err)?
            .map_or(applied + 1, |v| v.value().2);
        files
            .insert(file, (len, applied, next.max(applied + 1)))
            .map_err(err)?;
        let mut lines = self.txn.open_table(LINES).map_err(err)?;
        lines
            .retain_in((file, 0)..=(file, applied), |_, _| false)
            .map_err(err)?;
        Ok(())
    }

    fn queue(&mut self, record: &OutboxRecord) -> Result<u64, StoreError> {
        let id = self.next_id()?;
        self.put_pending(id, record)?;
        if let Some(who) = &record.person {
            (self.txn.open_table(USER_DELIVERIES).map_err(err)?)
                .insert((who.as_str(), id), ())
                .map_err(err)?;
        }
        Ok(id)
    }

    fn record_failed(&mut self, record: &OutboxRecord) -> Result<u64, StoreError> {
        let id = self.next_id()?;
        self.put_finished(id, record)?;
        Ok(id)
    }

    /// Nothing when the delivery is no longer queued: the person it was for was forgotten
    /// (`forget_person`) while it was being attempted, and it must not come back.
    fn update_pending(&mut self, id: u64, record: &OutboxRecord) -> Result<(), StoreError> {
        if !self.is_queued(id)? {
            return Ok(());
        }
        self.put_pending(id, record)
    }

    /// Nothing when the delivery is no longer queued (see `update_pending`).
    fn finish(&mut self, id: u64, record: &OutboxRecord) -> Result<(), StoreError> {
        if !self.is_queued(id)? {
            return Ok(());
        }
        let mut outbox = self.txn.open_table(OUTBOX).map_err(err)?;
        let was = match outbox.remove(id).map_err(err)? {
            Some(old) => Some(Indexed::of(old.value())?),
            None => None,
        };
        drop(outbox);
        if let Some(was) = was {
            self.unindex(id, &was)?;
        }
        self.put_finished(id, record)
    }

    fn retry(&mut self, id: u64, now_unix: u64) -> Result<Retry, StoreError> {
        if self
            .txn
            .open_table(OUTBOX)
            .map_err(err)?
            .get(id)
            .map_err(err)?
            .is_some()
        {
            return Ok(Retry::Pending);
        }
        // A failure is in `outbox_failed`, or in `outbox_done` in a database from before it.
        let mut found = None;
        for table in [OUTBOX_FAILED, OUTBOX_DONE] {
            let history = self.txn.open_table(table).map_err(err)?;
            if let Some(json) = history.get(id).map_err(err)? {
                let record: OutboxRecord = serde_json::from_str(json.value()).map_err(err)?;
                found = Some((table, record));
                break;
            }
        }
        let Some((table, mut record)) = found else {
            return Ok(Retry::NotFound);
        };
        match record.status {
            Status::Sent => return Ok(Retry::Delivered),
            Status::Pending => return Ok(Retry::Pending),
            Status::Failed if record.payload.is_empty() => return Ok(Retry::NeverMade),
            Status::Failed => {}
        }
        self.txn
            .open_table(table)
            .map_err(err)?
            .remove(id)
            .map_err(err)?;
        record.status = Status::Pending;
        record.finished_unix = None;
        record.next_attempt_unix = now_unix;
        record.retried_unix = Some(now_unix);
        self.put_pending(id, &record)?;
        Ok(Retry::Queued)
    }

    fn forget_person(&mut self, who: &str) -> Result<Erased, StoreError> {
        let mut erased = Erased::default();
        let listed: Vec<(String, u8)> = {
            let index = self.txn.open_table(USER_KEYS).map_err(err)?;
            index
                .range((who, "")..=(who, "\u{10ffff}"))
                .map_err(err)?
                .map(|row| {
                    let (k, kind) = row.map_err(err)?;
                    Ok((k.value().1.to_string(), kind.value()))
                })
                .collect::<Result<_, StoreError>>()?
        };
        for (key, kind) in &listed {
            match *kind {
                USER_WAIT => {
                    if let Some(wait) = self.remove_wait(key)? {
                        let mut waiting = self.txn.open_table(WAITING).map_err(err)?;
                        let rule = wait.rule.as_str();
                        let left = (waiting.get(rule).map_err(err)?)
                            .map_or(0, |n| n.value())
                            .saturating_sub(1);
                        match left {
                            0 => waiting.remove(rule).map_err(err)?,
                            n => waiting.insert(rule, n).map_err(err)?,
                        };
                        erased.pending += 1;
                    }
                }
                _ => {
                    let removed = (self.txn.open_table(KEYS).map_err(err)?)
                        .remove(key.as_str())
                        .map_err(err)?
                        .is_some();
                    erased.rule_state += u64::from(removed);
                }
            }
        }
        (self.txn.open_table(USER_KEYS).map_err(err)?)
            .retain_in((who, "")..=(who, "\u{10ffff}"), |_, _| false)
            .map_err(err)?;
        let deliveries: Vec<u64> = {
            let index = self.txn.open_table(USER_DELIVERIES).map_err(err)?;
            index
                .range((who, 0)..=(who, u64::MAX))
                .map_err(err)?
                .map(|row| Ok(row.map_err(err)?.0.value().1))
                .collect::<Result<_, StoreError>>()?
        };
        for id in deliveries {
            let pending = (self.txn.open_table(OUTBOX).map_err(err)?)
                .remove(id)
                .map_err(err)?
                .map(|json| Indexed::of(json.value()))
                .transpose()?;
            let mut found = false;
            if let Some(was) = pending {
                self.unindex(id, &was)?;
                found = true;
            }
            for table in [OUTBOX_FAILED, OUTBOX_DONE] {
                found |= (self.txn.open_table(table).map_err(err)?)
                    .remove(id)
                    .map_err(err)?
                    .is_some();
            }
            erased.deliveries += u64::from(found);
        }
        (self.txn.open_table(USER_DELIVERIES).map_err(err)?)
            .retain_in((who, 0)..=(who, u64::MAX), |_, _| false)
            .map_err(err)?;
        let remembered: Vec<(String, i64, u64, i64)> = {
            let table = self.txn.open_table(REMEMBERED).map_err(err)?;
            table
                .range((who, "", i64::MIN, 0)..=(who, "\u{10ffff}", i64::MAX, u64::MAX))
                .map_err(err)?
                .map(|row| {
                    let (k, v) = row.map_err(err)?;
                    let (_, rule, at, seq) = k.value();
                    Ok((rule.to_string(), at, seq, v.value().0))
                })
                .collect::<Result<_, StoreError>>()?
        };
        let mut table = self.txn.open_table(REMEMBERED).map_err(err)?;
        let mut expiry = self.txn.open_table(REMEMBERED_EXPIRY).map_err(err)?;
        let mut counts = self.txn.open_table(REMEMBERED_COUNT).map_err(err)?;
        for (rule, at, seq, expires) in &remembered {
            table.remove((who, rule.as_str(), *at, *seq)).map_err(err)?;
            expiry
                .remove((*expires, who, rule.as_str(), *at, *seq))
                .map_err(err)?;
            counts.remove((who, rule.as_str())).map_err(err)?;
        }
        erased.remembered = remembered.len() as u64;
        erased.groups = aggregates::forget_member(&self.txn, &mut self.aggregate_rows, who)?;
        erased.explanations = explained::forget(&self.txn, who)?;
        Ok(erased)
    }

    fn remember(&mut self, r: &Remembered) -> Result<(), StoreError> {
        let seq = self.next_id()?;
        let json = serde_json::to_string(&r.entry).map_err(err)?;
        let (user, rule) = (r.distinct_id.as_str(), r.rule.as_str());
        let mut table = self.txn.open_table(REMEMBERED).map_err(err)?;
        let mut expiry = self.txn.open_table(REMEMBERED_EXPIRY).map_err(err)?;
        let mut counts = self.txn.open_table(REMEMBERED_COUNT).map_err(err)?;
        table
            .insert((user, rule, r.at_ms, seq), (r.expires_ms, json.as_str()))
            .map_err(err)?;
        expiry
            .insert((r.expires_ms, user, rule, r.at_ms, seq), ())
            .map_err(err)?;
        let mut count = counts
            .get((user, rule))
            .map_err(err)?
            .map_or(0, |c| c.value())
            + 1;
        // The oldest of this rule's for this user go first (the rule's rows are in time order).
        while count > r.keep_last {
            let range = (user, rule, i64::MIN, 0)..=(user, rule, i64::MAX, u64::MAX);
            let Some((at, old_seq, expires)) = (match table.range(range).map_err(err)?.next() {
                Some(row) => {
                    let (key, value) = row.map_err(err)?;
                    Some((key.value().2, key.value().3, value.value().0))
                }
                None => None,
            }) else {
                break;
            };
            table.remove((user, rule, at, old_seq)).map_err(err)?;
            expiry
                .remove((expires, user, rule, at, old_seq))
                .map_err(err)?;
            count -= 1;
        }
        counts.insert((user, rule), count).map_err(err)?;
        Ok(())
    }

    fn aggregate(&mut self, counted: &Counted) -> Result<bool, StoreError> {
        aggregates::count(&self.txn, &mut self.aggregate_rows, counted)
    }

    fn explain(&mut self, uuid: &str, who: &str, record: &str) -> Result<(), StoreError> {
        explained::keep(&self.txn, uuid, who, record)
    }

    fn expire_aggregates(&mut self, today: i32, max: usize) -> Result<usize, StoreError> {
        aggregates::expire(&self.txn, &mut self.aggregate_rows, today, max)
    }

    fn expire_remembered(&mut self, now_ms: i64, max: usize) -> Result<usize, StoreError> {
        let mut expiry = self.txn.open_table(REMEMBERED_EXPIRY).map_err(err)?;
        let gone: Vec<(i64, String, String, i64, u64)> = expiry
            .range((i64::MIN, "", "", i64::MIN, 0)..(now_ms, "", "", i64::MIN, 0))
            .map_err(err)?
            .take(max)
            .map(|row| {
                let (k, _) = row.map_err(err)?;
                let (e, user, rule, at, seq) = k.value();
                Ok((e, user.to_string(), rule.to_string(), at, seq))
            })
            .collect::<Result<_, StoreError>>()?;
        let mut table = self.txn.open_table(REMEMBERED).map_err(err)?;
        let mut counts = self.txn.open_table(REMEMBERED_COUNT).map_err(err)?;
        for (e, user, rule, at, seq) in &gone {
            expiry
                .remove((*e, user.as_str(), rule.as_str(), *at, *seq))
                .map_err(err)?;
            if table
                .remove((user.as_str(), rule.as_str(), *at, *seq))
                .map_err(err)?
                .is_some()
            {
                let left = counts
                    .get((user.as_str(), rule.as_str()))
                    .map_err(err)?
                    .map_or(0, |c| c.value())
                    .saturating_sub(1);
                if left == 0 {
                    counts.remove((user.as_str(), rule.as_str())).map_err(err)?;
                } else {
                    counts
                        .insert((user.as_str(), rule.as_str()), left)
                        .map_err(err)?;
                }
            }
        }
        Ok(gone.len())
    }

    /// Called with every batch while there are any, so a large backlog is a steady trickle, not
    /// one long transaction.
    fn expire_seen(&mut self, cutoff_unix: u64, max: usize) -> Result<usize, StoreError> {
        let mut by_time = self.txn.open_table(SEEN_BY_TIME).map_err(err)?;
        let mut seen = self.txn.open_table(SEEN).map_err(err)?;
        let mut expired = Vec::new();
        for row in by_time
            .range((0u64, "")..(cutoff_unix, ""))
            .map_err(err)?
            .take(max)
        {
            let (k, _) = row.map_err(err)?;
            let (t, uuid) = k.value();
            expired.push((t, uuid.to_string()));
        }
        for (t, uuid) in &expired {
            by_time.remove((*t, uuid.as_str())).map_err(err)?;
            seen.remove(uuid.as_str()).map_err(err)?;
        }
        let mut by_time = self.txn.open_table(DELIVERY_IDS_BY_TIME).map_err(err)?;
        let mut ids = self.txn.open_table(DELIVERY_IDS).map_err(err)?;
        let mut deliveries = Vec::new();
        for row in by_time
            .range((0u64, "", "")..(cutoff_unix, "", ""))
            .map_err(err)?
            .take(max - expired.len().min(max))
        {
            let (k, _) = row.map_err(err)?;
            let (t, source, id) = k.value();
            deliveries.push((t, source.to_string(), id.to_string()));
        }
        for (t, source, id) in &deliveries {
            by_time
                .remove((*t, source.as_str(), id.as_str()))
                .map_err(err)?;
            ids.remove((source.as_str(), id.as_str())).map_err(err)?;
        }
        Ok(expired.len() + deliveries.len())
    }

    fn forget_idle(&mut self, cutoff_unix: u64, look_at: usize) -> Result<usize, StoreError> {
        let cutoff_day = cutoff_unix / DAY;
        let mut cursor = self
            .idle_cursor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut table = self.txn.open_table(KEYS).map_err(err)?;
        let mut idle = Vec::new();
        let mut looked = 0;
        let mut last = None;
        let after = match cursor.as_deref() {
            Some(key) => Bound::Excluded(key),
            None => Bound::Unbounded,
        };
        for row in table
            .range::<&str>((after, Bound::Unbounded))
            .map_err(err)?
            .take(look_at)
        {
            let (k, v) = row.map_err(err)?;
            looked += 1;
            last = Some(k.value().to_string());
            // An unreadable record goes too (it reads as never used anyway).
            if record::day(v.value()).map_or(true, |day| day < cutoff_day) {
                idle.push(k.value().to_string());
            }
        }
        // From the start again once the end is reached.
        *cursor = if looked < look_at { None } else { last };
        for key in &idle {
            table.remove(key.as_str()).map_err(err)?;
            unlist(&self.txn, key)?;
        }
        Ok(idle.len())
    }

    fn waiting(&self) -> Result<Vec<(String, u64)>, StoreError> {
        super::waiting(&self.txn.open_table(WAITING).map_err(err)?)
    }

    fn drop_waits(&mut self, rule: &str, max: usize) -> Result<u64, StoreError> {
        let prefix = StateKey::prefix(rule, "wait");
        let mut dropped = Vec::new();
        {
            let waits = self.txn.open_table(WAITS).map_err(err)?;
            for row in waits.range(prefix.as_str()..).map_err(err)?.take(max) {
                let key = row.map_err(err)?.0.value().to_string();
                if !key.starts_with(&prefix) {
                    break;
                }
                dropped.push(key);
            }
        }
        for key in &dropped {
            self.remove_wait(key)?;
        }
        let mut waiting = self.txn.open_table(WAITING).map_err(err)?;
        let left = waiting
            .get(rule)
            .map_err(err)?
            .map_or(0, |n| n.value())
            .saturating_sub(dropped.len() as u64);
        // Counted from the waits themselves once none is left, so a count can never stay stuck.
        match left == 0 || dropped.len() < max {
            true => waiting.remove(rule).map_err(err)?,
            false => waiting.insert(rule, left).map_err(err)?,
        };
        Ok(dropped.len() as u64)
    }

    fn journaled(&mut self) -> Result<u64, StoreError> {
        let meta = self.txn.open_table(META).map_err(err)?;
        Ok(meta.get(JOURNALED).map_err(err)?.map_or(0, |v| v.value()))
    }

    fn set_journaled(&mut self, seq: u64) -> Result<(), StoreError> {
        let mut meta = self.txn.open_table(META).map_err(err)?;
        meta.insert(JOURNALED, seq).map_err(err)?;
        Ok(())
    }

    /// redb syncs before returning; the deliveries queued so far become due.
    fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let next_id = next_id(&self.txn)?;
        let durable_next_id = self.durable_next_id.clone();
        self.commit_with(redb::Durability::Immediate)?;
        durable_next_id.fetch_max(next_id, Ordering::Relaxed);
        Ok(())
    }

    /// redb keeps the commit in this process's memory until a durable one follows.
    fn commit_unsynced(self: Box<Self>) -> Result<(), StoreError> {
        self.commit_with(redb::Durability::None)
    }
}

/// Where the journal's last entry in the store is kept, in `meta`.
const JOURNALED: &str = "journaled";
/// Where the next delivery id is kept, in `meta`.
const NEXT_ID: &str = "next_email_id";

/// The id the next delivery queued in `txn` gets.
pub(super) fn next_id(txn: &redb::WriteTransaction) -> Result<u64, StoreError> {
    let meta = txn.open_table(META).map_err(err)?;
    Ok(meta.get(NEXT_ID).map_err(err)?.map_or(1, |v| v.value()))
}

/// The part of a stored delivery that says whose it is.
#[derive(serde::Deserialize)]
struct Person {
    #[serde(default)]
    person: Option<String>,
}

/// Takes `key` off the list of every person whose id is one of its values (it is gone: a wait
/// ended, an idle key forgotten), so that the person's list does not keep what no longer is.
fn unlist(txn: &redb::WriteTransaction, key: &str) -> Result<(), StoreError> {
    let values: Vec<serde_json::Value> = serde_json::from_str(key).unwrap_or_default();
    let mut people = txn.open_table(USER_KEYS).map_err(err)?;
    // A key is a JSON list: the rule, the kind, then the values.
    for who in values.iter().skip(2).filter_map(serde_json::Value::as_str) {
        people.remove((who, key)).map_err(err)?;
    }
    Ok(())
}

impl WriteTxn {
    /// Writes a finished delivery into its history, failed or delivered, keeping the newest of
    /// each (see [`KEEP_FINISHED`], [`KEEP_FAILED`]): the history is for looking at recent
    /// deliveries and retrying failures (totals are in `/metrics`), and must not grow with every
    /// event.
    fn put_finished(&mut self, id: u64, record: &OutboxRecord) -> Result<(), StoreError> {
        let (table, keep) = match record.status {
            Status::Failed => (OUTBOX_FAILED, KEEP_FAILED),
            _ => (OUTBOX_DONE, KEEP_FINISHED),
        };
        self.put_record(table, id, record)?;
        let mut history = self.txn.open_table(table).map_err(err)?;
        let mut people = self.txn.open_table(USER_DELIVERIES).map_err(err)?;
        let mut extra = history.len().map_err(err)?.saturating_sub(keep);
        while extra > 0 {
            let Some((old, json)) = history.pop_first().map_err(err)? else {
                break;
            };
            // Gone from the history, gone from its person's list.
            if let Ok(Person { person: Some(who) }) = serde_json::from_str(json.value()) {
                people.remove((who.as_str(), old.value())).map_err(err)?;
            }
            extra -= 1;
        }
        Ok(())
    }

    fn next_id(&mut self) -> Result<u64, StoreError> {
        let id = next_id(&self.txn)?;
        let mut meta = self.txn.open_table(META).map_err(err)?;
        meta.insert(NEXT_ID, id + 1).map_err(err)?;
        Ok(id)
    }

    fn commit_with(mut self, durability: redb::Durability) -> Result<(), StoreError> {
        self.aggregate_rows.flush(&self.txn)?;
        self.txn.set_durability(durability).map_err(err)?;
        let failed = self.failed;
        self.txn.commit().map_err(|e| {
            failed.store(true, Ordering::Relaxed);
            err(e)
        })
    }

    /// Writes a pending delivery and its places in the due indexes (moving it if it was there).
    fn put_pending(&mut self, id: u64, record: &OutboxRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).map_err(err)?;
        let mut outbox = self.txn.open_table(OUTBOX).map_err(err)?;
        let was = match outbox.insert(id, json.as_str()).map_err(err)? {
            Some(old) => Some(Indexed::of(old.value())?),
            None => None,
        };
        drop(outbox);
        if let Some(was) = was {
            self.unindex(id, &was)?;
        }
        let at = record.next_attempt_unix;
        (self.txn.open_table(OUTBOX_DUE).map_err(err)?)
            .insert((at, id), ())
            .map_err(err)?;
        (self.txn.open_table(OUTBOX_LANES).map_err(err)?)
            .insert((record.lane().key().as_str(), at, id), ())
            .map_err(err)?;
        Ok(())
    }

    /// Removes the pending wait at `key` from the waits, their due index and its person's list;
    /// the wait as it was, if there was one. The rule's count of waits is the caller's.
    fn remove_wait(&mut self, key: &str) -> Result<Option<Pending>, StoreError> {
        let wait = (self.txn.open_table(WAITS).map_err(err)?)
            .remove(key)
            .map_err(err)?
            .map(|json| serde_json::from_str::<Pending>(json.value()))
            .transpose()
            .map_err(err)?;
        if let Some(wait) = &wait {
            (self.txn.open_table(WAITS_DUE).map_err(err)?)
                .remove((wait.deadline_ms, key))
                .map_err(err)?;
            unlist(&self.txn, key)?;
        }
        Ok(wait)
    }

    fn is_queued(&self, id: u64) -> Result<bool, StoreError> {
        let outbox = self.txn.open_table(OUTBOX).map_err(err)?;
        Ok(outbox.get(id).map_err(err)?.is_some())
    }

    /// Removes a pending delivery, as it was stored, from the due indexes.
    fn unindex(&mut self, id: u64, was: &Indexed) -> Result<(), StoreError> {
        let at = was.next_attempt_unix;
        (self.txn.open_table(OUTBOX_DUE).map_err(err)?)
            .remove((at, id))
            .map_err(err)?;
        (self.txn.open_table(OUTBOX_LANES).map_err(err)?)
            .remove((was.lane_key().as_str(), at, id))
            .map_err(err)?;
        Ok(())
    }

    fn put_record(
        &mut self,
        table: TableDefinition<u64, &str>,
        id: u64,
        record: &OutboxRecord,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).map_err(err)?;
        self.txn
            .open_table(table)
            .map_err(err)?
            .insert(id, json.as_str())
            .map_err(err)?;
        Ok(())
    }
}
