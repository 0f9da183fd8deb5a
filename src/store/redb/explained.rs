//! The records of why rules did or did not act on events (see `explain.rs`), in redb.
//!
//! One table, `explained`: (sequence, uuid) → (whose, the record as JSON), in the order they
//! were written, so that keeping one costs an append at the end and forgetting the oldest
//! beyond `explain::KEEP` a removal at the start: no random write per event, which would cost
//! the busiest workloads a quarter of their throughput (measured: see PERFORMANCE.md). Finding
//! one by uuid walks the table (100,000 rows at most: milliseconds, in one read transaction); a
//! wait that ends later adds a record of its own under the same uuid, merged when it is read.

use super::err;
use crate::explain::KEEP;
use crate::store::StoreError;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};

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

/// The record of `uuid`, if it is kept (see [`crate::explain::merge_records`]).
pub(super) fn read(txn: &redb::ReadTransaction, uuid: &str) -> Result<Option<String>, StoreError> {
    let table = txn.open_table(EXPLAINED).map_err(err)?;
    let mut records = Vec::new();
    for row in table.iter().map_err(err)? {
        let (k, v) = row.map_err(err)?;
        if k.value().1 == uuid {
            records.push(v.value().1.to_string());
        }
    }
    crate::explain::merge_records(&records).map_err(err)
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
