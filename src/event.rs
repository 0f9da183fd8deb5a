//! Decoding request bodies into normalized events.
//!
//! PostHog (and anything else that speaks JSON) can send an event in several shapes; see
//! `docs/posthog-webhook.md` in the shared folder. Every shape becomes the same [`Event`], so rules
//! only ever name `event`, `uuid`, `distinct_id`, `timestamp`, `properties.*` and
//! `person.properties.*`. A body is decoded completely before anything acts on it: one invalid
//! event rejects the whole body.

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

/// One event, normalized. Every field holds a JSON value so that rule paths can point at any of
/// them without copying; the decoder guarantees the kinds documented on each field.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name: always a non-empty string.
    pub name: Value,
    /// The sender's id for this event (PostHog's `uuid`): a string, or null when none was sent.
    pub uuid: Value,
    /// Who did it: a string, or null when the sender did not say.
    pub distinct_id: Value,
    /// When it happened, as RFC 3339 in UTC; the time tripline received it if the sender gave none.
    pub timestamp: Value,
    /// The same instant, for time windows and `again_after`.
    pub time: DateTime<Utc>,
    /// The event's properties: always an object.
    pub properties: Value,
    /// The person's properties as PostHog knew them: always an object (empty without a person).
    pub person_properties: Value,
    /// The configured source that sent it (see `auth.rs`): a string, or null when requests are
    /// not authenticated or the event comes from a file.
    pub source: Value,
}

impl Event {
    /// The event name.
    pub fn name(&self) -> &str {
        self.name.as_str().unwrap_or_default()
    }

    /// The sender's event id, if any.
    pub fn uuid(&self) -> Option<&str> {
        self.uuid.as_str()
    }

    /// The data a template sees: the same names a rule uses (`event`, `properties.x`,
    /// `person.properties.email`, ...).
    pub fn template_context(&self) -> Value {
        json!({
            "event": self.name,
            "uuid": self.uuid,
            "distinct_id": self.distinct_id,
            "timestamp": self.timestamp,
            "properties": self.properties,
            "person": { "properties": self.person_properties },
            "source": self.source,
        })
    }
}

/// Why a body was refused. Each message tells the sender what to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("the body is empty: send one event or a list of events as JSON")]
    Empty,
    #[error("the body is not valid JSON: {0}")]
    NotJson(String),
    #[error(
        "the JSON is nested too deeply (more than {limit} levels): no PostHog event looks like this"
    )]
    TooDeep { limit: usize },
    #[error(
        "the body holds {count} events, more than the {limit} accepted in one request: send them in smaller batches"
    )]
    TooManyEvents { count: usize, limit: usize },
    #[error(
        "this is a legacy PostHog action webhook ({{\"text\": ...}}): it carries a chat message, not an event; \
         use a PostHog \"Webhook\" destination with its default body {{\"event\": \"{{event}}\", \"person\": \"{{person}}\"}}"
    )]
    LegacyText,
    #[error("no event found: {0}")]
    NoEvent(String),
    #[error("event {index} of the body: {problem}")]
    InvalidEvent { index: usize, problem: String },
}

/// How much a body may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Deepest nesting of arrays and objects (the body itself is level 1); at most
    /// [`MAX_DEPTH`], which the JSON parser enforces anyway.
    pub max_depth: usize,
    /// Most events in one body.
    pub max_events: usize,
}

/// The longest event id kept (ids are remembered for days to spot retried deliveries).
pub const MAX_UUID_BYTES: usize = 200;

/// The deepest nesting the JSON parser accepts.
pub const MAX_DEPTH: usize = 128;

impl BodyLimits {
    /// No limits beyond the parser's: for files on the author's own disk (`test`, `replay`).
    pub const LOCAL_FILES: BodyLimits = BodyLimits {
        max_depth: MAX_DEPTH,
        max_events: usize::MAX,
    };
}

/// Decodes a request body into its events. `now` stands in for a missing timestamp.
pub fn decode(
    body: &[u8],
    now: DateTime<Utc>,
    limits: &BodyLimits,
) -> Result<Vec<Event>, DecodeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError::Empty);
    }
    let root: Value = serde_json::from_slice(body).map_err(|e| {
        if e.to_string().starts_with("recursion limit exceeded") {
            DecodeError::TooDeep { limit: MAX_DEPTH }
        } else {
            DecodeError::NotJson(e.to_string())
        }
    })?;
    decode_value(root, now, limits)
}

/// How deeply `value` nests: 1 for a scalar, an empty list or an empty object.
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 1,
    }
}

/// Decodes an already parsed body (as [`decode`] does after parsing).
pub fn decode_value(
    root: Value,
    now: DateTime<Utc>,
    limits: &BodyLimits,
) -> Result<Vec<Event>, DecodeError> {
    if limits.max_depth < MAX_DEPTH && depth(&root) > limits.max_depth {
        return Err(DecodeError::TooDeep {
            limit: limits.max_depth,
        });
    }
    let items = match root {
        Value::Array(items) if items.is_empty() => {
            return Err(DecodeError::NoEvent("the list is empty".into()));
        }
        Value::Array(items) => items,
        Value::Object(mut map) => {
            if let Some(batch) = map.remove("batch") {
                match batch {
                    Value::Array(items) if !items.is_empty() => items,
                    _ => {
                        return Err(DecodeError::NoEvent(
                            "`batch` must be a non-empty list of events".into(),
                        ));
                    }
                }
            } else if map.contains_key("hook") && map.get("data").is_some_and(Value::is_object) {
                let data = map.remove("data").unwrap_or_default();
                return zapier_event(data, now)
                    .map(|e| vec![e])
                    .map_err(|problem| DecodeError::InvalidEvent { index: 1, problem });
            } else if !map.contains_key("event") && map.contains_key("text") {
                return Err(DecodeError::LegacyText);
            } else if !map.contains_key("event") {
                return Err(DecodeError::NoEvent(
                    "the body has no `event` key; expected {\"event\": {...}, \"person\": {...}}, \
                     a flat event {\"event\": \"name\", ...}, a `batch` envelope or a list of events"
                        .into(),
                ));
            } else {
                vec![Value::Object(map)]
            }
        }
        other => {
            return Err(DecodeError::NoEvent(format!(
                "the body is {}, not an event object",
                kind_of(&other)
            )));
        }
    };
    if items.len() > limits.max_events {
        return Err(DecodeError::TooManyEvents {
            count: items.len(),
            limit: limits.max_events,
        });
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            single_event(item, now).map_err(|problem| DecodeError::InvalidEvent {
                index: i + 1,
                problem,
            })
        })
        .collect()
}

/// One event in any of the single-event shapes: the webhook destination envelope
/// `{"event": {...}, "person": {...}}` or a flat event `{"event": "name", ...}`.
fn single_event(item: Value, now: DateTime<Utc>) -> Result<Event, String> {
    let Value::Object(mut outer) = item else {
        return Err(format!("expected an event object, got {}", kind_of(&item)));
    };
    match outer.get("event") {
        Some(Value::Object(_)) => {
            let Some(Value::Object(event)) = outer.remove("event") else {
                unreachable!("checked just above")
            };
            let person = outer.remove("person").unwrap_or(Value::Null);
            normalize(event, "event", "uuid", "distinct_id", person, now)
        }
        Some(Value::String(_)) => {
            let person = outer.remove("person").unwrap_or(Value::Null);
            normalize(outer, "event", "uuid", "distinct_id", person, now)
        }
        Some(other) => Err(format!(
            "the event name (`event`) must be text, got {}",
            kind_of(other)
        )),
        None => Err("it has no `event` (the event name)".into()),
    }
}

/// A Zapier REST hook's `data`: camelCase names for the same fields.
fn zapier_event(data: Value, now: DateTime<Utc>) -> Result<Event, String> {
    let Value::Object(mut data) = data else {
        unreachable!("the caller checked `data` is an object")
    };
    let person = data.remove("person").unwrap_or(Value::Null);
    normalize(data, "event", "eventUuid", "distinctId", person, now)
}

fn normalize(
    mut event: Map<String, Value>,
    name_key: &str,
    uuid_key: &str,
    distinct_id_key: &str,
    person: Value,
    now: DateTime<Utc>,
) -> Result<Event, String> {
    // The 2024 destination globals call the name `name` instead of `event`.
    let name = match event.remove(name_key).or_else(|| event.remove("name")) {
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        Some(Value::String(_)) => return Err("the event name is empty".into()),
        Some(other) => {
            return Err(format!(
                "the event name (`event`) must be text, got {}",
                kind_of(&other)
            ));
        }
        None => return Err("it has no event name (`event`)".into()),
    };
    let properties = object_or_empty(event.remove("properties"), "properties")?;
    let uuid = match event.remove(uuid_key) {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) if s.len() > MAX_UUID_BYTES => {
            return Err(format!(
                "`uuid` is {} bytes long; an event id is at most {MAX_UUID_BYTES} (PostHog's are 36)",
                s.len()
            ));
        }
        Some(Value::String(s)) => Value::String(s),
        Some(other) => return Err(format!("`uuid` must be text, got {}", kind_of(&other))),
    };
    // posthog-js may put the distinct id only inside the properties.
    let distinct_id = match event
        .remove(distinct_id_key)
        .filter(|v| !v.is_null())
        .or_else(|| properties.get("distinct_id").cloned())
    {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) => Value::String(s),
        Some(Value::Number(n)) => Value::String(n.to_string()),
        Some(other) => {
            return Err(format!(
                "`distinct_id` must be text, got {}",
                kind_of(&other)
            ));
        }
    };
    let timestamp = match event.remove("timestamp") {
        None | Some(Value::Null) => now,
        Some(Value::String(s)) => parse_timestamp(&s).ok_or_else(|| {
            format!("`timestamp` {s:?} is not an ISO 8601 date such as 2025-06-14T09:21:33.412Z")
        })?,
        Some(other) => {
            return Err(format!(
                "`timestamp` must be an ISO 8601 date as text, got {}",
                kind_of(&other)
            ));
        }
    };
    let person_properties = match person {
        Value::Null => Value::Object(Map::new()),
        Value::Object(mut person) => {
            object_or_empty(person.remove("properties"), "person.properties")?
        }
        other => {
            return Err(format!(
                "`person` must be an object or null, got {}",
                kind_of(&other)
            ));
        }
    };
    Ok(Event {
        name: Value::String(name),
        uuid,
        distinct_id,
        timestamp: Value::String(timestamp.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        time: timestamp,
        properties,
        person_properties,
        source: Value::Null,
    })
}

fn object_or_empty(value: Option<Value>, what: &str) -> Result<Value, String> {
    match value {
        None | Some(Value::Null) => Ok(Value::Object(Map::new())),
        Some(v @ Value::Object(_)) => Ok(v),
        Some(other) => Err(format!(
            "`{what}` must be a JSON object, got {}",
            kind_of(&other)
        )),
    }
}

/// Parses the timestamp forms PostHog is known to send: RFC 3339 with 0–9 fractional digits and
/// `Z` or an offset, the same without an offset (taken as UTC), ClickHouse's `YYYY-MM-DD HH:MM:SS`,
/// and a bare date.
pub fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// How a JSON value is called in an error message.
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "true/false",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-01-02T03:04:05Z".parse().unwrap()
    }

    fn one(body: &str) -> Event {
        let mut events = decode(body.as_bytes(), now(), &BodyLimits::LOCAL_FILES).unwrap();
        assert_eq!(events.len(), 1);
        events.remove(0)
    }

    #[test]
    fn webhook_envelope_and_person_null() {
        let e = one(
            r#"{"event":{"uuid":"u","event":"x","distinct_id":"d","properties":{"a":1},"timestamp":"2024-01-01T00:00:00Z"},"person":{"id":"p","properties":{"email":"e@x"}}}"#,
        );
        assert_eq!(e.name(), "x");
        assert_eq!(e.uuid(), Some("u"));
        assert_eq!(e.timestamp, json!("2024-01-01T00:00:00Z"));
        assert_eq!(e.person_properties, json!({"email": "e@x"}));
        let e = one(r#"{"event":{"event":"x"},"person":null}"#);
        assert_eq!(e.person_properties, json!({}));
        assert_eq!(e.timestamp, json!("2026-01-02T03:04:05Z"));
    }

    #[test]
    fn flat_batch_array_and_zapier() {
        let e = one(r#"{"event":"x","distinct_id":42,"properties":{}}"#);
        assert_eq!(e.distinct_id, json!("42"));
        let events = decode(
            br#"{"api_key":"k","batch":[{"event":"a","properties":{"distinct_id":"in-props"}},{"event":"b"}]}"#,
            now(),
            &BodyLimits::LOCAL_FILES,
        )
        .unwrap();
        assert_eq!(events[0].distinct_id, json!("in-props"));
        assert_eq!(events[1].name(), "b");
        let events = decode(
            br#"[{"event":"a"},{"event":{"name":"b"}}]"#,
            now(),
            &BodyLimits::LOCAL_FILES,
        )
        .unwrap();
        assert_eq!(events[1].name(), "b");
        let e = one(
            r#"{"hook":{"id":"h"},"data":{"eventUuid":"u","event":"z","distinctId":"d","person":{"properties":{"email":"e"}}}}"#,
        );
        assert_eq!((e.name(), e.uuid()), ("z", Some("u")));
        assert_eq!(e.person_properties, json!({"email": "e"}));
    }

    #[test]
    fn timestamps_are_normalized_to_utc() {
        for (given, want) in [
            (
                "2025-06-14T09:21:33.412000+00:00",
                "2025-06-14T09:21:33.412Z",
            ),
            ("2025-06-14T11:21:33+02:00", "2025-06-14T09:21:33Z"),
            ("2024-01-01T12:00:00", "2024-01-01T12:00:00Z"),
            ("2025-06-14 09:21:33.412", "2025-06-14T09:21:33.412Z"),
        ] {
            let e = one(&format!(r#"{{"event":"x","timestamp":"{given}"}}"#));
            assert_eq!(e.timestamp, json!(want), "{given}");
        }
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let err = |b: &str| decode(b.as_bytes(), now(), &BodyLimits::LOCAL_FILES).unwrap_err();
        assert_eq!(err("  "), DecodeError::Empty);
        assert!(matches!(err("{"), DecodeError::NotJson(_)));
        assert_eq!(err(r#"{"text":"hi"}"#), DecodeError::LegacyText);
        assert!(matches!(err("[]"), DecodeError::NoEvent(_)));
        assert!(matches!(err("42"), DecodeError::NoEvent(_)));
        assert_eq!(
            err(r#"[{"event":"ok"},{"event":{"event":42}}]"#).to_string(),
            "event 2 of the body: the event name (`event`) must be text, got a number"
        );
        assert_eq!(
            err(r#"{"event":{"event":"x","properties":"{}"}}"#).to_string(),
            "event 1 of the body: `properties` must be a JSON object, got text"
        );
        assert!(
            err(r#"{"event":"x","timestamp":"yesterday"}"#)
                .to_string()
                .contains("ISO 8601")
        );
        assert!(
            err(&format!(r#"{{"event":"x","uuid":"{}"}}"#, "u".repeat(201)))
                .to_string()
                .contains("`uuid` is 201 bytes long")
        );
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(err(&deep), DecodeError::TooDeep { limit: 128 });
    }

    #[test]
    fn a_server_limits_depth_and_events_per_body() {
        let limits = BodyLimits {
            max_depth: 4,
            max_events: 2,
        };
        let decode = |b: &str| decode(b.as_bytes(), now(), &limits);
        // {"event": {"properties": {"a": {"b": 1}}}} nests 4 levels deep: the limit.
        assert!(decode(r#"{"event":{"event":"x","properties":{"a":1}}}"#).is_ok());
        assert_eq!(
            decode(r#"{"event":{"event":"x","properties":{"a":{"b":[1]}}}}"#).unwrap_err(),
            DecodeError::TooDeep { limit: 4 }
        );
        assert!(decode(r#"[{"event":"a"},{"event":"b"}]"#).is_ok());
        assert_eq!(
            decode(r#"[{"event":"a"},{"event":"b"},{"event":"c"}]"#).unwrap_err(),
            DecodeError::TooManyEvents { count: 3, limit: 2 }
        );
    }
}
