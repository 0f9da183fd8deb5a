//! How long `GET /aggregates/{rule}` takes to sum a range, against a floor measured in the same
//! run: reading the same rows raw from the same database file, with nothing decoded or merged.
//!
//! Two rules are counted into a real store (redb, in a temporary folder) through the committer's
//! own call (`Batch::aggregate`), in batches of 5,000:
//! - `ab`: USERS people over 90 days in two groups; each day a new slice of them (so that all are
//!   seen) and 10,000 returning ones, about 21,000 a day: every day is past the exact size
//!   (10,000 a group), so a range is estimated from the days' sketches.
//! - `ab-small`: 10 days of 5,000 people a group, 100,000 user-days in all: the most a range
//!   counts exactly (`MAX_EXACT_UNION`), so the exact union at its largest.
//!
//! The writes are timed against a floor: one insert of the person's id per event into a plain
//! redb table, in the same batches, each committed.
//!
//! Then, in alternating rounds, the summary of each whole range (`Backend::aggregates` and
//! `summarize`, as the endpoint does) and the floor: a raw redb scan of the same rows
//! (`aggregate_days` for `ab`; `aggregate_users` for `ab-small`), summing their lengths. The
//! medians are printed, with the ratio.
//!
//!     cargo run --release --example aggregates -- [USERS=1000000] [ROUNDS=5]

use redb::{ReadableDatabase, TableDefinition};
use std::time::{Duration, Instant};
use tripline::store::Backend;
use tripline::store::aggregates::{Counted, MAX_EXACT_UNION, summarize};
use tripline::store::redb::Db;

const DAYS: i32 = 90;
const FIRST_DAY: i32 = 739_000;
const RETURNING_PER_DAY: u64 = 10_000;
const BATCH: usize = 5_000;
/// The rows as the store keeps them (`store/redb/aggregates.rs`), read raw for the floor.
const ROWS: TableDefinition<(&str, i32, &str), &[u8]> = TableDefinition::new("aggregate_days");
const FLOOR: TableDefinition<&str, ()> = TableDefinition::new("floor");
const USERS: TableDefinition<(&str, i32, &str, u64), ()> = TableDefinition::new("aggregate_users");

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let users: u64 = args.next().map_or(Ok(1_000_000), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(5), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let db = Db::open(dir.path())?;

    let started = Instant::now();
    let mut events = 0u64;
    let mut batch: Vec<Counted> = Vec::with_capacity(BATCH);
    let slice = users.div_ceil(DAYS as u64);
    let mut random = 0x9e37_79b9_7f4a_7c15u64;
    for d in 0..DAYS {
        let new = (d as u64 * slice)..((d as u64 + 1) * slice).min(users);
        let returning = (0..RETURNING_PER_DAY).map(|_| {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random % users
        });
        for user in new.chain(returning) {
            batch.push(counted("ab", user, FIRST_DAY + d, user.is_multiple_of(31)));
            if batch.len() == BATCH {
                events += write(&db, &mut batch)?;
            }
        }
    }
    for d in 0..10 {
        for user in 0..10_000u64 {
            batch.push(counted(
                "ab-small",
                user + d as u64 * 10_000,
                FIRST_DAY + d,
                false,
            ));
            if batch.len() == BATCH {
                events += write(&db, &mut batch)?;
            }
        }
    }
    events += write(&db, &mut batch)?;
    let elapsed = started.elapsed();
    let rate = events as f64 / elapsed.as_secs_f64();
    // The floor of the writes: one insert of the person's id per event into a plain table, in
    // the same batches, each committed, in a database of its own.
    let floor_db = redb::Database::create(dir.path().join("floor.redb"))?;
    let started = Instant::now();
    let mut done = 0;
    while done < events {
        let txn = floor_db.begin_write()?;
        {
            let mut table = txn.open_table(FLOOR)?;
            for i in done..(done + BATCH as u64).min(events) {
                let user = (i * 0x9e37_79b9_7f4a_7c15) % users;
                table.insert(format!("user-{user}").as_str(), ())?;
            }
        }
        txn.commit()?;
        done += BATCH as u64;
    }
    let floor_rate = events as f64 / started.elapsed().as_secs_f64();
    drop(floor_db);
    println!(
        "counted {events} events of {users} people: {rate:.0} events/s; floor (one insert per event, same batches) {floor_rate:.0}/s; {:.1}x the floor's time",
        floor_rate / rate
    );

    let last = FIRST_DAY + DAYS - 1;
    let mut db = Some(db);
    let path = dir.path().join("tripline.redb");
    let (mut big, mut big_floor, mut small, mut small_floor) = (vec![], vec![], vec![], vec![]);
    let mut shown = None;
    for _ in 0..rounds {
        let store = match db.take() {
            Some(db) => db,
            None => Db::open(dir.path())?,
        };
        let t = Instant::now();
        let summary = summarize(&store.aggregates("ab", FIRST_DAY, last)?);
        big.push(t.elapsed());
        let t = Instant::now();
        let exact = summarize(&store.aggregates("ab-small", FIRST_DAY, last)?);
        small.push(t.elapsed());
        assert!(exact.exact && exact.all.users == MAX_EXACT_UNION);
        shown = Some((summary.all.users, summary.exact, summary.all.events));
        drop(store);

        let raw = redb::Database::open(&path)?;
        let txn = raw.begin_read()?;
        let t = Instant::now();
        let rows = txn.open_table(ROWS)?;
        let mut bytes = 0;
        for row in rows.range(("ab", FIRST_DAY, "")..=("ab", last, "\u{10ffff}"))? {
            bytes += row?.1.value().len();
        }
        big_floor.push(t.elapsed());
        let t = Instant::now();
        let table = txn.open_table(USERS)?;
        let mut hashes = 0u64;
        for row in table
            .range(("ab-small", FIRST_DAY, "", 0)..=("ab-small", last, "\u{10ffff}", u64::MAX))?
        {
            hashes ^= row?.0.value().3;
        }
        small_floor.push(t.elapsed());
        std::hint::black_box((bytes, hashes));
    }
    let (estimated, exact, total) = shown.expect("at least one round");
    let error = (estimated as f64 - users as f64) / users as f64 * 100.0;
    println!(
        "ab: 90 days, {total} events, {users} people: uniqueUsers {estimated} (exact: {exact}, {error:+.2}%)"
    );
    report("90 days, sketches", &big, &big_floor);
    report("100,000 user-days, exact", &small, &small_floor);
    Ok(())
}

fn counted(rule: &str, user: u64, day: i32, conversion: bool) -> Counted {
    Counted {
        rule: rule.into(),
        distinct_id: format!("user-{user}"),
        day,
        group: Some(if user.is_multiple_of(2) { "A" } else { "B" }.into()),
        conversion,
        keep_days: 400,
    }
}

/// Counts the batch in one transaction, committed; returns how many.
fn write(db: &Db, batch: &mut Vec<Counted>) -> anyhow::Result<u64> {
    let mut txn = db.begin()?;
    for c in batch.iter() {
        txn.aggregate(c)?;
    }
    txn.commit()?;
    let n = batch.len() as u64;
    batch.clear();
    Ok(n)
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn report(what: &str, tripline: &[Duration], floor: &[Duration]) {
    let (t, f) = (median(tripline), median(floor));
    println!(
        "{what}: summary {:.2} ms, floor (raw scan of the same rows) {:.2} ms, {:.1}x the floor",
        t.as_secs_f64() * 1000.0,
        f.as_secs_f64() * 1000.0,
        t.as_secs_f64() / f.as_secs_f64()
    );
}
