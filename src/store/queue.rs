//! The stored form of an email in the outbox: what the database keeps for each one, pending or
//! finished. The sender (`pipeline/outbox.rs`) makes and updates these records.

use serde::{Deserialize, Serialize};

/// Where an email stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Sent,
    Failed,
}

/// One email in the outbox, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxRecord {
    pub rule: String,
    pub from: String,
    pub to: Vec<String>,
    pub to_masked: String,
    /// The whole RFC 5322 message.
    pub message: String,
    pub status: Status,
    pub created_unix: u64,
    pub attempts: u32,
    pub next_attempt_unix: u64,
    pub last_error: Option<String>,
    pub finished_unix: Option<u64>,
}

impl OutboxRecord {
    /// The record of an email a rule could not make (a field its template uses was missing):
    /// failed from the start, with the reason, so that it is seen at `GET /outbox`.
    pub fn not_made(rule: String, reason: String, now_unix: u64) -> OutboxRecord {
        OutboxRecord {
            rule,
            from: String::new(),
            to: Vec::new(),
            to_masked: String::new(),
            message: String::new(),
            status: Status::Failed,
            created_unix: now_unix,
            attempts: 0,
            next_attempt_unix: now_unix,
            last_error: Some(reason),
            finished_unix: Some(now_unix),
        }
    }
}

/// See [`crate::store::Backend::due`].
#[derive(Debug, Default)]
pub struct Due {
    pub deliveries: Vec<(u64, OutboxRecord)>,
    pub next_due_unix: Option<u64>,
}

/// See [`crate::store::Backend::outbox_status`].
pub struct OutboxStatus {
    pub pending: u64,
    pub waiting: Vec<(u64, OutboxRecord)>,
    pub finished: u64,
    pub recent: Vec<(u64, OutboxRecord)>,
}
