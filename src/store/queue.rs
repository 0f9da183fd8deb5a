//! The stored form of a delivery in the outbox: what the store keeps for each one, pending or
//! finished. The committer queues them, the sender (`pipeline/outbox.rs`) updates them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};

/// A delivery of some kind, as an action makes it, before it is queued.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The kind of action (`email`), whose sender delivers it.
    pub kind: &'static str,
    /// Where it goes, for logs, `GET /outbox` and `tripline test`, with personal data masked.
    pub to: String,
    /// The destination whose own bound on attempts at once applies (an HTTP endpoint's name);
    /// `None` for a kind bounded as a whole (one mail server).
    pub lane: Option<String>,
    /// Whose event it comes from (a distinct id), set by the engine.
    pub person: Option<String>,
    /// The uuid of the event it comes from (for a wait, the event that started it), set by
    /// the engine, for `GET /explain`.
    pub event: Option<String>,
    /// What the kind's sender needs, stored as it is.
    pub payload: Map<String, Value>,
}

impl Delivery {
    /// A delivery of `kind` to `to` (masked), in `lane`, whose payload is `payload` as JSON (a
    /// struct: each of its fields is a key of the payload). Whose it is, the engine sets.
    pub fn new(
        kind: &'static str,
        to: String,
        lane: Option<String>,
        payload: &impl Serialize,
    ) -> Delivery {
        let Ok(Value::Object(payload)) = serde_json::to_value(payload) else {
            unreachable!("a delivery's payload is a struct of plain values: a JSON object")
        };
        Delivery {
            kind,
            to,
            lane,
            person: None,
            event: None,
            payload,
        }
    }
}

/// A stored payload, read back as what its kind made (`Delivery::new`).
pub fn read_payload<T: serde::de::DeserializeOwned>(
    payload: &Map<String, Value>,
) -> serde_json::Result<T> {
    T::deserialize(&Value::Object(payload.clone()))
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Sent,
    Failed,
}

/// One delivery in the outbox, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxRecord {
    pub rule: String,
    /// The kind of action, whose sender delivers it. Records from before kinds were emails.
    #[serde(default = "kind_before_kinds")]
    pub kind: String,
    /// Where it goes, masked, for logs and `GET /outbox`. Stored under its name from before
    /// kinds existed, so that the tripline before this one can still deliver a queued email.
    #[serde(rename = "to_masked")]
    pub destination: String,
    /// See [`Delivery::lane`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<String>,
    /// See [`Delivery::person`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub person: Option<String>,
    /// See [`Delivery::event`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// What the kind's sender needs (for an email: `from`, `to`, `message`...), stored beside
    /// the fields above, as records from before kinds existed had them.
    #[serde(flatten)]
    pub payload: Map<String, Value>,
    pub status: Status,
    pub created_unix: u64,
    pub attempts: u32,
    pub next_attempt_unix: u64,
    pub last_error: Option<String>,
    pub finished_unix: Option<u64>,
    /// When the operator last asked for a failed delivery to be tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retried_unix: Option<u64>,
}

/// The kind of a record stored before kinds existed.
pub(crate) fn kind_before_kinds() -> String {
    "email".into()
}

impl OutboxRecord {
    /// A new pending record for `delivery`, decided by `rule`.
    pub fn new(rule: String, delivery: Delivery, now_unix: u64) -> OutboxRecord {
        OutboxRecord {
            rule,
            kind: delivery.kind.to_string(),
            destination: delivery.to,
            lane: delivery.lane,
            person: delivery.person,
            event: delivery.event,
            payload: delivery.payload,
            status: Status::Pending,
            created_unix: now_unix,
            attempts: 0,
            next_attempt_unix: now_unix,
            last_error: None,
            finished_unix: None,
            retried_unix: None,
        }
    }

    /// The lane whose bound on attempts at once it counts against.
    pub fn lane(&self) -> Lane {
        Lane {
            kind: self.kind.clone(),
            destination: self.lane.clone(),
        }
    }

    /// When its retries started: when it was queued, or last retried by the operator.
    pub fn age_from_unix(&self) -> u64 {
        self.retried_unix.unwrap_or(self.created_unix)
    }

    /// The record of a delivery a rule could not make (a field its template uses was missing):
    /// failed from the start, with the reason, so that it is seen at `GET /outbox`.
    pub fn not_made(rule: String, kind: &str, reason: String, now_unix: u64) -> OutboxRecord {
        OutboxRecord {
            rule,
            kind: kind.to_string(),
            destination: String::new(),
            lane: None,
            person: None,
            event: None,
            payload: Map::new(),
            status: Status::Failed,
            created_unix: now_unix,
            attempts: 0,
            next_attempt_unix: now_unix,
            last_error: Some(reason),
            finished_unix: Some(now_unix),
            retried_unix: None,
        }
    }
}

/// What [`crate::store::Backend::due`] leaves out: deliveries in flight, and more of a kind (or
/// to one destination) than takes attempts now.
#[derive(Debug, Default)]
pub struct Skip {
    pub in_flight: HashSet<u64>,
    /// How many more attempts each lane takes now; a lane not listed takes any number.
    pub room: HashMap<Lane, usize>,
}

/// What a bound on attempts at once applies to: a kind as a whole (`destination` `None`), or
/// one destination of a kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lane {
    pub kind: String,
    pub destination: Option<String>,
}

/// The separator of a lane's key: a control character no kind or endpoint name holds.
const LANE_KEY_SEPARATOR: char = '\u{1f}';

impl Lane {
    /// As the store's index of lanes keys it: the kind, and the destination after a separator.
    pub fn key(&self) -> String {
        match &self.destination {
            Some(destination) => format!("{}{LANE_KEY_SEPARATOR}{destination}", self.kind),
            None => self.kind.clone(),
        }
    }

    /// The lane of a [`key`](Self::key).
    pub fn from_key(key: &str) -> Lane {
        match key.split_once(LANE_KEY_SEPARATOR) {
            Some((kind, destination)) => Lane {
                kind: kind.to_string(),
                destination: Some(destination.to_string()),
            },
            None => Lane {
                kind: key.to_string(),
                destination: None,
            },
        }
    }
}

/// Takes one attempt in `lane` from `room` if it has room (its kind's bound, and its own);
/// `false` if not.
pub fn take_room(room: &mut HashMap<Lane, usize>, lane: &Lane) -> bool {
    let kind = Lane {
        kind: lane.kind.clone(),
        destination: None,
    };
    let lanes = [Some(kind), lane.destination.is_some().then(|| lane.clone())];
    let lanes: Vec<&Lane> = lanes.iter().flatten().collect();
    if lanes.iter().any(|l| room.get(*l) == Some(&0)) {
        return false;
    }
    for lane in lanes {
        if let Some(left) = room.get_mut(lane) {
            *left -= 1;
        }
    }
    true
}

/// What became of an operator's retry (see [`crate::store::Batch::retry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Back in the queue.
    Queued,
    /// No such delivery in the queue or the finished history.
    NotFound,
    /// Still in the queue: nothing to do.
    Pending,
    /// It was delivered.
    Delivered,
    /// It was never made (its template failed): trying again would fail the same way.
    NeverMade,
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
    /// Delivered and failed for good.
    pub finished: u64,
    /// The newest finished, delivered or not.
    pub recent: Vec<(u64, OutboxRecord)>,
    /// Failed for good (kept apart, so that deliveries never push them out).
    pub failed: u64,
    /// The newest failed for good.
    pub failures: Vec<(u64, OutboxRecord)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_email_stored_before_kinds_existed_reads_as_an_email() {
        let stored = r#"{"rule":"r","from":"a@x.io","to":["b@x.io"],"to_masked":"b***@x.io","message":"Subject: s\r\n\r\nhi","status":"pending","created_unix":1,"attempts":2,"next_attempt_unix":3,"last_error":null,"finished_unix":null}"#;
        let record: OutboxRecord = serde_json::from_str(stored).unwrap();
        assert_eq!(record.kind, "email");
        assert_eq!(record.destination, "b***@x.io");
        assert_eq!(record.payload["to"], json!(["b@x.io"]));
        assert_eq!(record.payload["message"], json!("Subject: s\r\n\r\nhi"));
        assert_eq!((record.attempts, record.next_attempt_unix), (2, 3));
        // Written again, it keeps every field the tripline before kinds read, beside `kind`.
        let again: Value = serde_json::to_value(&record).unwrap();
        let before: Value = serde_json::from_str(stored).unwrap();
        for (field, value) in before.as_object().unwrap() {
            assert_eq!(&again[field], value, "{field}");
        }
        assert_eq!(again["kind"], json!("email"));
    }
}
