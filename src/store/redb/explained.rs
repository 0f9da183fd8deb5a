//! The records of why rules did or did not act on events (see `explain.rs`), in redb.
//!
//! Tables: `explained`, uuid → (when received, whose, the record as JSON); `explained_by_time`,
//! (when received, uuid), to forget the oldest beyond `explain::KEEP`; their number in `meta`.

use redb::{ReadableTable, TableDefinition};
use serde_json::Value;

use super::{META, err};
use crate::explain::KEEP;
use crate::store::StoreError;

pub(super) const EXPLAINED: TableDefinition<&str, (i64, &str, &str)> =
    TableDefinition::new("explained");
pub(super) const BY_TIME: TableDefinition<(i64, &str), ()> =
    TableDefinition::new("explained_by_time");
/// Where their number is kept, in `meta`.
const COUNT: &str = "explained";

/// Creates the tables, so that readers never meet a missing one.
pub(super) fn create(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(EXPLAINED).map_err(err)?;
    txn.open_table(BY_TIME).map_err(err)?;
    Ok(())
}

/// Keeps `record` of the event `uuid` unless it has one (a retried delivery changes nothing),
/// forgetting the oldest beyond [`KEEP`].
pub(super) fn keep(
    txn: &redb::WriteTransaction,
    uuid: &str,
    received_ms: i64,
    who: &str,
    record: &str,
) -> Result<(), StoreError> {
    let mut table = txn.open_table(EXPLAINED).map_err(err)?;
    if table.get(uuid).map_err(err)?.is_some() {
        return Ok(());
    }
    table
        .insert(uuid, (received_ms, who, record))
        .map_err(err)?;
    let mut by_time = txn.open_table(BY_TIME).map_err(err)?;
    by_time.insert((received_ms, uuid), ()).map_err(err)?;
    let mut meta = txn.open_table(META).map_err(err)?;
    let mut count = meta.get(COUNT).map_err(err)?.map_or(0, |c| c.value()) + 1;
    if count > KEEP {
        let oldest = by_time
            .first()
            .map_err(err)?
            .map(|(k, _)| (k.value().0, k.value().1.to_string()));
        if let Some((at, old)) = oldest {
            by_time.remove((at, old.as_str())).map_err(err)?;
            table.remove(old.as_str()).map_err(err)?;
            count -= 1;
        }
    }
    meta.insert(COUNT, count).map_err(err)?;
    Ok(())
}

/// Adds `entry` to the rules of the record of `uuid`, if it is still kept.
pub(super) fn add(
    txn: &redb::WriteTransaction,
    uuid: &str,
    entry: &Value,
) -> Result<(), StoreError> {
    let mut table = txn.open_table(EXPLAINED).map_err(err)?;
    let Some((at, who, json)) = table.get(uuid).map_err(err)?.map(|v| {
        let (at, who, json) = v.value();
        (at, who.to_string(), json.to_string())
    }) else {
        return Ok(());
    };
    let mut record: Value = serde_json::from_str(&json).map_err(err)?;
    if let Some(rules) = record["rules"].as_array_mut() {
        rules.push(entry.clone());
    }
    table
        .insert(uuid, (at, who.as_str(), record.to_string().as_str()))
        .map_err(err)?;
    Ok(())
}

/// The record of `uuid`, if it is kept.
pub(super) fn read(txn: &redb::ReadTransaction, uuid: &str) -> Result<Option<String>, StoreError> {
    let table = txn.open_table(EXPLAINED).map_err(err)?;
    Ok(table
        .get(uuid)
        .map_err(err)?
        .map(|v| v.value().2.to_string()))
}

/// Forgets the records of `who`'s events; returns how many.
pub(super) fn forget(txn: &redb::WriteTransaction, who: &str) -> Result<u64, StoreError> {
    let mut table = txn.open_table(EXPLAINED).map_err(err)?;
    let theirs: Vec<(String, i64)> = table
        .iter()
        .map_err(err)?
        .filter_map(|row| match row {
            Ok((k, v)) if v.value().1 == who => Some(Ok((k.value().to_string(), v.value().0))),
            Ok(_) => None,
            Err(e) => Some(Err(err(e))),
        })
        .collect::<Result<_, _>>()?;
    let mut by_time = txn.open_table(BY_TIME).map_err(err)?;
    for (uuid, at) in &theirs {
        table.remove(uuid.as_str()).map_err(err)?;
        by_time.remove((*at, uuid.as_str())).map_err(err)?;
    }
    let mut meta = txn.open_table(META).map_err(err)?;
    let count = meta.get(COUNT).map_err(err)?.map_or(0, |c| c.value());
    meta.insert(COUNT, count.saturating_sub(theirs.len() as u64))
        .map_err(err)?;
    Ok(theirs.len() as u64)
}
