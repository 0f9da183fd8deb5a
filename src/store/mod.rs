//! Everything the service keeps: rule state, the delivery queue, handled ids, and the output
//! lines not yet appended to their files.
//!
//! One seam, [`Backend`], with its write side [`Batch`]: the committer, the sender and the status
//! endpoints hold a `dyn Backend`, never a particular database. A batch of events loads the rule
//! state it needs at once and writes back what changed at once ([`RuleState`], see `state.rs`),
//! so a networked database costs two round trips per batch, not several per event.
//!
//! Implementations: the embedded redb database (`store/redb/`), which the service uses, and
//! [`MemoryStore`], rule state that lives as long as a command (`tripline test`, `replay`).

pub mod aggregates;
pub mod key;
pub mod pending;
pub mod postgres;
pub mod queue;
pub mod redb;
pub mod remembered;
pub mod state;

use aggregates::{Counted, DayData, Membership};
pub use key::StateKey;
pub use pending::{Held, Pending};
use queue::{Due, OutboxRecord, OutboxStatus, Retry, Skip};
use remembered::{Remembered, Stored};
pub use state::{Distinct, KeyRecord, State, Wants, record_in_window};
use std::collections::{BTreeMap, BTreeSet};

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
    /// Another instance sharing the store changed the same state at the same time (a
    /// serialization failure or a deadlock in PostgreSQL): the batch is run again from its load.
    #[error("another instance changed the same state at the same time: {0}")]
    Conflict(String),
}

/// Rule state, loaded and saved a batch at a time. Times in the state are milliseconds since 1970
/// of the events' own timestamps; `now_unix` (wall-clock seconds) dates handled ids and used keys.
pub trait RuleState {
    /// The state `wants` names, as it is now.
    fn load(&mut self, wants: &Wants) -> Result<State, StoreError>;
    /// Writes back what changed in `state` (see [`State::changes`]).
    fn save(&mut self, state: State, now_unix: u64) -> Result<(), StoreError>;
    /// At most `max` pending waits whose deadline is at or before `until_ms`, soonest first.
    /// Read from a due index: the cost follows what is due, not how many waits are pending.
    fn due_waits(
        &mut self,
        until_ms: i64,
        max: usize,
    ) -> Result<Vec<(StateKey, Pending)>, StoreError>;
}

/// Changes made together: nothing is visible or durable until [`Batch::commit`], and a batch
/// dropped without it changes nothing.
pub trait Batch: RuleState + Send {
    /// Records that the signed delivery `id` from `source` is handled now; `false` if it was
    /// handled before (a replayed or retried request: it must have no second effect).
    fn first_signed_delivery(
        &mut self,
        source: &str,
        id: &str,
        now_unix: u64,
    ) -> Result<bool, StoreError>;
    /// Records a new output file, `len` bytes long now, if it is not known yet: lines are
    /// appended after that.
    fn start_file(&mut self, file: &str, len: u64) -> Result<(), StoreError>;
    /// Queues `text` (whole lines) to be appended to `file` after the lines queued before,
    /// committed at `at_ms`; returns its number in the file's sequence.
    fn queue_lines(&mut self, file: &str, text: &str, at_ms: i64) -> Result<u64, StoreError>;
    /// Records that `file` holds every queued text up to number `applied` and is `len` bytes
    /// long, and forgets those texts.
    fn applied(&mut self, file: &str, applied: u64, len: u64) -> Result<(), StoreError>;
    /// Adds a delivery to the queue; returns its id.
    fn queue(&mut self, record: &OutboxRecord) -> Result<u64, StoreError>;
    /// Records a delivery that could not be made, as finished and failed; returns its id.
    fn record_failed(&mut self, record: &OutboxRecord) -> Result<u64, StoreError>;
    /// Rewrites a pending delivery (after a failed attempt), due again at its
    /// `next_attempt_unix`.
    fn update_pending(&mut self, id: u64, record: &OutboxRecord) -> Result<(), StoreError>;
    /// Moves a delivery out of the queue into the finished history (done, or failed for good).
    fn finish(&mut self, id: u64, record: &OutboxRecord) -> Result<(), StoreError>;
    /// Moves the delivery `id`, failed for good, back into the queue under the same id (so
    /// with the same idempotency key), due now, its age counted from now.
    fn retry(&mut self, id: u64, now_unix: u64) -> Result<Retry, StoreError>;
    /// Forgets everything kept about `distinct_id`: the rule state its events made, its pending
    /// waits, its deliveries (queued or finished), its remembered events and its groups in
    /// `[aggregate]` rules; says how many of each.
    fn forget_person(&mut self, distinct_id: &str) -> Result<Erased, StoreError>;
    /// Keeps an event a `[remember]` rule remembers for its user, forgetting the oldest of that
    /// rule's for the user beyond `keep_last`.
    fn remember(&mut self, remembered: &Remembered) -> Result<(), StoreError>;
    /// Counts an event of an `[aggregate]` rule in its day and group (the person's group when
    /// the event has none); `false` if neither says a group, so it is not counted.
    fn aggregate(&mut self, counted: &Counted) -> Result<bool, StoreError>;
    /// Forgets at most `max` rows of `[aggregate]` counts (days, and people last counted) older
    /// than their rule keeps them, `today` being a day number (`aggregates::day_number`);
    /// returns how many.
    fn expire_aggregates(&mut self, today: i32, max: usize) -> Result<usize, StoreError>;
    /// Keeps a record of why rules did or did not act on the event `uuid` of `who` (see
    /// `explain.rs`); the oldest beyond `explain::KEEP` are forgotten. Records written later
    /// for the same uuid (a wait it started, ended) add their rules to the first.
    fn explain(&mut self, uuid: &str, who: &str, record: &str) -> Result<(), StoreError>;
    /// Forgets at most `max` remembered events whose time ran out before `now_ms`; returns how
    /// many.
    fn expire_remembered(&mut self, now_ms: i64, max: usize) -> Result<usize, StoreError>;
    /// Forgets at most `max` event and delivery ids first handled before `cutoff_unix`;
    /// returns how many.
    fn expire_seen(&mut self, cutoff_unix: u64, max: usize) -> Result<usize, StoreError>;
    /// Looks at the next `look_at` keys of rule state (going on from where the last call
    /// stopped, and from the start again after the end) and forgets those no event has used
    /// since before `cutoff_unix`; returns how many.
    fn forget_idle(&mut self, cutoff_unix: u64, look_at: usize) -> Result<usize, StoreError>;
    /// Every rule with pending waits this instance may end or drop (see [`Backend::running`]),
    /// and how many.
    fn waiting(&self) -> Result<Vec<(String, u64)>, StoreError>;
    /// Ends at most `max` pending waits of `rule` (a rule that no longer waits); returns how
    /// many.
    fn drop_waits(&mut self, rule: &str, max: usize) -> Result<u64, StoreError>;
    /// The last entry of the committer's journal whose effects are in the store (0 for none):
    /// see `pipeline/journal.rs`.
    fn journaled(&mut self) -> Result<u64, StoreError>;
    /// Records that the journal's entries up to `seq` are in the store with this batch.
    fn set_journaled(&mut self, seq: u64) -> Result<(), StoreError>;
    /// Makes every change durable, with every commit before it.
    fn commit(self: Box<Self>) -> Result<(), StoreError>;
    /// Makes every change visible at once, and durable with the next [`Backend::sync`] or
    /// [`Batch::commit`]. A stop of the process before that may lose it, so the caller keeps
    /// what it needs to make it again (`pipeline/journal.rs`); deliveries it queued are not due
    /// until it is durable.
    fn commit_unsynced(self: Box<Self>) -> Result<(), StoreError>;
}

/// What the store keeps about one person (see [`Backend::person`]).
#[derive(Debug, Default)]
pub struct Person {
    /// Rule state its events made: the key, and what it holds.
    pub keys: Vec<(StateKey, KeyRecord)>,
    /// Its pending waits (held actions and digests too): the key, and the wait.
    pub waits: Vec<(StateKey, Pending)>,
    /// Its deliveries, pending or in the history: id and record.
    pub deliveries: Vec<(u64, OutboxRecord)>,
    /// The events `[remember]` rules kept for it (every rule's, in no particular order: at
    /// most the sum of the rules' `keep_last`).
    pub remembered: Vec<Stored>,
    /// Its groups in `[aggregate]` rules.
    pub groups: Vec<Membership>,
}

/// What [`Batch::forget_person`] forgot, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Erased {
    pub rule_state: u64,
    pub pending: u64,
    pub deliveries: u64,
    pub remembered: u64,
    /// Rules of `[aggregate]` that had its group (the counts themselves hold no one's id).
    pub groups: u64,
    /// Records of why rules did or did not act on its events.
    pub explanations: u64,
}

/// How far an output file is written: the file is `len` bytes long once the texts queued for it
/// up to number `applied` are appended (see `pipeline/appender.rs`); the next one gets `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileProgress {
    pub len: u64,
    pub applied: u64,
    pub next: u64,
    /// Whether `len` is the length of this instance's copy of the file: always with a store of
    /// its own; with a shared store, not when another instance (another data folder) wrote the
    /// file last, whose copy is elsewhere.
    pub ours: bool,
}

/// Lines committed for a file and not yet appended to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedLines {
    /// Its number in the file's sequence.
    pub seq: u64,
    /// When it was committed (milliseconds since 1970).
    pub at_ms: i64,
    pub text: String,
}

/// A store the service runs on.
pub trait Backend: Send + Sync {
    /// Starts a batch of changes. One exists at a time; others wait.
    fn begin(&self) -> Result<Box<dyn Batch>, StoreError>;
    /// Every output file and how far it is written.
    fn files(&self) -> Result<Vec<(String, FileProgress)>, StoreError>;
    /// The texts queued for `file` after number `after`, in order, as many as fit in
    /// `max_bytes` (at least one).
    fn queued_lines(
        &self,
        file: &str,
        after: u64,
        max_bytes: usize,
    ) -> Result<Vec<QueuedLines>, StoreError>;
    /// At most `max` pending deliveries due by `now_unix`, soonest due first, leaving out those
    /// in flight, more of a kind than it has room for (see [`Skip`]) and those not yet durable;
    /// and when the next one left is due.
    fn due(&self, now_unix: u64, max: usize, skip: &Skip) -> Result<Due, StoreError>;
    /// How many deliveries wait.
    fn pending_count(&self) -> Result<u64, StoreError>;
    /// The queue at a glance, with the oldest `shown` waiting and the newest `shown` finished.
    fn outbox_status(&self, shown: usize) -> Result<OutboxStatus, StoreError>;
    /// Whether a batch can commit now (for `/readyz`).
    fn check(&self) -> Result<(), StoreError>;
    /// Makes every commit so far durable (see [`Batch::commit_unsynced`]).
    fn sync(&self) -> Result<(), StoreError>;
    /// Every rule with pending waits, and how many.
    fn waiting(&self) -> Result<Vec<(String, u64)>, StoreError>;
    /// The soonest deadline of a pending wait (milliseconds since 1970), if any.
    fn next_wait_due(&self) -> Result<Option<i64>, StoreError>;
    /// What the store keeps about `distinct_id`, read at one moment: the rule state its events
    /// made, its pending waits, its deliveries still in the queue or the history, and the events
    /// remembered for it.
    fn person(&self, distinct_id: &str) -> Result<Person, StoreError>;
    /// The `[aggregate]` counts of `rule` from day `from` to day `to` (day numbers), in day
    /// order, with their users' hashes when the range can be counted exactly.
    fn aggregates(&self, rule: &str, from: i32, to: i32) -> Result<Vec<DayData>, StoreError>;
    /// Every rule whose `[aggregate]` counts are kept, running or not.
    fn aggregate_rules(&self) -> Result<Vec<String>, StoreError>;
    /// The record of why rules did or did not act on the event `uuid` (JSON), if it is kept.
    fn explanation(&self, uuid: &str) -> Result<Option<String>, StoreError>;
    /// Whether other instances share the store: they commit lines for the same output files,
    /// and take over deliveries and waits.
    fn is_shared(&self) -> bool {
        false
    }
    /// Whether this instance writes the output file `file` now. A store of its own: always. A
    /// shared store: only the instance holding the file's lock, which this takes when it is
    /// free and keeps while the instance runs.
    fn writes_file(&self, _file: &str) -> Result<bool, StoreError> {
        Ok(true)
    }
    /// Records the rules this instance runs now that keep pending records (waits, held
    /// actions, digests). With a shared store, the waits of such a rule this instance does not
    /// run and another does (a deploy under way) are left to that one: not listed by
    /// [`RuleState::due_waits`], [`Batch::waiting`] and [`Backend::next_wait_due`] here, so
    /// neither ended nor dropped as a deleted rule's.
    fn running(&self, _rules: &[&str]) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Rule state in memory, for running rules without side effects (`tripline test`, `replay`).
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// `None` until the first save, and while the state is lent out.
    state: Option<State>,
    /// Every pending wait by deadline.
    due: BTreeSet<(i64, StateKey)>,
}

impl MemoryStore {
    /// The soonest deadline of a pending wait.
    pub fn next_due(&self) -> Option<i64> {
        self.due.first().map(|(at, _)| *at)
    }

    /// Every rule with pending waits, and how many, by name.
    pub fn waiting(&self) -> Vec<(String, u64)> {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for (_, key) in &self.due {
            if let Some(w) = self.state.as_ref().and_then(|s| s.wait(key)) {
                *counts.entry(w.rule.clone()).or_default() += 1;
            }
        }
        counts.into_iter().collect()
    }
}

impl RuleState for MemoryStore {
    /// Everything is in memory already: the whole state is lent out until it is saved.
    fn load(&mut self, _wants: &Wants) -> Result<State, StoreError> {
        Ok(self.state.take().unwrap_or_default())
    }

    fn save(&mut self, mut state: State, _now_unix: u64) -> Result<(), StoreError> {
        for change in state.changes().waits {
            if let Some(before) = change.stored_deadline {
                self.due.remove(&(before, change.key.clone()));
            }
            if let Some(now) = change.now {
                self.due.insert((now.deadline_ms, change.key.clone()));
            }
        }
        state.saved();
        self.state = Some(state);
        Ok(())
    }

    fn due_waits(
        &mut self,
        until_ms: i64,
        max: usize,
    ) -> Result<Vec<(StateKey, Pending)>, StoreError> {
        let Some(state) = &self.state else {
            return Ok(Vec::new());
        };
        Ok((self.due.iter())
            .take_while(|(at, _)| *at <= until_ms)
            .take(max)
            .filter_map(|(_, key)| Some((key.clone(), state.wait(key)?.clone())))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store_counts_marks_and_dedupes() {
        let mut s = MemoryStore::default();
        let k = StateKey::new("r", "count", &[]);
        let mut state = s.load(&Wants::default()).unwrap();
        assert_eq!(state.increment(&k), 1);
        assert_eq!(state.increment(&k), 2);
        assert_eq!(state.last_acted(&k), None);
        state.mark_acted(&k, 7);
        assert!(state.first_delivery("u"));
        s.save(state, 0).unwrap();
        let mut state = s.load(&Wants::default()).unwrap();
        assert_eq!(state.last_acted(&k), Some(7));
        assert_eq!(state.increment(&k), 3);
        assert!(!state.first_delivery("u"));
    }
}
