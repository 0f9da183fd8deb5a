//! The `[remember]` action: keep a user's recent events, for `GET /users/{id}` (a support
//! chatbot's context, a person's recent activity).
//!
//! Only what the rule lists is kept, with the same field syntax as `[jsonl]` (`actions/fields.rs`:
//! `from` or `template`, `trim`, `max_chars`, `redact`, `hash`), plus an optional `label`
//! template, and what identifies the event (its name, uuid and timestamp). The committer writes
//! it in the batch's transaction; the store keeps the newest `keep_last` of the rule per user
//! and forgets each after `keep_for`.

use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::{Value, json};
use std::ops::Range;
use std::time::Duration;
use toml::Spanned;

use super::fields::{FieldConfig, Fields, redactor};
use crate::redact::Redactor;
use super::{Action, Compile, Input, Kind, Output};
use crate::actions::email::template_check::Known;
use crate::actions::email::templates::template_diagnostic;
use crate::ingest::path::FieldPath;
use crate::store::remembered::{Entry, Remembered};
use crate::units::{self, DURATION_EXAMPLES};

/// The kind's name, as its table is written.
pub const KIND: &str = "remember";

/// The most events one rule may keep per user.
pub const MAX_KEEP_LAST: i64 = 1000;

/// The longest label kept, in characters.
pub const MAX_LABEL_CHARS: usize = 500;

/// The longest one rule may keep an event.
pub const MAX_KEEP_FOR: Duration = Duration::from_secs(366 * 86_400);

/// The `[remember]` kind.
pub struct Remember;

/// `[remember]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RememberConfig {
    /// How many of this rule's events are kept per user, the newest.
    pub keep_last: Spanned<i64>,
    /// How long each is kept ("30 days").
    pub keep_for: Spanned<String>,
    /// A readable line for the event; may use `{{...}}` fields.
    #[serde(default)]
    pub label: Option<Spanned<String>>,
    /// Personal data replaced by placeholders in every field (a field's own `redact` wins).
    #[serde(default)]
    pub redact: Option<Spanned<Vec<Spanned<String>>>>,
    /// What is kept of each event, as `[jsonl.fields]`.
    #[serde(default)]
    pub fields: Option<Spanned<IndexMap<String, Spanned<FieldConfig>>>>,
}

/// A compiled `[remember]` table.
#[derive(Debug)]
pub struct RememberAction {
    keep_last: u64,
    keep_for: Duration,
    /// The label's template key, and where it is written.
    label: Option<(String, Range<usize>)>,
    /// What the rule's `redact` replaces in the label (its fields have their own).
    redact: Redactor,
    fields: Fields,
}

impl Kind for Remember {
    type Config = RememberConfig;

    fn compile(config: Spanned<RememberConfig>, cx: &mut Compile) -> Option<Box<dyn Action>> {
        let r = config.into_inner();
        let mut ok = true;
        let keep_last = *r.keep_last.get_ref();
        if !(1..=MAX_KEEP_LAST).contains(&keep_last) {
            cx.problems.add(
                r.keep_last.span(),
                format!("`keep_last` must be from 1 to {MAX_KEEP_LAST}"),
                Some("keep_last = 50 keeps each user's 50 newest events of this rule".into()),
            );
            ok = false;
        }
        let keep_for = match units::parse_duration(r.keep_for.get_ref()) {
            Ok(d) if !d.is_zero() && d <= MAX_KEEP_FOR => Some(d),
            Ok(_) => {
                cx.problems.add(
                    r.keep_for.span(),
                    "`keep_for` must be longer than 0 and at most a year",
                    Some("keep_for = \"30 days\"".into()),
                );
                None
            }
            Err(e) => {
                cx.problems.add(
                    r.keep_for.span(),
                    format!("`keep_for`: {e}"),
                    Some(format!("write a length of time such as {DURATION_EXAMPLES}")),
                );
                None
            }
        };
        let label = match &r.label {
            Some(text) => {
                let key = format!("rule:{}:remember:label", cx.rule);
                match cx.templates.add_inline(&key, text.get_ref()) {
                    Ok(()) => Some((key, text.span())),
                    Err(e) => {
                        let d = template_diagnostic(cx.problems.file, cx.problems.source, &e);
                        cx.problems
                            .add(text.span(), format!("`label`: {}", d.message), d.hint);
                        ok = false;
                        None
                    }
                }
            }
            None => None,
        };
        let redact = match &r.redact {
            Some(list) => redactor(list, cx),
            None => Redactor::default(),
        };
        let fields = match r.fields {
            Some(fields) => Fields::compile("[remember.fields]", fields, r.redact.as_ref(), cx),
            None => Some(Fields(Vec::new())),
        };
        let action = RememberAction {
            keep_last: keep_last.max(1) as u64,
            keep_for: keep_for?,
            label,
            redact,
            fields: fields?,
        };
        ok.then(|| Box::new(action) as Box<dyn Action>)
    }
}

impl Action for RememberAction {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn run(&self, input: &Input) -> Result<Output, String> {
        let fail = |e: String| format!("not remembered: {e}");
        let event = input.event;
        let Some(distinct_id) = event.distinct_id.as_str() else {
            return Err(fail(
                "the event has no `distinct_id`, so there is no one to remember it for".into(),
            ));
        };
        let label = match &self.label {
            Some((key, _)) => {
                let data = input.template_data();
                let text = input.templates.rendering(&data).text(key).map_err(fail)?;
                // Text typed on a page can end up in a label (a clicked element's text).
                let text = self.redact.redact(text.trim());
                Some(text.chars().take(MAX_LABEL_CHARS).collect())
            }
            None => None,
        };
        let fields = self.fields.object(input).map_err(fail)?;
        let at_ms = event.time.timestamp_millis();
        let keep_for_ms = i64::try_from(self.keep_for.as_millis()).unwrap_or(i64::MAX);
        Ok(Output::Remember(Box::new(Remembered {
            distinct_id: distinct_id.to_string(),
            rule: input.rule.to_string(),
            at_ms,
            expires_ms: at_ms.saturating_add(keep_for_ms),
            keep_last: self.keep_last,
            entry: Entry {
                rule: input.rule.to_string(),
                event: event.name().to_string(),
                uuid: event.uuid.clone(),
                timestamp: event.timestamp.as_str().unwrap_or_default().to_string(),
                label,
                fields: serde_json::from_str(&fields).map_err(|e| fail(e.to_string()))?,
            },
        })))
    }

    fn summary(&self) -> Value {
        json!({
            "kind": KIND,
            "keep_last": self.keep_last,
            "keep_for": units::format_duration(self.keep_for),
            "fields": self.fields.keys(),
        })
    }

    fn fields(&self) -> Vec<&FieldPath> {
        self.fields.paths()
    }

    fn check(&self, known: &Known, cx: &mut Compile) {
        if let Some((key, span)) = &self.label {
            cx.check_inline_template(key, span, known);
        }
        self.fields.check(known, cx);
    }
}
