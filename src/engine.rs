//! The engine: runs a batch of events through one rule set.
//!
//! For each event, each candidate rule (indexed by event name) is checked in file order:
//! `[when]` → `[count]` (bump the counter, act from `at_least` on) → `[limits] once_per` (claim
//! the once-key) → actions. The engine is synchronous; the HTTP edge runs it on tokio's blocking
//! pool.

use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{debug, info, info_span, warn};

use crate::actions::email::{EmailError, Mailer};
use crate::actions::jsonl::JsonlWriters;
use crate::event::Event;
use crate::rules::path::FieldPath;
use crate::rules::{Rule, RuleSet};
use crate::store::{StateKey, Store, StoreError};

/// What happened to a batch of events.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    /// The rules that ran their actions, once per event they acted on.
    pub fired: Vec<String>,
    /// Actions that could not be done for this event's data (a missing field in a template...),
    /// as messages. They are logged; retrying the same event would not help.
    pub failed: Vec<String>,
}

/// A fault on our side: the request should be answered 503 so the sender retries.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write to {file}: {source}")]
    Output {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Email(String),
}

/// Everything that outlives a rule set: state, open files, the mail transport.
pub struct Engine {
    store: Arc<dyn Store>,
    jsonl: JsonlWriters,
    mailer: Mailer,
}

impl Engine {
    pub fn new(store: Arc<dyn Store>, jsonl: JsonlWriters, mailer: Mailer) -> Engine {
        Engine {
            store,
            jsonl,
            mailer,
        }
    }

    /// Runs `events` through `rules`.
    pub fn handle(&self, rules: &RuleSet, events: &[Event]) -> Result<Report, EngineError> {
        let mut report = Report::default();
        for event in events {
            let _event_span = info_span!(
                "event",
                event.uuid = event.uuid().unwrap_or("-"),
                event.name = event.name()
            )
            .entered();
            for rule in rules.candidates(event.name()) {
                if rule.matches(event) {
                    let _rule_span = info_span!("rule", rule.id = %rule.name).entered();
                    if self.apply(rules, rule, event, &mut report)? {
                        report.fired.push(rule.name.clone());
                    }
                }
            }
        }
        Ok(report)
    }

    /// Applies one matching rule; returns whether it acted.
    fn apply(
        &self,
        rules: &RuleSet,
        rule: &Rule,
        event: &Event,
        report: &mut Report,
    ) -> Result<bool, EngineError> {
        let mut count = None;
        if let Some(c) = &rule.count {
            let Some(key) = state_key(rule, "count", &c.per, event) else {
                return Ok(false);
            };
            let n = self.store.increment(&key)?;
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
            if !self.store.claim_once(&key)? {
                debug!("already acted once for this key");
                return Ok(false);
            }
            once_key = Some(key);
        }

        if let Some(jsonl) = &rule.jsonl {
            let line = jsonl.project(event);
            self.jsonl
                .append(&jsonl.file, &line)
                .map_err(|source| EngineError::Output {
                    file: jsonl.file.clone(),
                    source,
                })?;
            debug!(file = %jsonl.file.display(), "line written");
        }
        if let Some(email) = &rule.email {
            let mut data = event.template_context();
            data["count"] = count.map_or(Value::Null, Value::from);
            match self.mailer.send(email, &rules.templates, &data) {
                Ok(sent) => {
                    info!(to = %sent.to_masked, email.id = %sent.id, "email written to the outbox")
                }
                Err(EmailError::Render(reason)) => {
                    warn!(%reason, "email not sent");
                    report
                        .failed
                        .push(format!("rule \"{}\": email not sent: {reason}", rule.name));
                    // Let a later event try again once the data or the template is fixed.
                    if let Some(key) = &once_key {
                        self.store.release_once(key)?;
                    }
                    return Ok(false);
                }
                Err(e @ EmailError::Transport(_)) => return Err(EngineError::Email(e.to_string())),
            }
        }
        Ok(true)
    }
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
