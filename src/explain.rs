//! Why a rule did or did not act on an event, in words someone who edits rules can read: "why
//! didn't Dana get the discount?".
//!
//! The committer makes a [`Record`] for each event with a uuid that some rule names or acted
//! on, once its batch is decided ([`records`]), and writes it in the same transaction; the store
//! keeps the newest [`KEEP`] (a retried delivery makes none: the first stands). A request whose
//! events no rule acts on never reaches the committer (a commit would halve how many such
//! requests are served: measured, PERFORMANCE.md); the records of its events that a rule names
//! are kept in memory instead ([`Recent`], the newest [`KEEP_IN_MEMORY`]). For each rule:
//! what it did ([`Outcome`]) and its figures, or the first condition of `[when]` that failed
//! with the value the event had. A record holds facts only, kept small because every event some
//! rule names writes one; the sentences are made when it is read ([`Entry::says`]), with the
//! rule as it runs then. A wait that ends later adds a record for the event that started it,
//! read with the first. `GET /explain/{uuid}` (`http/explain.rs`) adds what became of the
//! deliveries.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::borrow::Cow;
use std::collections::HashMap;

use crate::engine::{Outcome, Report};
use crate::ingest::event::Event;
use crate::rules::{Rule, RuleSet};

/// How many events' records the store keeps, the newest.
pub const KEEP: u64 = 100_000;

/// How many records of events no rule acted on are kept in memory, the newest.
pub const KEEP_IN_MEMORY: usize = 20_000;

/// The records of events no rule acted on (see the module's comment): uuid, whose, record.
#[derive(Default)]
pub struct Recent(std::sync::Mutex<std::collections::VecDeque<Kept>>);

impl Recent {
    /// Keeps `records`, forgetting the oldest beyond [`KEEP_IN_MEMORY`].
    pub fn keep(&self, records: Vec<Kept>) {
        let mut recent = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for record in records {
            if recent.len() == KEEP_IN_MEMORY {
                recent.pop_front();
            }
            recent.push_back(record);
        }
    }

    /// The first record of `uuid`, as JSON.
    pub fn find(&self, uuid: &str) -> Option<String> {
        let recent = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        recent
            .iter()
            .find(|(u, _, _)| u == uuid)
            .map(|(_, _, json)| json.clone())
    }

    /// Forgets the records of `who`'s events; returns how many.
    pub fn forget(&self, who: &str) -> u64 {
        let mut recent = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = recent.len();
        recent.retain(|(_, w, _)| w != who);
        (before - recent.len()) as u64
    }
}

/// What is kept about one event: its name, whose it is, its time and when it was received, and
/// what each rule did. A record written for a wait that ended has only `rules`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Record<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub who: Option<Cow<'a, str>>,
    /// The source it came from (for a tenant's read token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Cow<'a, str>>,
    /// The event's time and when it was received (milliseconds since 1970).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_ms: Option<i64>,
    pub rules: Vec<Entry<'a>>,
}

/// What one rule did with the event, as facts.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Entry<'a> {
    pub rule: Cow<'a, str>,
    /// `fired`, `counting`, `not_matched`... (see docs/API.md).
    pub result: Cow<'a, str>,
    /// `counting`: the count reached, and from which the rule acts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_least: Option<u64>,
    /// `suppressed`: when the rule last acted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ms: Option<i64>,
    /// Until when it holds (a limit, a cap's period, a wait, a send window, a digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<i64>,
    /// `capped`: the group and what it allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_most: Option<u64>,
    /// Why, in words: the failed condition, the actions that could not be made...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// When a wait the event started ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<i64>,
}

/// A record to keep: the event's uuid, whose it is, and the record as JSON.
pub type Kept = (String, String, String);

/// The record of one event from the records a store kept under its uuid, oldest first: the
/// event's own record, with the rules of the records written for it later (waits it started,
/// ended) added. A retried delivery of an event no rule acted on is written again, and is left
/// out; so is what is left of an event whose own record was forgotten.
pub fn merge_records(records: &[String]) -> serde_json::Result<Option<String>> {
    let mut found: Option<Value> = None;
    for record in records {
        let record: Value = serde_json::from_str(record)?;
        let own = record.get("event").is_some();
        match &mut found {
            None if own => found = Some(record),
            Some(first) if !own => {
                let more = record["rules"].as_array().cloned().unwrap_or_default();
                if let Some(rules) = first["rules"].as_array_mut() {
                    rules.extend(more);
                }
            }
            _ => {}
        }
    }
    Ok(found.map(|r| r.to_string()))
}

/// The records of `events`, decided as `report` says, received at `received_ms`, and the
/// records `report` adds for earlier events (waits they started, ended now). An event handled
/// before (a retried delivery) has none: its first record stands.
pub fn records(rules: &RuleSet, events: &[Event], report: &Report, received_ms: i64) -> Vec<Kept> {
    let mut out = Vec::new();
    let mut taken = vec![false; report.outcomes.len()];
    // Each event's outcomes, found at once (a body may hold many events).
    let mut of_event: HashMap<&str, Vec<usize>> = HashMap::new();
    for (n, about) in report.about.iter().enumerate() {
        if let Some(uuid) = &about.uuid {
            of_event.entry(uuid).or_default().push(n);
        }
    }
    'events: for event in events {
        let Some(uuid) = event.uuid() else { continue };
        let theirs = of_event.get(uuid).map_or(&[][..], Vec::as_slice);
        let mut entries = Vec::new();
        for (index, rule) in rules.candidates(event.name()) {
            let mut acted_on = false;
            for &n in theirs {
                if report.outcomes[n].0 == index && !taken[n] {
                    taken[n] = true;
                    acted_on = true;
                    entries.push(entry(rule, &report.outcomes[n].1));
                }
            }
            // A rule for every event (`event = "*"`) is only shown when it did something.
            let named = (rule.events.iter().flatten()).any(|n| n == event.name());
            if acted_on || !named {
                continue;
            }
            match rule.when.why_not(event) {
                Some(why) => entries.push(Entry {
                    rule: Cow::Borrowed(&rule.name),
                    result: Cow::Borrowed("not_matched"),
                    why: Some(why),
                    ..Entry::default()
                }),
                // It holds, and the rule did nothing: the event was handled before.
                None => continue 'events,
            }
        }
        // Rules watching for this event while they wait (`until`, `unless`).
        for &n in theirs {
            if !taken[n] {
                taken[n] = true;
                let (i, outcome) = &report.outcomes[n];
                entries.push(entry(&rules.rules()[*i], outcome));
            }
        }
        if entries.is_empty() {
            continue;
        }
        let who = event.distinct_id.as_str().unwrap_or_default();
        let record = Record {
            event: Some(Cow::Borrowed(event.name())),
            who: Some(Cow::Borrowed(who)),
            source: event.source.as_str().map(Cow::Borrowed),
            at_ms: Some(event.time.timestamp_millis()),
            received_ms: Some(received_ms),
            rules: entries,
        };
        out.push((uuid.to_string(), who.to_string(), to_json(&record)));
    }
    // Waits that earlier events started, ended now: at their deadline (the outcome is about
    // the event that started it), or by one of these events (`until`, `unless`).
    let outcomes = report.outcomes.iter().zip(&report.about).enumerate();
    for (n, ((i, outcome), about)) in outcomes {
        let started_by = match (taken[n], &about.uuid, &about.ended) {
            (false, Some(uuid), _) => uuid,
            (true, _, Some(uuid)) => uuid,
            _ => continue,
        };
        let mut e = entry(&rules.rules()[*i], outcome);
        e.ended_ms = Some(received_ms);
        let record = Record {
            rules: vec![e],
            ..Record::default()
        };
        let who = about.who.clone().unwrap_or_default();
        out.push((started_by.clone(), who, to_json(&record)));
    }
    out
}

fn to_json(record: &Record) -> String {
    serde_json::to_string(record).expect("a record is plain data")
}

/// What `rule` did, as facts.
fn entry<'a>(rule: &'a Rule, outcome: &Outcome) -> Entry<'a> {
    let mut e = Entry {
        rule: Cow::Borrowed(&rule.name),
        ..Entry::default()
    };
    let result = match outcome {
        Outcome::Fired => "fired",
        Outcome::Counting { count } => {
            e.count = Some(*count);
            e.at_least = rule.count.as_ref().map(|c| c.at_least);
            "counting"
        }
        Outcome::Suppressed { last_ms, until_ms } => {
            e.last_ms = Some(*last_ms);
            e.until_ms = *until_ms;
            "suppressed"
        }
        Outcome::Capped {
            group,
            at_most,
            until_ms,
        } => {
            e.group = Some(Cow::Owned(group.clone()));
            e.at_most = Some(*at_most);
            e.until_ms = Some(*until_ms);
            "capped"
        }
        Outcome::NoKey { field } => {
            e.why = Some(field.clone());
            "no_value"
        }
        Outcome::PartlyFailed { reasons } => {
            e.why = Some(reasons.join("; "));
            "partly_failed"
        }
        Outcome::Failed { reasons } => {
            e.why = Some(reasons.join("; "));
            "failed"
        }
        Outcome::Waiting { until_ms } => {
            e.until_ms = Some(*until_ms);
            "waiting"
        }
        Outcome::Cancelled => "cancelled",
        Outcome::Expired { why } => {
            e.why = Some(why.to_string());
            "expired"
        }
        Outcome::WaitRefused { reason } => {
            e.why = Some(reason.clone());
            "wait_refused"
        }
        Outcome::Held { until_ms } => {
            e.until_ms = Some(*until_ms);
            "held"
        }
        Outcome::Collected { until_ms } => {
            e.until_ms = Some(*until_ms);
            "collected"
        }
    };
    e.result = Cow::Borrowed(result);
    e
}

impl Record<'_> {
    /// The record as `GET /explain` shows it, each rule's entry with its sentence, told with
    /// the rules running now (`rules`).
    pub fn shown(&self, uuid: &str, rules: Option<&RuleSet>) -> Value {
        let rule = |name: &str| rules.and_then(|set| set.rules().iter().find(|r| r.name == name));
        let entries: Vec<Value> = (self.rules.iter())
            .map(|e| e.shown(rule(&e.rule)))
            .collect();
        json!({
            "uuid": uuid,
            "event": self.event,
            "distinct_id": self.who,
            "timestamp": self.at_ms.map(|t| time(t, SecondsFormat::Millis)),
            "received": self.received_ms.map(|t| time(t, SecondsFormat::Secs)),
            "rules": entries,
        })
    }
}

impl Entry<'_> {
    /// The entry with its sentence and its times written out.
    fn shown(&self, rule: Option<&Rule>) -> Value {
        let mut e = json!({"rule": self.rule, "result": self.result, "says": self.says(rule)});
        if let (Some(count), Some(at_least)) = (self.count, self.at_least) {
            e["count"] = count.into();
            e["at_least"] = at_least.into();
        }
        if let Some(count) = rule.and_then(|r| r.count.as_ref())
            && self.result == "counting"
        {
            e["per"] = fields(&count.per).into();
        }
        if matches!(
            self.result.as_ref(),
            "suppressed" | "capped" | "waiting" | "held" | "collected"
        ) {
            e["until"] = self.until_ms.map(|t| time(t, SecondsFormat::Secs)).into();
        }
        if let Some(at) = self.ended_ms {
            e["at"] = time(at, SecondsFormat::Secs).into();
        }
        e
    }

    /// What happened, in a sentence; `rule` is the rule as it runs now, if it still does.
    pub fn says(&self, rule: Option<&Rule>) -> String {
        let why = self.why.as_deref().unwrap_or("no reason was kept");
        let until = self.until_ms.map(words).unwrap_or_default();
        let said = match self.result.as_ref() {
            "not_matched" => format!("Not for this rule: {why}."),
            "fired" => match rule {
                Some(r) => format!("Acted: {}.", actions(r)),
                None => "Acted.".into(),
            },
            "counting" => format!(
                "Counted: this is number {}, and the rule acts from number {} on.",
                self.count.unwrap_or_default(),
                self.at_least.unwrap_or_default()
            ),
            "suppressed" => {
                let per = (rule.and_then(|r| r.limits.as_ref()))
                    .and_then(|l| l.once_per.as_ref())
                    .map_or_else(String::new, |p| format!(" for the same {}", fields(p)));
                let again = match self.until_ms {
                    Some(_) => format!("it may act again from {until}"),
                    None => "it acts only once, so not again".to_string(),
                };
                let last = self.last_ms.map(words).unwrap_or_default();
                format!("Held back by its [limits]: it already acted{per} on {last}; {again}.")
            }
            "capped" => format!(
                "Held back by the cap group \"{}\": it allows {} per period for this recipient, and they had them; the next period starts {until}.",
                self.group.as_deref().unwrap_or_default(),
                self.at_most.unwrap_or_default()
            ),
            "no_value" => {
                format!(
                    "Not counted: the event has no `{why}`, which the rule counts or limits by."
                )
            }
            "partly_failed" => format!("Acted, but not every action could be made: {why}."),
            "failed" => format!("Did not act: {why}."),
            "waiting" => format!("Started waiting ([wait]), until {until}."),
            "cancelled" => {
                "Cancelled the rule's wait ([wait] unless): it will not act for it.".into()
            }
            "expired" => format!("The wait ended without acting: {why}."),
            "wait_refused" => format!("Could not wait: {why}."),
            "held" => {
                format!("Acted outside its [send_window]: its actions are held until {until}.")
            }
            "collected" => format!("Added to the digest sent {until}."),
            other => format!("{other}."),
        };
        match (self.ended_ms, self.result.as_ref()) {
            (Some(at), "fired" | "partly_failed" | "failed") => {
                format!("Its wait ended on {}: {said}", words(at))
            }
            (Some(at), "cancelled") => format!(
                "Its wait was cancelled on {} by a later event ([wait] unless): the rule does not act for it.",
                words(at)
            ),
            _ => said,
        }
    }
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

/// Field paths as a list in words: `` `distinct_id` and `properties.feature` ``.
fn fields(paths: &[crate::ingest::path::FieldPath]) -> String {
    let names: Vec<String> = paths.iter().map(|p| format!("`{p}`")).collect();
    match names.len() {
        0 => "everyone".into(),
        _ => names.join(" and "),
    }
}

/// A time for a record (RFC 3339, UTC).
fn time(ms: i64, precision: SecondsFormat) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(precision, true)
}

/// A time in a sentence: `2026-12-04 18:20 UTC`.
fn words(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%d %H:%M UTC")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(result: &'static str) -> Entry<'static> {
        Entry {
            rule: Cow::Borrowed("r"),
            result: Cow::Borrowed(result),
            ..Entry::default()
        }
    }

    #[test]
    fn each_result_reads_as_a_sentence_with_its_times() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis();
        let again = Entry {
            last_ms: Some(t("2026-12-01T10:00:00Z")),
            until_ms: Some(t("2026-12-08T10:00:00Z")),
            ..entry("suppressed")
        };
        assert_eq!(
            again.says(None),
            "Held back by its [limits]: it already acted on 2026-12-01 10:00 UTC; it may act again from 2026-12-08 10:00 UTC."
        );
        let capped = Entry {
            group: Some(Cow::Borrowed("marketing")),
            at_most: Some(2),
            until_ms: Some(t("2026-12-07T23:00:00Z")),
            ..entry("capped")
        };
        assert!(
            capped
                .says(None)
                .starts_with("Held back by the cap group \"marketing\": it allows 2 per period")
        );
        assert!(capped.says(None).ends_with("starts 2026-12-07 23:00 UTC."));
        let shown = capped.shown(None);
        assert_eq!(shown["until"], "2026-12-07T23:00:00Z");
        // A wait that ended later, for a rule no longer running.
        let ended = Entry {
            ended_ms: Some(t("2026-12-04T12:30:00Z")),
            ..entry("fired")
        };
        assert_eq!(
            ended.says(None),
            "Its wait ended on 2026-12-04 12:30 UTC: Acted."
        );
        assert_eq!(ended.shown(None)["at"], "2026-12-04T12:30:00Z");
    }

    #[test]
    fn a_record_keeps_facts_only() {
        let record = Record {
            event: Some(Cow::Borrowed("feature_used")),
            who: Some(Cow::Borrowed("dana")),
            source: Some(Cow::Borrowed("posthog")),
            at_ms: Some(1),
            received_ms: Some(2),
            rules: vec![Entry {
                count: Some(4),
                at_least: Some(5),
                ..entry("counting")
            }],
        };
        let json = to_json(&record);
        assert_eq!(
            json,
            r#"{"event":"feature_used","who":"dana","source":"posthog","at_ms":1,"received_ms":2,"rules":[{"rule":"r","result":"counting","count":4,"at_least":5}]}"#
        );
        let back: Record = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back.shown("u1", None)["rules"][0]["says"],
            "Counted: this is number 4, and the rule acts from number 5 on."
        );
    }
}
