//! Rule state: counters, once-keys and the events already handled.
//!
//! Everything a rule remembers goes through the [`Store`] trait, keyed by the rule's *name* and
//! the values of the fields it counts per, so state survives reloads, file renames and edits of
//! other rules. The service uses the durable implementation in `store/redb.rs`, one write transaction
//! per group of requests; [`MemoryStore`] keeps the same state in memory.

pub mod queue;
pub mod redb;

use sha2::{Digest, Sha256};

/// A key in the store: a rule name, a kind of state and field values, encoded unambiguously.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StateKey(String);

/// Field values longer than this (encoded) are kept as their SHA-256 digest, so a sender cannot
/// make a rule store large strings: a key stays under about 100 bytes plus the rule's name.
pub const MAX_VALUES_BYTES: usize = 128;

impl StateKey {
    /// The key for `kind` ("count", "once") of `rule` at these field values.
    /// Long values are replaced by their digest under the kind `KIND#sha256`, which no short key
    /// has, so the two forms never collide.
    pub fn new(rule: &str, kind: &str, values: &[&serde_json::Value]) -> StateKey {
        let encoded: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let length: usize = encoded.iter().map(|e| e.len() + 1).sum();
        let rule = serde_json::Value::from(rule);
        if length > MAX_VALUES_BYTES {
            let digest = Sha256::digest(encoded.join(",").as_bytes());
            return StateKey(format!("[{rule},\"{kind}#sha256\",\"{digest:x}\"]"));
        }
        let mut key = format!("[{rule},{}", serde_json::Value::from(kind));
        for e in &encoded {
            key.push(',');
            key.push_str(e);
        }
        key.push(']');
        StateKey(key)
    }

    /// The encoded key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The store could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the store: a second tripline on the same data folder. Retrying does
    /// not help; the operator must stop one of them.
    #[error("another tripline is already running with this data folder")]
    InUse,
    /// A read or write failed (a full disk, an I/O error, the database being reopened): the same
    /// request may succeed later.
    #[error("the state store failed: {0}")]
    Unavailable(String),
}

/// Counters, time windows, when rules last acted, and delivered event ids. Changes made through
/// one value are applied together or not at all (for the database: when its transaction commits).
/// Times are milliseconds since 1970 of the events' own timestamps.
pub trait Store {
    /// Records that the event `uuid` is being handled now; `false` if it was handled before.
    fn first_delivery(&mut self, uuid: &str, now_unix: u64) -> Result<bool, StoreError>;
    /// Adds one to the counter at `key` and returns its new value.
    fn increment(&mut self, key: &StateKey) -> Result<u64, StoreError>;
    /// Records an event at `t_ms` in the window at `key` and returns how many recorded events
    /// fall within `window_ms` up to `t_ms` (see [`record_in_window`]).
    fn count_within(
        &mut self,
        key: &StateKey,
        t_ms: i64,
        window_ms: i64,
        keep: usize,
    ) -> Result<u64, StoreError>;
    /// When the rule last acted for `key`, if it ever did.
    fn last_acted(&mut self, key: &StateKey) -> Result<Option<i64>, StoreError>;
    /// Records that the rule acted for `key` at `t_ms`.
    fn mark_acted(&mut self, key: &StateKey, t_ms: i64) -> Result<(), StoreError>;
    /// Records that an event used `key` at `now_unix` (wall-clock time), so that the key is kept
    /// while in use and forgotten once idle (see `store/redb.rs`).
    fn touch(&mut self, key: &StateKey, now_unix: u64) -> Result<(), StoreError>;
}

/// Adds `t` to the sorted event times of one window and returns how many fall in
/// `(t - window, t]`, counting up to `keep`. Only what can still matter is kept: at most `keep`
/// times (the threshold), none older than `window` before the newest, so a window's state stays
/// small.
pub fn record_in_window(times: &mut Vec<i64>, t: i64, window: i64, keep: usize) -> u64 {
    let at = times.partition_point(|&x| x <= t);
    times.insert(at, t);
    let count = times[..=at]
        .iter()
        .filter(|&&x| x > t.saturating_sub(window))
        .count()
        .min(keep) as u64;
    let newest = *times.last().expect("just inserted");
    times.retain(|&x| x > newest.saturating_sub(window));
    if times.len() > keep {
        times.drain(..times.len() - keep);
    }
    count
}

/// State in memory, for running rules without side effects (`tripline test`, `replay`).
#[derive(Debug, Default)]
pub struct MemoryStore {
    seen: foldhash::HashSet<String>,
    counters: foldhash::HashMap<StateKey, u64>,
    windows: foldhash::HashMap<StateKey, Vec<i64>>,
    acted: foldhash::HashMap<StateKey, i64>,
}

impl Store for MemoryStore {
    fn first_delivery(&mut self, uuid: &str, _now_unix: u64) -> Result<bool, StoreError> {
        Ok(self.seen.insert(uuid.to_string()))
    }

    fn increment(&mut self, key: &StateKey) -> Result<u64, StoreError> {
        if let Some(n) = self.counters.get_mut(key) {
            *n += 1;
            return Ok(*n);
        }
        self.counters.insert(key.clone(), 1);
        Ok(1)
    }

    fn count_within(
        &mut self,
        key: &StateKey,
        t_ms: i64,
        window_ms: i64,
        keep: usize,
    ) -> Result<u64, StoreError> {
        let times = self.windows.entry(key.clone()).or_default();
        Ok(record_in_window(times, t_ms, window_ms, keep))
    }

    fn last_acted(&mut self, key: &StateKey) -> Result<Option<i64>, StoreError> {
        Ok(self.acted.get(key).copied())
    }

    fn mark_acted(&mut self, key: &StateKey, t_ms: i64) -> Result<(), StoreError> {
        self.acted.insert(key.clone(), t_ms);
        Ok(())
    }

    /// In memory, state lives as long as the command: nothing to forget.
    fn touch(&mut self, _key: &StateKey, _now_unix: u64) -> Result<(), StoreError> {
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
    fn long_values_are_kept_as_a_digest() {
        let long = json!("x".repeat(10_000));
        let key = StateKey::new("r", "count", &[&long]);
        assert!(key.as_str().len() < 100, "{}", key.as_str());
        assert_ne!(
            key,
            StateKey::new("r", "count", &[&json!("x".repeat(9_999))])
        );
        assert_eq!(key, StateKey::new("r", "count", &[&long]));
        // Short keys are written as they always were, so databases from before still match.
        assert_eq!(
            StateKey::new("r", "once", &[&json!("a"), &json!(1)]).as_str(),
            r#"["r","once","a",1]"#
        );
    }

    #[test]
    fn windows_count_recent_events_and_stay_small() {
        let mut times = Vec::new();
        // window 10, threshold 3
        assert_eq!(record_in_window(&mut times, 100, 10, 3), 1);
        assert_eq!(record_in_window(&mut times, 105, 10, 3), 2);
        assert_eq!(
            record_in_window(&mut times, 116, 10, 3),
            1,
            "100 and 105 are too old"
        );
        assert_eq!(times, [116]);
        assert_eq!(record_in_window(&mut times, 117, 10, 3), 2);
        assert_eq!(record_in_window(&mut times, 118, 10, 3), 3);
        assert_eq!(record_in_window(&mut times, 119, 10, 3), 3);
        assert_eq!(times, [117, 118, 119], "at most the threshold is kept");
        // An event that arrives late counts in its own window, as far as it is remembered.
        assert_eq!(record_in_window(&mut times, 112, 10, 3), 1);
        assert_eq!(times, [117, 118, 119]);
    }

    #[test]
    fn memory_store_counts_marks_and_dedupes() {
        let mut s = MemoryStore::default();
        let k = StateKey::new("r", "count", &[]);
        assert_eq!(s.increment(&k).unwrap(), 1);
        assert_eq!(s.increment(&k).unwrap(), 2);
        assert_eq!(s.last_acted(&k).unwrap(), None);
        s.mark_acted(&k, 7).unwrap();
        assert_eq!(s.last_acted(&k).unwrap(), Some(7));
        assert!(s.first_delivery("u", 0).unwrap());
        assert!(!s.first_delivery("u", 0).unwrap());
    }
}
