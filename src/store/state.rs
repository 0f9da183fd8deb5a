//! Rule state in memory: what a batch of events reads and changes while the engine decides.
//!
//! A store loads the state a batch needs in one go ([`Wants`] → [`State`]), the engine works on
//! it without I/O, and the store writes back only what changed ([`State::changes`]). One load and
//! one write per batch is what a networked database can afford; for the embedded one it means
//! each table is opened once per batch instead of once per operation.

use foldhash::{HashMap, HashSet};

use crate::store::StateKey;

/// The state a batch of events may read: the keys its rules count or limit by, and the ids of
/// its events.
#[derive(Debug, Default)]
pub struct Wants {
    /// Plain counters (`[count]` without `within`).
    pub counters: HashSet<StateKey>,
    /// Time windows (`[count]` with `within`).
    pub windows: HashSet<StateKey>,
    /// When a rule with `[limits]` last acted.
    pub acted: HashSet<StateKey>,
    /// Event uuids, to skip those handled before.
    pub uuids: HashSet<String>,
}

/// Loaded rule state and what the engine changed in it. A key that was not loaded reads as
/// never used (a zero count, an empty window, never acted).
#[derive(Debug, Default)]
pub struct State {
    counters: HashMap<StateKey, u64>,
    windows: HashMap<StateKey, Vec<i64>>,
    acted: HashMap<StateKey, i64>,
    seen: HashSet<String>,
    changed: Changed,
}

/// What changed since the state was loaded.
#[derive(Debug, Default)]
struct Changed {
    counters: HashSet<StateKey>,
    windows: HashSet<StateKey>,
    acted: HashSet<StateKey>,
    seen: Vec<String>,
    touched: HashSet<StateKey>,
}

/// What a store writes back after a batch: see [`State::changes`].
pub struct Changes<'a> {
    pub counters: Vec<(&'a StateKey, u64)>,
    pub windows: Vec<(&'a StateKey, &'a [i64])>,
    pub acted: Vec<(&'a StateKey, i64)>,
    /// Event uuids handled for the first time.
    pub seen: &'a [String],
    /// Keys an event used, so that they are kept while in use and forgotten once idle.
    pub touched: Vec<&'a StateKey>,
}

impl State {
    /// Sets a counter as loaded from the store.
    pub fn load_counter(&mut self, key: StateKey, count: u64) {
        self.counters.insert(key, count);
    }

    /// Sets a window's event times (sorted) as loaded from the store.
    pub fn load_window(&mut self, key: StateKey, times: Vec<i64>) {
        self.windows.insert(key, times);
    }

    /// Sets when a rule last acted for `key`, as loaded from the store.
    pub fn load_acted(&mut self, key: StateKey, t_ms: i64) {
        self.acted.insert(key, t_ms);
    }

    /// Notes that the event `uuid` was handled before, as loaded from the store.
    pub fn load_seen(&mut self, uuid: String) {
        self.seen.insert(uuid);
    }

    /// Records that the event `uuid` is being handled now; `false` if it was handled before.
    pub fn first_delivery(&mut self, uuid: &str) -> bool {
        if self.seen.contains(uuid) {
            return false;
        }
        self.seen.insert(uuid.to_string());
        self.changed.seen.push(uuid.to_string());
        true
    }

    /// Adds one to the counter at `key` and returns its new value.
    pub fn increment(&mut self, key: &StateKey) -> u64 {
        let n = self.counters.entry(key.clone()).or_default();
        *n += 1;
        let n = *n;
        self.changed.counters.insert(key.clone());
        n
    }

    /// Records an event at `t_ms` in the window at `key` and returns how many recorded events
    /// fall within `window_ms` up to `t_ms` (see [`record_in_window`]).
    pub fn count_within(&mut self, key: &StateKey, t_ms: i64, window_ms: i64, keep: usize) -> u64 {
        let times = self.windows.entry(key.clone()).or_default();
        let n = record_in_window(times, t_ms, window_ms, keep);
        self.changed.windows.insert(key.clone());
        n
    }

    /// When the rule last acted for `key`, if it ever did.
    pub fn last_acted(&self, key: &StateKey) -> Option<i64> {
        self.acted.get(key).copied()
    }

    /// Records that the rule acted for `key` at `t_ms`.
    pub fn mark_acted(&mut self, key: &StateKey, t_ms: i64) {
        self.acted.insert(key.clone(), t_ms);
        self.changed.acted.insert(key.clone());
    }

    /// Records that an event used `key`, so that the store keeps it while in use.
    pub fn touch(&mut self, key: &StateKey) {
        if !self.changed.touched.contains(key) {
            self.changed.touched.insert(key.clone());
        }
    }

    /// What changed since the state was loaded (or since [`State::saved`]).
    pub fn changes(&self) -> Changes<'_> {
        Changes {
            counters: (self.changed.counters.iter())
                .map(|k| (k, self.counters[k]))
                .collect(),
            windows: (self.changed.windows.iter())
                .map(|k| (k, self.windows[k].as_slice()))
                .collect(),
            acted: (self.changed.acted.iter())
                .map(|k| (k, self.acted[k]))
                .collect(),
            seen: &self.changed.seen,
            touched: self.changed.touched.iter().collect(),
        }
    }

    /// Marks every change as written.
    pub fn saved(&mut self) {
        self.changed = Changed::default();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn only_what_changed_is_written_back() {
        let mut state = State::default();
        let (a, b) = (
            StateKey::new("r", "count", &[]),
            StateKey::new("r", "once", &[]),
        );
        state.load_counter(a.clone(), 4);
        state.load_acted(b.clone(), 9);
        state.load_seen("old".into());
        assert!(!state.first_delivery("old"));
        assert!(state.first_delivery("new"));
        assert!(!state.first_delivery("new"), "twice in one batch");
        assert_eq!(state.increment(&a), 5);
        state.touch(&a);
        assert_eq!(state.last_acted(&b), Some(9));
        let changes = state.changes();
        assert_eq!(changes.counters, [(&a, 5)]);
        assert!(changes.acted.is_empty() && changes.windows.is_empty());
        assert_eq!(changes.seen, ["new"]);
        assert_eq!(changes.touched, [&a]);
        state.saved();
        assert!(state.changes().counters.is_empty());
        assert_eq!(
            state.increment(&a),
            6,
            "the value is kept, the change forgotten"
        );
    }
}
