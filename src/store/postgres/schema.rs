//! The schema, versioned: the SQL files in `migrations/`, applied in order at start, each in a
//! transaction with its version recorded in `tripline_schema`. Instances starting together take
//! turns (an advisory lock); a database whose schema is newer than this build knows is refused,
//! so an older tripline never writes into tables it does not understand.

use deadpool_postgres::Object;

use super::pg;
use crate::store::StoreError;

/// Every version, in order: its number and its SQL.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/0001_tables.sql")),
    (2, include_str!("migrations/0002_aggregates.sql")),
];

/// The advisory lock instances take turns on while migrating.
const MIGRATING: i64 = 0x7472_6970_6c69_6e65; // "tripline"

/// The newest version this build knows.
pub fn newest() -> i32 {
    MIGRATIONS.last().map_or(0, |(v, _)| *v)
}

/// Brings the database to the newest schema, or says why it cannot be used.
pub async fn migrate(client: &mut Object) -> Result<(), StoreError> {
    // Waiting for another instance's migration, however long it takes, is no failure.
    client
        .batch_execute("SET lock_timeout = 0")
        .await
        .map_err(pg)?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATING])
        .await
        .map_err(pg)?;
    let migrated = apply(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATING])
        .await;
    let reset = client.batch_execute("RESET lock_timeout").await;
    migrated?;
    unlocked.map(drop).map_err(pg)?;
    reset.map_err(pg)
}

async fn apply(client: &mut Object) -> Result<(), StoreError> {
    let exists = client
        .query_one("SELECT to_regclass('tripline_schema') IS NOT NULL", &[])
        .await
        .map_err(pg)?;
    if !exists.get::<_, bool>(0) {
        client
            .batch_execute(
                "CREATE TABLE tripline_schema (
                     version integer PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now()
                 )",
            )
            .await
            .map_err(pg)?;
    }
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM tripline_schema", &[])
        .await
        .map_err(pg)?;
    let current: i32 = row.get(0);
    if current > newest() {
        return Err(StoreError::Unavailable(format!(
            "the database holds tripline's tables at version {current}, made by a newer tripline \
             (this one knows up to version {}): run that version, or point --store at another \
             database",
            newest()
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let txn = client.transaction().await.map_err(pg)?;
        txn.batch_execute(sql).await.map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot bring the database to version {version}: {}",
                pg(e)
            ))
        })?;
        txn.execute(
            "INSERT INTO tripline_schema (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(pg)?;
        txn.commit().await.map_err(pg)?;
        tracing::info!(version, "brought the PostgreSQL schema up to date");
    }
    Ok(())
}
