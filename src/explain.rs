//! Why a rule did or did not act on an event, in words someone who edits rules can read: "why
//! didn't Dana get the discount?".
//!
//! The committer makes a record for each event with a uuid that some rule names or acted on,
//! once its batch is decided ([`records`]), and writes it in the same transaction; the store
//! keeps the newest [`KEEP`] (a retried delivery keeps the first). For each rule: what it did
//! ([`Outcome`]) or the first condition of `[when]` that failed with the value the event had,
//! each with a sentence (`says`). A wait that ends later adds to the record of the event that
//! started it. `GET /explain/{uuid}` (`http/explain.rs`) adds what became of the deliveries.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use crate::engine::{Outcome, Report};
use crate::ingest::event::Event;
use crate::rules::{Rule, RuleSet};

/// How many events' records the store keeps, the newest.
pub const KEEP: u64 = 100_000;

/// What [`records`] makes of a request's events.
#[derive(Debug, Default)]
pub struct Records {
    /// A record for each of the request's events that has one, by uuid.
    pub new: Vec<(String, Value)>,
    /// Entries for the records of earlier events (a wait they started ended now), by uuid.
    pub more: Vec<(String, Value)>,
}

/// The records of `events`, decided as `report` says, received at `received_ms`; and the entries
/// `report` adds to earlier events' records.
pub fn records(rules: &RuleSet, events: &[Event], report: &Report, received_ms: i64) -> Records {
    let mut out = Records::default();
    let mut taken = vec![false; report.outcomes.len()];
    for event in events {
        let Some(uuid) = event.uuid() else { continue };
        let mut entries = Vec::new();
        for (index, rule) in rules.candidates(event.name()) {
            let mut acted_on = false;
            for (n, ((i, outcome), about)) in report.outcomes.iter().zip(&report.about).enumerate()
            {
                if *i == index && !taken[n] && about.as_deref() == Some(uuid) {
                    taken[n] = true;
                    acted_on = true;
                    entries.push(entry(rule, outcome));
                }
            }
            // A rule for every event (`event = "*"`) is only shown when it did something.
            let named = rule
                .events
                .as_ref()
                .is_some_and(|names| names.iter().any(|n| n == event.name()));
            if acted_on || !named {
                continue;
            }
            entries.push(match rule.when.why_not(event) {
                Some(why) => json!({
                    "rule": rule.name,
                    "result": "not_matched",
                    "says": format!("Not for this rule: {why}."),
                }),
                None => json!({
                    "rule": rule.name,
                    "result": "handled_before",
                    "says": "This event was received before (same uuid): a retried delivery changes nothing.",
                }),
            });
        }
        // Rules watching for this event while they wait (`until`, `unless`).
        for (n, ((i, outcome), about)) in report.outcomes.iter().zip(&report.about).enumerate() {
            if !taken[n] && about.as_deref() == Some(uuid) {
                taken[n] = true;
                entries.push(entry(&rules.rules()[*i], outcome));
            }
        }
        if entries.is_empty() {
            continue;
        }
        out.new.push((
            uuid.to_string(),
            json!({
                "uuid": uuid,
                "event": event.name(),
                "distinct_id": event.distinct_id,
                "timestamp": event.time.to_rfc3339_opts(SecondsFormat::Millis, true),
                "received": time(received_ms),
                "rules": entries,
            }),
        ));
    }
    // What is left is about earlier events: waits they started, ended now.
    for (n, ((i, outcome), about)) in report.outcomes.iter().zip(&report.about).enumerate() {
        if let (false, Some(uuid)) = (taken[n], about) {
            let mut e = entry(&rules.rules()[*i], outcome);
            e["at"] = time(received_ms).into();
            out.more.push((uuid.clone(), e));
        }
    }
    out
}

/// What `rule` did, in a record: the result, a sentence, and the figures behind it.
fn entry(rule: &Rule, outcome: &Outcome) -> Value {
    let (result, says) = match outcome {
        Outcome::Fired => ("fired", format!("Acted: {}.", actions(rule))),
        Outcome::Counting { count } => {
            let at_least = rule.count.as_ref().map_or(0, |c| c.at_least);
            let mut e = json!({
                "rule": rule.name,
                "result": "counting",
                "says": format!(
                    "Counted: this is number {count}, and the rule acts from number {at_least} on."
                ),
                "count": count,
                "at_least": at_least,
            });
            if let Some(per) = rule.count.as_ref().map(|c| fields(&c.per)) {
                e["per"] = per.into();
            }
            return e;
        }
        Outcome::Suppressed { last_ms, until_ms } => {
            let per = rule
                .limits
                .as_ref()
                .and_then(|l| l.once_per.as_ref())
                .map_or_else(String::new, |p| format!(" for the same {}", fields(p)));
            let again = match until_ms {
                Some(until) => format!("it may act again from {}", words(*until)),
                None => "it acts only once, so not again".to_string(),
            };
            (
                "suppressed",
                format!(
                    "Held back by its [limits]: it already acted{per} on {}; {again}.",
                    words(*last_ms)
                ),
            )
        }
        Outcome::Capped {
            group,
            at_most,
            until_ms,
        } => (
            "capped",
            format!(
                "Held back by the cap group \"{group}\": it allows {at_most} per period for this recipient, and they had them; the next period starts {}.",
                words(*until_ms)
            ),
        ),
        Outcome::NoKey { field } => (
            "no_value",
            format!("Not counted: the event has no `{field}`, which the rule counts or limits by."),
        ),
        Outcome::PartlyFailed { reasons } => (
            "partly_failed",
            format!(
                "Acted, but not every action could be made: {}.",
                reasons.join("; ")
            ),
        ),
        Outcome::Failed { reasons } => ("failed", format!("Did not act: {}.", reasons.join("; "))),
        Outcome::Waiting { until_ms } => (
            "waiting",
            format!("Started waiting ([wait]), until {}.", words(*until_ms)),
        ),
        Outcome::Cancelled => (
            "cancelled",
            "Cancelled the rule's wait ([wait] unless): it will not act for it.".to_string(),
        ),
        Outcome::Expired { why } => ("expired", format!("The wait ended without acting: {why}.")),
        Outcome::WaitRefused { reason } => ("wait_refused", format!("Could not wait: {reason}.")),
        Outcome::Held { until_ms } => (
            "held",
            format!(
                "Acted outside its [send_window]: its actions are held until {}.",
                words(*until_ms)
            ),
        ),
        Outcome::Collected { until_ms } => (
            "collected",
            format!("Added to the digest sent {}.", words(*until_ms)),
        ),
    };
    let mut e = json!({"rule": rule.name, "result": result, "says": says});
    match outcome {
        Outcome::Suppressed { until_ms, .. } => e["until"] = until_ms.map(time).into(),
        Outcome::Capped { until_ms, .. }
        | Outcome::Waiting { until_ms }
        | Outcome::Held { until_ms }
        | Outcome::Collected { until_ms } => e["until"] = time(*until_ms).into(),
        _ => {}
    }
    e
}

/// What a rule does when it acts, in words: `it ran its [email] and [jsonl]`.
fn actions(rule: &Rule) -> String {
    let kinds: Vec<String> = rule
        .actions
        .iter()
        .map(|a| format!("[{}]", a.kind()))
        .collect();
    format!("it ran its {}", kinds.join(" and "))
}

/// Field paths as a list in words: `distinct_id and properties.feature`.
fn fields(paths: &[crate::ingest::path::FieldPath]) -> String {
    let names: Vec<String> = paths.iter().map(|p| format!("`{p}`")).collect();
    match names.len() {
        0 => "everyone".into(),
        _ => names.join(" and "),
    }
}

/// A time for a record (RFC 3339, UTC).
fn time(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A time in a sentence: `2026-12-04 18:20 UTC`.
fn words(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%d %H:%M UTC")
        .to_string()
}
