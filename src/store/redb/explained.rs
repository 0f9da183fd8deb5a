//! The records of why rules did or did not act on events (see `explain.rs`), in redb.
//!
//! One table, `explained`: (sequence, uuid) → (whose, the record as JSON), in the order they
//! were written, so that keeping one costs an append at the end and forgetting the oldest
//! beyond `explain::KEEP` a removal at the start: no random write per event, which would cost
//! the busiest workloads a quarter of their throughput (measured: see PERFORMANCE.md). Finding
//! one by uuid walks the table (100,000 rows at most: milliseconds, in one read transaction); a
//! wait that ends later adds a record of its own under the same uuid, merged when it is read.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use serde_json::Value;

use super::err;
use crate::explain::KEEP;
use crate::store::StoreError;

pub(super) const EXPLAINED: TableDefinition<(u64, &str), (&str, &str)> =
    TableDefinition::new("explained");

/// Creates the table, so that readers never meet a missing one.
pub(super) fn create(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(EXPLAINED).map_err(err)?;
    Ok(())
}

/// Keeps `record` of the event `uuid` of `who`, after every other, forgetting the oldest beyond
/// [`KEEP`].
pub(super) fn keep(
    txn: &redb::WriteTransaction,
    uuid: &str,
    who: &str,
    record: &str,
) -> Result<(), StoreError> {
    let mut table = txn.open_table(EXPLAINED).map_err(err)?;
    let next = table
        .last()
        .map_err(err)?
        .map_or(0, |(k, _)| k.value().0 + 1);
    table.insert((next, uuid), (who, record)).map_err(err)?;
    while table.len().map_err(err)? > KEEP {
        table.pop_first().map_err(err)?;
    }
    Ok(())
}

/// The record of `uuid`, if it is kept: the event's own record, with the rules of the records
/// written for it later (waits it started, ended) added. A retried delivery of an event no rule
/// acted on is written again, and is left out here; so is what is left of an event whose own
/// record was forgotten.
pub(super) fn read(txn: &redb::ReadTransaction, uuid: &str) -> Result<Option<String>, StoreError> {
    let table = txn.open_table(EXPLAINED).map_err(err)?;
    let mut found: Option<Value> = None;
    for row in table.iter().map_err(err)? {
        let (k, v) = row.map_err(err)?;
        if k.value().1 != uuid {
            continue;
        }
        let record: Value = serde_json::from_str(v.value().1).map_err(err)?;
        let own = record.get("event").is_some();
        match &mut found {
            None if own => found = Some(record),
            Some(first) if !own => {
                let more = record["rules"].as_array().cloned().unwrap_or_default();
                if let Some(rules) = first["rules"].as_array_mut() {
                    rules.extend(more);
                }
            }
            _ => {}
        }
    }
    Ok(found.map(|r| r.to_string()))
}

/// Forgets the records of `who`'s events; returns how many.
pub(super) fn forget(txn: &redb::WriteTransaction, who: &str) -> Result<u64, StoreError> {
    let mut table = txn.open_table(EXPLAINED).map_err(err)?;
    let theirs: Vec<(u64, String)> = table
        .iter()
        .map_err(err)?
        .filter_map(|row| match row {
            Ok((k, v)) if v.value().0 == who => Some(Ok((k.value().0, k.value().1.to_string()))),
            Ok(_) => None,
            Err(e) => Some(Err(err(e))),
        })
        .collect::<Result<_, _>>()?;
    for (at, uuid) in &theirs {
        table.remove((*at, uuid.as_str())).map_err(err)?;
    }
    Ok(theirs.len() as u64)
}
