//! Decoding request bodies into normalized events.
//!
//! PostHog (and anything else that speaks JSON) can send an event in several shapes; see
//! `docs/posthog-webhook.md` in the shared folder. Every shape becomes the same [`Event`], so rules
//! only ever name `event`, `uuid`, `distinct_id`, `timestamp`, `properties.*` and
//! `person.properties.*`. A body is checked completely before anything acts on it: one invalid
//! event rejects the whole body. The events no rule is tried on are checked but never built: the
//! body is first read as raw JSON text per field (`RawObject`), and an event's properties become
//! values only when a rule may read them.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::borrow::Cow;
use std::fmt;

use crate::units::parse_timestamp;

/// One event, normalized. Every field holds a JSON value so that rule paths can point at any of
/// them without copying; the decoder guarantees the kinds documented on each field.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// The clicked element and its ancestors, as PostHog's autocapture sends them (`""` or null
    /// for other events): see `ingest/elements.rs`.
    #[serde(default)]
    pub elements_chain: Value,
    /// The configured source that sent it (see `ingest/auth.rs`): a string, or null when requests are
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
    /// `person.properties.email`, ...), one entry per [`Field`] (a test holds them to it).
    pub fn template_context(&self) -> Value {
        json!({
            "event": self.name,
            "uuid": self.uuid,
            "distinct_id": self.distinct_id,
            "timestamp": self.timestamp,
            "properties": self.properties,
            "person": { "properties": self.person_properties },
            "elements_chain": self.elements_chain,
            "elements": self.elements_chain.as_str().map_or(json!([]), super::elements::parse),
            "source": self.source,
        })
    }
}

/// The fields of an [`Event`], as rules, templates and test expectations name them: the one list
/// that field paths, template checks and the template data derive from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Event,
    Uuid,
    DistinctId,
    Timestamp,
    Properties,
    PersonProperties,
    ElementsChain,
    Source,
}

impl Field {
    /// Every field, in the order messages list them.
    pub const ALL: [Field; 8] = [
        Field::Event,
        Field::Uuid,
        Field::DistinctId,
        Field::Timestamp,
        Field::Properties,
        Field::PersonProperties,
        Field::ElementsChain,
        Field::Source,
    ];

    /// As a rule writes it.
    pub fn name(self) -> &'static str {
        match self {
            Field::Event => "event",
            Field::Uuid => "uuid",
            Field::DistinctId => "distinct_id",
            Field::Timestamp => "timestamp",
            Field::Properties => "properties",
            Field::PersonProperties => "person.properties",
            Field::ElementsChain => "elements_chain",
            Field::Source => "source",
        }
    }

    /// The field named `name`, as a rule writes it.
    pub fn named(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether the field holds objects with fields of their own (the others are single values).
    pub fn has_parts(self) -> bool {
        matches!(self, Field::Properties | Field::PersonProperties)
    }

    /// Its value in `event`.
    pub fn of(self, event: &Event) -> &Value {
        match self {
            Field::Event => &event.name,
            Field::Uuid => &event.uuid,
            Field::DistinctId => &event.distinct_id,
            Field::Timestamp => &event.timestamp,
            Field::Properties => &event.properties,
            Field::PersonProperties => &event.person_properties,
            Field::ElementsChain => &event.elements_chain,
            Field::Source => &event.source,
        }
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
    /// [`MAX_DEPTH`], which the JSON parser enforces anyway on what it builds.
    pub max_depth: usize,
    /// Most events in one body.
    pub max_events: usize,
    /// How far past `now` (the time the body is received) an event's timestamp may be before its
    /// time, for windows and `again_after`, is taken as `now` plus this; `None` takes every
    /// timestamp as it is (for `tripline test`, whose events set the virtual clock).
    pub max_clock_skew: Option<std::time::Duration>,
}

/// How far ahead of the receiving clock an event may be stamped by default (`max_clock_skew`).
pub const DEFAULT_CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

/// The longest event id kept (ids are remembered for days to spot retried deliveries).
pub const MAX_UUID_BYTES: usize = 200;

/// The deepest nesting the JSON parser accepts when it builds values.
pub const MAX_DEPTH: usize = 128;

impl BodyLimits {
    /// No limits beyond the parser's, checked for every event: for files on the author's own
    /// disk (`test`, `replay`).
    pub const LOCAL_FILES: BodyLimits = BodyLimits {
        max_depth: MAX_DEPTH,
        max_events: usize::MAX,
        max_clock_skew: None,
    };
}

/// A decoded body: the events some rule wants, and how many it held in all.
#[derive(Debug)]
pub struct Decoded {
    /// How many events the body held, wanted or not.
    pub received: usize,
    /// The wanted events, in the body's order.
    pub events: Vec<Event>,
    /// How many of them were stamped further ahead of the receiving clock than `max_clock_skew`
    /// allows, and so were timed at that limit.
    pub clamped: usize,
}

/// Decodes a body into all of its events. `now` stands in for a missing timestamp.
pub fn decode(
    body: &[u8],
    now: DateTime<Utc>,
    limits: &BodyLimits,
) -> Result<Vec<Event>, DecodeError> {
    decode_wanted(body, now, limits, |_| true).map(|decoded| decoded.events)
}

/// Decodes a body, building only the events whose name `wanted` accepts. Every event is checked
/// all the same (valid JSON, each field of the right kind), so a body is accepted or refused
/// whatever the rules; but the properties of an event no rule names are never read into values,
/// which is most of the work for such an event. One difference remains: text that cannot become a
/// string) is replaced first: an escaped lone surrogate such as `"\ud83d"`, which JavaScript
/// produces when a string is cut in the middle of an emoji, becomes U+FFFD (see
/// [`replace_lone_surrogates`]).
pub fn decode_wanted(
    body: &[u8],
    now: DateTime<Utc>,
    limits: &BodyLimits,
    wanted: impl Fn(&str) -> bool,
) -> Result<Decoded, DecodeError> {
    let body = replace_lone_surrogates(body);
    let mut decoded = decode_repaired(&body, now, limits, wanted)?;
    if let Some(skew) = limits.max_clock_skew {
        // A skew past the calendar's end leaves every timestamp as it is.
        let latest = chrono::TimeDelta::from_std(skew)
            .ok()
            .and_then(|skew| now.checked_add_signed(skew))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        for event in &mut decoded.events {
            if event.time > latest {
                event.time = latest;
                decoded.clamped += 1;
            }
        }
    }
    Ok(decoded)
}

/// `body` with every escaped lone UTF-16 surrogate (`\ud83d` not followed by a low surrogate, or
/// a low one alone) replaced by `\ufffd`, the replacement character: JSON allows them, but no
/// string can hold one. The escape has the same length, so positions in error messages stay
/// right. Borrowed unchanged when there is none (one `memchr` pass over the backslashes).
pub fn replace_lone_surrogates(body: &[u8]) -> Cow<'_, [u8]> {
    fn hex4(b: &[u8]) -> Option<u32> {
        let digits = std::str::from_utf8(b.get(..4)?).ok()?;
        u32::from_str_radix(digits, 16).ok()
    }
    let surrogate_at = |i: usize| -> Option<u32> {
        (body.get(i + 1) == Some(&b'u'))
            .then(|| hex4(&body[i + 2..]))
            .flatten()
            .filter(|c| (0xD800..0xE000).contains(c))
    };
    let mut lone = Vec::new();
    let mut at = 0;
    while let Some(found) = memchr::memchr(b'\\', &body[at..]) {
        let i = at + found;
        match surrogate_at(i) {
            Some(high) if high < 0xDC00 => {
                let paired = body.get(i + 6) == Some(&b'\\')
                    && surrogate_at(i + 6).is_some_and(|low| low >= 0xDC00);
                if paired {
                    at = i + 12;
                } else {
                    lone.push(i);
                    at = i + 6;
                }
            }
            Some(_low_alone) => {
                lone.push(i);
                at = i + 6;
            }
            // Any other escape is two bytes at least (`\\` must not be read as the start of one).
            None => at = i + 2,
        }
        if at >= body.len() {
            break;
        }
    }
    if lone.is_empty() {
        return Cow::Borrowed(body);
    }
    let mut fixed = body.to_vec();
    for i in lone {
        fixed[i + 2..i + 6].copy_from_slice(b"fffd");
    }
    Cow::Owned(fixed)
}

/// [`decode_wanted`] once lone surrogates are replaced.
fn decode_repaired(
    body: &[u8],
    now: DateTime<Utc>,
    limits: &BodyLimits,
    wanted: impl Fn(&str) -> bool,
) -> Result<Decoded, DecodeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError::Empty);
    }
    if nests_deeper_than(body, limits.max_depth) {
        return Err(DecodeError::TooDeep {
            limit: limits.max_depth,
        });
    }
    let not_json = |e: serde_json::Error| DecodeError::NotJson(e.to_string());
    let body = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => Body::List(serde_json::from_slice(body).map_err(not_json)?),
        Some(b'{') => {
            let map: RawObject = serde_json::from_slice(body).map_err(not_json)?;
            if let Some(batch) = map.get("batch") {
                let items: Vec<&RawValue> = match kind(batch) {
                    Kind::List => read(batch, "`batch`").map_err(DecodeError::NotJson)?,
                    _ => Vec::new(),
                };
                if items.is_empty() {
                    return Err(DecodeError::NoEvent(
                        "`batch` must be a non-empty list of events".into(),
                    ));
                }
                Body::List(items)
            } else if let Some(data) = map.get("data").filter(|d| is_object(d))
                && map.get("hook").is_some()
            {
                Body::Zapier(data)
            } else if map.get("event").is_none() && map.get("text").is_some() {
                return Err(DecodeError::LegacyText);
            } else if map.get("event").is_none() {
                return Err(DecodeError::NoEvent(
                    "the body has no `event` key; expected {\"event\": {...}, \"person\": {...}}, \
                     a flat event {\"event\": \"name\", ...}, a `batch` envelope or a list of events"
                        .into(),
                ));
            } else {
                Body::One(map)
            }
        }
        _ => {
            let scalar: &RawValue = serde_json::from_slice(body).map_err(not_json)?;
            return Err(DecodeError::NoEvent(format!(
                "the body is {}, not an event object",
                kind(scalar).called()
            )));
        }
    };
    let invalid = |index: usize| move |problem| DecodeError::InvalidEvent { index, problem };
    let mut events = Vec::new();
    let received = match body {
        Body::List(items) if items.is_empty() => {
            return Err(DecodeError::NoEvent("the list is empty".into()));
        }
        Body::List(items) if items.len() > limits.max_events => {
            return Err(DecodeError::TooManyEvents {
                count: items.len(),
                limit: limits.max_events,
            });
        }
        Body::List(items) => {
            for (i, item) in items.iter().enumerate() {
                events.extend(single_event(item, now, &wanted).map_err(invalid(i + 1))?);
            }
            items.len()
        }
        Body::One(map) => {
            events.extend(object_event(&map, now, &wanted).map_err(invalid(1))?);
            1
        }
        Body::Zapier(data) => {
            events.extend(zapier_event(data, now, &wanted).map_err(invalid(1))?);
            1
        }
    };
    Ok(Decoded {
        received,
        events,
        clamped: 0,
    })
}

/// Where a body's events are.
enum Body<'a> {
    /// A list of events, or a `batch` envelope's list.
    List(Vec<&'a RawValue>),
    /// One event, envelope or flat.
    One(RawObject<'a>),
    /// A Zapier REST hook's `data`.
    Zapier(&'a RawValue),
}

/// Whether JSON `text` nests more than `limit` levels deep: the text itself is level 1, and each
/// array or object adds a level for what it holds (`{"a": 1}` is 2 levels, `{}` is 1). A scan of
/// the bytes, so that a deep body is refused before any of it is parsed; the inside of strings is
/// skipped with `memchr`. Broken JSON gives some answer, never a panic.
fn nests_deeper_than(text: &[u8], limit: usize) -> bool {
    // No deeper than one more than the number of `[` and `{` anywhere: most bodies stop here.
    if limit > 0
        && memchr::memchr2_iter(b'[', b'{', text)
            .nth(limit - 1)
            .is_none()
    {
        return false;
    }
    let (mut depth, mut at) = (0usize, 0);
    while let Some(&b) = text.get(at) {
        at += 1;
        match b {
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' | b':' | b' ' | b'\t' | b'\n' | b'\r' => {}
            // A value (or a key, which always has one) one level inside the current one.
            _ => {
                if depth + 1 > limit {
                    return true;
                }
                if b == b'"' {
                    // To the closing quote: the next quote that is not escaped.
                    let rest = |at: usize| text.get(at..).unwrap_or_default();
                    while let Some(i) = memchr::memchr2(b'"', b'\\', rest(at)) {
                        at += i + 1;
                        if text[at - 1] == b'"' {
                            break;
                        }
                        at += 1;
                    }
                }
            }
        }
    }
    false
}

/// One event in any of the single-event shapes: the webhook destination envelope
/// `{"event": {...}, "person": {...}}` or a flat event `{"event": "name", ...}`. `None` when
/// it is valid but not wanted.
fn single_event(
    item: &RawValue,
    now: DateTime<Utc>,
    wanted: &impl Fn(&str) -> bool,
) -> Result<Option<Event>, String> {
    if !is_object(item) {
        return Err(format!(
            "expected an event object, got {}",
            kind(item).called()
        ));
    }
    object_event(&read(item, "the event")?, now, wanted)
}

fn object_event(
    outer: &RawObject,
    now: DateTime<Utc>,
    wanted: &impl Fn(&str) -> bool,
) -> Result<Option<Event>, String> {
    let person = outer.get("person");
    match outer.get("event").map(|e| (e, kind(e))) {
        Some((event, Kind::Object)) => {
            let event = read(event, "`event`")?;
            normalize(
                &event,
                ["event", "uuid", "distinct_id"],
                person,
                now,
                wanted,
            )
        }
        Some((_, Kind::Text)) => {
            normalize(outer, ["event", "uuid", "distinct_id"], person, now, wanted)
        }
        Some((_, other)) => Err(format!(
            "the event name (`event`) must be text, got {}",
            other.called()
        )),
        None => Err("it has no `event` (the event name)".into()),
    }
}

/// A Zapier REST hook's `data`: camelCase names for the same fields.
fn zapier_event(
    data: &RawValue,
    now: DateTime<Utc>,
    wanted: &impl Fn(&str) -> bool,
) -> Result<Option<Event>, String> {
    let data: RawObject = read(data, "`data`")?;
    let person = data.get("person");
    normalize(
        &data,
        ["event", "eventUuid", "distinctId"],
        person,
        now,
        wanted,
    )
}

/// Checks every field of one event and, if `wanted` accepts its name, builds it. `keys` are the
/// names of the event name, id and distinct id in this shape.
fn normalize(
    event: &RawObject,
    [name_key, uuid_key, distinct_id_key]: [&str; 3],
    person: Option<&RawValue>,
    now: DateTime<Utc>,
    wanted: &impl Fn(&str) -> bool,
) -> Result<Option<Event>, String> {
    // The 2024 destination globals call the name `name` instead of `event`.
    let name = match event.get(name_key).or_else(|| event.get("name")) {
        Some(raw) if kind(raw) == Kind::Text => {
            let name = text(raw, "the event name")?;
            if name.trim().is_empty() {
                return Err("the event name is empty".into());
            }
            name
        }
        Some(other) => {
            return Err(format!(
                "the event name (`event`) must be text, got {}",
                kind(other).called()
            ));
        }
        None => return Err("it has no event name (`event`)".into()),
    };
    let properties = object_or_empty(event.get("properties"), "properties")?;
    let uuid = match event.get(uuid_key).map(|raw| (raw, kind(raw))) {
        None | Some((_, Kind::Null)) => None,
        Some((raw, Kind::Text)) => {
            let uuid = text(raw, "`uuid`")?;
            if uuid.len() > MAX_UUID_BYTES {
                return Err(format!(
                    "`uuid` is {} bytes long; an event id is at most {MAX_UUID_BYTES} (PostHog's are 36)",
                    uuid.len()
                ));
            }
            Some(uuid)
        }
        Some((_, other)) => return Err(format!("`uuid` must be text, got {}", other.called())),
    };
    // posthog-js may put the distinct id only inside the properties.
    let in_properties: RawObject;
    let distinct_id = match event
        .get(distinct_id_key)
        .filter(|raw| kind(raw) != Kind::Null)
    {
        Some(raw) => Some(raw),
        None => match properties {
            Some(properties) => {
                in_properties = read(properties, "`properties`")?;
                in_properties.get("distinct_id")
            }
            None => None,
        },
    };
    let distinct_id = match distinct_id.map(|raw| (raw, kind(raw))) {
        None | Some((_, Kind::Null)) => None,
        Some((raw, Kind::Text)) => Some(text(raw, "`distinct_id`")?),
        Some((raw, Kind::Number)) => Some(Cow::Borrowed(raw.get())),
        Some((_, other)) => {
            return Err(format!(
                "`distinct_id` must be text, got {}",
                other.called()
            ));
        }
    };
    let time = match event.get("timestamp").map(|raw| (raw, kind(raw))) {
        None | Some((_, Kind::Null)) => now,
        Some((raw, Kind::Text)) => {
            let s = text(raw, "`timestamp`")?;
            parse_timestamp(&s).ok_or_else(|| {
                format!(
                    "`timestamp` {s:?} is not an ISO 8601 date such as 2025-06-14T09:21:33.412Z"
                )
            })?
        }
        Some((_, other)) => {
            return Err(format!(
                "`timestamp` must be an ISO 8601 date as text, got {}",
                other.called()
            ));
        }
    };
    let person_properties = match person.map(|raw| (raw, kind(raw))) {
        None | Some((_, Kind::Null)) => None,
        Some((raw, Kind::Object)) => {
            let person: RawObject = read(raw, "`person`")?;
            object_or_empty(person.get("properties"), "person.properties")?
        }
        Some((_, other)) => {
            return Err(format!(
                "`person` must be an object or null, got {}",
                other.called()
            ));
        }
    };
    let elements_chain = match event.get("elements_chain").map(|raw| (raw, kind(raw))) {
        None | Some((_, Kind::Null)) => None,
        Some((raw, Kind::Text)) => Some(text(raw, "`elements_chain`")?),
        Some((_, other)) => {
            return Err(format!(
                "`elements_chain` must be text, got {}",
                other.called()
            ));
        }
    };
    if !wanted(&name) {
        return Ok(None);
    }
    let text = |t: Option<Cow<str>>| t.map_or(Value::Null, |t| Value::String(t.into_owned()));
    Ok(Some(Event {
        name: Value::String(name.into_owned()),
        uuid: text(uuid),
        distinct_id: text(distinct_id),
        timestamp: Value::String(time.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        time,
        properties: object(properties, "properties")?,
        person_properties: object(person_properties, "person.properties")?,
        elements_chain: text(elements_chain),
        source: Value::Null,
    }))
}

/// A field that must be an object when present: `None` when absent or null.
fn object_or_empty<'a>(
    raw: Option<&'a RawValue>,
    what: &str,
) -> Result<Option<&'a RawValue>, String> {
    match raw.map(|raw| (raw, kind(raw))) {
        None | Some((_, Kind::Null)) => Ok(None),
        Some((raw, Kind::Object)) => Ok(Some(raw)),
        Some((_, other)) => Err(format!(
            "`{what}` must be a JSON object, got {}",
            other.called()
        )),
    }
}

/// The values of an object field, or an empty object.
fn object(raw: Option<&RawValue>, what: &str) -> Result<Value, String> {
    raw.map_or(Ok(Value::Object(Map::new())), |raw| read(raw, what))
}

/// The text of a raw JSON string (already checked to be valid): the slice between the quotes
/// when it holds no escape, which is nearly always.
fn text<'a>(raw: &'a RawValue, what: &str) -> Result<Cow<'a, str>, String> {
    let quoted = raw.get().trim();
    match quoted.get(1..quoted.len().saturating_sub(1)) {
        Some(inner) if quoted.starts_with('"') && !inner.contains('\\') => Ok(Cow::Borrowed(inner)),
        _ => read::<Text>(raw, what).map(|Text(text)| text),
    }
}

/// Reads raw JSON (already checked to be valid) into `T`; `what` names it in the error.
fn read<'a, T: Deserialize<'a>>(raw: &'a RawValue, what: &str) -> Result<T, String> {
    serde_json::from_str(raw.get()).map_err(|e| format!("{what} cannot be read: {e}"))
}

/// The kinds of JSON value, as told by a raw value's first character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    Bool,
    Number,
    Text,
    List,
    Object,
}

impl Kind {
    /// How the kind is called in an error message.
    fn called(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool => "true/false",
            Kind::Number => "a number",
            Kind::Text => "text",
            Kind::List => "a list",
            Kind::Object => "an object",
        }
    }
}

fn kind(raw: &RawValue) -> Kind {
    match raw.get().trim_start().as_bytes().first() {
        Some(b'{') => Kind::Object,
        Some(b'[') => Kind::List,
        Some(b'"') => Kind::Text,
        Some(b't' | b'f') => Kind::Bool,
        Some(b'n') => Kind::Null,
        _ => Kind::Number,
    }
}

fn is_object(raw: &RawValue) -> bool {
    kind(raw) == Kind::Object
}

/// Text from the body: borrowed unless it holds escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("text")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
        }
        deserializer.deserialize_str(Visit)
    }
}

/// A JSON object's keys with the raw text of their values: read without building the values.
/// As in a parsed object, the last of repeated keys counts.
struct RawObject<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> RawObject<'a> {
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

impl<'de> Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = RawObject<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawObject<'de>, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((Text(key), value)) = map.next_entry::<Text, &RawValue>()? {
                    entries.push((key, value));
                }
                Ok(RawObject(entries))
            }
        }
        deserializer.deserialize_map(Visit)
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
    fn events_no_rule_wants_are_checked_but_not_built() {
        let decode = |b: &str| {
            decode_wanted(b.as_bytes(), now(), &BodyLimits::LOCAL_FILES, |name| {
                name == "keep"
            })
        };
        let decoded = decode(
            r#"[{"event":"skip","properties":{"a":1}},{"event":{"event":"keep","properties":{"b":2}}}]"#,
        )
        .unwrap();
        assert_eq!(decoded.received, 2);
        assert_eq!(decoded.events.len(), 1);
        assert_eq!(decoded.events[0].properties, json!({"b": 2}));
        // A body of events nobody wants is accepted, with nothing to build.
        let decoded = decode(r#"{"event":"skip","uuid":"u"}"#).unwrap();
        assert_eq!((decoded.received, decoded.events.len()), (1, 0));
        // An unwanted event with a field of the wrong kind refuses the body all the same.
        assert_eq!(
            decode(r#"[{"event":"keep"},{"event":"skip","timestamp":5}]"#)
                .unwrap_err()
                .to_string(),
            "event 2 of the body: `timestamp` must be an ISO 8601 date as text, got a number"
        );
        assert!(decode(r#"{"event":"skip","properties":[1]}"#).is_err());
        assert!(decode(r#"{"event":"skip","distinct_id":{"id":1}}"#).is_err());
        assert!(decode(r#"{"event":"skip","properties":{"distinct_id":[1]}}"#).is_err());
        // As in any JSON object, the last of repeated keys counts.
        assert_eq!(
            decode(r#"{"event":"skip","event":"keep"}"#).unwrap().events[0].name(),
            "keep"
        );
    }

    #[test]
    fn nesting_is_counted_outside_text_only() {
        let depth = |text: &[u8]| (1..200).find(|&limit| !nests_deeper_than(text, limit));
        assert_eq!(depth(b"1"), Some(1));
        assert_eq!(depth(b"{}"), Some(1));
        assert_eq!(depth(br#"{"a":1}"#), Some(2));
        assert_eq!(depth(b"[[]]"), Some(2));
        assert_eq!(depth(b"[[1]]"), Some(3));
        assert_eq!(depth(br#"{"a":"[[[{{{\"[[["}"#), Some(2));
        assert_eq!(depth(br#"{"a":[{"b":"\\"}]}"#), Some(4));
        let deep = format!("{}1{}", "[".repeat(150), "]".repeat(150));
        assert_eq!(depth(deep.as_bytes()), Some(151));
        // Broken JSON gives some answer, never a panic.
        for broken in [&b"\"\\"[..], b"]]]{", b"\"abc\\", b"\\"] {
            nests_deeper_than(broken, 1);
        }
    }

    #[test]
    fn a_server_limits_depth_and_events_per_body() {
        let limits = BodyLimits {
            max_depth: 4,
            max_events: 2,
            max_clock_skew: None,
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

    #[test]
    fn lone_surrogates_become_the_replacement_character() {
        // A JavaScript string cut in the middle of an emoji, in a field a rule reads.
        let e = one(
            r#"{"event":"x","properties":{"t":"cut \ud83d","low":"\udc00!","ok":"\ud83c\udfe0"}}"#,
        );
        assert_eq!(e.properties["t"], json!("cut \u{fffd}"));
        assert_eq!(e.properties["low"], json!("\u{fffd}!"));
        assert_eq!(e.properties["ok"], json!("🏠"), "a whole pair is kept");
        // An escaped backslash followed by `ud83d` is text, not an escape.
        let text = one(r#"{"event":"x","properties":{"t":"\\ud83d"}}"#);
        assert_eq!(text.properties["t"], json!("\\ud83d"));
        assert!(matches!(
            replace_lone_surrogates(br#"{"a":"\\ud83d \ud83c\udfe0"}"#),
            Cow::Borrowed(_)
        ));
        // Two high surrogates in a row, one at the very end, and cut-off escapes: no panic.
        assert_eq!(
            &*replace_lone_surrogates(br#""\ud83d\ud83d\ud83d"#),
            br#""\ufffd\ufffd\ufffd"#
        );
        for broken in [&b"\\"[..], b"\\u", b"\\ud8", b"\\ud83d\\", b"\\ud83d\\u"] {
            replace_lone_surrogates(broken);
        }
    }

    #[test]
    fn a_timestamp_too_far_ahead_is_timed_at_the_clock_skew_limit() {
        let limits = BodyLimits {
            max_clock_skew: Some(std::time::Duration::from_secs(300)),
            ..BodyLimits::LOCAL_FILES
        };
        let body = br#"[{"event":"x","timestamp":"2099-01-01T00:00:00Z"},{"event":"x","timestamp":"2026-01-02T03:06:05Z"}]"#;
        let decoded = decode_wanted(body, now(), &limits, |_| true).unwrap();
        assert_eq!(decoded.clamped, 1);
        let limit: DateTime<Utc> = "2026-01-02T03:09:05Z".parse().unwrap();
        assert_eq!(decoded.events[0].time, limit);
        assert_eq!(
            decoded.events[0].timestamp,
            json!("2099-01-01T00:00:00Z"),
            "the timestamp as sent is kept for templates and lines"
        );
        assert_eq!(
            decoded.events[1].time.to_rfc3339(),
            "2026-01-02T03:06:05+00:00"
        );
        let as_sent = decode_wanted(body, now(), &BodyLimits::LOCAL_FILES, |_| true).unwrap();
        assert_eq!(as_sent.clamped, 0);
    }

    #[test]
    fn templates_see_every_field_under_the_name_rules_use() {
        let e = one(
            r#"{"event":"x","uuid":"u","distinct_id":"d","properties":{"a":1},"person":{"properties":{"b":2}}}"#,
        );
        let data = e.template_context();
        for field in Field::ALL {
            let pointer = format!("/{}", field.name().replace('.', "/"));
            assert_eq!(
                data.pointer(&pointer),
                Some(field.of(&e)),
                "{}",
                field.name()
            );
        }
        // And the elements read from `elements_chain`, beside it.
        assert_eq!(data.as_object().unwrap().len(), Field::ALL.len() + 1);
        assert_eq!(data["elements"], serde_json::json!([]));
    }

    #[test]
    fn autocapture_keeps_its_elements_chain_and_refuses_one_that_is_not_text() {
        let e = one(r#"{"event":"$autocapture","elements_chain":"button:text=\"Go\""}"#);
        assert_eq!(e.elements_chain, "button:text=\"Go\"");
        assert_eq!(e.template_context()["elements"][0]["text"], "Go");
        let refused = decode(
            br#"{"event":"$autocapture","elements_chain":["button"]}"#,
            now(),
            &BodyLimits::LOCAL_FILES,
        );
        assert!(
            (refused.unwrap_err().to_string())
                .contains("`elements_chain` must be text, got a list"),
        );
    }
}
