//! Rule state: counters, once-keys and the events already handled.
//!
//! Everything a rule remembers goes through the [`Store`] trait, keyed by the rule's *name* and
//! the values of the fields it counts per, so state survives reloads, file renames and edits of
//! other rules. The service uses the durable implementation in `db.rs`, one write transaction
//! per group of requests; [`MemoryStore`] keeps the same state in memory.

use std::collections::{HashMap, HashSet};

/// A key in the store: a rule name, a kind of state and field values, encoded unambiguously.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StateKey(String);

impl StateKey {
    /// The key for `kind` ("count", "once") of `rule` at these field values.
    pub fn new(rule: &str, kind: &str, values: &[&serde_json::Value]) -> StateKey {
        let mut parts = vec![serde_json::Value::from(rule), kind.into()];
        parts.extend(values.iter().map(|v| (*v).clone()));
        StateKey(serde_json::Value::Array(parts).to_string())
    }

    /// The encoded key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The store could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[error("the state store failed: {0}")]
pub struct StoreError(pub String);

/// Counters, once-keys and delivered event ids. Changes made through one value are applied
/// together or not at all (for the database: when its transaction commits).
pub trait Store {
    /// Records that the event `uuid` is being handled now; `false` if it was handled before.
    fn first_delivery(&mut self, uuid: &str, now_unix: u64) -> Result<bool, StoreError>;
    /// Adds one to the counter at `key` and returns its new value.
    fn increment(&mut self, key: &StateKey) -> Result<u64, StoreError>;
    /// Whether `key` is marked.
    fn once_done(&mut self, key: &StateKey) -> Result<bool, StoreError>;
    /// Marks `key`.
    fn mark_once(&mut self, key: &StateKey) -> Result<(), StoreError>;
}

/// State in memory, for running rules without side effects (and for tests).
#[derive(Debug, Default)]
pub struct MemoryStore {
    seen: HashSet<String>,
    counters: HashMap<StateKey, u64>,
    once: HashSet<StateKey>,
}

impl Store for MemoryStore {
    fn first_delivery(&mut self, uuid: &str, _now_unix: u64) -> Result<bool, StoreError> {
        Ok(self.seen.insert(uuid.to_string()))
    }

    fn increment(&mut self, key: &StateKey) -> Result<u64, StoreError> {
        let n = self.counters.entry(key.clone()).or_insert(0);
        *n += 1;
        Ok(*n)
    }

    fn once_done(&mut self, key: &StateKey) -> Result<bool, StoreError> {
        Ok(self.once.contains(key))
    }

    fn mark_once(&mut self, key: &StateKey) -> Result<(), StoreError> {
        self.once.insert(key.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_do_not_collide_across_rules_kinds_or_types() {
        let a = StateKey::new("r", "count", &[&json!("1")]);
        assert_ne!(a, StateKey::new("r", "count", &[&json!(1)]));
        assert_ne!(a, StateKey::new("r", "once", &[&json!("1")]));
        assert_ne!(
            StateKey::new("a,b", "count", &[]),
            StateKey::new("a", "count", &[&json!("b")])
        );
    }

    #[test]
    fn memory_store_counts_marks_and_dedupes() {
        let mut s = MemoryStore::default();
        let k = StateKey::new("r", "count", &[]);
        assert_eq!(s.increment(&k).unwrap(), 1);
        assert_eq!(s.increment(&k).unwrap(), 2);
        assert!(!s.once_done(&k).unwrap());
        s.mark_once(&k).unwrap();
        assert!(s.once_done(&k).unwrap());
        assert!(s.first_delivery("u", 0).unwrap());
        assert!(!s.first_delivery("u", 0).unwrap());
    }
}
