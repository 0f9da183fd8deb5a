//! Events a `[remember]` rule keeps for a user: what the store holds for each, and what
//! `GET /users/{id}` reads back.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One event to remember, as a rule's action makes it (see `actions/remember/`).
#[derive(Debug, Clone, PartialEq)]
pub struct Remembered {
    pub distinct_id: String,
    pub rule: String,
    /// The event's time (milliseconds since 1970): the order of a user's events.
    pub at_ms: i64,
    /// When it is forgotten (milliseconds since 1970).
    pub expires_ms: i64,
    /// How many of this rule's events the user keeps: the oldest beyond go.
    pub keep_last: u64,
    pub entry: Entry,
}

/// What is kept of one event: only what the rule asked for, and what identifies it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub rule: String,
    /// The event's name, uuid and timestamp (RFC 3339).
    pub event: String,
    pub uuid: Value,
    pub timestamp: String,
    /// The rule's `label`, filled in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The rule's fields, as `[jsonl]` writes them.
    pub fields: Value,
}

/// A remembered event as read back, with its place in the user's list (for cursors).
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub at_ms: i64,
    pub seq: u64,
    /// When it is forgotten: until the hourly pass does, it is only left out of what is read.
    pub expires_ms: i64,
    pub entry: Entry,
}
