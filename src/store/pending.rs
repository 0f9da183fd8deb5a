//! A pending wait, as kept until it ends (see `[wait]` in `rules/` and its decisions in
//! `engine.rs`), or an action held until the rule's send window opens (`[send_window]`).

use serde::{Deserialize, Serialize};

use crate::ingest::event::Event;

/// One rule waiting for one set of values (its `same` fields): started by `trigger`, ending at
/// `deadline_ms` unless a later event ends it first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// The rule's name: a wait belongs to it across reloads.
    pub rule: String,
    /// When the wait ends: the triggering event's own time plus the rule's `for` (milliseconds
    /// since 1970).
    pub deadline_ms: i64,
    /// The event that started it: what the actions run on.
    pub trigger: Event,
    /// The latest event of these values seen since (for `then`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<Event>,
    /// The rule's count when the wait started (`{{count}}`), if it counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Set for actions the rule decided outside its `[send_window]`: held until the window
    /// opens (the deadline), then run as they are, once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Held>,
    /// Set for a `[digest]` being collected: its events, sent at the deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Collected>,
}

/// The events of a digest so far: the first ones (at most the rule's `keep`), and how many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Collected {
    pub events: Vec<Event>,
    pub total: u64,
}

/// What a held action needs beyond its event: how the rule's wait ended, if it had one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Held {
    /// The event that completed the wait (`until`), if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Event>,
    /// How long the wait lasted, in milliseconds, if the rule waited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
}

impl Pending {
    /// The event a `then` is checked on: the latest seen, or the trigger.
    pub fn latest(&self) -> &Event {
        self.latest.as_ref().unwrap_or(&self.trigger)
    }
}
