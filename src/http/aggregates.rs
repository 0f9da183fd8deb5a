//! `GET /aggregates/{rule}`: an `[aggregate]` rule's counts over a range of days, in the shape
//! of the campaign-analytics platform's summary (`totalEvents`, `uniqueUsers`, and per group,
//! `variants`: events, users, conversions, conversion rate), with the rows of each day on
//! request. Distinct users are exact up to a size and estimated beyond it; `usersExact` says
//! which (see `store/aggregates.rs`).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use chrono::NaiveDate;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

use super::AppState;
use super::admin::Access;
use super::error::AppError;
use crate::actions::aggregate;
use crate::store::aggregates::{Totals, day_date, day_number, summarize};

/// The query string.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateQuery {
    /// The first day counted (YYYY-MM-DD, in the rule's time zone); the first kept if absent.
    from: Option<String>,
    /// The last day counted, included; the last kept if absent.
    to: Option<String>,
    /// `true`: also each day's counts.
    days: Option<bool>,
}

pub async fn aggregates(
    State(state): State<Arc<AppState>>,
    Extension(access): Extension<Access>,
    Path(rule): Path<String>,
    query: Result<Query<AggregateQuery>, QueryRejection>,
) -> Result<Json<Value>, AppError> {
    let Query(query) = query.map_err(|e| AppError::BadQuery(e.body_text()))?;
    let not_found = || {
        AppError::NotFound(format!(
            "no rule named `{rule}` counts events: a rule needs an [aggregate] table (see docs/RULES.md)"
        ))
    };
    // A tenant reads its own running rules' counts only.
    if !access.sees(state.rules.snapshot().as_deref(), &rule) {
        return Err(not_found());
    }
    let from = query.from.as_deref().map(|d| date("from", d)).transpose()?;
    let to = query.to.as_deref().map(|d| date("to", d)).transpose()?;
    if let (Some(from), Some(to)) = (from, to)
        && from > to
    {
        return Err(AppError::BadQuery(format!(
            "`from` ({from}) is after `to` ({to})"
        )));
    }
    // The running rule's zone, if it still counts (its days stay after it is removed).
    let timezone = state.rules.snapshot().and_then(|set| {
        let rule = set.rules().iter().find(|r| r.name == rule)?;
        let action = rule.actions.iter().find(|a| a.kind() == aggregate::KIND)?;
        Some(action.summary()["timezone"].clone())
    });
    let store = state.store.clone();
    let name = rule.clone();
    let running = timezone.is_some();
    let (first, last) = (
        from.map_or(i32::MIN, day_number),
        to.map_or(i32::MAX, day_number),
    );
    let rows = tokio::task::spawn_blocking(move || {
        // A rule no longer running is known by its counts, kept until its `keep_for` ends.
        if !running && !store.aggregate_rules()?.contains(&name) {
            return Ok(None);
        }
        store.aggregates(&name, first, last).map(Some)
    })
    .await
    .map_err(|e| AppError::Internal(e.to_string()))?
    .map_err(|e: crate::store::StoreError| AppError::Internal(e.to_string()))?;
    let Some(rows) = rows else {
        return Err(not_found());
    };
    let summary = summarize(&rows);
    let day = |d: Option<i32>| d.map(|d| day_date(d).to_string());
    let mut answer = json!({
        "rule": rule,
        "from": from.map(|d| d.to_string()).or_else(|| day(summary.first_day)),
        "to": to.map(|d| d.to_string()).or_else(|| day(summary.last_day)),
        "timezone": timezone,
        "totalEvents": summary.all.events,
        "uniqueUsers": summary.all.users,
        "usersExact": summary.exact,
        "variants": variants(&summary.groups),
    });
    if query.days == Some(true) {
        answer["days"] = summary
            .days
            .iter()
            .map(|(d, groups)| {
                json!({
                    "date": day_date(*d).to_string(),
                    "totalEvents": groups.values().map(|t| t.events).sum::<u64>(),
                    "variants": variants(groups),
                })
            })
            .collect();
    }
    Ok(Json(answer))
}

/// A date of the query.
fn date(name: &str, text: &str) -> Result<NaiveDate, AppError> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| {
        AppError::BadQuery(format!(
            "`{name}` must be a date such as 2026-12-03, not `{text}`"
        ))
    })
}

/// Each group's counts, with its conversion rate (conversions per user, to 3 decimals).
fn variants(groups: &BTreeMap<String, Totals>) -> Value {
    let mut out = Map::new();
    for (group, t) in groups {
        let rate = if t.users == 0 {
            0.0
        } else {
            (t.conversions as f64 / t.users as f64 * 1000.0).round() / 1000.0
        };
        out.insert(
            group.clone(),
            json!({
                "events": t.events,
                "users": t.users,
                "conversions": t.conversions,
                "conversionRate": rate,
            }),
        );
    }
    Value::Object(out)
}
