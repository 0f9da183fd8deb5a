//! Rule state: counters and once-keys.
//!
//! Everything a rule remembers goes through the [`Store`] trait, keyed by the rule's *name* and
//! the values of the fields it counts per, so state survives reloads, file renames and edits of
//! other rules. [`MemoryStore`] keeps it in memory; a disk-backed store implements the same trait.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

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
}

/// The store could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[error("the state store failed: {0}")]
pub struct StoreError(pub String);

/// Counters and once-keys. Every method is atomic with respect to the others.
pub trait Store: Send + Sync {
    /// Adds one to the counter at `key` and returns its new value.
    fn increment(&self, key: &StateKey) -> Result<u64, StoreError>;
    /// Marks `key`; returns `true` if it was not marked before.
    fn claim_once(&self, key: &StateKey) -> Result<bool, StoreError>;
    /// Unmarks `key` (when the action it guarded failed and should be tried again).
    fn release_once(&self, key: &StateKey) -> Result<(), StoreError>;
}

/// State in memory: lost when the process stops.
#[derive(Default)]
pub struct MemoryStore {
    counters: Mutex<HashMap<StateKey, u64>>,
    once: Mutex<HashSet<StateKey>>,
}

impl Store for MemoryStore {
    fn increment(&self, key: &StateKey) -> Result<u64, StoreError> {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let n = counters.entry(key.clone()).or_insert(0);
        *n += 1;
        Ok(*n)
    }

    fn claim_once(&self, key: &StateKey) -> Result<bool, StoreError> {
        Ok(self
            .once
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone()))
    }

    fn release_once(&self, key: &StateKey) -> Result<(), StoreError> {
        self.once
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
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
    fn memory_store_counts_and_claims() {
        let s = MemoryStore::default();
        let k = StateKey::new("r", "count", &[]);
        assert_eq!(s.increment(&k).unwrap(), 1);
        assert_eq!(s.increment(&k).unwrap(), 2);
        assert!(s.claim_once(&k).unwrap());
        assert!(!s.claim_once(&k).unwrap());
        s.release_once(&k).unwrap();
        assert!(s.claim_once(&k).unwrap());
    }
}
