//! One PostgreSQL transaction as a [`Batch`]. Reads that decide something are sent at once
//! (the batch's state in one round trip: locks, uuids, keys, waits, counts); writes are kept and
//! sent with the commit, in one round trip. Locks are taken in one order by every batch: the
//! advisory locks of keys and uuids (sorted, at each load), then the rows numbering output
//! files' lines (files in name order), then `[aggregate]` locks, then the rows written at
//! commit; so instances wait for each other without deadlocking, except when a batch loads more
//! keys after another batch took them (PostgreSQL breaks it; the batch is run again).

use deadpool_postgres::Object;
use futures_util::FutureExt;
use std::collections::HashMap;
use std::sync::Arc;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::aggregates::{self, Counting};
use super::{
    Params, Shared, boxed, decode, json_err, leaving_theirs, lock_id, outbox_record, pg, pipelined,
};
use crate::explain::KEEP;
use crate::store::aggregates::Counted;
use crate::store::queue::{OutboxRecord, Retry, Status};
use crate::store::remembered::{Remembered, Stored};
use crate::store::{
    Batch, Erased, KeyRecord, Pending, Person, RuleState, State, StateKey, StoreError, Wants,
};

/// The most finished deliveries kept of each kind (delivered, failed for good), as in redb.
use crate::store::redb::{KEEP_FAILED, KEEP_FINISHED};

/// Below this many keys to look at, idle keys are left to the minute's tick: PostgreSQL finds
/// them by their day's index, so one pass a minute costs less than a statement per batch.
const IDLE_KEYS_PER_TICK: usize = 1000;

const DAY: u64 = 86_400;

/// The due waits this instance may end, soonest first (see `Backend::running`).
static DUE_WAITS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    leaving_theirs(
        "SELECT key, wait FROM waits WHERE deadline_ms <= $1 AND THEIRS_LEFT \
         ORDER BY deadline_ms LIMIT $2",
        3,
        4,
    )
});

pub(super) struct PgBatch {
    shared: Arc<Shared>,
    /// The connection, until the batch is committed or dropped.
    client: Option<Object>,
    /// Whether `BEGIN` was sent.
    begun: bool,
    /// Each rule's number of pending waits as loaded: the batch writes the difference, so that
    /// instances starting waits of one rule at once add up.
    waiting_loaded: HashMap<String, i64>,
    /// Output files whose progress the batch records, sent first with the commit.
    files: Vec<(&'static str, Params)>,
    /// The other writes, sent with the commit.
    later: Vec<(&'static str, Params)>,
    /// Records of `explain`: uuids, whose, records.
    explained: (Vec<String>, Vec<String>, Vec<String>),
    /// Whether finished deliveries were added, delivered or failed: the history is trimmed.
    finished: [bool; 2],
    /// Events of `[aggregate]` rules, counted when the batch commits.
    counting: Counting,
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl PgBatch {
    pub(super) fn new(shared: Arc<Shared>, client: Object) -> PgBatch {
        PgBatch {
            shared,
            client: Some(client),
            begun: false,
            waiting_loaded: HashMap::new(),
            files: Vec::new(),
            later: Vec::new(),
            explained: Default::default(),
            finished: [false; 2],
            counting: Counting::default(),
        }
    }

    /// Sends `statements` at once (after `BEGIN`, the first time) and returns their rows.
    fn send(&mut self, statements: &[(&str, Params)]) -> Result<Vec<Vec<Row>>, StoreError> {
        let begin = !self.begun;
        self.begun = true;
        let client = self.client.as_ref().expect("a batch has its connection");
        self.shared.block_on(send(client, begin, statements, false))
    }

    /// Sends one statement (see [`PgBatch::send`]).
    fn one(&mut self, sql: &'static str, params: Params) -> Result<Vec<Row>, StoreError> {
        Ok(self.send(&[(sql, params)])?.remove(0))
    }

    /// The next delivery id: from the block this instance took, or a new block.
    fn next_id(&mut self) -> Result<u64, StoreError> {
        {
            let ids = self.shared.ids.lock().unwrap_or_else(|e| e.into_inner());
            if ids.0 < ids.1 {
                let mut ids = ids;
                ids.0 += 1;
                return Ok((ids.0 - 1) as u64);
            }
        }
        let rows = self.one("SELECT nextval('delivery_id_blocks')", Vec::new())?;
        let block: i64 = rows[0].get(0);
        let mut ids = self.shared.ids.lock().unwrap_or_else(|e| e.into_inner());
        *ids = (block * super::ID_BLOCK + 1, (block + 1) * super::ID_BLOCK);
        Ok((block * super::ID_BLOCK) as u64)
    }

    /// Forgets `who`'s group in every `[aggregate]` rule and takes them out of the users of
    /// every day they were counted on (see [`aggregates::without_user`]), with those days
    /// locked as counting locks them; returns how many rules had them.
    fn forget_member(&mut self, who: &str) -> Result<u64, StoreError> {
        let hash = crate::store::aggregates::user_hash(who) as i64;
        let listed = self.send(&[
            (
                "SELECT DISTINCT rule, day FROM aggregate_users WHERE hash = $1",
                vec![boxed(hash)],
            ),
            (
                "SELECT rule FROM aggregate_members WHERE who = $1",
                vec![boxed(who.to_string())],
            ),
        ])?;
        // The locks counting takes: a batch counting them now commits first.
        let days = listed[0].iter().map(|r| {
            let (rule, day): (String, i32) = (r.get(0), r.get(1));
            lock_id("aggregate day", &format!("{rule}\u{1f}{day}"))
        });
        let members = listed[1].iter().map(|r| {
            let rule: String = r.get(0);
            lock_id("aggregate member", &format!("{who}\u{1f}{rule}"))
        });
        let mut locks: Vec<i64> = days.chain(members).collect();
        locks.sort_unstable();
        locks.dedup();
        let rows = self.send(&[
            (
                "SELECT pg_advisory_xact_lock(id) FROM unnest($1::int8[]) AS id",
                vec![boxed(locks)],
            ),
            (
                "DELETE FROM aggregate_members WHERE who = $1 RETURNING 1",
                vec![boxed(who.to_string())],
            ),
            (
                "WITH gone AS (DELETE FROM aggregate_users WHERE hash = $1 \
                 RETURNING rule, day, grp) \
                 SELECT d.rule, d.day, d.grp, d.row_data, array(SELECT u.hash \
                 FROM aggregate_users u WHERE u.rule = d.rule AND u.day = d.day \
                 AND u.grp = d.grp AND u.hash <> $1) \
                 FROM aggregate_days d JOIN gone g \
                 ON d.rule = g.rule AND d.day = g.day AND d.grp = g.grp",
                vec![boxed(hash)],
            ),
        ])?;
        let rewrites = aggregates::without_user(&rows[2])?;
        self.later.extend(rewrites);
        Ok(rows[1].len() as u64)
    }

    fn put_finished(&mut self, id: u64, record: &OutboxRecord) -> Result<(), StoreError> {
        let failed = record.status == Status::Failed;
        self.finished[usize::from(failed)] = true;
        let json = serde_json::to_string(record).map_err(json_err)?;
        self.later.push((
            "INSERT INTO outbox_done (id, failed, person, record) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET failed = EXCLUDED.failed, record = EXCLUDED.record, \
             done_at = EXCLUDED.done_at",
            vec![
                boxed(int(id)),
                boxed(failed),
                boxed(record.person.clone()),
                boxed(json),
            ],
        ));
        Ok(())
    }

    fn put_pending(&mut self, id: u64, record: &OutboxRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).map_err(json_err)?;
        self.later.push((
            "INSERT INTO outbox (id, lane, next_attempt_unix, person, record) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET lane = EXCLUDED.lane, \
             next_attempt_unix = EXCLUDED.next_attempt_unix, record = EXCLUDED.record, \
             claimed_by = NULL",
            vec![
                boxed(int(id)),
                boxed(record.lane().key()),
                boxed(int(record.next_attempt_unix)),
                boxed(record.person.clone()),
                boxed(json),
            ],
        ));
        Ok(())
    }
}

/// Sends `statements` on `client` at once, after `BEGIN` if `begin` and before `COMMIT` if
/// `commit`, and returns the rows of each of `statements`.
async fn send(
    client: &Object,
    begin: bool,
    statements: &[(&str, Params)],
    commit: bool,
) -> Result<Vec<Vec<Row>>, StoreError> {
    let mut prepared = Vec::with_capacity(statements.len() + 2);
    if begin {
        // Each statement reads what was committed before it: a uuid read after its lock is
        // seen handled by the instance that held the lock (whatever the server's default).
        let begin = "BEGIN ISOLATION LEVEL READ COMMITTED";
        prepared.push(client.prepare_cached(begin).await.map_err(pg)?);
    }
    for (sql, _) in statements {
        prepared.push(client.prepare_cached(sql).await.map_err(pg)?);
    }
    if commit {
        prepared.push(client.prepare_cached("COMMIT").await.map_err(pg)?);
    }
    let none: Vec<&(dyn ToSql + Sync)> = Vec::new();
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = statements
        .iter()
        .map(|(_, p)| {
            p.iter()
                .map(|b| b.as_ref() as &(dyn ToSql + Sync))
                .collect()
        })
        .collect();
    let all_params = (begin.then_some(&none).into_iter())
        .chain(params.iter())
        .chain(commit.then_some(&none));
    let futures = prepared
        .iter()
        .zip(all_params)
        .map(|(statement, params)| client.query(statement, params).boxed())
        .collect();
    let mut rows = pipelined(futures).await?;
    if commit {
        rows.pop();
    }
    if begin {
        rows.remove(0);
    }
    Ok(rows)
}

impl Drop for PgBatch {
    /// A batch dropped without its commit is rolled back before its connection is used again.
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if !self.begun {
            return;
        }
        if let Some(runtime) = &self.shared.runtime {
            runtime.spawn(async move {
                if client.batch_execute("ROLLBACK").await.is_err() {
                    // Not back into the pool: its transaction state is unknown.
                    drop(Object::take(client));
                }
            });
        }
    }
}

/// The times of a window as a PostgreSQL array literal, for `unnest` (which cannot take an
/// array of arrays of different lengths).
fn times_literal(times: &[i64]) -> String {
    let inner: Vec<String> = times.iter().map(i64::to_string).collect();
    format!("{{{}}}", inner.join(","))
}

impl RuleState for PgBatch {
    fn load(&mut self, wants: &Wants) -> Result<State, StoreError> {
        let mut locks: Vec<i64> = (wants.keys.iter().chain(&wants.waits))
            .map(|k| lock_id("key", k.as_str()))
            .chain(wants.uuids.iter().map(|u| lock_id("uuid", u)))
            .collect();
        locks.sort_unstable();
        locks.dedup();
        let text = |v: Vec<String>| boxed(v);
        let keys: Vec<String> = wants.keys.iter().map(|k| k.as_str().to_string()).collect();
        let waits: Vec<String> = wants.waits.iter().map(|k| k.as_str().to_string()).collect();
        let uuids: Vec<String> = wants.uuids.iter().map(|u| u.to_string()).collect();
        let rules: Vec<String> = wants.waiting.iter().map(|r| r.to_string()).collect();
        let statements = [
            // In order, so that two batches wanting the same ones never wait for each other
            // both ways.
            (
                "SELECT pg_advisory_xact_lock(id) FROM unnest($1::int8[]) AS id",
                vec![boxed(locks)],
            ),
            (
                "SELECT uuid FROM seen WHERE uuid = ANY($1)",
                vec![text(uuids)],
            ),
            (
                "SELECT key, count, times, acted_ms, day FROM keys WHERE key = ANY($1)",
                vec![text(keys)],
            ),
            (
                "SELECT key, wait FROM waits WHERE key = ANY($1)",
                vec![text(waits)],
            ),
            (
                "SELECT rule, n FROM waiting WHERE rule = ANY($1)",
                vec![text(rules)],
            ),
        ];
        let rows = self.send(&statements)?;
        let mut state = State::default();
        for row in &rows[1] {
            state.load_seen(row.get(0));
        }
        for row in &rows[2] {
            state.load_key(&StateKey::stored(row.get(0)), key_record(row));
        }
        for row in &rows[3] {
            let wait: Pending = decode(row.get(1))?;
            state.load_wait(&StateKey::stored(row.get(0)), wait);
        }
        let mut counts: HashMap<String, i64> = HashMap::new();
        for row in &rows[4] {
            counts.insert(row.get(0), row.get(1));
        }
        for rule in &wants.waiting {
            let n = counts.get(*rule).copied().unwrap_or(0);
            state.load_waiting(rule, n.max(0) as u64);
            self.waiting_loaded.entry(rule.to_string()).or_insert(n);
        }
        Ok(state)
    }

    /// Due waits another instance is ending now are left to it: each is claimed with a lock
    /// that is not waited for (`pg_try_advisory_xact_lock`), the same the batch's load takes.
    fn due_waits(
        &mut self,
        until_ms: i64,
        max: usize,
    ) -> Result<Vec<(StateKey, Pending)>, StoreError> {
        let rows = self.one(
            &DUE_WAITS,
            vec![
                boxed(until_ms),
                boxed(int(max as u64)),
                boxed(self.shared.instance.clone()),
                boxed(self.shared.rules()),
            ],
        )?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = rows.iter().map(|r| lock_id("key", r.get(0))).collect();
        let locked = self.one(
            "SELECT pg_try_advisory_xact_lock(id) FROM unnest($1::int8[]) AS id",
            vec![boxed(ids)],
        )?;
        let mut out = Vec::new();
        for (row, lock) in rows.iter().zip(&locked) {
            if lock.get::<_, bool>(0) {
                out.push((StateKey::stored(row.get(0)), decode(row.get(1))?));
            }
        }
        Ok(out)
    }

    fn save(&mut self, state: State, now_unix: u64) -> Result<(), StoreError> {
        let changes = state.changes();
        if !changes.seen.is_empty() {
            let seen: Vec<String> = changes.seen.iter().map(|s| s.to_string()).collect();
            self.later.push((
                "INSERT INTO seen (uuid, at_unix) SELECT u, $2 FROM unnest($1::text[]) AS u \
                 ON CONFLICT DO NOTHING",
                vec![boxed(seen), boxed(int(now_unix))],
            ));
        }
        // As in redb: a key is written when it changed, or at most once a day when an event
        // only used it (the day keeps it from being forgotten as idle).
        let today = now_unix / DAY;
        let (mut keys, mut counts, mut times, mut acted, mut owners) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for change in &changes.keys {
            if !change.changed && change.day == Some(today) {
                continue;
            }
            keys.push(change.key.as_str().to_string());
            counts.push(int(change.count));
            times.push(times_literal(change.window));
            acted.push(change.acted);
            owners.push(change.owner.map(str::to_string));
        }
        if !keys.is_empty() {
            self.later.push((
                "INSERT INTO keys (key, count, times, acted_ms, day, owner) \
                 SELECT k, c, t::int8[], a, $5, o \
                 FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[], $6::text[]) \
                 AS u(k, c, t, a, o) \
                 ON CONFLICT (key) DO UPDATE SET count = EXCLUDED.count, times = EXCLUDED.times, \
                 acted_ms = EXCLUDED.acted_ms, day = EXCLUDED.day, \
                 owner = coalesce(keys.owner, EXCLUDED.owner)",
                vec![
                    boxed(keys),
                    boxed(counts),
                    boxed(times),
                    boxed(acted),
                    boxed(int(today)),
                    boxed(owners),
                ],
            ));
        }
        let (mut set, mut rules, mut deadlines, mut owners, mut json, mut ended) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for change in &changes.waits {
            let key = change.key.as_str().to_string();
            match change.now {
                Some(wait) => {
                    // Only a wait that is this person's (its `same` values hold their id).
                    let owner = (wait.trigger.distinct_id.as_str())
                        .filter(|who| change.key.holds(who))
                        .map(str::to_string);
                    set.push(key);
                    rules.push(wait.rule.clone());
                    deadlines.push(wait.deadline_ms);
                    owners.push(owner);
                    json.push(serde_json::to_string(wait).map_err(json_err)?);
                }
                None => ended.push(key),
            }
        }
        if !set.is_empty() {
            self.later.push((
                "INSERT INTO waits (key, rule, deadline_ms, owner, wait) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[]) \
                 ON CONFLICT (key) DO UPDATE SET rule = EXCLUDED.rule, \
                 deadline_ms = EXCLUDED.deadline_ms, owner = EXCLUDED.owner, wait = EXCLUDED.wait",
                vec![
                    boxed(set),
                    boxed(rules),
                    boxed(deadlines),
                    boxed(owners),
                    boxed(json),
                ],
            ));
        }
        if !ended.is_empty() {
            self.later
                .push(("DELETE FROM waits WHERE key = ANY($1)", vec![boxed(ended)]));
        }
        let mut waiting: Vec<(String, i64)> = (changes.waiting.iter())
            .map(|(rule, n)| {
                let before = self.waiting_loaded.get(*rule).copied().unwrap_or(0);
                (rule.to_string(), int(*n) - before)
            })
            .filter(|(_, by)| *by != 0)
            .collect();
        // In order, as every batch takes these rows.
        waiting.sort();
        if !waiting.is_empty() {
            let (rules, by): (Vec<String>, Vec<i64>) = waiting.into_iter().unzip();
            self.later.push((
                "INSERT INTO waiting (rule, n) SELECT * FROM unnest($1::text[], $2::int8[]) \
                 ON CONFLICT (rule) DO UPDATE SET n = waiting.n + EXCLUDED.n",
                vec![boxed(rules.clone()), boxed(by)],
            ));
            self.later.push((
                "DELETE FROM waiting WHERE rule = ANY($1) AND n <= 0",
                vec![boxed(rules)],
            ));
        }
        Ok(())
    }
}

/// A key's record as read from `SELECT key, count, times, acted_ms, day`.
fn key_record(row: &Row) -> KeyRecord {
    KeyRecord {
        count: row.get::<_, i64>(1) as u64,
        window: row.get(2),
        acted: row.get(3),
        day: row.get::<_, i64>(4) as u64,
    }
}

impl Batch for PgBatch {
    fn first_signed_delivery(
        &mut self,
        source: &str,
        id: &str,
        now_unix: u64,
    ) -> Result<bool, StoreError> {
        // Another instance handling the same id now makes this wait for its commit, then find
        // it there.
        let rows = self.one(
            "INSERT INTO delivery_ids (source, id, at_unix) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING RETURNING 1",
            vec![
                boxed(source.to_string()),
                boxed(id.to_string()),
                boxed(int(now_unix)),
            ],
        )?;
        Ok(!rows.is_empty())
    }

    fn start_file(&mut self, file: &str, len: u64) -> Result<(), StoreError> {
        self.files.push((
            "INSERT INTO jsonl_files (file, next) VALUES ($1, 1) ON CONFLICT DO NOTHING",
            vec![boxed(file.to_string())],
        ));
        self.files.push((
            "INSERT INTO jsonl_progress (file, len, applied, writer) VALUES ($1, $2, 0, $3) \
             ON CONFLICT DO NOTHING",
            vec![
                boxed(file.to_string()),
                boxed(int(len)),
                boxed(self.shared.instance.clone()),
            ],
        ));
        Ok(())
    }

    /// The file's row stays locked until the commit: batches of several instances writing one
    /// file number their lines in the order they commit (the committer gives a batch's files in
    /// order, so two batches never wait for each other's files both ways).
    fn queue_lines(&mut self, file: &str, text: &str, at_ms: i64) -> Result<u64, StoreError> {
        let rows = self.one(
            "INSERT INTO jsonl_files (file, next) VALUES ($1, 2) \
             ON CONFLICT (file) DO UPDATE SET next = jsonl_files.next + 1 RETURNING next - 1",
            vec![boxed(file.to_string())],
        )?;
        let seq: i64 = rows[0].get(0);
        self.later.push((
            "INSERT INTO jsonl_lines (file, seq, at_ms, text) VALUES ($1, $2, $3, $4)",
            vec![
                boxed(file.to_string()),
                boxed(seq),
                boxed(at_ms),
                boxed(text.to_string()),
            ],
        ));
        Ok(seq as u64)
    }

    /// Recorded only while this instance holds the file's lock: one that lost it (its
    /// connection dropped, and another instance writes the file now) records nothing more.
    fn applied(&mut self, file: &str, applied: u64, len: u64) -> Result<(), StoreError> {
        if !self.shared.holds_file(file) {
            tracing::warn!(
                file,
                "not recording how far the file is written: another instance writes it now"
            );
            return Ok(());
        }
        self.files.push((
            "INSERT INTO jsonl_progress (file, len, applied, writer) VALUES ($1, $3, $2, $4) \
             ON CONFLICT (file) DO UPDATE SET len = EXCLUDED.len, applied = EXCLUDED.applied, \
             writer = EXCLUDED.writer WHERE jsonl_progress.applied <= EXCLUDED.applied",
            vec![
                boxed(file.to_string()),
                boxed(int(applied)),
                boxed(int(len)),
                boxed(self.shared.instance.clone()),
            ],
        ));
        self.files.push((
            "DELETE FROM jsonl_lines WHERE file = $1 AND seq <= $2",
            vec![boxed(file.to_string()), boxed(int(applied))],
        ));
        Ok(())
    }

    fn queue(&mut self, record: &OutboxRecord) -> Result<u64, StoreError> {
        let id = self.next_id()?;
        self.put_pending(id, record)?;
        Ok(id)
    }

    fn record_failed(&mut self, record: &OutboxRecord) -> Result<u64, StoreError> {
        let id = self.next_id()?;
        self.put_finished(id, record)?;
        Ok(id)
    }

    /// Nothing when the delivery is no longer queued (finished by another instance, or its
    /// person forgotten meanwhile), or another instance took it over (this one's lease ran out:
    /// that one's outcome counts).
    fn update_pending(&mut self, id: u64, record: &OutboxRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).map_err(json_err)?;
        self.later.push((
            "UPDATE outbox SET next_attempt_unix = $2, record = $3, claimed_by = NULL \
             WHERE id = $1 AND (claimed_by IS NULL OR claimed_by = $4)",
            vec![
                boxed(int(id)),
                boxed(int(record.next_attempt_unix)),
                boxed(json),
                boxed(self.shared.instance.clone()),
            ],
        ));
        Ok(())
    }

    /// Nothing when the delivery is no longer queued (see `update_pending`).
    fn finish(&mut self, id: u64, record: &OutboxRecord) -> Result<(), StoreError> {
        let failed = record.status == Status::Failed;
        self.finished[usize::from(failed)] = true;
        let json = serde_json::to_string(record).map_err(json_err)?;
        self.later.push((
            "WITH gone AS (DELETE FROM outbox WHERE id = $1 \
             AND (claimed_by IS NULL OR claimed_by = $4) RETURNING id, person) \
             INSERT INTO outbox_done (id, failed, person, record) \
             SELECT id, $2, person, $3 FROM gone",
            vec![
                boxed(int(id)),
                boxed(failed),
                boxed(json),
                boxed(self.shared.instance.clone()),
            ],
        ));
        Ok(())
    }

    fn retry(&mut self, id: u64, now_unix: u64) -> Result<Retry, StoreError> {
        let rows = self.send(&[
            ("SELECT 1 FROM outbox WHERE id = $1", vec![boxed(int(id))]),
            (
                "SELECT record FROM outbox_done WHERE id = $1 FOR UPDATE",
                vec![boxed(int(id))],
            ),
        ])?;
        if !rows[0].is_empty() {
            return Ok(Retry::Pending);
        }
        let Some(row) = rows[1].first() else {
            return Ok(Retry::NotFound);
        };
        let mut record = outbox_record(row.get(0))?;
        match record.status {
            Status::Sent => return Ok(Retry::Delivered),
            Status::Pending => return Ok(Retry::Pending),
            Status::Failed if record.payload.is_empty() => return Ok(Retry::NeverMade),
            Status::Failed => {}
        }
        self.later.push((
            "DELETE FROM outbox_done WHERE id = $1",
            vec![boxed(int(id))],
        ));
        record.status = Status::Pending;
        record.finished_unix = None;
        record.next_attempt_unix = now_unix;
        record.retried_unix = Some(now_unix);
        self.put_pending(id, &record)?;
        Ok(Retry::Queued)
    }

    /// Takes the locks of the person's keys and waits first, so that a batch deciding on them
    /// now finishes before they are forgotten.
    fn forget_person(&mut self, who: &str) -> Result<Erased, StoreError> {
        let listed = self.send(&[(
            "SELECT key FROM keys WHERE owner = $1 UNION SELECT key FROM waits WHERE owner = $1",
            vec![boxed(who.to_string())],
        )])?;
        let mut locks: Vec<i64> = listed[0].iter().map(|r| lock_id("key", r.get(0))).collect();
        locks.sort_unstable();
        locks.dedup();
        let person = || boxed(who.to_string());
        let rows = self.send(&[
            (
                "SELECT pg_advisory_xact_lock(id) FROM unnest($1::int8[]) AS id",
                vec![boxed(locks)],
            ),
            (
                "DELETE FROM keys WHERE owner = $1 RETURNING 1",
                vec![person()],
            ),
            (
                "DELETE FROM waits WHERE owner = $1 RETURNING rule",
                vec![person()],
            ),
            (
                "DELETE FROM outbox WHERE person = $1 RETURNING 1",
                vec![person()],
            ),
            (
                "DELETE FROM outbox_done WHERE person = $1 RETURNING 1",
                vec![person()],
            ),
            (
                "DELETE FROM remembered WHERE who = $1 RETURNING 1",
                vec![person()],
            ),
            (
                "DELETE FROM explained WHERE who = $1 RETURNING 1",
                vec![person()],
            ),
        ])?;
        let mut ended: HashMap<String, i64> = HashMap::new();
        for row in &rows[2] {
            *ended.entry(row.get(0)).or_default() -= 1;
        }
        let mut ended: Vec<(String, i64)> = ended.into_iter().collect();
        ended.sort();
        if !ended.is_empty() {
            let (rules, by): (Vec<String>, Vec<i64>) = ended.into_iter().unzip();
            self.later.push((
                "UPDATE waiting SET n = waiting.n + u.by \
                 FROM unnest($1::text[], $2::int8[]) AS u(rule, by) WHERE waiting.rule = u.rule",
                vec![boxed(rules.clone()), boxed(by)],
            ));
            self.later.push((
                "DELETE FROM waiting WHERE rule = ANY($1) AND n <= 0",
                vec![boxed(rules)],
            ));
        }
        Ok(Erased {
            rule_state: rows[1].len() as u64,
            pending: rows[2].len() as u64,
            deliveries: (rows[3].len() + rows[4].len()) as u64,
            remembered: rows[5].len() as u64,
            groups: self.forget_member(who)?,
            explanations: rows[6].len() as u64,
        })
    }

    fn remember(&mut self, r: &Remembered) -> Result<(), StoreError> {
        let json = serde_json::to_string(&r.entry).map_err(json_err)?;
        self.later.push((
            "INSERT INTO remembered (who, rule, at_ms, expires_ms, entry) \
             VALUES ($1, $2, $3, $4, $5)",
            vec![
                boxed(r.distinct_id.clone()),
                boxed(r.rule.clone()),
                boxed(r.at_ms),
                boxed(r.expires_ms),
                boxed(json),
            ],
        ));
        // The oldest of this rule's for this user beyond `keep_last` go.
        self.later.push((
            "DELETE FROM remembered WHERE (who, rule, at_ms, seq) IN (\
             SELECT who, rule, at_ms, seq FROM remembered WHERE who = $1 AND rule = $2 \
             ORDER BY at_ms DESC, seq DESC OFFSET $3)",
            vec![
                boxed(r.distinct_id.clone()),
                boxed(r.rule.clone()),
                boxed(int(r.keep_last)),
            ],
        ));
        Ok(())
    }

    /// Counted when the batch commits; an event without a group is counted only if its person
    /// has one (stored, or from an earlier event of the batch), which is looked up now.
    fn aggregate(&mut self, counted: &Counted) -> Result<bool, StoreError> {
        let (who, rule) = (&counted.distinct_id, &counted.rule);
        if counted.group.is_none() && !self.counting.has_group(who, rule) {
            let rows = self.one(
                "SELECT 1 FROM aggregate_members WHERE who = $1 AND rule = $2",
                vec![boxed(who.clone()), boxed(rule.clone())],
            )?;
            if rows.is_empty() {
                return Ok(false);
            }
        }
        self.counting.push(counted.clone());
        Ok(true)
    }

    fn expire_aggregates(&mut self, today: i32, max: usize) -> Result<usize, StoreError> {
        let limit = int(max as u64);
        let params = || vec![boxed(today), boxed(limit)];
        let rows = self.send(&[
            (
                "DELETE FROM aggregate_users WHERE ctid IN (SELECT u.ctid FROM aggregate_users u \
                 JOIN aggregate_rules r ON u.rule = r.rule WHERE u.day < $1::int4 - r.keep_days \
                 LIMIT $2 FOR UPDATE OF u SKIP LOCKED) RETURNING 1",
                params(),
            ),
            // A day goes once its users are gone.
            (
                "DELETE FROM aggregate_days WHERE ctid IN (SELECT d.ctid FROM aggregate_days d \
                 JOIN aggregate_rules r ON d.rule = r.rule WHERE d.day < $1::int4 - r.keep_days \
                 AND NOT EXISTS (SELECT 1 FROM aggregate_users u \
                 WHERE u.rule = d.rule AND u.day = d.day AND u.grp = d.grp) \
                 LIMIT $2 FOR UPDATE OF d SKIP LOCKED) RETURNING 1",
                params(),
            ),
            (
                "DELETE FROM aggregate_members WHERE ctid IN (SELECT m.ctid \
                 FROM aggregate_members m JOIN aggregate_rules r ON m.rule = r.rule \
                 WHERE m.last_day < $1::int4 - r.keep_days \
                 LIMIT $2 FOR UPDATE OF m SKIP LOCKED) RETURNING 1",
                params(),
            ),
        ])?;
        Ok(rows.iter().map(Vec::len).sum::<usize>().min(max))
    }

    fn explain(&mut self, uuid: &str, who: &str, record: &str) -> Result<(), StoreError> {
        self.explained.0.push(uuid.to_string());
        self.explained.1.push(who.to_string());
        self.explained.2.push(record.to_string());
        Ok(())
    }

    fn expire_remembered(&mut self, now_ms: i64, max: usize) -> Result<usize, StoreError> {
        let rows = self.one(
            "DELETE FROM remembered WHERE ctid IN (SELECT ctid FROM remembered \
             WHERE expires_ms < $1 LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING 1",
            vec![boxed(now_ms), boxed(int(max as u64))],
        )?;
        Ok(rows.len())
    }

    /// With the ids, the records of why rules acted beyond the newest [`KEEP`] go.
    fn expire_seen(&mut self, cutoff_unix: u64, max: usize) -> Result<usize, StoreError> {
        let (cutoff, max) = (int(cutoff_unix), int(max as u64));
        let rows = self.send(&[
            (
                "DELETE FROM seen WHERE uuid IN (SELECT uuid FROM seen WHERE at_unix < $1 \
                 LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING 1",
                vec![boxed(cutoff), boxed(max)],
            ),
            (
                "DELETE FROM delivery_ids WHERE (source, id) IN (SELECT source, id \
                 FROM delivery_ids WHERE at_unix < $1 LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING 1",
                vec![boxed(cutoff), boxed(max)],
            ),
            (
                "DELETE FROM explained WHERE seq <= (SELECT max(seq) FROM explained) - $1",
                vec![boxed(int(KEEP))],
            ),
        ])?;
        // As redb: at most `max` in all, so that a full pass says more are left.
        Ok((rows[0].len() + rows[1].len()).min(max as usize))
    }

    fn forget_idle(&mut self, cutoff_unix: u64, look_at: usize) -> Result<usize, StoreError> {
        if look_at < IDLE_KEYS_PER_TICK {
            return Ok(0);
        }
        let rows = self.one(
            "DELETE FROM keys WHERE key IN (SELECT key FROM keys WHERE day < $1 \
             LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING 1",
            vec![boxed(int(cutoff_unix / DAY)), boxed(int(look_at as u64))],
        )?;
        Ok(rows.len())
    }

    /// Not the rules whose waits this instance leaves to others (see `Backend::running`).
    fn waiting(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let client = self.client.as_ref().expect("a batch has its connection");
        let sql = leaving_theirs(
            "SELECT rule, n FROM waiting WHERE n > 0 AND THEIRS_LEFT",
            1,
            2,
        );
        let rules = self.shared.rules();
        self.shared.block_on(async {
            let rows = (client.query(&sql, &[&self.shared.instance, &rules]).await).map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
                .collect())
        })
    }

    fn drop_waits(&mut self, rule: &str, max: usize) -> Result<u64, StoreError> {
        let rows = self.one(
            "DELETE FROM waits WHERE key IN (SELECT key FROM waits WHERE rule = $1 \
             LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING 1",
            vec![boxed(rule.to_string()), boxed(int(max as u64))],
        )?;
        let dropped = rows.len() as u64;
        // Counted from the waits themselves once none is left, so a count can never stay stuck.
        self.later.push(match dropped < max as u64 {
            true => (
                "INSERT INTO waiting (rule, n) \
                 SELECT $1::text, count(*) FROM waits WHERE rule = $1::text \
                 ON CONFLICT (rule) DO UPDATE SET n = EXCLUDED.n",
                vec![boxed(rule.to_string())],
            ),
            false => (
                "UPDATE waiting SET n = n - $2 WHERE rule = $1",
                vec![boxed(rule.to_string()), boxed(int(dropped))],
            ),
        });
        self.later.push((
            "DELETE FROM waiting WHERE rule = $1 AND n <= 0",
            vec![boxed(rule.to_string())],
        ));
        Ok(dropped)
    }

    /// There is no journal with PostgreSQL (`--durability interval` is redb's).
    fn journaled(&mut self) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn set_journaled(&mut self, _seq: u64) -> Result<(), StoreError> {
        Err(StoreError::Unavailable(
            "there is no journal with PostgreSQL (--durability interval is the embedded store's)"
                .into(),
        ))
    }

    /// Sends every write kept, and the commit, at once.
    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        let mut statements = std::mem::take(&mut self.files);
        // The files' rows first, then the counts' locks: the order every batch takes them in.
        if !self.counting.is_empty() {
            let reads = self.counting.reads();
            let first = statements.len();
            statements.extend(reads);
            let rows = self.send(&statements)?;
            statements = self.counting.count(&rows[first..])?;
        }
        statements.append(&mut self.later);
        let (uuids, who, records) = std::mem::take(&mut self.explained);
        if !uuids.is_empty() {
            statements.push((
                "INSERT INTO explained (uuid, who, record) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[])",
                vec![boxed(uuids), boxed(who), boxed(records)],
            ));
        }
        for (failed, keep) in [(false, KEEP_FINISHED), (true, KEEP_FAILED)] {
            if self.finished[usize::from(failed)] {
                statements.push((
                    "DELETE FROM outbox_done WHERE failed = $1 AND done_at <= (SELECT done_at \
                     FROM outbox_done WHERE failed = $1 ORDER BY done_at DESC OFFSET $2 LIMIT 1)",
                    vec![boxed(failed), boxed(int(keep))],
                ));
            }
        }
        if statements.is_empty() && !self.begun {
            return Ok(());
        }
        let begin = !self.begun;
        // Committed or not, the connection is done with this transaction: no rollback after.
        let client = self.client.take().expect("a batch has its connection");
        let sent = self
            .shared
            .block_on(send(&client, begin, &statements, true));
        if sent.is_err() {
            // A failed statement leaves the transaction aborted: rolled back before reuse.
            self.client = Some(client);
            self.begun = true;
        }
        sent.map(drop)
    }

    fn commit_unsynced(self: Box<Self>) -> Result<(), StoreError> {
        self.commit()
    }
}

/// What the store keeps about `who` (see [`crate::store::Backend::person`]), read with
/// `client` in one round trip.
pub(super) async fn person(client: &Object, who: &str) -> Result<Person, StoreError> {
    let who = who.to_string();
    let p = || vec![boxed(who.clone())];
    let rows = send(
        client,
        false,
        &[
            (
                "SELECT key, count, times, acted_ms, day FROM keys WHERE owner = $1 ORDER BY key",
                p(),
            ),
            (
                "SELECT key, wait FROM waits WHERE owner = $1 ORDER BY key",
                p(),
            ),
            (
                "SELECT id, record FROM outbox WHERE person = $1 \
                 UNION ALL SELECT id, record FROM outbox_done WHERE person = $1 ORDER BY id",
                p(),
            ),
            (
                "SELECT at_ms, seq, expires_ms, entry FROM remembered WHERE who = $1 \
                 ORDER BY rule, at_ms, seq",
                p(),
            ),
            (
                "SELECT rule, grp, converted FROM aggregate_members WHERE who = $1 ORDER BY rule",
                p(),
            ),
        ],
        false,
    )
    .await?;
    let mut person = Person::default();
    for row in &rows[0] {
        person
            .keys
            .push((StateKey::stored(row.get(0)), key_record(row)));
    }
    for row in &rows[1] {
        person
            .waits
            .push((StateKey::stored(row.get(0)), decode(row.get(1))?));
    }
    for row in &rows[2] {
        let id: i64 = row.get(0);
        person
            .deliveries
            .push((id as u64, outbox_record(row.get(1))?));
    }
    for row in &rows[3] {
        person.remembered.push(Stored {
            at_ms: row.get(0),
            seq: row.get::<_, i64>(1) as u64,
            expires_ms: row.get(2),
            entry: decode(row.get(3))?,
        });
    }
    person.groups = aggregates::memberships(&rows[4]);
    Ok(person)
}
