//! Rule state in memory: what a batch of events reads and changes while the engine decides.
//!
//! A store loads the state a batch needs in one go ([`Wants`] → [`State`]), the engine works on
//! it without I/O, and the store writes back only what changed ([`State::changes`]). One load and
//! one write per batch is what a networked database can afford; for the embedded one it means
//! each table is opened once per batch instead of once per operation.

use foldhash::HashMap;

use crate::store::StateKey;
use crate::store::pending::Pending;

/// The state a batch of events may read: the keys its rules count or limit by, and the ids of
/// its events (borrowed from the batch; a key named twice is loaded twice, harmlessly).
#[derive(Debug, Default)]
pub struct Wants<'a> {
    /// Keys of `[count]` (a counter or a window) and `[limits]` (when the rule last acted, a
    /// cap's period count).
    pub keys: Vec<&'a StateKey>,
    /// Event uuids, to skip those handled before.
    pub uuids: Vec<&'a str>,
    /// Pending waits.
    pub waits: Vec<&'a StateKey>,
    /// Rules whose number of pending waits may change (their cap is checked).
    pub waiting: Vec<&'a str>,
}

impl<'a> Wants<'a> {
    /// Only these keys of `[count]` and `[limits]`.
    pub fn keys(keys: &'a [StateKey]) -> Wants<'a> {
        Wants {
            keys: keys.iter().collect(),
            ..Wants::default()
        }
    }

    /// Adds a rule whose number of pending records is read, once however many events name it.
    pub fn waiting(&mut self, rule: &'a str) {
        if !self.waiting.contains(&rule) {
            self.waiting.push(rule);
        }
    }
}

/// Loaded rule state and what the engine changed in it. A key that was not loaded reads as
/// never used (a zero count, an empty window, never acted).
///
/// Two maps in all, so that a batch's state costs two hash tables however many kinds of state
/// it touches: one slot per key, and the event ids. What changed is listed apart, so that
/// writing it back costs what changed, not what is held (`tripline test` and `replay` hold the
/// whole state in one).
#[derive(Debug, Default)]
pub struct State {
    keys: HashMap<StateKey, Slot>,
    /// The keys changed or used since the state was loaded (or saved).
    dirty: Vec<StateKey>,
    /// Event uuids handled before, or since the state was loaded.
    seen: foldhash::HashSet<String>,
    /// Event uuids first handled since the state was loaded (or saved).
    fresh: Vec<String>,
    /// Pending waits per rule, and whether the number changed since the state was loaded.
    waiting: HashMap<String, (u64, bool)>,
    /// Whose event made each key the store did not have (see [`State::own`]).
    owners: HashMap<StateKey, String>,
}

/// What one key holds: a `count` key its counter or window, a `once` key when the rule acted.
#[derive(Debug, Default)]
struct Slot {
    count: u64,
    window: Vec<i64>,
    acted: Option<i64>,
    /// A `wait` key's pending wait (boxed: it holds an event, and most slots have none).
    wait: Option<Box<Pending>>,
    /// Its deadline as the store has it (so that the store can move its due index).
    stored_deadline: Option<i64>,
    /// Which of the above changed since the state was loaded ([`CHANGED_COUNT`]...).
    changed: u8,
    /// Whether an event used the key since the state was loaded.
    touched: bool,
    /// The day (since 1970) the store last had an event use the key, as loaded.
    day: Option<u64>,
}

/// What the store keeps for one key of `[count]` or `[limits]`: see [`State::load_key`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub count: u64,
    pub window: Vec<i64>,
    pub acted: Option<i64>,
    /// The day (since 1970) an event last used the key.
    pub day: u64,
}

const CHANGED_COUNT: u8 = 1;
const CHANGED_WINDOW: u8 = 2;
const CHANGED_ACTED: u8 = 4;
const CHANGED_WAIT: u8 = 8;

/// A pending wait set or ended: see [`Changes::waits`].
pub struct WaitChange<'a> {
    pub key: &'a StateKey,
    /// Its deadline in the store before, to move or remove it in a due index.
    pub stored_deadline: Option<i64>,
    /// The wait now; `None` once it ended.
    pub now: Option<&'a Pending>,
}

/// A key of `[count]` or `[limits]` that changed or that an event used: what it holds now.
pub struct KeyChange<'a> {
    pub key: &'a StateKey,
    pub count: u64,
    pub window: &'a [i64],
    pub acted: Option<i64>,
    /// Whether its count, window or last action changed (else an event only used it).
    pub changed: bool,
    /// The day the store had for it, if it had it.
    pub day: Option<u64>,
    /// Whose event made it, when the store did not have it (see [`State::own`]).
    pub owner: Option<&'a str>,
}

/// What a store writes back after a batch: see [`State::changes`].
pub struct Changes<'a> {
    /// Keys of `[count]` and `[limits]` changed or used.
    pub keys: Vec<KeyChange<'a>>,
    /// Pending waits set or ended: the key, the deadline the store had for it, and the wait now.
    pub waits: Vec<WaitChange<'a>>,
    /// Rules whose number of pending waits changed, with the number now.
    pub waiting: Vec<(&'a str, u64)>,
    /// Event uuids handled for the first time.
    pub seen: Vec<&'a str>,
}

impl State {
    fn slot(&mut self, key: &StateKey) -> &mut Slot {
        // Looked up first: most keys of a batch are there already, and need no copy.
        if !self.keys.contains_key(key) {
            self.keys.insert(key.clone(), Slot::default());
        }
        self.keys.get_mut(key).expect("inserted above")
    }

    /// The slot at `key`, about to change (or be used): listed as dirty the first time.
    fn slot_to_change(&mut self, key: &StateKey) -> &mut Slot {
        if !self.keys.contains_key(key) {
            self.keys.insert(key.clone(), Slot::default());
        }
        let slot = self.keys.get_mut(key).expect("inserted above");
        if slot.changed == 0 && !slot.touched {
            self.dirty.push(key.clone());
        }
        slot
    }

    /// Adds state loaded later in the same batch: keys this state does not hold yet.
    pub fn merge(&mut self, later: State) {
        debug_assert!(
            later.dirty.is_empty() && later.fresh.is_empty(),
            "merged as loaded"
        );
        for (key, slot) in later.keys {
            self.keys.entry(key).or_insert(slot);
        }
        self.seen.extend(later.seen);
        for (rule, n) in later.waiting {
            self.waiting.entry(rule).or_insert(n);
        }
    }

    /// Sets a key of `[count]` or `[limits]` as loaded from the store: its counter, its window
    /// (event times, sorted; or a period and its count; or value digests), when the rule last
    /// acted for it, and the day an event last used it.
    pub fn load_key(&mut self, key: &StateKey, record: KeyRecord) {
        let slot = self.slot(key);
        slot.count = record.count;
        slot.window = record.window;
        slot.acted = record.acted;
        slot.day = Some(record.day);
    }

    /// Sets a pending wait as loaded from the store.
    pub fn load_wait(&mut self, key: &StateKey, wait: Pending) {
        let slot = self.slot(key);
        slot.stored_deadline = Some(wait.deadline_ms);
        slot.wait = Some(Box::new(wait));
    }

    /// Sets a rule's number of pending waits as loaded from the store.
    pub fn load_waiting(&mut self, rule: &str, n: u64) {
        self.waiting.insert(rule.to_string(), (n, false));
    }

    /// The pending wait at `key`, if any.
    pub fn wait(&self, key: &StateKey) -> Option<&Pending> {
        self.keys.get(key).and_then(|slot| slot.wait.as_deref())
    }

    /// How many waits `rule` has pending (as loaded, if it was, and changed since).
    pub fn waiting(&self, rule: &str) -> u64 {
        self.waiting.get(rule).map_or(0, |(n, _)| *n)
    }

    /// Sets the pending wait at `key` (a new one, or a changed one).
    pub fn set_wait(&mut self, key: &StateKey, wait: Pending) {
        let rule = wait.rule.clone();
        let slot = self.slot_to_change(key);
        let new = slot.wait.is_none();
        slot.wait = Some(Box::new(wait));
        slot.changed |= CHANGED_WAIT;
        if new {
            self.add_waiting(&rule, 1);
        }
    }

    /// Ends the pending wait at `key`, returning it.
    pub fn end_wait(&mut self, key: &StateKey) -> Option<Pending> {
        self.keys.get(key)?.wait.as_ref()?;
        let slot = self.slot_to_change(key);
        let wait = *slot.wait.take().expect("looked at above");
        slot.changed |= CHANGED_WAIT;
        self.add_waiting(&wait.rule, -1);
        Some(wait)
    }

    fn add_waiting(&mut self, rule: &str, by: i64) {
        if !self.waiting.contains_key(rule) {
            self.waiting.insert(rule.to_string(), (0, false));
        }
        let (n, changed) = self.waiting.get_mut(rule).expect("inserted above");
        *n = n.saturating_add_signed(by);
        *changed = true;
    }

    /// Notes that the event `uuid` was handled before, as loaded from the store.
    pub fn load_seen(&mut self, uuid: &str) {
        self.seen.insert(uuid.to_string());
    }

    /// Records that the event `uuid` is being handled now; `false` if it was handled before.
    pub fn first_delivery(&mut self, uuid: &str) -> bool {
        if self.seen.contains(uuid) {
            return false;
        }
        self.seen.insert(uuid.to_string());
        self.fresh.push(uuid.to_string());
        true
    }

    /// Adds one to the counter at `key` and returns its new value.
    pub fn increment(&mut self, key: &StateKey) -> u64 {
        let slot = self.slot_to_change(key);
        slot.count += 1;
        slot.changed |= CHANGED_COUNT;
        slot.count
    }

    /// Records an event at `t_ms` in the window at `key` and returns how many recorded events
    /// fall within `window_ms` up to `t_ms` (see [`record_in_window`]).
    pub fn count_within(&mut self, key: &StateKey, t_ms: i64, window_ms: i64, keep: usize) -> u64 {
        let slot = self.slot_to_change(key);
        slot.changed |= CHANGED_WINDOW;
        record_in_window(&mut slot.window, t_ms, window_ms, keep)
    }

    /// Adds one to the count of calendar period `period` at `key` and returns it. Only the
    /// latest period is kept (as `[period, count]` in the key's window): a newer one starts
    /// again from one; an event from an older one counts as the first of its period, unkept.
    pub fn count_in_period(&mut self, key: &StateKey, period: i64) -> u64 {
        let slot = self.slot_to_change(key);
        match slot.window[..] {
            [p, n] if p == period => {
                slot.window[1] = n.saturating_add(1);
                slot.changed |= CHANGED_WINDOW;
                slot.window[1] as u64
            }
            [p, _] if p > period => {
                slot.touched = true;
                1
            }
            _ => {
                slot.window = vec![period, 1];
                slot.changed |= CHANGED_WINDOW;
                1
            }
        }
    }

    /// The count of calendar period `period` at `key` (0 if it holds another period's).
    pub fn period_count(&self, key: &StateKey, period: i64) -> u64 {
        match self.keys.get(key).map(|slot| &slot.window[..]) {
            Some([p, n]) if *p == period => *n as u64,
            _ => 0,
        }
    }

    /// Records that `value` (a digest) was seen at `t_ms` and returns how many different values
    /// count now, up to `keep`: ever, within `window_ms` before `t_ms`, or in calendar `period`
    /// (see [`Distinct`]). At most `keep` values are kept per key (the most recent), so the
    /// count is exact up to the threshold.
    pub fn count_distinct(
        &mut self,
        key: &StateKey,
        value: i64,
        t_ms: i64,
        how: Distinct,
        keep: usize,
    ) -> u64 {
        let slot = self.slot_to_change(key);
        slot.changed |= CHANGED_WINDOW;
        count_distinct(&mut slot.window, value, t_ms, how, keep)
    }

    /// When the rule last acted for `key`, if it ever did.
    pub fn last_acted(&self, key: &StateKey) -> Option<i64> {
        self.keys.get(key).and_then(|slot| slot.acted)
    }

    /// Records that the rule acted for `key` at `t_ms`.
    pub fn mark_acted(&mut self, key: &StateKey, t_ms: i64) {
        let slot = self.slot_to_change(key);
        slot.acted = Some(t_ms);
        slot.changed |= CHANGED_ACTED;
    }

    /// Records that an event of `who` (a distinct id) is about to make `key`, if the store does
    /// not have it yet and the key is that person's (its values hold their id): the store then
    /// lists the key as theirs (`GET /users`, and what `DELETE /users` forgets). Most keys an
    /// event uses are stored already, and cost one lookup here.
    pub fn own(&mut self, key: &StateKey, who: &str) {
        let stored = self.keys.get(key).is_some_and(|slot| slot.day.is_some());
        if !stored && !self.owners.contains_key(key) && key.holds(who) {
            self.owners.insert(key.clone(), who.to_string());
        }
    }

    /// Records that an event used `key`, so that the store keeps it while in use.
    pub fn touch(&mut self, key: &StateKey) {
        self.slot_to_change(key).touched = true;
    }

    /// What changed since the state was loaded (or since [`State::saved`]).
    pub fn changes(&self) -> Changes<'_> {
        let mut changes = Changes {
            keys: Vec::new(),
            waits: Vec::new(),
            waiting: (self.waiting.iter())
                .filter(|(_, (_, changed))| *changed)
                .map(|(rule, (n, _))| (rule.as_str(), *n))
                .collect(),
            seen: self.fresh.iter().map(String::as_str).collect(),
        };
        for key in &self.dirty {
            let slot = &self.keys[key];
            let changed = slot.changed & (CHANGED_COUNT | CHANGED_WINDOW | CHANGED_ACTED) != 0;
            if changed || slot.touched {
                changes.keys.push(KeyChange {
                    key,
                    count: slot.count,
                    window: &slot.window,
                    acted: slot.acted,
                    changed,
                    day: slot.day,
                    owner: self.owners.get(key).map(String::as_str),
                });
            }
            if slot.changed & CHANGED_WAIT != 0 {
                changes.waits.push(WaitChange {
                    key,
                    stored_deadline: slot.stored_deadline,
                    now: slot.wait.as_deref(),
                });
            }
        }
        changes
    }

    /// What changed in the waits, cheaply: the soonest deadline set, and each rule's number of
    /// pending waits that changed.
    pub fn wait_changes(&self) -> (Option<i64>, Vec<(String, u64)>) {
        let soonest = (self.dirty.iter().map(|key| &self.keys[key]))
            .filter(|slot| slot.changed & CHANGED_WAIT != 0)
            .filter_map(|slot| slot.wait.as_ref().map(|w| w.deadline_ms))
            .min();
        let waiting = (self.waiting.iter())
            .filter(|(_, (_, changed))| *changed)
            .map(|(rule, (n, _))| (rule.clone(), *n))
            .collect();
        (soonest, waiting)
    }

    /// Marks every change as written.
    pub fn saved(&mut self) {
        for key in self.dirty.drain(..) {
            let slot = self.keys.get_mut(&key).expect("a dirty key has a slot");
            slot.changed = 0;
            slot.touched = false;
            slot.stored_deadline = slot.wait.as_ref().map(|w| w.deadline_ms);
        }
        self.waiting
            .values_mut()
            .for_each(|(_, changed)| *changed = false);
        self.fresh.clear();
        self.owners.clear();
    }
}

/// Which different values count (see [`State::count_distinct`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distinct {
    Ever,
    Within(i64),
    InPeriod(i64),
}

/// The different values of one key, kept in its window as numbers: `[v1, v2, ...]` (ever),
/// `[v1, t1, v2, t2, ...]` (within: each value's latest time), `[period, v1, v2, ...]` (in a
/// period: only the latest period's).
fn count_distinct(kept: &mut Vec<i64>, value: i64, t: i64, how: Distinct, keep: usize) -> u64 {
    match how {
        Distinct::Ever => {
            if !kept.contains(&value) && kept.len() < keep {
                kept.push(value);
            }
            kept.len() as u64
        }
        Distinct::InPeriod(period) => {
            match kept.first() {
                Some(&p) if p == period => {}
                Some(&p) if p > period => return 1,
                _ => *kept = vec![period],
            }
            if !kept[1..].contains(&value) && kept.len() <= keep {
                kept.push(value);
            }
            (kept.len() - 1) as u64
        }
        Distinct::Within(window) => {
            let mut pairs: Vec<(i64, i64)> = kept.chunks_exact(2).map(|c| (c[0], c[1])).collect();
            match pairs.iter_mut().find(|(v, _)| *v == value) {
                Some((_, seen)) => *seen = (*seen).max(t),
                None => pairs.push((value, t)),
            }
            let newest = pairs.iter().map(|(_, s)| *s).max().unwrap_or(t);
            pairs.retain(|(_, s)| *s > newest.saturating_sub(window));
            // The most recent `keep` values are enough to know whether `keep` are in a window.
            pairs.sort_by_key(|(_, s)| std::cmp::Reverse(*s));
            pairs.truncate(keep);
            let count = pairs
                .iter()
                .filter(|(_, s)| *s <= t && *s > t.saturating_sub(window))
                .count() as u64;
            *kept = pairs.iter().flat_map(|(v, s)| [*v, *s]).collect();
            count
        }
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
    fn different_values_are_counted_ever_in_a_period_or_in_a_window() {
        let mut kept = Vec::new();
        let ever = Distinct::Ever;
        assert_eq!(count_distinct(&mut kept, 7, 0, ever, 3), 1);
        assert_eq!(
            count_distinct(&mut kept, 7, 1, ever, 3),
            1,
            "the same value again"
        );
        assert_eq!(count_distinct(&mut kept, 8, 2, ever, 3), 2);
        assert_eq!(count_distinct(&mut kept, 9, 3, ever, 3), 3);
        assert_eq!(
            count_distinct(&mut kept, 10, 4, ever, 3),
            3,
            "at most the threshold"
        );
        assert_eq!(kept, [7, 8, 9]);

        let mut kept = Vec::new();
        assert_eq!(count_distinct(&mut kept, 7, 0, Distinct::InPeriod(5), 3), 1);
        assert_eq!(count_distinct(&mut kept, 8, 0, Distinct::InPeriod(5), 3), 2);
        assert_eq!(
            count_distinct(&mut kept, 8, 0, Distinct::InPeriod(6), 3),
            1,
            "a new week"
        );
        assert_eq!(
            count_distinct(&mut kept, 9, 0, Distinct::InPeriod(5), 3),
            1,
            "a late one"
        );
        assert_eq!(kept, [6, 8]);

        let mut kept = Vec::new();
        let within = Distinct::Within(10);
        assert_eq!(count_distinct(&mut kept, 7, 100, within, 3), 1);
        assert_eq!(count_distinct(&mut kept, 8, 105, within, 3), 2);
        assert_eq!(
            count_distinct(&mut kept, 7, 108, within, 3),
            2,
            "7 again, later"
        );
        assert_eq!(
            count_distinct(&mut kept, 9, 116, within, 3),
            2,
            "8 (at 105) left the window"
        );
        assert_eq!(count_distinct(&mut kept, 10, 117, within, 3), 3);
    }

    #[test]
    fn a_period_count_starts_again_in_each_period() {
        let mut state = State::default();
        let k = StateKey::new("r", "count in day", &[]);
        assert_eq!(state.count_in_period(&k, 100), 1);
        assert_eq!(state.count_in_period(&k, 100), 2);
        assert_eq!(state.count_in_period(&k, 101), 1);
        assert_eq!(
            state.count_in_period(&k, 100),
            1,
            "a late event from the day before"
        );
        assert_eq!(state.count_in_period(&k, 101), 2);
    }

    #[test]
    fn only_what_changed_is_written_back() {
        let mut state = State::default();
        let (a, b) = (
            StateKey::new("r", "count", &[]),
            StateKey::new("r", "once", &[]),
        );
        let loaded = |count, acted| KeyRecord {
            count,
            acted,
            day: 3,
            ..KeyRecord::default()
        };
        state.load_key(&a, loaded(4, None));
        state.load_key(&b, loaded(0, Some(9)));
        state.load_seen("old");
        assert!(!state.first_delivery("old"));
        assert!(state.first_delivery("new"));
        assert!(!state.first_delivery("new"), "twice in one batch");
        assert_eq!(state.increment(&a), 5);
        state.touch(&a);
        assert_eq!(state.last_acted(&b), Some(9));
        let changes = state.changes();
        let keys: Vec<_> = (changes.keys.iter())
            .map(|c| (c.key, c.count, c.changed, c.day))
            .collect();
        assert_eq!(keys, [(&a, 5, true, Some(3))], "`b` was only read");
        assert_eq!(changes.seen, ["new"]);
        // Used only: written for its day (the store skips it if the day is the same).
        state.saved();
        state.touch(&b);
        let changes = state.changes();
        let keys: Vec<_> = (changes.keys.iter()).map(|c| (c.key, c.changed)).collect();
        assert_eq!(keys, [(&b, false)]);
        state.saved();
        assert!(state.changes().keys.is_empty());
        assert_eq!(
            state.increment(&a),
            6,
            "the value is kept, the change forgotten"
        );
    }
}
