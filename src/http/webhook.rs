//! `POST /webhook`: decode every event of a body, run them through one snapshot of the rules,
//! and answer once their effects are durable.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;
use tracing::{Instrument, info_span, warn};

use super::AppState;
use super::admission::Sender;
use super::error::AppError;
use crate::engine::{Outcome, Report};
use crate::explain;
use crate::ingest::event;
use crate::pipeline::committer::Delivery;
use crate::telemetry;

/// POST /webhook, once admission has settled who sent it: decode every event, run them through
/// one snapshot of the rules, and answer once their effects are durable.
pub async fn webhook(
    State(state): State<Arc<AppState>>,
    Extension(sender): Extension<Sender>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, AppError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => AppError::TooLarge,
        _ => AppError::Unreadable(rejection.body_text()),
    })?;
    let now = state.clock.now();
    let Sender { source, webhook_id } = sender;
    let rules = state.rules.snapshot();
    let decoded = event::decode_wanted(&body, now, &state.body_limits, |name| {
        rules.as_ref().is_none_or(|rules| rules.wants(name))
    })?;
    let Some(rules) = rules else {
        return Err(AppError::NoRules);
    };
    if decoded.clamped > 0 {
        warn!(
            events = decoded.clamped,
            "events stamped later than now plus max_clock_skew: timed at that limit for windows and limits"
        );
        metrics::counter!(telemetry::EVENTS_CLOCK_CLAMPED.name, "source" => source.clone())
            .increment(decoded.clamped as u64);
    }
    let count = decoded.received;
    let mut events = decoded.events;
    for e in &mut events {
        e.source = Value::String(source.clone());
    }
    let span = info_span!(
        "request",
        source = %source,
        events = count,
        event.uuid = events.first().and_then(|e| e.uuid()).unwrap_or("-")
    );
    // Events no rule wants (not even decoded past their fields' kinds) have no effect to make
    // durable: answered at once, without a commit.
    let report = if events.iter().any(|e| rules.involves(e)) {
        state
            .committer
            .submit(
                rules.clone(),
                events,
                webhook_id.map(|id| Delivery {
                    source: source.clone(),
                    id,
                }),
            )
            .instrument(span)
            .await?
    } else {
        // No commit, so no record in the store: why the rules that name these events did not
        // act on them is kept in memory.
        if events.iter().any(|e| rules.names(e)) {
            let now_ms = state.clock.now().timestamp_millis();
            let records = explain::records(&rules, &events, &Report::default(), now_ms);
            state.explained.keep(records);
        }
        Report::default()
    };
    record_received(&source, count, &report);
    Ok(Json(json!({
        "accepted": count,
        "duplicates": report.duplicates,
        "fired": report.fired(&rules),
        "waiting": report.rules_where(&rules, |o| matches!(o, Outcome::Waiting { .. })),
        "cancelled": report.rules_where(&rules, |o| *o == Outcome::Cancelled),
        "held": report.rules_where(&rules, |o| matches!(o, Outcome::Held { .. })),
        "collected": report.rules_where(&rules, |o| matches!(o, Outcome::Collected { .. })),
        "suppressed": report.rules_where(&rules, |o| o.suppressed().is_some()),
        "failed": report.failures(&rules),
    })))
}

/// Counts a committed request's events (what each rule did with them is counted by the
/// committer, with what the timer's waits did).
fn record_received(source: &str, events: usize, report: &Report) {
    metrics::counter!(telemetry::EVENTS_RECEIVED.name, "source" => source.to_string())
        .increment(events as u64);
    metrics::counter!(telemetry::EVENTS_DUPLICATE.name).increment(report.duplicates as u64);
}
