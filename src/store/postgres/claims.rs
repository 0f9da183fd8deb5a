//! Deliveries claimed by one instance at a time, under its lease.
//!
//! An instance claims the due deliveries it attempts (`claimed_by`, taken with
//! `FOR UPDATE SKIP LOCKED`, so two instances never wait for each other's rows) and releases
//! each when its outcome is recorded (`update_pending` and `finish` in `batch.rs`). A claim holds
//! while its instance's lease does (`instances.alive_until`, renewed every two seconds): an
//! instance killed in the middle of an attempt leaves its claims to the others within
//! [`LEASE`](super::LEASE), and the delivery is made again with the same id, Message-ID and
//! Idempotency-Key (at least once across a crash, as with one instance).

use deadpool_postgres::Object;
use futures_util::FutureExt;
use std::collections::HashSet;
use tokio_postgres::types::ToSql;

use super::{LEASE, outbox_record, pg, pipelined};
use crate::store::StoreError;
use crate::store::queue::{Due, Lane, OutboxStatus, Skip, take_room};

/// How soon an instance looks at the queue again when nothing is due: other instances queue
/// deliveries and give up claims without telling it.
const LOOK_AGAIN_SECONDS: u64 = 1;

/// The claims of `instance`, and of instances whose lease ran out, are free.
const FREE: &str = "(claimed_by IS NULL OR claimed_by = $1 OR claimed_by NOT IN \
                    (SELECT id FROM instances WHERE alive_until > clock_timestamp()))";

/// Renews `instance`'s lease, and forgets instances gone for a day.
pub(super) async fn beat(
    client: &tokio_postgres::Client,
    instance: &str,
) -> Result<(), StoreError> {
    let lease = LEASE.as_secs_f64();
    client
        .execute(
            "INSERT INTO instances (id, alive_until) \
             VALUES ($1, clock_timestamp() + make_interval(secs => $2)) \
             ON CONFLICT (id) DO UPDATE SET alive_until = EXCLUDED.alive_until",
            &[&instance, &lease],
        )
        .await
        .map_err(pg)?;
    client
        .execute(
            "DELETE FROM instances WHERE alive_until < clock_timestamp() - interval '1 day'",
            &[],
        )
        .await
        .map_err(pg)?;
    Ok(())
}

/// Claims at most `max` due deliveries for `instance` (see [`crate::store::Backend::due`]):
/// each lane's soonest, as many as it has room for, leaving out those in flight here.
pub(super) async fn due(
    client: &Object,
    instance: &str,
    now_unix: u64,
    max: usize,
    skip: &Skip,
) -> Result<Due, StoreError> {
    let now = i64::try_from(now_unix).unwrap_or(i64::MAX);
    let in_flight: Vec<i64> = skip.in_flight.iter().map(|id| *id as i64).collect();
    let per_lane = i64::try_from(max).unwrap_or(i64::MAX);
    let candidates_sql = format!(
        "SELECT id, lane FROM (\
           SELECT id, lane, next_attempt_unix, row_number() OVER \
             (PARTITION BY lane ORDER BY next_attempt_unix, id) AS n \
           FROM outbox WHERE next_attempt_unix <= $2 AND NOT (id = ANY($3)) AND {FREE}\
         ) AS c WHERE n <= $4 ORDER BY next_attempt_unix, id"
    );
    let candidates = client.prepare_cached(&candidates_sql).await.map_err(pg)?;
    let next = client
        .prepare_cached("SELECT min(next_attempt_unix) FROM outbox WHERE next_attempt_unix > $1")
        .await
        .map_err(pg)?;
    let a: [&(dyn ToSql + Sync); 4] = [&instance, &now, &in_flight, &per_lane];
    let b: [&(dyn ToSql + Sync); 1] = [&now];
    let rows = pipelined(vec![
        client.query(&candidates, &a).boxed(),
        client.query(&next, &b).boxed(),
    ])
    .await?;
    let mut room = skip.room.clone();
    let mut chosen: Vec<i64> = Vec::new();
    let mut full: HashSet<String> = HashSet::new();
    for row in &rows[0] {
        let lane: String = row.get(1);
        if chosen.len() == max || full.contains(&lane) {
            continue;
        }
        // A full lane waits for one of its attempts to end, which wakes the sender.
        if !take_room(&mut room, &Lane::from_key(&lane)) {
            full.insert(lane);
            continue;
        }
        chosen.push(row.get(0));
    }
    let later: Option<i64> = rows[1].first().and_then(|r| r.get(0));
    let look_again = now_unix.saturating_add(LOOK_AGAIN_SECONDS);
    let mut due = Due {
        deliveries: Vec::with_capacity(chosen.len()),
        next_due_unix: Some(later.map_or(look_again, |at| (at as u64).min(look_again))),
    };
    if chosen.is_empty() {
        return Ok(due);
    }
    // Another instance may have claimed some meanwhile: only those still free are taken.
    let claim = client
        .prepare_cached(&format!(
            "UPDATE outbox SET claimed_by = $1 WHERE id IN (SELECT id FROM outbox \
             WHERE id = ANY($2) AND {FREE} FOR UPDATE SKIP LOCKED) \
             RETURNING id, next_attempt_unix, record"
        ))
        .await
        .map_err(pg)?;
    let claimed = client
        .query(&claim, &[&instance, &chosen])
        .await
        .map_err(pg)?;
    let mut taken = Vec::with_capacity(claimed.len());
    for row in &claimed {
        let (id, at): (i64, i64) = (row.get(0), row.get(1));
        taken.push((at, id, outbox_record(row.get(2))?));
    }
    taken.sort_by_key(|(at, id, _)| (*at, *id));
    due.deliveries = taken
        .into_iter()
        .map(|(_, id, record)| (id as u64, record))
        .collect();
    Ok(due)
}

/// The queue at a glance (see [`crate::store::Backend::outbox_status`]), in one round trip.
pub(super) async fn status(client: &Object, shown: i64) -> Result<OutboxStatus, StoreError> {
    let sql = [
        "SELECT count(*) FROM outbox",
        "SELECT count(*) FILTER (WHERE failed), count(*) FROM outbox_done",
        "SELECT id, record FROM outbox ORDER BY id LIMIT $1",
        "SELECT id, record FROM outbox_done ORDER BY done_at DESC, id DESC LIMIT $1",
        "SELECT id, record FROM outbox_done WHERE failed ORDER BY done_at DESC, id DESC LIMIT $1",
    ];
    let mut statements = Vec::new();
    for sql in sql {
        statements.push(client.prepare_cached(sql).await.map_err(pg)?);
    }
    let shown_param: [&(dyn ToSql + Sync); 1] = [&shown];
    let futures = statements
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let params: &[&(dyn ToSql + Sync)] = if i < 2 { &[] } else { &shown_param };
            client.query(s, params).boxed()
        })
        .collect();
    let rows = pipelined(futures).await?;
    let records = |rows: &[tokio_postgres::Row]| {
        rows.iter()
            .map(|r| Ok((r.get::<_, i64>(0) as u64, outbox_record(r.get(1))?)))
            .collect::<Result<Vec<_>, StoreError>>()
    };
    let count = |row: &tokio_postgres::Row, i| row.get::<_, i64>(i) as u64;
    Ok(OutboxStatus {
        pending: count(&rows[0][0], 0),
        waiting: records(&rows[2])?,
        finished: count(&rows[1][0], 1),
        recent: records(&rows[3])?,
        failed: count(&rows[1][0], 0),
        failures: records(&rows[4])?,
    })
}
