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

/// The longest label kept, in characters.
pub const MAX_LABEL_CHARS: usize = 500;


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
        // The operator's bounds (`[remember]` in tripline.toml).
        let caps = cx.declared.remember;
        let keep_last = *r.keep_last.get_ref();
        if keep_last < 1 || keep_last as u64 > caps.keep_last {
            cx.problems.add(
                r.keep_last.span(),
                format!("`keep_last` must be from 1 to {}", caps.keep_last),
                Some("keep_last = 50 keeps each person's 50 newest events of this rule; the most is the operator's `max_keep_last` in tripline.toml".into()),
            );
            ok = false;
        }
        let keep_for = match units::parse_duration(r.keep_for.get_ref()) {
            Ok(d) if !d.is_zero() && d <= caps.keep_for => Some(d),
            Ok(_) => {
                cx.problems.add(
                    r.keep_for.span(),
                    format!(
                        "`keep_for` must be longer than 0 and at most {}",
                        units::format_duration(caps.keep_for)
                    ),
                    Some("keep_for = \"30 days\"; the most is the operator's `max_keep_for` in tripline.toml".into()),
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

#[cfg(test)]
mod tests {
    use crate::actions::email::templates::Templates;
    use crate::config::{Declared, RememberCaps};
    use crate::rules::Caps;
    use crate::rules::compile::compile;
    use std::path::Path;
    use std::time::Duration;

    /// The problems of a `[remember]` rule keeping `keep_last` for `keep_for`, under `caps`.
    fn problems(keep_last: i64, keep_for: &str, caps: RememberCaps) -> Vec<String> {
        let source = format!(
            "name = \"r\"\n[when]\nevent = \"x\"\n[remember]\nkeep_last = {keep_last}\nkeep_for = \"{keep_for}\"\n"
        );
        let (mut templates, _) = Templates::load(Path::new("no-templates"));
        let declared = Declared {
            remember: caps,
            ..Declared::default()
        };
        match compile(Path::new("r.toml"), &source, &mut templates, &Caps::new(), &declared) {
            Ok(_) => vec![],
            Err(p) => p.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_rule_keeps_no_more_than_the_operator_allows() {
        let default = RememberCaps::default();
        assert!(problems(50, "30 days", default).is_empty());
        let small = RememberCaps {
            keep_last: 10,
            keep_for: Duration::from_secs(7 * 86_400),
        };
        let p = problems(50, "30 days", small);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("r.toml:5:13: `keep_last` must be from 1 to 10"), "{p:?}");
        assert!(p[1].contains("`keep_for` must be longer than 0 and at most 7days"), "{p:?}");
        assert!(problems(0, "1 day", default)[0].contains("`keep_last`"));
    }

    #[test]
    fn a_label_alone_is_enough_to_remember() {
        let source = "name = \"r\"\n[when]\nevent = \"x\"\n[remember]\nkeep_last = 5\nkeep_for = \"1 day\"\nlabel = \"Did {{event}}\"\n[remember.fields]\n";
        let (mut templates, _) = Templates::load(Path::new("no-templates"));
        let compiled = compile(
            Path::new("r.toml"),
            source,
            &mut templates,
            &Caps::new(),
            &Declared::default(),
        );
        assert!(compiled.is_ok(), "{:?}", compiled.err());
    }
}
