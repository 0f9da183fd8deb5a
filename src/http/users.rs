//! `GET /users/{distinct_id}`: what tripline keeps about one person, for a support chatbot's
//! prompt or a person's recent activity: the events `[remember]` rules kept (newest first, a
//! page at a time), the sessions they make up, the rule state their events made (counters,
//! windows, when a rule last acted), their groups in `[aggregate]` rules, what waits for them,
//! and the deliveries made for them.
//! `?format=text` gives the same as a short block of text, ready to paste into a prompt.
//!
//! `DELETE /users/{distinct_id}`: forgets all of it (a person's right to erasure), and says
//! what it removed.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use super::AppState;
use super::admin::Access;
use super::error::AppError;
use crate::store::aggregates::day_date;
use crate::store::queue::OutboxRecord;
use crate::store::remembered::Stored;
use crate::store::{KeyRecord, Pending, StateKey};
use crate::units::duration_in_words;

/// Events in one page, unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 50;
/// The most events in one page.
const MAX_LIMIT: usize = 500;

/// The query string.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserQuery {
    /// `json` (the default) or `text`.
    format: Option<String>,
    /// Events in this page (1 to 500).
    limit: Option<usize>,
    /// The `next` of the page before: events older than its last.
    before: Option<String>,
    /// Only events at or after this time (RFC 3339, or a date: its start, UTC).
    start: Option<String>,
    /// Only events before this time (RFC 3339, or a date: the day after it, UTC).
    end: Option<String>,
}

pub async fn user(
    State(state): State<Arc<AppState>>,
    Extension(access): Extension<Access>,
    Path(distinct_id): Path<String>,
    query: Result<Query<UserQuery>, QueryRejection>,
) -> Result<Response, AppError> {
    let Query(query) = query.map_err(|e| AppError::BadQuery(e.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(AppError::BadQuery(format!(
            "`limit` must be from 1 to {MAX_LIMIT}"
        )));
    }
    let text = wants_text(query.format.as_deref())?;
    let start = query
        .start
        .as_deref()
        .map(|t| instant(t, false))
        .transpose()?;
    let end = query.end.as_deref().map(|t| instant(t, true)).transpose()?;
    let before = query.before.as_deref().map(cursor).transpose()?;
    let store = state.store.clone();
    let who = distinct_id.clone();
    let mut person = tokio::task::spawn_blocking(move || store.person(&who))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?
        .map_err(|e| AppError::Internal(e.to_string()))?;
    // A tenant sees what its own rules keep about the person (the same id may be someone else
    // at another source).
    if access != Access::All {
        let rules = state.rules.snapshot();
        let sees = |rule: &str| access.sees(rules.as_deref(), rule);
        person.remembered.retain(|e| sees(&e.entry.rule));
        // A cap group's counts are the operator's, whatever a rule is named.
        person.keys.retain(|(k, _)| {
            let (rule, kind, _) = key_parts(k);
            sees(&rule) && !kind.starts_with("cap")
        });
        person.waits.retain(|(_, w)| sees(&w.rule));
        person.deliveries.retain(|(_, r)| sees(&r.rule));
        person.groups.retain(|m| sees(&m.rule));
    }
    let mut events = std::mem::take(&mut person.remembered);
    let as_of = state.clock.now();
    let now_ms = as_of.timestamp_millis();
    events.retain(|e| {
        e.expires_ms > now_ms
            && start.is_none_or(|s| e.at_ms >= s)
            && end.is_none_or(|t| e.at_ms < t)
    });
    // Newest first; events of the same millisecond in the order they were kept.
    events.sort_unstable_by_key(|e| std::cmp::Reverse((e.at_ms, e.seq)));
    let sessions = sessions(&events);
    let page: Vec<&Stored> = events
        .iter()
        .filter(|e| before.is_none_or(|c| (e.at_ms, e.seq) < c))
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    let page = &page[..page.len().min(limit)];
    let next = more
        .then(|| page.last().map(|e| format!("{}.{}", e.at_ms, e.seq)))
        .flatten();
    let counters: Vec<Value> = person.keys.iter().map(|(k, r)| counter(k, r)).collect();
    let pending: Vec<Value> = person.waits.iter().map(|(_, w)| waiting(w)).collect();
    let mut deliveries = person.deliveries;
    deliveries.sort_unstable_by_key(|(id, _)| std::cmp::Reverse(*id));
    let actions: Vec<Value> = deliveries.iter().map(|(id, r)| action(*id, r)).collect();
    let groups: Vec<Value> = (person.groups.iter())
        .map(|m| {
            json!({
                "rule": m.rule,
                "group": m.group,
                "converted": m.converted.map(|d| day_date(d).to_string()),
            })
        })
        .collect();
    if text {
        let mut body = as_text(&distinct_id, as_of, page, &sessions, next.is_some());
        others_as_text(&mut body, &counters, &groups, &pending, &actions);
        return Ok(plain_text(body));
    }
    let recent: Vec<Value> = page
        .iter()
        .map(|e| {
            json!({
                "timestamp": e.entry.timestamp,
                "event": e.entry.event,
                "uuid": e.entry.uuid,
                "rule": e.entry.rule,
                "label": e.entry.label,
                "fields": e.entry.fields,
            })
        })
        .collect();
    Ok(Json(json!({
        "distinct_id": distinct_id,
        "as_of": as_of.to_rfc3339_opts(SecondsFormat::Millis, true),
        "recent_events": recent,
        "next": next,
        "sessions": sessions.iter().map(Session::json).collect::<Vec<_>>(),
        "counters": counters,
        "groups": groups,
        "pending": pending,
        "actions": actions,
    }))
    .into_response())
}

/// `DELETE /users/{distinct_id}`: forgets everything kept about the person, in one
/// transaction, and says what.
pub async fn forget(
    State(state): State<Arc<AppState>>,
    Path(distinct_id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, AppError> {
    // As for the outbox's retry: not from a page the operator happens to visit.
    if headers.contains_key(header::ORIGIN) {
        return Err(AppError::FromWebPage);
    }
    let store = state.store.clone();
    let who = distinct_id.clone();
    let erased = tokio::task::spawn_blocking(move || {
        let mut txn = store.begin()?;
        let erased = txn.forget_person(&who)?;
        txn.commit()?;
        Ok::<_, crate::store::StoreError>(erased)
    })
    .await
    .map_err(|e| AppError::Internal(e.to_string()))?
    .map_err(|e| AppError::Internal(e.to_string()))?;
    let mut erased = erased;
    erased.explanations += state.explained.forget(&distinct_id);
    tracing::info!(?erased, "forgot a person at the operator's request");
    Ok(Json(json!({
        "distinct_id": distinct_id,
        "erased": erased,
        "not_erased": "lines already written to JSONL files, and emails and requests already delivered, are outside tripline: remove them where they went",
    }))
    .into_response())
}

/// A key of rule state, as `counters` shows it: the rule, the kind of state, the values it is
/// kept for, and what it holds.
fn counter(key: &StateKey, record: &KeyRecord) -> Value {
    let (rule, kind, values) = key_parts(key);
    json!({
        "rule": rule,
        "kind": kind,
        "values": values,
        "count": counted(&kind, record),
        "last_acted": record.acted.map(time),
    })
}

/// A key's rule, kind and values (a key is a JSON list: the rule, the kind, then the values).
fn key_parts(key: &StateKey) -> (String, String, Vec<Value>) {
    let mut parts: Vec<Value> = serde_json::from_str(key.as_str()).unwrap_or_default();
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    let (rule, kind) = (text(parts.first()), text(parts.get(1)));
    let values = if parts.len() > 2 {
        parts.split_off(2)
    } else {
        Vec::new()
    };
    (rule, kind, values)
}

/// What a key's count is, by its kind (see `store/state.rs` for how each keeps it); `None` for
/// a key that counts nothing (a once-mark).
fn counted(kind: &str, record: &KeyRecord) -> Option<u64> {
    let window = &record.window;
    let n = |len: usize| len as u64;
    match kind {
        // A plain count, or (with `within`) the times in its window.
        "count" if window.is_empty() => Some(record.count),
        "count" => Some(n(window.len())),
        // Of a period (a day, a week...), or a cap group's: [period, count].
        k if k.starts_with("count in") || k.starts_with("cap") => {
            Some(window.get(1).map_or(0, |c| u64::try_from(*c).unwrap_or(0)))
        }
        // Different values: kept as they are, after their period, or with when each was seen.
        "distinct" => Some(n(window.len())),
        k if k.starts_with("distinct in") => Some(n(window.len().saturating_sub(1))),
        "distinct within" => Some(n(window.len() / 2)),
        _ => None,
    }
}

/// A pending wait (or held action, or digest being collected), as `pending` shows it.
pub(super) fn waiting(wait: &Pending) -> Value {
    let kind = match (&wait.held, &wait.digest) {
        (Some(_), _) => "held",
        (_, Some(_)) => "digest",
        _ => "wait",
    };
    json!({
        "rule": wait.rule,
        "kind": kind,
        "since": wait.trigger.timestamp,
        "event": wait.trigger.name,
        "until": time(wait.deadline_ms),
    })
}

/// A delivery, as `actions` shows it.
pub(super) fn action(id: u64, record: &OutboxRecord) -> Value {
    let at = |unix: u64| time(i64::try_from(unix).unwrap_or(i64::MAX).saturating_mul(1000));
    json!({
        "id": id,
        "kind": record.kind,
        "rule": record.rule,
        "to": record.destination,
        "status": record.status,
        "attempts": record.attempts,
        "last_error": record.last_error,
        "created": at(record.created_unix),
        "finished": record.finished_unix.map(at),
    })
}

/// The counters, pending waits and actions, as lines of text.
fn others_as_text(
    out: &mut String,
    counters: &[Value],
    groups: &[Value],
    pending: &[Value],
    actions: &[Value],
) {
    let text = |v: &Value| one_line(&v.as_str().map_or_else(|| v.to_string(), str::to_string));
    if !counters.is_empty() {
        out.push_str("Rule counters:\n");
        for c in counters {
            let _ = writeln!(
                out,
                "- {} ({}): {}",
                text(&c["rule"]),
                text(&c["kind"]),
                c["count"]
            );
        }
    }
    if !groups.is_empty() {
        out.push_str("Groups (experiments):\n");
        for g in groups {
            let converted = match g["converted"].as_str() {
                Some(day) => format!(", converted on {day}"),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "- {}: {}{converted}",
                text(&g["rule"]),
                text(&g["group"])
            );
        }
    }
    if !pending.is_empty() {
        out.push_str("Waiting:\n");
        for p in pending {
            let _ = writeln!(
                out,
                "- {} ({}) until {}",
                text(&p["rule"]),
                text(&p["kind"]),
                text(&p["until"])
            );
        }
    }
    if !actions.is_empty() {
        out.push_str("Messages and requests, newest first:\n");
        for a in actions {
            let _ = writeln!(
                out,
                "- {} by {}: {}",
                text(&a["kind"]),
                text(&a["rule"]),
                text(&a["status"])
            );
        }
    }
}

/// Whether `?format=` asks for text (`text`) rather than JSON (`json`, or nothing).
pub(super) fn wants_text(format: Option<&str>) -> Result<bool, AppError> {
    match format {
        None | Some("json") => Ok(false),
        Some("text") => Ok(true),
        Some(other) => Err(AppError::BadQuery(format!(
            "`format` is `json` or `text`, not `{other}`"
        ))),
    }
}

/// A `text/plain` answer.
pub(super) fn plain_text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// A time as the query gives it, in milliseconds: RFC 3339, or a date (its start; with `end`,
/// the start of the day after, so that `end=2026-12-03` includes that day).
fn instant(text: &str, end: bool) -> Result<i64, AppError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| {
        AppError::BadQuery(format!(
            "`{text}` is not a date (2026-12-03) or a time (2026-12-03T10:00:00Z)"
        ))
    })?;
    let date = if end {
        date.succ_opt().unwrap_or(date)
    } else {
        date
    };
    Ok(date
        .and_hms_opt(0, 0, 0)
        .map_or(0, |t| t.and_utc().timestamp_millis()))
}

/// The place a `next` cursor names: (time, sequence).
fn cursor(text: &str) -> Result<(i64, u64), AppError> {
    let bad = || AppError::BadQuery("`before` is not a `next` this endpoint gave".into());
    let (at, seq) = text.split_once('.').ok_or_else(bad)?;
    Ok((
        at.parse().map_err(|_| bad())?,
        seq.parse().map_err(|_| bad())?,
    ))
}

/// One session: the events sharing a `session` field.
struct Session<'e> {
    id: &'e str,
    start: i64,
    end: i64,
    events: usize,
    /// The `page` field of its first and last events that have one.
    first_page: Option<&'e str>,
    last_page: Option<&'e str>,
}

impl Session<'_> {
    fn json(&self) -> Value {
        json!({
            "session_id": self.id,
            "start": time(self.start),
            "end": time(self.end),
            "events": self.events,
            "duration_seconds": (self.end - self.start) / 1000,
            "first_page": self.first_page,
            "last_page": self.last_page,
        })
    }
}

/// The sessions of `events` (newest first), newest first: events are grouped by their
/// `session` field (a rule writes `session = "properties.$session_id"`), and `page` gives each
/// its first and last page.
fn sessions(events: &[Stored]) -> Vec<Session<'_>> {
    let mut by_id: BTreeMap<&str, Session> = BTreeMap::new();
    // Oldest first, so that the first page is the first seen.
    for e in events.iter().rev() {
        let Some(id) = e.entry.fields.get("session").and_then(Value::as_str) else {
            continue;
        };
        let page = e.entry.fields.get("page").and_then(Value::as_str);
        let session = by_id.entry(id).or_insert(Session {
            id,
            start: e.at_ms,
            end: e.at_ms,
            events: 0,
            first_page: None,
            last_page: None,
        });
        session.end = e.at_ms;
        session.events += 1;
        if page.is_some() {
            session.first_page = session.first_page.or(page);
            session.last_page = page;
        }
    }
    let mut sessions: Vec<Session> = by_id.into_values().collect();
    sessions.sort_unstable_by_key(|s| std::cmp::Reverse(s.end));
    sessions
}

fn time(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The same, as a short block for a prompt.
/// `text` on one line: a label or a page comes from what people sent, and a line break in it
/// must not start a line of its own in a block meant for a prompt.
pub(super) fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn as_text(
    who: &str,
    as_of: DateTime<Utc>,
    page: &[&Stored],
    sessions: &[Session],
    more: bool,
) -> String {
    let minute = |ms: i64| {
        DateTime::<Utc>::from_timestamp_millis(ms)
            .unwrap_or_default()
            .format("%Y-%m-%d %H:%M UTC")
            .to_string()
    };
    let mut out = format!(
        "User {}, as of {}.\n",
        one_line(who),
        as_of.format("%Y-%m-%d %H:%M UTC")
    );
    if page.is_empty() {
        out.push_str("No recent activity is recorded.\n");
    } else {
        out.push_str("Recent activity, newest first:\n");
        for e in page {
            let what = one_line(e.entry.label.as_deref().unwrap_or(&e.entry.event));
            let _ = writeln!(out, "- {}: {what}", minute(e.at_ms));
        }
        if more {
            out.push_str("- (older activity not shown)\n");
        }
    }
    if !sessions.is_empty() {
        out.push_str("Sessions, newest first:\n");
        for s in sessions {
            let long = std::time::Duration::from_millis((s.end - s.start).max(0) as u64);
            let _ = write!(
                out,
                "- {}: {} event{} over {}",
                minute(s.start),
                s.events,
                if s.events == 1 { "" } else { "s" },
                duration_in_words(long)
            );
            match (s.first_page, s.last_page) {
                (Some(first), Some(last)) if first != last => {
                    let _ = write!(out, ", from {} to {}", one_line(first), one_line(last));
                }
                (Some(page), _) => {
                    let _ = write!(out, ", on {}", one_line(page));
                }
                _ => {}
            }
            out.push('\n');
        }
    }
    out
}
