//! The engine: decides what a batch of events does under one rule set.
//!
//! For each event not seen before (by `uuid`), each candidate rule (indexed by event name) is
//! checked in file order: `[when]` → `[count]` (bump the counter, act from `at_least` on) →
//! `[limits] once_per` → actions. The engine changes state only through a [`Store`] and performs
//! no I/O: it returns the [`Effect`]s (lines to append, emails to queue), which the committer makes
//! durable together with the state changes.

use lettre::message::Mailbox;
use serde_json::Value;
use std::path::PathBuf;
use tracing::{debug, info_span, warn};

use crate::actions::email::{self, EmailAction, mask_email};
use crate::event::Event;
use crate::rules::path::FieldPath;
use crate::rules::{Rule, RuleSet};
use crate::store::{StateKey, Store, StoreError};

/// Something a rule does, to be made durable.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Append `line` (newline included) to `file`, relative to the data folder.
    Line { file: PathBuf, line: String },
    /// Queue an email for delivery.
    Email(QueuedEmail),
}

/// A rendered email, ready for the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedEmail {
    pub rule: String,
    /// Envelope sender and recipient addresses.
    pub from: String,
    pub to: Vec<String>,
    /// The recipient, masked for logs and status pages.
    pub to_masked: String,
    /// The whole RFC 5322 message.
    pub message: String,
}

/// What happened to a batch of events.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    /// The rules that acted, once per event they acted on.
    pub fired: Vec<String>,
    /// Events skipped because their `uuid` was handled before (a retried delivery).
    pub duplicates: usize,
    /// Actions that could not be done for this event's data (a missing field in a template...).
    /// Retrying the same event would not help, so they are reported, not answered with an error.
    pub failed: Vec<String>,
}

/// Runs `events` through `rules`, changing state in `store` and pushing effects onto `effects`.
pub fn run(
    rules: &RuleSet,
    events: &[Event],
    store: &mut dyn Store,
    default_from: &Mailbox,
    now_unix: u64,
    effects: &mut Vec<Effect>,
) -> Result<Report, StoreError> {
    let mut report = Report::default();
    for event in events {
        let _span = info_span!(
            "event",
            event.uuid = event.uuid().unwrap_or("-"),
            event.name = event.name()
        )
        .entered();
        if let Some(uuid) = event.uuid()
            && !store.first_delivery(uuid, now_unix)?
        {
            debug!("already handled: a retried delivery has no second effect");
            report.duplicates += 1;
            continue;
        }
        for rule in rules.candidates(event.name()) {
            if rule.when.holds(event) {
                let _rule_span = info_span!("rule", rule.id = %rule.name).entered();
                if apply(
                    rules,
                    rule,
                    event,
                    store,
                    default_from,
                    effects,
                    &mut report,
                )? {
                    report.fired.push(rule.name.clone());
                }
            }
        }
    }
    Ok(report)
}

/// Applies one matching rule; returns whether it acted.
fn apply(
    rules: &RuleSet,
    rule: &Rule,
    event: &Event,
    store: &mut dyn Store,
    default_from: &Mailbox,
    effects: &mut Vec<Effect>,
    report: &mut Report,
) -> Result<bool, StoreError> {
    let mut count = None;
    if let Some(c) = &rule.count {
        let Some(key) = state_key(rule, "count", &c.per, event) else {
            return Ok(false);
        };
        let n = store.increment(&key)?;
        if n < c.at_least {
            debug!(count = n, at_least = c.at_least, "counted");
            return Ok(false);
        }
        count = Some(n);
    }
    let mut once_key = None;
    if let Some(paths) = &rule.once_per {
        let Some(key) = state_key(rule, "once", paths, event) else {
            return Ok(false);
        };
        if store.once_done(&key)? {
            debug!("already acted once for this key");
            return Ok(false);
        }
        once_key = Some(key);
    }

    // Render first: an email that cannot be made leaves no trace, so a later event retries.
    let queued = match &rule.email {
        Some(action) => match render(rules, rule, action, event, count, default_from) {
            Ok(q) => Some(q),
            Err(reason) => {
                warn!(%reason, "email not sent");
                report
                    .failed
                    .push(format!("rule \"{}\": email not sent: {reason}", rule.name));
                return Ok(false);
            }
        },
        None => None,
    };
    if let Some(key) = &once_key {
        store.mark_once(key)?;
    }
    if let Some(jsonl) = &rule.jsonl {
        effects.push(Effect::Line {
            file: jsonl.file.clone(),
            line: jsonl.project(event),
        });
    }
    if let Some(q) = queued {
        effects.push(Effect::Email(q));
    }
    Ok(true)
}

fn render(
    rules: &RuleSet,
    rule: &Rule,
    action: &EmailAction,
    event: &Event,
    count: Option<u64>,
    default_from: &Mailbox,
) -> Result<QueuedEmail, String> {
    let mut data = event.template_context();
    data["count"] = count.map_or(Value::Null, Value::from);
    let message =
        email::build(action, &rules.templates, &data, default_from).map_err(|e| e.to_string())?;
    let envelope = message.envelope();
    let to: Vec<String> = envelope.to().iter().map(|a| a.to_string()).collect();
    Ok(QueuedEmail {
        rule: rule.name.clone(),
        from: envelope.from().map(|a| a.to_string()).unwrap_or_default(),
        to_masked: to.first().map(|a| mask_email(a)).unwrap_or_default(),
        to,
        message: String::from_utf8_lossy(&message.formatted()).into_owned(),
    })
}

/// The state key for `rule` at the values of `paths` in `event`; `None` (the rule does not count
/// this event) when the event lacks one of them.
fn state_key(rule: &Rule, kind: &str, paths: &[FieldPath], event: &Event) -> Option<StateKey> {
    let mut values = Vec::with_capacity(paths.len());
    for path in paths {
        match path.lookup(event) {
            Some(v) => values.push(v),
            None => {
                debug!(field = %path, "not counted: the event has no value for this field");
                return None;
            }
        }
    }
    Some(StateKey::new(&rule.name, kind, &values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;
    use crate::store::MemoryStore;
    use std::path::Path;

    const RULE: &str = r#"
name = "fifth"
[when]
event = "used"
[count]
per = ["distinct_id"]
at_least = 2
[limits]
once_per = ["distinct_id"]
[email]
to = "{{person.properties.email}}"
subject = "hi"
template = "t"
[jsonl]
file = "out.jsonl"
fields = { who = "distinct_id" }
"#;

    fn rules() -> (tempfile::TempDir, RuleSet) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        std::fs::create_dir(dir.path().join("templates")).unwrap();
        std::fs::write(dir.path().join("rules/r.toml"), RULE).unwrap();
        std::fs::write(dir.path().join("templates/t.text.hbs"), "count {{count}}").unwrap();
        let set = RuleSet::load(
            &dir.path().join("rules"),
            &dir.path().join("templates"),
            dir.path(),
        )
        .unwrap();
        (dir, set)
    }

    fn event(uuid: &str, email: Option<&str>) -> Vec<Event> {
        let person = email.map_or("null".to_string(), |e| {
            format!(r#"{{"properties":{{"email":"{e}"}}}}"#)
        });
        let body = format!(
            r#"{{"event":{{"event":"used","uuid":"{uuid}","distinct_id":"d"}},"person":{person}}}"#
        );
        decode(body.as_bytes(), chrono::Utc::now()).unwrap()
    }

    #[test]
    fn counts_then_acts_once_and_ignores_retried_uuids() {
        let (_dir, set) = rules();
        let from: Mailbox = "t <t@localhost>".parse().unwrap();
        let mut store = MemoryStore::default();
        let mut effects = Vec::new();
        let mut run_one = |uuid: &str, email| {
            run(
                &set,
                &event(uuid, email),
                &mut store,
                &from,
                0,
                &mut effects,
            )
            .unwrap()
        };
        assert_eq!(run_one("1", Some("a@x.io")).fired, Vec::<String>::new());
        assert_eq!(
            run_one("1", Some("a@x.io")).duplicates,
            1,
            "same uuid: no second count"
        );
        // The 2nd use has no address: nothing happens, and the once-key stays free.
        let r = run_one("2", None);
        assert!(r.failed[0].contains("person.properties.email"), "{r:?}");
        assert_eq!(run_one("3", Some("a@x.io")).fired, ["fifth"]);
        assert_eq!(run_one("4", Some("a@x.io")).fired, Vec::<String>::new());
        assert_eq!(effects.len(), 2, "{effects:?}");
        assert_eq!(
            effects[0],
            Effect::Line {
                file: Path::new("out.jsonl").into(),
                line: "{\"who\":\"d\"}\n".into()
            }
        );
        let Effect::Email(email) = &effects[1] else {
            panic!("{effects:?}")
        };
        assert_eq!(email.to, ["a@x.io"]);
        assert_eq!(email.to_masked, "a***@x.io");
        assert!(email.message.contains("count 3"), "{}", email.message);
    }
}
