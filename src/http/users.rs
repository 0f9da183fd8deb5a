//! `GET /users/{distinct_id}`: what tripline keeps about one person, for a support chatbot's
//! prompt or a person's recent activity: the events `[remember]` rules kept (newest first, a
//! page at a time), and the sessions they make up. `?format=text` gives the same as a short
//! block of text, ready to paste into a prompt.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use super::AppState;
use super::error::AppError;
use crate::store::remembered::Stored;
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
    let text = match query.format.as_deref() {
        None | Some("json") => false,
        Some("text") => true,
        Some(other) => {
            return Err(AppError::BadQuery(format!(
                "`format` is `json` or `text`, not `{other}`"
            )));
        }
    };
    let start = query
        .start
        .as_deref()
        .map(|t| instant(t, false))
        .transpose()?;
    let end = query.end.as_deref().map(|t| instant(t, true)).transpose()?;
    let before = query.before.as_deref().map(cursor).transpose()?;
    let store = state.store.clone();
    let who = distinct_id.clone();
    let mut events = tokio::task::spawn_blocking(move || store.remembered(&who))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?
        .map_err(|e| AppError::Internal(e.to_string()))?;
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
    if text {
        let body = as_text(&distinct_id, as_of, page, &sessions, next.is_some());
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response());
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
    }))
    .into_response())
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
        "User {who}, as of {}.\n",
        as_of.format("%Y-%m-%d %H:%M UTC")
    );
    if page.is_empty() {
        out.push_str("No recent activity is recorded.\n");
    } else {
        out.push_str("Recent activity, newest first:\n");
        for e in page {
            let what = e.entry.label.as_deref().unwrap_or(&e.entry.event);
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
                    let _ = write!(out, ", from {first} to {last}");
                }
                (Some(page), _) => {
                    let _ = write!(out, ", on {page}");
                }
                _ => {}
            }
            out.push('\n');
        }
    }
    out
}
