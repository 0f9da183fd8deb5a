//! `GET /explain/{uuid}`: why each rule did or did not act on one event, in words (the record
//! the committer kept, see `explain.rs`), with what became of what it sent and of the wait it
//! started, as the store has them now. `?format=text` gives the same as lines to read (what
//! `tripline explain UUID` prints).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use std::fmt::Write;
use std::sync::Arc;

use super::AppState;
use super::admin::Access;
use super::error::AppError;
use super::users::{action, one_line, plain_text, waiting, wants_text};
use crate::explain::{KEEP, Record};

/// The query string.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainQuery {
    /// `json` (the default) or `text`.
    format: Option<String>,
}

pub async fn explain(
    State(state): State<Arc<AppState>>,
    Extension(access): Extension<Access>,
    Path(uuid): Path<String>,
    query: Result<Query<ExplainQuery>, QueryRejection>,
) -> Result<Response, AppError> {
    let Query(query) = query.map_err(|e| AppError::BadQuery(e.body_text()))?;
    let text = wants_text(query.format.as_deref())?;
    let store = state.store.clone();
    let rules = state.rules.snapshot();
    let explained = state.explained.clone();
    let id = uuid.clone();
    let found = tokio::task::spawn_blocking(move || {
        // Kept with the batch it was committed in, or in memory when no rule acted on it.
        let Some(json) = store.explanation(&id)?.or_else(|| explained.find(&id)) else {
            return Ok(None);
        };
        let mut kept: Record = serde_json::from_str(&json)
            .map_err(|e| crate::store::StoreError::Unavailable(e.to_string()))?;
        // A tenant sees its own events, and what its own rules did with them.
        if let Access::Tenant(t) = &access {
            if kept.source.as_deref() != Some(t.as_str()) {
                return Ok(None);
            }
            kept.rules
                .retain(|e| access.sees(rules.as_deref(), &e.rule));
        }
        let mut record = kept.shown(&id, rules.as_deref());
        // What became of what each rule sent for this event, and of the waits it started.
        let person = match kept.who.as_deref() {
            Some(who) => store.person(who)?,
            None => crate::store::Person::default(),
        };
        if let Some(entries) = record["rules"].as_array_mut() {
            for entry in entries {
                let rule = entry["rule"].as_str().unwrap_or_default().to_string();
                let sent: Vec<Value> = (person.deliveries.iter())
                    .filter(|(_, r)| r.rule == rule && r.event.as_deref() == Some(id.as_str()))
                    .map(|(n, r)| action(*n, r))
                    .collect();
                if !sent.is_empty() {
                    entry["deliveries"] = sent.into();
                }
                let pending = (person.waits.iter())
                    .find(|(_, w)| w.rule == rule && w.trigger.uuid() == Some(id.as_str()));
                if let (Some((_, w)), Some("waiting" | "held" | "collected")) =
                    (pending, entry["result"].as_str())
                {
                    entry["pending"] = waiting(w);
                }
            }
        }
        Ok::<_, crate::store::StoreError>(Some(record))
    })
    .await
    .map_err(|e| AppError::Internal(e.to_string()))?
    .map_err(|e| AppError::Internal(e.to_string()))?;
    let Some(record) = found else {
        return Err(AppError::NotFound(format!(
            "tripline has no record of the event `{uuid}`: it was not received, no rule names its event, or it is older than the newest {KEEP} events kept"
        )));
    };
    if text {
        return Ok(plain_text(as_text(&record)));
    }
    Ok(Json(record).into_response())
}

/// The record as lines to read.
fn as_text(record: &Value) -> String {
    let s = |v: &Value| one_line(&v.as_str().map_or_else(|| v.to_string(), str::to_string));
    let mut out = format!(
        "Event {} \"{}\" of {}, at {} (received {}).\n",
        s(&record["uuid"]),
        s(&record["event"]),
        s(&record["distinct_id"]),
        s(&record["timestamp"]),
        s(&record["received"]),
    );
    for entry in record["rules"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "- {}: {}", s(&entry["rule"]), s(&entry["says"]));
        if let Some(at) = entry["at"].as_str() {
            let _ = writeln!(out, "    (at {})", one_line(at));
        }
        for d in entry["deliveries"].as_array().into_iter().flatten() {
            let error = match d["last_error"].as_str() {
                Some(e) => format!(", last error: {}", one_line(e)),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "    {} {} to {}: {} after {} attempt(s){error}",
                s(&d["kind"]),
                d["id"],
                s(&d["to"]),
                s(&d["status"]),
                d["attempts"],
            );
        }
        if entry["pending"].is_object() {
            let _ = writeln!(
                out,
                "    still waiting, until {}",
                s(&entry["pending"]["until"])
            );
        }
    }
    out
}
