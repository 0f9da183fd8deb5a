//! The durable state: one redb database file, `<data>/tripline.redb`.
//!
//! redb is an embedded, pure-Rust, crash-safe (copy-on-write B-trees, checksummed commits)
//! key-value store with a single writer, which is exactly the shape of group commit: one
//! committer thread applies a whole batch of requests in one write transaction and syncs once.
//!
//! Tables:
//! - `counters`: state key → count; `windows`: state key → the event times of a `[count]` with
//!   `within` (little-endian i64 milliseconds); `acted`: state key → when a rule with `[limits]`
//!   last acted (i64 milliseconds);
//! - `seen`: event uuid → unix seconds first handled, and `seen_by_time` to expire them;
//! - `jsonl_lines`: (output file, number) → lines committed and not yet appended to the file, and
//!   when; `jsonl_files`: output file → its length once the lines up to a number were appended,
//!   and the next number (see `pipeline/appender.rs`);
//! - `outbox`, `outbox_done` and `outbox_failed`: delivery id → record (JSON), pending,
//!   delivered (trimmed to the newest [`KEEP_FINISHED`]) and failed for good (trimmed to the
//!   newest [`KEEP_FAILED`] on their own, so that a burst of deliveries never pushes out the
//!   failures an operator has yet to look at); `outbox_lanes`: `(lane, next attempt, id)` of
//!   every pending delivery, so that the sender reads only what is due and has room, and
//!   `outbox_due`: `(next attempt, id)`, for a tripline from before lanes; `meta`: the next id;
//! - `waits`: state key → a pending wait (JSON); `waits_due`: `(deadline, key)` of each, so that
//!   the waits due are read from its start; `waiting`: rule → how many waits it has pending.

mod aggregates;
mod batch;
mod explained;
mod record;

pub use batch::WriteTxn;

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::store::aggregates::DayData;
use crate::store::queue::{Due, Lane, OutboxRecord, OutboxStatus, Skip, take_room};
use crate::store::remembered::Stored;
use crate::store::{Backend, Batch, FileProgress, QueuedLines, StoreError};
use crate::store::{Person, StateKey};

/// Rule state: state key → its record (`record.rs`): counter, window, last action, last day used.
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const SEEN: TableDefinition<&str, u64> = TableDefinition::new("seen");
const SEEN_BY_TIME: TableDefinition<(u64, &str), ()> = TableDefinition::new("seen_by_time");
/// Standard Webhooks deliveries handled: (source, `webhook-id`) → unix seconds, and by time.
const DELIVERY_IDS: TableDefinition<(&str, &str), u64> = TableDefinition::new("delivery_ids");
const DELIVERY_IDS_BY_TIME: TableDefinition<(u64, &str, &str), ()> =
    TableDefinition::new("delivery_ids_by_time");
/// Before the appender: output file → its length as of the last commit (migrated to `FILES`).
const JSONL_LEN: TableDefinition<&str, u64> = TableDefinition::new("jsonl_len");
/// Output file → (length, last text applied, next text's number): see [`FileProgress`].
const FILES: TableDefinition<&str, (u64, u64, u64)> = TableDefinition::new("jsonl_files");
/// Lines committed and not yet appended: (file, number) → (committed at ms, text).
const LINES: TableDefinition<(&str, u64), (i64, &str)> = TableDefinition::new("jsonl_lines");
const OUTBOX: TableDefinition<u64, &str> = TableDefinition::new("outbox");
const OUTBOX_DONE: TableDefinition<u64, &str> = TableDefinition::new("outbox_done");
const OUTBOX_FAILED: TableDefinition<u64, &str> = TableDefinition::new("outbox_failed");
/// Every pending email by when it is next due, `(next_attempt_unix, id)`: written with `outbox`,
/// in the same transactions.
const OUTBOX_DUE: TableDefinition<(u64, u64), ()> = TableDefinition::new("outbox_due");
/// Every pending delivery by lane (see `Lane::key`) and when it is next due, `(lane, next
/// attempt, id)`: written with `outbox`, so that the sender reads each lane only as far as it
/// has room, and a lane with none (a hung endpoint's) costs nothing however much waits in it.
/// `outbox_due` is kept beside it for a tripline from before lanes.
const OUTBOX_LANES: TableDefinition<(&str, u64, u64), ()> = TableDefinition::new("outbox_lanes");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Events `[remember]` rules keep: (distinct id, rule, time ms, sequence) → (expiry ms, the
/// entry as JSON).
const REMEMBERED: TableDefinition<(&str, &str, i64, u64), (i64, &str)> =
    TableDefinition::new("remembered");
/// What each person's events made: (distinct id, key) → [`USER_RECORD`] for a key of `keys`,
/// [`USER_WAIT`] for one of `waits`. Written when a key is new; a row whose key is gone (an idle
/// key forgotten, a wait ended) is passed over when read.
const USER_KEYS: TableDefinition<(&str, &str), u8> = TableDefinition::new("user_keys");
const USER_RECORD: u8 = 0;
const USER_WAIT: u8 = 1;
/// Each person's deliveries: (distinct id, delivery id).
const USER_DELIVERIES: TableDefinition<(&str, u64), ()> = TableDefinition::new("user_deliveries");
/// How many each rule keeps for each user: (distinct id, rule) → count (no row at zero).
const REMEMBERED_COUNT: TableDefinition<(&str, &str), u64> =
    TableDefinition::new("remembered_count");
/// When each is forgotten: (expiry ms, distinct id, rule, time ms, sequence).
const REMEMBERED_EXPIRY: TableDefinition<(i64, &str, &str, i64, u64), ()> =
    TableDefinition::new("remembered_expiry");
/// Pending waits: state key → the wait (JSON, see `store/pending.rs`).
const WAITS: TableDefinition<&str, &str> = TableDefinition::new("waits");
/// Every pending wait by deadline, `(deadline ms, state key)`: written with `waits`.
const WAITS_DUE: TableDefinition<(i64, &str), ()> = TableDefinition::new("waits_due");
/// How many waits each rule has pending: rule name → count (no row at zero).
const WAITING: TableDefinition<&str, u64> = TableDefinition::new("waiting");
/// Rule state before one record per key: merged into `KEYS` at open.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const WINDOWS: TableDefinition<&str, &[u8]> = TableDefinition::new("windows");
const ACTED: TableDefinition<&str, i64> = TableDefinition::new("acted");
const TOUCHED: TableDefinition<&str, u64> = TableDefinition::new("touched");
const TOUCHED_BY_DAY: TableDefinition<(u64, &str), ()> = TableDefinition::new("touched_by_day");

/// Moves the output files' lengths of a database from before the appender into `FILES`: the
/// files held exactly what was committed, with nothing queued.
fn migrate_file_lengths(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let old: Vec<(String, u64)> = {
        let Ok(table) = txn.open_table(JSONL_LEN) else {
            return Ok(());
        };
        let rows = table.iter().map_err(err)?;
        rows.map(|row| row.map(|(k, v)| (k.value().to_string(), v.value())))
            .collect::<Result<_, _>>()
            .map_err(err)?
    };
    let mut files = txn.open_table(FILES).map_err(err)?;
    for (file, len) in old {
        if files.get(file.as_str()).map_err(err)?.is_none() {
            files.insert(file.as_str(), (len, 0, 1)).map_err(err)?;
        }
    }
    drop(files);
    txn.delete_table(JSONL_LEN).map_err(err)?;
    Ok(())
}

/// Merges the rule state of a database from before one record per key (`counters`, `windows`,
/// `acted`, `touched` and its index by day) into `keys`, and removes those tables. A key never
/// marked as used (from before idle keys were forgotten) starts its idle clock at the upgrade.
fn merge_state_tables(txn: &redb::WriteTransaction, today: u64) -> Result<(), StoreError> {
    let before = [
        COUNTERS.name(),
        WINDOWS.name(),
        ACTED.name(),
        TOUCHED.name(),
        TOUCHED_BY_DAY.name(),
    ];
    let present: Vec<String> = txn
        .list_tables()
        .map_err(err)?
        .map(|t| t.name().to_string())
        .filter(|name| before.contains(&name.as_str()))
        .collect();
    if present.is_empty() {
        return Ok(());
    }
    #[derive(Default)]
    struct Parts {
        count: u64,
        window: Vec<i64>,
        acted: Option<i64>,
        day: Option<u64>,
        state: bool,
    }
    let mut keys: std::collections::BTreeMap<String, Parts> = Default::default();
    fn rows<V: redb::Value + 'static>(
        txn: &redb::WriteTransaction,
        table: TableDefinition<&str, V>,
        mut each: impl FnMut(String, V::SelfType<'_>),
    ) -> Result<(), StoreError> {
        let t = txn.open_table(table).map_err(err)?;
        for row in t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            each(k.value().to_string(), v.value());
        }
        Ok(())
    }
    rows(txn, COUNTERS, |k, n| {
        let p = keys.entry(k).or_default();
        (p.count, p.state) = (n, true);
    })?;
    rows(txn, WINDOWS, |k, bytes| {
        let p = keys.entry(k).or_default();
        p.window = (bytes.chunks_exact(8))
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        p.state = true;
    })?;
    rows(txn, ACTED, |k, t| {
        let p = keys.entry(k).or_default();
        (p.acted, p.state) = (Some(t), true);
    })?;
    rows(txn, TOUCHED, |k, day| {
        keys.entry(k).or_default().day = Some(day)
    })?;
    let mut table = txn.open_table(KEYS).map_err(err)?;
    let mut bytes = Vec::new();
    let mut merged = 0;
    for (key, p) in keys.iter().filter(|(_, p)| p.state) {
        // Newer than the old tables (an older build ran on this database since): kept.
        if table.get(key.as_str()).map_err(err)?.is_some() {
            continue;
        }
        record::encode(
            p.count,
            &p.window,
            p.acted,
            p.day.unwrap_or(today),
            &mut bytes,
        );
        table.insert(key.as_str(), bytes.as_slice()).map_err(err)?;
        merged += 1;
    }
    drop(table);
    txn.delete_table(COUNTERS).map_err(err)?;
    txn.delete_table(WINDOWS).map_err(err)?;
    txn.delete_table(ACTED).map_err(err)?;
    txn.delete_table(TOUCHED).map_err(err)?;
    txn.delete_table(TOUCHED_BY_DAY).map_err(err)?;
    tracing::info!(keys = merged, "rule state moved to one record per key");
    Ok(())
}

/// The part of a stored outbox record the indexes need: its lane and when it is next due
/// (records from before kinds existed are emails).
#[derive(serde::Deserialize)]
struct Indexed {
    #[serde(default = "crate::store::queue::kind_before_kinds")]
    kind: String,
    #[serde(default)]
    lane: Option<String>,
    next_attempt_unix: u64,
}

impl Indexed {
    fn of(json: &str) -> Result<Indexed, StoreError> {
        serde_json::from_str(json).map_err(err)
    }

    fn lane_key(&self) -> String {
        Lane {
            kind: self.kind.clone(),
            destination: self.lane.clone(),
        }
        .key()
    }
}

/// Fills `outbox_due` and `outbox_lanes` from `outbox` when they do not hold as many
/// deliveries: a database from before an index existed gets every pending delivery indexed at
/// the upgrade.
fn index_pending(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let outbox = txn.open_table(OUTBOX).map_err(err)?;
    let mut due = txn.open_table(OUTBOX_DUE).map_err(err)?;
    let mut lanes = txn.open_table(OUTBOX_LANES).map_err(err)?;
    let pending = outbox.len().map_err(err)?;
    if due.len().map_err(err)? == pending && lanes.len().map_err(err)? == pending {
        return Ok(());
    }
    due.retain(|_, ()| false).map_err(err)?;
    lanes.retain(|_, ()| false).map_err(err)?;
    for row in outbox.iter().map_err(err)? {
        let (id, json) = row.map_err(err)?;
        let indexed = Indexed::of(json.value())?;
        let at = indexed.next_attempt_unix;
        due.insert((at, id.value()), ()).map_err(err)?;
        lanes
            .insert((indexed.lane_key().as_str(), at, id.value()), ())
            .map_err(err)?;
    }
    tracing::info!(
        pending,
        "indexed the pending deliveries by lane and due time"
    );
    Ok(())
}

/// The table of once-marks written before `again_after` existed (key → nothing).
const ONCE_BEFORE_0_2: TableDefinition<&str, ()> = TableDefinition::new("once");

/// Moves once-marks from the older `once` table into `acted`, at time 0 ("long ago"), so that a
/// rule that acted before an upgrade does not act again for the same person.
fn migrate_once_marks(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let old_exists = txn
        .list_tables()
        .map_err(err)?
        .any(|t| t.name() == ONCE_BEFORE_0_2.name());
    if !old_exists {
        return Ok(());
    }
    let keys: Vec<String> = {
        let old = txn.open_table(ONCE_BEFORE_0_2).map_err(err)?;
        old.iter()
            .map_err(err)?
            .map(|row| row.map(|(k, _)| k.value().to_string()).map_err(err))
            .collect::<Result<_, _>>()?
    };
    let mut acted = txn.open_table(ACTED).map_err(err)?;
    for key in &keys {
        if acted.get(key.as_str()).map_err(err)?.is_none() {
            acted.insert(key.as_str(), 0).map_err(err)?;
        }
    }
    drop(acted);
    txn.delete_table(ONCE_BEFORE_0_2).map_err(err)?;
    tracing::info!(
        marks = keys.len(),
        "moved once-marks to the new `acted` table"
    );
    Ok(())
}

/// The database's file name in the data folder.
pub const FILE_NAME: &str = "tripline.redb";

/// Seconds in a day.
const DAY: u64 = 86_400;

/// How many delivered deliveries the outbox history keeps (and failed ones of a database from
/// before `outbox_failed`).
pub const KEEP_FINISHED: u64 = 10_000;

/// How many deliveries failed for good the outbox keeps, for the operator to see and retry.
pub const KEEP_FAILED: u64 = 10_000;

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The database's page cache (read cache and write buffer). redb's default (1 GiB) would let a
/// large state grow the process to that size; beyond this, pages come from the operating
/// system's file cache instead. 64 MiB filled up under the threshold workload (RSS 142 MB after
/// 20 s) with no more throughput than 16 MiB (RSS 78 MB, flat from 20 to 40 s): the pages a
/// batch needs are found in the operating system's cache all the same.
const CACHE_BYTES: usize = 16 << 20;

/// The database, and whether it must be reopened.
///
/// After a write fails (a full disk, an I/O error), redb refuses every later transaction until
/// the database is closed and opened again. So a failed commit marks the database as failed, and
/// the next transaction (or `/readyz`) first reopens it, at most once a second: once space is
/// back, the service heals by itself.
pub struct Db {
    path: PathBuf,
    /// `None` between closing a failed database and opening it again.
    db: RwLock<Option<Database>>,
    failed: Arc<AtomicBool>,
    last_reopen: Mutex<Option<Instant>>,
    /// Where the look for idle keys goes on from (see `Batch::forget_idle`).
    idle_cursor: Arc<Mutex<Option<String>>>,
    /// The first delivery id not yet durable: the sender leaves those out (see
    /// `Batch::commit_unsynced`).
    durable_next_id: Arc<AtomicU64>,
}

/// How often a failed database is tried again.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// Opens (or creates) the database file and every table, so that readers never meet a missing
/// one, and brings an older database up to date.
fn open_database(path: &Path) -> Result<Database, StoreError> {
    let db = redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse,
            other => err(other),
        })?;
    let txn = db.begin_write().map_err(err)?;
    {
        txn.open_table(KEYS).map_err(err)?;
        txn.open_table(SEEN).map_err(err)?;
        txn.open_table(SEEN_BY_TIME).map_err(err)?;
        txn.open_table(DELIVERY_IDS).map_err(err)?;
        txn.open_table(DELIVERY_IDS_BY_TIME).map_err(err)?;
        txn.open_table(FILES).map_err(err)?;
        txn.open_table(LINES).map_err(err)?;
        txn.open_table(OUTBOX).map_err(err)?;
        txn.open_table(OUTBOX_DONE).map_err(err)?;
        txn.open_table(OUTBOX_FAILED).map_err(err)?;
        txn.open_table(OUTBOX_DUE).map_err(err)?;
        txn.open_table(OUTBOX_LANES).map_err(err)?;
        txn.open_table(META).map_err(err)?;
        txn.open_table(REMEMBERED).map_err(err)?;
        txn.open_table(USER_KEYS).map_err(err)?;
        txn.open_table(USER_DELIVERIES).map_err(err)?;
        txn.open_table(REMEMBERED_COUNT).map_err(err)?;
        txn.open_table(REMEMBERED_EXPIRY).map_err(err)?;
        txn.open_table(WAITS).map_err(err)?;
        txn.open_table(WAITS_DUE).map_err(err)?;
        txn.open_table(WAITING).map_err(err)?;
        aggregates::create(&txn)?;
        explained::create(&txn)?;
        migrate_once_marks(&txn)?;
        migrate_file_lengths(&txn)?;
        merge_state_tables(&txn, Clock::wall().unix() / DAY)?;
        index_pending(&txn)?;
    }
    txn.commit().map_err(err)?;
    Ok(db)
}

/// The first delivery id not in the database as opened (everything opened is durable).
fn next_id_opened(db: &Database) -> Result<u64, StoreError> {
    let txn = db.begin_write().map_err(err)?;
    let outbox = txn.open_table(OUTBOX).map_err(err)?;
    let after_last = (outbox.last().map_err(err)?).map_or(1, |(id, _)| id.value() + 1);
    drop(outbox);
    Ok(batch::next_id(&txn)?.max(after_last))
}

impl Db {
    /// Opens (or creates) the database in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Db, StoreError> {
        let path = data_dir.join(FILE_NAME);
        let db = open_database(&path)?;
        let durable_next_id = Arc::new(AtomicU64::new(next_id_opened(&db)?));
        Ok(Db {
            path,
            db: RwLock::new(Some(db)),
            failed: Arc::new(AtomicBool::new(false)),
            last_reopen: Mutex::new(None),
            idle_cursor: Arc::new(Mutex::new(None)),
            durable_next_id,
        })
    }

    /// Starts a write transaction. Only one exists at a time; others wait.
    pub fn write(&self) -> Result<WriteTxn, StoreError> {
        let txn = self.database(|db| db.begin_write().map_err(err));
        if txn.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        Ok(WriteTxn {
            txn: txn?,
            failed: self.failed.clone(),
            idle_cursor: self.idle_cursor.clone(),
            durable_next_id: self.durable_next_id.clone(),
            aggregate_rows: aggregates::Rows::default(),
        })
    }

    /// Starts a read transaction.
    fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.database(|db| db.begin_read().map_err(err))
    }

    /// Runs `f` on the open database, reopening it first if a write failed.
    fn database<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.failed.load(Ordering::Relaxed) {
            self.reopen()?;
        }
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match db.as_ref() {
            Some(db) => f(db),
            None => Err(StoreError::Unavailable(
                "the database is closed after a write failure and could not be opened again yet"
                    .into(),
            )),
        }
    }

    /// Closes and opens the database again after a failed write, at most once a second.
    fn reopen(&self) -> Result<(), StoreError> {
        {
            let mut last = self
                .last_reopen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
                return Err(StoreError::Unavailable(
                    "a write to the database failed (is the disk full?); trying again shortly"
                        .into(),
                ));
            }
            *last = Some(Instant::now());
        }
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if !self.failed.load(Ordering::Relaxed) {
            return Ok(()); // another thread reopened it meanwhile
        }
        // The file is closed once no transaction holds it; only then can it be opened again.
        drop(slot.take());
        let db = open_database(&self.path).map_err(|e| {
            let why = match e {
                StoreError::Unavailable(why) | StoreError::Conflict(why) => why,
                StoreError::InUse => "a transaction still holds its file".into(),
            };
            StoreError::Unavailable(format!(
                "a write to the database failed and it cannot be opened again yet: {why}"
            ))
        })?;
        // What was committed without a sync is gone with the closed file.
        let next_id = next_id_opened(&db)?;
        self.durable_next_id.store(next_id, Ordering::Relaxed);
        *slot = Some(db);
        self.failed.store(false, Ordering::Relaxed);
        tracing::info!("the database was reopened after a failed write");
        Ok(())
    }
}

impl Backend for Db {
    fn begin(&self) -> Result<Box<dyn Batch>, StoreError> {
        Ok(Box::new(self.write()?))
    }

    fn files(&self) -> Result<Vec<(String, FileProgress)>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(FILES).map_err(err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let (len, applied, next) = v.value();
            out.push((
                k.value().to_string(),
                FileProgress {
                    len,
                    applied,
                    next,
                    ours: true,
                },
            ));
        }
        Ok(out)
    }

    fn queued_lines(
        &self,
        file: &str,
        after: u64,
        max_bytes: usize,
    ) -> Result<Vec<QueuedLines>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(LINES).map_err(err)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for row in table
            .range((file, after + 1)..=(file, u64::MAX))
            .map_err(err)?
        {
            let (k, v) = row.map_err(err)?;
            let (at_ms, text) = v.value();
            if !out.is_empty() && bytes + text.len() > max_bytes {
                break;
            }
            bytes += text.len();
            out.push(QueuedLines {
                seq: k.value().1,
                at_ms,
                text: text.to_string(),
            });
        }
        Ok(out)
    }

    /// Reads each lane of the index only as far as it has room (a lane with none is passed at
    /// its first row), then decodes in full only the records it returns.
    fn due(&self, now_unix: u64, max: usize, skip: &Skip) -> Result<Due, StoreError> {
        let durable_next_id = self.durable_next_id.load(Ordering::Relaxed);
        let txn = self.read()?;
        let lanes = txn.open_table(OUTBOX_LANES).map_err(err)?;
        let outbox = txn.open_table(OUTBOX).map_err(err)?;
        let mut room = skip.room.clone();
        let mut chosen: Vec<(u64, u64)> = Vec::new();
        let mut next_due: Option<u64> = None;
        let mut soonest = |at: u64| next_due = Some(next_due.map_or(at, |n: u64| n.min(at)));
        // Each lane in turn: the first row after the previous lane's last is the next lane's.
        let mut lane_key = (lanes.first().map_err(err)?).map(|(key, _)| key.value().0.to_string());
        while let Some(key) = lane_key.take() {
            let lane = Lane::from_key(&key);
            let mut taken = 0;
            for row in lanes
                .range((key.as_str(), 0, 0)..=(key.as_str(), u64::MAX, u64::MAX))
                .map_err(err)?
            {
                let (_, at, id) = row.map_err(err)?.0.value();
                if skip.in_flight.contains(&id) || id >= durable_next_id {
                    continue;
                }
                if at > now_unix || taken == max {
                    soonest(at);
                    break;
                }
                // A full lane waits for one of its attempts to end, which wakes the sender.
                if !take_room(&mut room, &lane) {
                    break;
                }
                chosen.push((at, id));
                taken += 1;
            }
            let after = (
                std::ops::Bound::Excluded((key.as_str(), u64::MAX, u64::MAX)),
                std::ops::Bound::Unbounded,
            );
            lane_key = match lanes.range::<(&str, u64, u64)>(after).map_err(err)?.next() {
                Some(row) => Some(row.map_err(err)?.0.value().0.to_string()),
                None => None,
            };
        }
        chosen.sort_unstable();
        if let Some(&(at, _)) = chosen.get(max) {
            soonest(at);
        }
        chosen.truncate(max);
        let mut due = Due {
            deliveries: Vec::with_capacity(chosen.len()),
            next_due_unix: next_due,
        };
        for (_, id) in chosen {
            // Written in the same transactions as the index, so the record is there.
            if let Some(json) = outbox.get(id).map_err(err)? {
                due.deliveries
                    .push((id, serde_json::from_str(json.value()).map_err(err)?));
            }
        }
        Ok(due)
    }

    fn pending_count(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(OUTBOX).map_err(err)?;
        table.len().map_err(err)
    }

    /// Costs nothing while writes succeed; after a failed one, it reopens the database and
    /// commits a small write to find out.
    fn check(&self) -> Result<(), StoreError> {
        if self.failed.load(Ordering::Relaxed) {
            let txn = self.write()?;
            txn.txn
                .open_table(META)
                .map_err(err)?
                .insert("readyz_probe_unix", Clock::wall().unix())
                .map_err(err)?;
            Box::new(txn).commit()?;
        }
        self.pending_count().map(|_| ())
    }

    /// An empty durable commit: redb makes every commit before it durable with it.
    fn sync(&self) -> Result<(), StoreError> {
        Box::new(self.write()?).commit()
    }

    fn waiting(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let txn = self.read()?;
        waiting(&txn.open_table(WAITING).map_err(err)?)
    }

    fn next_wait_due(&self) -> Result<Option<i64>, StoreError> {
        let txn = self.read()?;
        let due = txn.open_table(WAITS_DUE).map_err(err)?;
        Ok(due.first().map_err(err)?.map(|(k, _)| k.value().0))
    }

    fn person(&self, distinct_id: &str) -> Result<Person, StoreError> {
        let txn = self.read()?;
        let index = txn.open_table(USER_KEYS).map_err(err)?;
        let keys = txn.open_table(KEYS).map_err(err)?;
        let waits = txn.open_table(WAITS).map_err(err)?;
        let mut person = Person::default();
        for row in index
            .range((distinct_id, "")..=(distinct_id, "\u{10ffff}"))
            .map_err(err)?
        {
            let (k, kind) = row.map_err(err)?;
            let key = k.value().1;
            match kind.value() {
                USER_WAIT => {
                    if let Some(json) = waits.get(key).map_err(err)? {
                        let wait = serde_json::from_str(json.value()).map_err(err)?;
                        person.waits.push((StateKey::stored(key), wait));
                    }
                }
                _ => {
                    if let Some(bytes) = keys.get(key).map_err(err)? {
                        let record = record::decode(bytes.value())?;
                        person.keys.push((StateKey::stored(key), record));
                    }
                }
            }
        }
        let index = txn.open_table(USER_DELIVERIES).map_err(err)?;
        let tables = [
            txn.open_table(OUTBOX).map_err(err)?,
            txn.open_table(OUTBOX_FAILED).map_err(err)?,
            txn.open_table(OUTBOX_DONE).map_err(err)?,
        ];
        for row in index
            .range((distinct_id, 0)..=(distinct_id, u64::MAX))
            .map_err(err)?
        {
            let id = row.map_err(err)?.0.value().1;
            for table in &tables {
                if let Some(json) = table.get(id).map_err(err)? {
                    person
                        .deliveries
                        .push((id, serde_json::from_str(json.value()).map_err(err)?));
                    break;
                }
            }
        }
        person.remembered = remembered(&txn, distinct_id)?;
        person.groups = aggregates::memberships(&txn, distinct_id)?;
        Ok(person)
    }

    fn aggregates(&self, rule: &str, from: i32, to: i32) -> Result<Vec<DayData>, StoreError> {
        aggregates::range(&self.read()?, rule, from, to)
    }

    fn aggregate_rules(&self) -> Result<Vec<String>, StoreError> {
        aggregates::rules(&self.read()?)
    }

    fn explanation(&self, uuid: &str) -> Result<Option<String>, StoreError> {
        explained::read(&self.read()?, uuid)
    }

    /// Only the rows shown are decoded.
    fn outbox_status(&self, shown: usize) -> Result<OutboxStatus, StoreError> {
        let txn = self.read()?;
        let pending = txn.open_table(OUTBOX).map_err(err)?;
        let done = txn.open_table(OUTBOX_DONE).map_err(err)?;
        let failed = txn.open_table(OUTBOX_FAILED).map_err(err)?;
        let failed_rows = outbox_rows(failed.iter().map_err(err)?.rev().take(shown))?;
        // The newest finished, delivered or not, by id.
        let mut recent = outbox_rows(done.iter().map_err(err)?.rev().take(shown))?;
        recent.extend(failed_rows.iter().cloned());
        recent.sort_unstable_by_key(|(id, _)| std::cmp::Reverse(*id));
        recent.truncate(shown);
        Ok(OutboxStatus {
            pending: pending.len().map_err(err)?,
            waiting: outbox_rows(pending.iter().map_err(err)?.take(shown))?,
            finished: done.len().map_err(err)? + failed.len().map_err(err)?,
            recent,
            failed: failed.len().map_err(err)?,
            failures: failed_rows,
        })
    }
}

/// Every event remembered for `distinct_id`, by every rule.
fn remembered(txn: &redb::ReadTransaction, distinct_id: &str) -> Result<Vec<Stored>, StoreError> {
    let table = txn.open_table(REMEMBERED).map_err(err)?;
    // Every rule's rows of this user: rule names are text, so "" to U+10FFFF spans them.
    let range = (distinct_id, "", i64::MIN, 0)..=(distinct_id, "\u{10ffff}", i64::MAX, u64::MAX);
    table
        .range(range)
        .map_err(err)?
        .map(|row| {
            let (key, value) = row.map_err(err)?;
            let (_, _, at_ms, seq) = key.value();
            let (expires_ms, json) = value.value();
            Ok(Stored {
                at_ms,
                seq,
                expires_ms,
                entry: serde_json::from_str(json).map_err(err)?,
            })
        })
        .collect()
}

/// Every row of the `waiting` table.
fn waiting(
    table: &impl ReadableTable<&'static str, u64>,
) -> Result<Vec<(String, u64)>, StoreError> {
    table
        .iter()
        .map_err(err)?
        .map(|row| {
            let (k, v) = row.map_err(err)?;
            Ok((k.value().to_string(), v.value()))
        })
        .collect()
}

/// Decodes rows of an outbox table.
fn outbox_rows<'a>(
    rows: impl Iterator<
        Item = Result<
            (
                redb::AccessGuard<'a, u64>,
                redb::AccessGuard<'a, &'static str>,
            ),
            redb::StorageError,
        >,
    >,
) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
    rows.map(|row| {
        let (k, v) = row.map_err(err)?;
        Ok((k.value(), serde_json::from_str(v.value()).map_err(err)?))
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::queue::Lane;
    use crate::store::{RuleState, State, StateKey, Wants};

    /// Rule state one operation at a time, each a load and a save, for tests that look at one key.
    trait OneAtATime: RuleState {
        fn with<T>(
            &mut self,
            wants: Wants,
            now_unix: u64,
            f: impl FnOnce(&mut State) -> T,
        ) -> Result<T, StoreError> {
            let mut state = self.load(&wants)?;
            let out = f(&mut state);
            self.save(state, now_unix)?;
            Ok(out)
        }
        fn increment(&mut self, key: &StateKey) -> Result<u64, StoreError> {
            self.with(one(key), 0, |s| s.increment(key))
        }
        fn count_within(
            &mut self,
            key: &StateKey,
            t: i64,
            window: i64,
            keep: usize,
        ) -> Result<u64, StoreError> {
            self.with(one(key), 0, |s| s.count_within(key, t, window, keep))
        }
        fn last_acted(&mut self, key: &StateKey) -> Result<Option<i64>, StoreError> {
            self.with(one(key), 0, |s| s.last_acted(key))
        }
        fn mark_acted(&mut self, key: &StateKey, t: i64) -> Result<(), StoreError> {
            self.with(one(key), 0, |s| s.mark_acted(key, t))
        }
        fn first_delivery(&mut self, uuid: &str, now_unix: u64) -> Result<bool, StoreError> {
            let mut wants = Wants::default();
            wants.uuids.push(uuid);
            self.with(wants, now_unix, |s| s.first_delivery(uuid))
        }
        fn touch(&mut self, key: &StateKey, now_unix: u64) -> Result<(), StoreError> {
            self.with(one(key), now_unix, |s| s.touch(key))
        }
    }

    /// The wants of one key (a key is always loaded before it is changed).
    fn one(key: &StateKey) -> Wants<'_> {
        Wants {
            keys: vec![key],
            ..Wants::default()
        }
    }

    impl<T: RuleState + ?Sized> OneAtATime for T {}

    #[test]
    fn once_marks_of_an_older_database_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let key = StateKey::new("r", "once", &[]);
        {
            let db = Database::create(dir.path().join("tripline.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(ONCE_BEFORE_0_2)
                .unwrap()
                .insert(key.as_str(), ())
                .unwrap();
            txn.commit().unwrap();
        }
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(db.begin().unwrap().last_acted(&key).unwrap(), Some(0));
        drop(db);
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(
            db.begin().unwrap().last_acted(&key).unwrap(),
            Some(0),
            "twice is harmless"
        );
    }

    #[test]
    fn the_history_keeps_the_newest_and_failures_apart_from_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let mut txn = db.begin().unwrap();
        let record = OutboxRecord::not_made("r".into(), "email", "no email".into(), 0);
        for _ in 0..KEEP_FAILED + 5 {
            txn.record_failed(&record).unwrap();
        }
        // Then more deliveries than the history keeps: the failures stay.
        let sent = OutboxRecord {
            status: crate::store::queue::Status::Sent,
            ..pending(0)
        };
        for _ in 0..KEEP_FINISHED + 5 {
            let id = txn.queue(&pending(0)).unwrap();
            txn.finish(id, &sent).unwrap();
        }
        txn.commit().unwrap();
        let status = db.outbox_status(1).unwrap();
        assert_eq!(status.failed, KEEP_FAILED);
        assert_eq!(status.finished, KEEP_FINISHED + KEEP_FAILED);
        assert_eq!(
            status.failures[0].0,
            KEEP_FAILED + 5,
            "the newest failure is kept"
        );
        assert_eq!(
            status.recent[0].0,
            KEEP_FAILED + 5 + KEEP_FINISHED + 5,
            "the newest delivery is kept"
        );
    }

    /// A pending email next due at `due_unix`.
    fn pending(due_unix: u64) -> OutboxRecord {
        OutboxRecord {
            status: crate::store::queue::Status::Pending,
            next_attempt_unix: due_unix,
            last_error: None,
            finished_unix: None,
            ..OutboxRecord::not_made("r".into(), "email", String::new(), 0)
        }
    }

    /// Leaving out these ids.
    fn skip(in_flight: &[u64]) -> Skip {
        Skip {
            in_flight: in_flight.iter().copied().collect(),
            ..Skip::default()
        }
    }

    fn ids(due: &Due) -> Vec<u64> {
        due.deliveries.iter().map(|(id, _)| *id).collect()
    }

    #[test]
    fn due_emails_are_claimed_soonest_first_at_most_max_with_the_next_due_time() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let mut txn = db.begin().unwrap();
        // Ids 1..=5, due at 50, 10, 40, 20, 30.
        for due in [50, 10, 40, 20, 30] {
            txn.queue(&pending(due)).unwrap();
        }
        txn.commit().unwrap();
        let none = skip(&[]);

        let due = db.due(35, 2, &none).unwrap();
        assert_eq!(ids(&due), [2, 4], "due at 10 and 20");
        assert_eq!(due.next_due_unix, Some(30), "due already, but past `max`");
        let due = db.due(35, 8, &none).unwrap();
        assert_eq!(ids(&due), [2, 4, 5]);
        assert_eq!(due.next_due_unix, Some(40), "the first one not due yet");
        let due = db.due(35, 8, &skip(&[2, 5])).unwrap();
        assert_eq!(ids(&due), [4], "those in flight are left out");
        assert_eq!(due.next_due_unix, Some(40));
        let due = db.due(35, 0, &skip(&[2])).unwrap();
        assert!(due.deliveries.is_empty());
        assert_eq!(
            due.next_due_unix,
            Some(20),
            "no free slot: the first one not in flight"
        );

        // A failed attempt moves the email in the index; a finished one leaves it.
        let mut txn = db.begin().unwrap();
        txn.update_pending(2, &pending(45)).unwrap();
        txn.finish(
            4,
            &OutboxRecord::not_made("r".into(), "email", "sent".into(), 36),
        )
        .unwrap();
        txn.commit().unwrap();
        let due = db.due(35, 8, &none).unwrap();
        assert_eq!(ids(&due), [5]);
        assert_eq!(due.next_due_unix, Some(40));
        assert_eq!(ids(&db.due(100, 8, &none).unwrap()), [5, 3, 2, 1]);
        let nothing = db.due(100, 8, &skip(&[1, 2, 3, 5])).unwrap();
        assert!(nothing.deliveries.is_empty());
        assert_eq!(nothing.next_due_unix, None, "nothing else waits");
    }

    #[test]
    fn a_kind_without_room_is_passed_over_and_the_others_still_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let mut txn = db.begin().unwrap();
        // Ids 1..=6, all due: email, log, email, log, email, log.
        for n in 0..6 {
            let mut record = pending(10 + n);
            record.kind = if n % 2 == 0 { "email" } else { "log" }.into();
            txn.queue(&record).unwrap();
        }
        txn.commit().unwrap();
        let mut limits = skip(&[]);
        limits.room.insert(
            Lane {
                kind: "email".into(),
                destination: None,
            },
            1,
        );
        let due = db.due(100, 8, &limits).unwrap();
        assert_eq!(ids(&due), [1, 2, 4, 6], "one email, then every log");
        assert_eq!(due.next_due_unix, None);
        limits.room.insert(
            Lane {
                kind: "email".into(),
                destination: None,
            },
            0,
        );
        assert_eq!(ids(&db.due(100, 2, &limits).unwrap()), [2, 4]);
    }

    #[test]
    fn a_full_endpoint_holds_only_its_own_lane_and_an_older_database_is_indexed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let mut txn = db.begin().unwrap();
        // Ids 1..=50 to a hung endpoint, all due first; then one to another endpoint and an
        // email, due later; then one due in the future.
        let lane = |to: &str| {
            let mut record = pending(10);
            record.kind = "http".into();
            record.lane = Some(to.into());
            record
        };
        for _ in 0..50 {
            txn.queue(&lane("hung")).unwrap();
        }
        txn.queue(&OutboxRecord {
            next_attempt_unix: 20,
            ..lane("chat")
        })
        .unwrap();
        txn.queue(&pending(30)).unwrap();
        txn.queue(&OutboxRecord {
            next_attempt_unix: 500,
            ..lane("chat")
        })
        .unwrap();
        txn.commit().unwrap();
        let endpoint = |to: &str| Lane {
            kind: "http".into(),
            destination: Some(to.into()),
        };
        let mut limits = skip(&[1, 2]);
        limits.room.insert(endpoint("hung"), 0);
        limits.room.insert(endpoint("chat"), 4);
        let due = db.due(100, 8, &limits).unwrap();
        assert_eq!(ids(&due), [51, 52], "the other endpoint's, then the email");
        assert_eq!(due.next_due_unix, Some(500));
        // With room, the hung endpoint's oldest come first, as many as fit.
        limits.room.insert(endpoint("hung"), 3);
        assert_eq!(ids(&db.due(100, 4, &limits).unwrap()), [3, 4, 5, 51]);

        // A database whose lane index is missing (from before lanes) gets it at open.
        drop(db);
        let database = redb::Database::create(dir.path().join("tripline.redb")).unwrap();
        let txn = database.begin_write().unwrap();
        txn.delete_table(OUTBOX_LANES).unwrap();
        txn.commit().unwrap();
        drop(database);
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(ids(&db.due(100, 4, &limits).unwrap()), [3, 4, 5, 51]);
    }

    #[test]
    fn remembered_events_keep_the_newest_per_user_and_rule_and_expire() {
        use crate::store::remembered::{Entry, Remembered};
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let remembered = |who: &str, rule: &str, at_ms: i64| Remembered {
            distinct_id: who.into(),
            rule: rule.into(),
            at_ms,
            expires_ms: at_ms + 1000,
            keep_last: 3,
            entry: Entry {
                rule: rule.into(),
                event: "e".into(),
                uuid: at_ms.into(),
                timestamp: String::new(),
                label: None,
                fields: serde_json::json!({}),
            },
        };
        let mut txn = db.begin().unwrap();
        for at in 1..=5 {
            txn.remember(&remembered("dana", "a", at * 100)).unwrap();
        }
        txn.remember(&remembered("dana", "b", 50)).unwrap();
        txn.remember(&remembered("sam", "a", 60)).unwrap();
        txn.commit().unwrap();
        let times = |who: &str| {
            let mut t: Vec<i64> = (db.person(who).unwrap().remembered.iter())
                .map(|e| e.at_ms)
                .collect();
            t.sort_unstable();
            t
        };
        // Rule a keeps dana's 3 newest; rule b's and sam's are theirs.
        assert_eq!(times("dana"), [50, 300, 400, 500]);
        assert_eq!(times("sam"), [60]);
        // Forgotten once their time is past (1 s after each), at most `max` at a time.
        let mut txn = db.begin().unwrap();
        assert_eq!(txn.expire_remembered(1_100, 1).unwrap(), 1);
        assert_eq!(txn.expire_remembered(1_100, 10).unwrap(), 1);
        txn.commit().unwrap();
        assert_eq!(times("dana"), [300, 400, 500]);
        assert_eq!(times("sam"), [] as [i64; 0]);
        // The count follows: three more for rule a still leave three.
        let mut txn = db.begin().unwrap();
        for at in 6..=8 {
            txn.remember(&remembered("dana", "a", at * 100)).unwrap();
        }
        assert_eq!(txn.expire_remembered(i64::MAX, 100).unwrap(), 3);
        txn.commit().unwrap();
        assert!(times("dana").is_empty());
    }

    #[test]
    fn a_delivery_forgotten_while_it_was_attempted_does_not_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let mut record = pending(10);
        record.person = Some("dana".into());
        let mut txn = db.begin().unwrap();
        let (one, two) = (txn.queue(&record).unwrap(), txn.queue(&record).unwrap());
        txn.commit().unwrap();
        // Both are being attempted when the person is forgotten.
        let mut txn = db.begin().unwrap();
        assert_eq!(txn.forget_person("dana").unwrap().deliveries, 2);
        txn.commit().unwrap();
        // Their attempts end: one delivered, one to try again. Neither is recorded.
        let mut txn = db.begin().unwrap();
        let sent = OutboxRecord {
            status: crate::store::queue::Status::Sent,
            ..record.clone()
        };
        txn.finish(one, &sent).unwrap();
        txn.update_pending(two, &record).unwrap();
        txn.commit().unwrap();
        let status = db.outbox_status(10).unwrap();
        assert_eq!((status.pending, status.finished), (0, 0));
        assert!(db.due(100, 10, &skip(&[])).unwrap().deliveries.is_empty());
    }

    #[test]
    fn a_persons_list_forgets_what_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let key = StateKey::new("r", "count", &[&serde_json::json!("dana")]);
        let mut state = State::default();
        state.own(&key, "dana");
        state.increment(&key);
        let mut txn = db.begin().unwrap();
        txn.save(state, 0).unwrap();
        txn.commit().unwrap();
        assert_eq!(db.person("dana").unwrap().keys.len(), 1);
        // Idle since day 0: forgotten, and off dana's list.
        let mut txn = db.begin().unwrap();
        assert_eq!(txn.forget_idle(10 * DAY, 100).unwrap(), 1);
        txn.commit().unwrap();
        let txn = db.read().unwrap();
        let listed = txn.open_table(USER_KEYS).unwrap();
        assert_eq!(listed.len().unwrap(), 0);
    }

    #[test]
    fn the_outbox_status_counts_every_pending_email_and_shows_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let mut txn = db.begin().unwrap();
        for due in 0..7 {
            txn.queue(&pending(100 - due)).unwrap();
        }
        txn.commit().unwrap();
        let status = db.outbox_status(3).unwrap();
        assert_eq!(status.pending, 7);
        let shown: Vec<u64> = status.waiting.iter().map(|(id, _)| *id).collect();
        assert_eq!(shown, [1, 2, 3], "the oldest, by id");
        assert_eq!(db.pending_count().unwrap(), 7);
    }

    #[test]
    fn pending_emails_of_an_older_database_are_indexed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The tables as they were before `outbox_due`.
            let db = Database::create(dir.path().join("tripline.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut outbox = txn.open_table(OUTBOX).unwrap();
                for (id, due) in [(7u64, 300u64), (8, 100), (9, 200)] {
                    let json = serde_json::to_string(&pending(due)).unwrap();
                    outbox.insert(id, json.as_str()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let db = Db::open(dir.path()).unwrap();
        let due = db.due(250, 8, &skip(&[])).unwrap();
        assert_eq!(ids(&due), [8, 9]);
        assert_eq!(due.next_due_unix, Some(300));
        drop(db);
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(
            ids(&db.due(300, 8, &skip(&[])).unwrap()),
            [8, 9, 7],
            "the index is kept as it is on the next open"
        );
    }

    #[test]
    fn state_survives_reopening_and_uncommitted_changes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let key = StateKey::new("r", "count", &[]);
        {
            let db = Db::open(dir.path()).unwrap();
            let mut txn = db.begin().unwrap();
            assert_eq!(txn.increment(&key).unwrap(), 1);
            assert!(txn.first_delivery("u1", 100).unwrap());
            txn.commit().unwrap();
            let mut txn = db.begin().unwrap();
            assert_eq!(txn.increment(&key).unwrap(), 2);
            drop(txn); // not committed
        }
        let db = Db::open(dir.path()).unwrap();
        let mut txn = db.begin().unwrap();
        assert_eq!(
            txn.increment(&key).unwrap(),
            2,
            "1 committed, the uncommitted one lost"
        );
        assert!(!txn.first_delivery("u1", 200).unwrap());
        assert_eq!(txn.count_within(&key, 1_000, 500, 5).unwrap(), 1);
        assert_eq!(txn.count_within(&key, 1_400, 500, 5).unwrap(), 2);
        assert_eq!(
            txn.count_within(&key, 1_600, 500, 5).unwrap(),
            2,
            "1000 left the window"
        );
        txn.mark_acted(&key, 1_600).unwrap();
        assert_eq!(txn.last_acted(&key).unwrap(), Some(1_600));
        assert!(txn.first_delivery("u2", 200).unwrap());
        assert_eq!(txn.expire_seen(150, 100).unwrap(), 1);
        assert!(
            txn.first_delivery("u1", 300).unwrap(),
            "expired ids are forgotten"
        );
        assert!(
            !txn.first_delivery("u2", 300).unwrap(),
            "recent ones are kept"
        );
    }

    #[test]
    fn a_second_opening_of_the_same_folder_is_told_it_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Db::open(dir.path()).unwrap();
        assert_eq!(Db::open(dir.path()).err(), Some(StoreError::InUse));
    }

    #[test]
    fn expired_ids_are_forgotten_a_bounded_number_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let mut txn = db.begin().unwrap();
        for i in 0..5 {
            assert!(txn.first_delivery(&format!("u{i}"), 100 + i).unwrap());
            assert!(
                txn.first_signed_delivery("s", &format!("m{i}"), 100 + i)
                    .unwrap()
            );
        }
        assert!(!txn.first_signed_delivery("s", "m1", 200).unwrap());
        assert!(
            txn.first_signed_delivery("other", "m1", 200).unwrap(),
            "ids are per source"
        );
        assert_eq!(txn.expire_seen(1000, 4).unwrap(), 4, "at most 4 a call");
        assert_eq!(txn.expire_seen(1000, 4).unwrap(), 4);
        assert_eq!(txn.expire_seen(1000, 4).unwrap(), 3, "11 in all");
        assert_eq!(txn.expire_seen(1000, 4).unwrap(), 0);
        assert!(txn.first_signed_delivery("s", "m1", 300).unwrap());
        assert!(txn.first_delivery("u1", 300).unwrap());
    }

    #[test]
    fn keys_idle_past_the_cutoff_are_forgotten_and_used_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let idle = StateKey::new("r", "count", &[&serde_json::json!("idle")]);
        let busy = StateKey::new("r", "once", &[&serde_json::json!("busy")]);
        let mut txn = db.begin().unwrap();
        for (key, day) in [(&idle, 10), (&busy, 10), (&busy, 20), (&busy, 20)] {
            txn.with(one(key), day * DAY, |s| {
                s.touch(key);
                s.increment(key);
                s.mark_acted(key, 1);
            })
            .unwrap();
        }
        assert_eq!(txn.forget_idle(15 * DAY, 100).unwrap(), 1, "only `idle`");
        assert_eq!(txn.forget_idle(15 * DAY, 100).unwrap(), 0);
        assert_eq!(txn.last_acted(&idle).unwrap(), None);
        assert_eq!(txn.increment(&idle).unwrap(), 1, "counted from zero again");
        assert_eq!(txn.last_acted(&busy).unwrap(), Some(1));
        assert_eq!(txn.increment(&busy).unwrap(), 4);
        // At most `look_at` keys are looked at per call, going on from where the last stopped.
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let mut txn = db.begin().unwrap();
        for i in 0..5 {
            txn.touch(&StateKey::new("r", "count", &[&i.into()]), DAY)
                .unwrap();
        }
        txn.touch(&busy, 20 * DAY).unwrap();
        assert_eq!(txn.forget_idle(2 * DAY, 3).unwrap(), 3);
        assert_eq!(txn.forget_idle(2 * DAY, 3).unwrap(), 2, "and `busy` kept");
        assert_eq!(
            txn.forget_idle(2 * DAY, 3).unwrap(),
            0,
            "the end: from the start again"
        );
        txn.touch(&idle, DAY).unwrap();
        assert_eq!(txn.forget_idle(2 * DAY, 3).unwrap(), 1);
    }

    #[test]
    fn an_unreadable_record_counts_afresh_and_stops_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let key = StateKey::new("r", "count", &[]);
        {
            let txn = db.write().unwrap();
            txn.txn
                .open_table(KEYS)
                .unwrap()
                .insert(key.as_str(), &b"not a record"[..])
                .unwrap();
            Box::new(txn).commit().unwrap();
        }
        let mut txn = db.begin().unwrap();
        assert_eq!(txn.increment(&key).unwrap(), 1, "read as never used");
        assert_eq!(txn.increment(&key).unwrap(), 2, "and written whole again");
        txn.commit().unwrap();
        let txn = db.write().unwrap();
        txn.txn
            .open_table(KEYS)
            .unwrap()
            .insert("[\"r\",\"count\",\"x\"]", &b"?"[..])
            .unwrap();
        let mut txn: Box<dyn Batch> = Box::new(txn);
        assert_eq!(
            txn.forget_idle(0, 100).unwrap(),
            1,
            "the unreadable one goes"
        );
    }

    #[test]
    fn keys_of_an_older_database_start_their_idle_clock_at_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join("tripline.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(COUNTERS)
                .unwrap()
                .insert("[\"r\",\"count\",\"a\"]", 3)
                .unwrap();
            txn.open_table(ACTED)
                .unwrap()
                .insert("[\"r\",\"once\",\"a\"]", 0)
                .unwrap();
            let times: Vec<u8> = [5i64, 7].iter().flat_map(|t| t.to_le_bytes()).collect();
            txn.open_table(WINDOWS)
                .unwrap()
                .insert("[\"w\",\"count within\",\"a\"]", times.as_slice())
                .unwrap();
            txn.open_table(TOUCHED)
                .unwrap()
                .insert("[\"w\",\"count within\",\"a\"]", 3)
                .unwrap();
            txn.commit().unwrap();
        }
        let db = Db::open(dir.path()).unwrap();
        let mut txn = db.begin().unwrap();
        let counter = StateKey::stored("[\"r\",\"count\",\"a\"]");
        let window = StateKey::stored("[\"w\",\"count within\",\"a\"]");
        assert_eq!(
            txn.last_acted(&StateKey::stored("[\"r\",\"once\",\"a\"]"))
                .unwrap(),
            Some(0)
        );
        // The window's record keeps its last day (3): idle since then.
        assert_eq!(txn.forget_idle(4 * DAY, 100).unwrap(), 1);
        let today = Clock::wall().unix() / DAY;
        let n = txn.with(one(&window), today * DAY, |s| {
            s.count_within(&window, 8, 100, 5)
        });
        assert_eq!(n.unwrap(), 1, "forgotten");
        assert_eq!(
            txn.forget_idle(today * DAY, 100).unwrap(),
            0,
            "marked today"
        );
        assert_eq!(txn.increment(&counter).unwrap(), 4, "the counter kept");
        assert_eq!(txn.forget_idle((today + 1) * DAY, 100).unwrap(), 3);
    }
}
