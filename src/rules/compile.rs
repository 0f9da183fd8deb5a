//! Turning one parsed rule file into a runnable [`Rule`], collecting every problem on the way.

use regex::RegexBuilder;
use serde_json::{Value, json};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

use crate::actions::email::EmailAction;
use crate::actions::email::templates::{Templates, template_diagnostic};
use crate::actions::jsonl::{JsonlAction, OutputField, output_path};
use crate::diag::{Diagnostic, Problems, did_you_mean, toml_diagnostic};
use crate::ingest::path::FieldPath;
use crate::rules::condition::{Condition, Test};
use crate::rules::file::*;
use crate::actions::email::template_check::{self, Known, Place};
use crate::rules::{Count, Limits, Rule};
use crate::units::{self, DURATION_EXAMPLES, DurationError, parse_timestamp};

/// The largest compiled size of one regular expression, so a rule cannot eat the server's memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The largest threshold of a `[count]` with `within`: its state holds one time per counted event.
const MAX_AT_LEAST_WITHIN: i64 = 1000;

/// Compiles the rule in `source` (the text of `file`). Inline templates (`to`, `subject`) are
/// added to `templates`. Returns every problem found, not just the first.
pub fn compile(
    file: &Path,
    source: &str,
    templates: &mut Templates,
) -> Result<Rule, Vec<Diagnostic>> {
    let mut c = Compiler {
        p: Problems::new(file, source),
    };
    let parsed = parse_reporting_every_unknown_key(file, source, &mut c.p.list)
        .ok_or_else(|| c.p.list.clone())?;
    let rule = c.rule(parsed, templates);
    match rule {
        Some(rule) if c.p.list.is_empty() => Ok(rule),
        _ => Err(c.p.list),
    }
}

/// Parses the file. serde stops at its first error; so that a file with several misspelled keys
/// shows them all, each line holding an unknown key is blanked out (spaces, so every position
/// stays the same) and the text parsed again. Any other structural error ends the parse.
fn parse_reporting_every_unknown_key(
    file: &Path,
    source: &str,
    problems: &mut Vec<Diagnostic>,
) -> Option<RuleFile> {
    const MAX_ROUNDS: usize = 50;
    let mut text = source.to_string();
    for _ in 0..MAX_ROUNDS {
        // After unknown keys were blanked, the rest of the file is still checked; the reported
        // problems keep it from loading.
        let e = match toml::from_str::<RuleFile>(&text) {
            Ok(parsed) => return Some(parsed),
            Err(e) => e,
        };
        // A key misspelled earlier is now missing: the "did you mean" already says so.
        let suggested = |key: &str| {
            let wanted = format!("did you mean `{key}`?");
            problems
                .iter()
                .any(|p| p.hint.as_deref().is_some_and(|h| h.contains(&wanted)))
        };
        match e.message().strip_prefix("missing field `") {
            Some(rest) if suggested(rest.trim_end().trim_end_matches('`')) => return None,
            _ => problems.push(toml_diagnostic(file, source, &e)),
        }
        let line = e
            .span()
            .filter(|_| e.message().starts_with("unknown field"))
            .and_then(|span| whole_line_entry(&text, span.start))?;
        text.replace_range(line.clone(), &" ".repeat(line.len()));
    }
    None
}

/// The byte range of the line at `at` if it is one whole `key = value` entry on its own line
/// (so blanking it leaves valid TOML).
fn whole_line_entry(text: &str, at: usize) -> Option<Range<usize>> {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line = &text[start..end];
    let entry = line.trim();
    let key_first = text[start..at].trim().is_empty();
    let opens = entry.ends_with('[')
        || entry.ends_with('{')
        || entry.ends_with("\"\"\"")
        || entry.ends_with("'''");
    (key_first && entry.contains('=') && !opens).then_some(start..end)
}

struct Compiler<'a> {
    p: Problems<'a>,
}

impl Compiler<'_> {
    fn problem(&mut self, span: Range<usize>, message: impl Into<String>, hint: Option<String>) {
        self.p.add(span, message, hint);
    }

    fn rule(&mut self, f: RuleFile, templates: &mut Templates) -> Option<Rule> {
        let name = f.name.get_ref().trim().to_string();
        if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
            self.problem(
                f.name.span(),
                "the rule's `name` must be a short piece of text (1 to 100 characters)",
                Some("for example name = \"power-user-discount\"".into()),
            );
        }

        let when_span = f.when.span();
        let when = f.when.into_inner();
        let events = self.event_selector(&when, when_span);
        let condition = self.when(when, true);

        let count = f.count.map(|count| {
            let at_least = *count.at_least.get_ref();
            let within = count.within.as_ref().and_then(|w| self.duration(w));
            if at_least < 1 {
                self.problem(count.at_least.span(), "`at_least` must be 1 or more", None);
            } else if within.is_some() && at_least > MAX_AT_LEAST_WITHIN {
                self.problem(
                    count.at_least.span(),
                    format!("with `within`, `at_least` can be at most {MAX_AT_LEAST_WITHIN}"),
                    Some("tripline remembers the time of each counted event, up to `at_least` of them per key".into()),
                );
            }
            Count {
                per: self.paths(&count.per),
                at_least: at_least.max(1) as u64,
                within,
            }
        });
        let limits = f.limits.map(|l| Limits {
            once_per: self.paths(&l.once_per),
            again_after: l.again_after.as_ref().and_then(|a| self.duration(a)),
        });

        let email_parts = f.email.as_ref().map(|e| {
            let e = e.get_ref();
            (e.template.get_ref().clone(), e.to.span(), e.subject.span())
        });
        let email = f.email.map(|e| self.email(e, &name, templates));
        let jsonl = f.jsonl.map(|j| self.jsonl(j));
        // Checked even when another part of the email is wrong, so that every problem shows.
        if let Some((body, to_span, subject_span)) = email_parts {
            let mut paths: Vec<&FieldPath> = condition.iter().flat_map(|c| c.paths()).collect();
            paths.extend(count.iter().flat_map(|c| &c.per));
            paths.extend(limits.iter().flat_map(|l| &l.once_per));
            paths.extend(
                jsonl
                    .iter()
                    .flatten()
                    .flat_map(|j| j.fields.iter().map(|f| &f.from)),
            );
            let known = Known::new(paths, count.is_some());
            let inline = [
                (inline_key(&name, "to"), to_span),
                (inline_key(&name, "subject"), subject_span),
            ];
            self.check_templates(&body, inline, &known, templates);
        }
        if email.is_none() && jsonl.is_none() {
            self.problem(
                0..0,
                "this rule does nothing: it has no action",
                Some("add an [email] or a [jsonl] table".into()),
            );
        }

        let summary = json!({
            "name": name,
            "description": f.description,
            "file": self.p.file.display().to_string(),
            "when": when_as_written(self.p.source),
            "count": count.as_ref().map(|c| {
                let mut summary = json!({
                    "per": c.per.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                    "at_least": c.at_least,
                });
                if let Some(d) = c.within {
                    summary["within"] = units::format_duration(d).into();
                }
                summary
            }),
            "limits": limits.as_ref().map(|l| {
                let mut summary = json!({
                    "once_per": l.once_per.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                });
                if let Some(d) = l.again_after {
                    summary["again_after"] = units::format_duration(d).into();
                }
                summary
            }),
            "actions": actions_summary(email.as_ref().and_then(|e| e.as_ref()), jsonl.as_ref().and_then(|j| j.as_ref())),
        });
        Some(Rule {
            name,
            file: self.p.file.to_path_buf(),
            events: events?,
            when: condition?,
            count,
            limits,
            email: email.flatten(),
            jsonl: jsonl.flatten(),
            summary,
        })
    }

    /// Which event names the rule is indexed under; `None` in the result means every event.
    /// The `event` key is required so that a rule always says what it is about.
    fn event_selector(
        &mut self,
        when: &WhenConfig,
        when_span: Range<usize>,
    ) -> Option<Option<Vec<String>>> {
        let Some((_, entry)) = when.entries.iter().find(|(k, _)| k.get_ref() == "event") else {
            self.problem(
                when_span,
                "[when] must say which event the rule is about",
                Some("add event = \"feature_used\", a list like event = [\"a\", \"b\"], or event = \"*\" for every event".into()),
            );
            return None;
        };
        let WhenEntry::Field(condition) = entry else {
            unreachable!("`event` is parsed as a field")
        };
        Some(match condition.get_ref() {
            ConditionConfig::Equals(toml::Value::String(s)) if s == "*" => None,
            ConditionConfig::Equals(toml::Value::String(s)) => Some(vec![s.clone()]),
            ConditionConfig::OneOf(list) => {
                let names: Option<Vec<String>> =
                    list.iter().map(|v| v.as_str().map(String::from)).collect();
                if names.is_none() {
                    self.problem(condition.span(), "event names must be text", None);
                }
                names
            }
            ConditionConfig::Equals(_) => {
                self.problem(
                    condition.span(),
                    "an event name must be text",
                    Some("write event = \"feature_used\" (in quotes)".into()),
                );
                None
            }
            // Operators (starts_with, ...) are checked per event, for every event name.
            ConditionConfig::Operators(_) => None,
        })
    }

    /// Compiles a `[when]` table. At the top level, a plain `event` name or list is left out:
    /// the rule set's index by event name already settles it (see `event_selector`).
    fn when(&mut self, when: WhenConfig, top: bool) -> Option<Condition> {
        let mut all = Vec::new();
        let mut ok = true;
        for (key, entry) in when.entries {
            let compiled = match entry {
                WhenEntry::Field(condition) => {
                    let settled = match condition.get_ref() {
                        ConditionConfig::Equals(toml::Value::String(s)) => top || s == "*",
                        ConditionConfig::OneOf(_) => top,
                        _ => false,
                    };
                    if key.get_ref() == "event" && settled {
                        continue;
                    }
                    self.field(&key, condition)
                }
                WhenEntry::All(list) => self.when_list(list).map(Condition::All),
                WhenEntry::Any(list) => {
                    if list.is_empty() {
                        self.problem(
                            key.span(),
                            "`any` needs at least one table of conditions",
                            None,
                        );
                    }
                    self.when_list(list).map(Condition::Any)
                }
                WhenEntry::Not(inner) => self
                    .when(inner.into_inner(), false)
                    .map(|c| Condition::Not(Box::new(c))),
            };
            match compiled {
                Some(c) => all.push(c),
                None => ok = false,
            }
        }
        ok.then(|| match all.len() {
            1 => all.pop().expect("one condition"),
            _ => Condition::All(all),
        })
    }

    fn when_list(&mut self, list: Vec<Spanned<WhenConfig>>) -> Option<Vec<Condition>> {
        let compiled: Vec<Option<Condition>> = list
            .into_iter()
            .map(|w| self.when(w.into_inner(), false))
            .collect();
        compiled.into_iter().collect()
    }

    fn path(&mut self, text: &Spanned<String>) -> Option<FieldPath> {
        match FieldPath::parse(text.get_ref()) {
            Ok(p) => Some(p),
            Err(e) => {
                self.problem(text.span(), e.message, e.hint);
                None
            }
        }
    }

    /// Checks what the email's templates use (see `template_check.rs`).
    fn check_templates(
        &mut self,
        body: &str,
        inline: [(String, Range<usize>); 2],
        known: &Known,
        templates: &Templates,
    ) {
        for (key, span) in inline {
            let place = Place::Rule {
                file: self.p.file,
                source: self.p.source,
                span,
            };
            template_check::check(
                &templates.references(&key, false),
                known,
                &place,
                &mut self.p.list,
            );
        }
        for html in [false, true] {
            if let Some((file, source)) = templates.file_of(body, html) {
                let place = Place::File { file, source };
                template_check::check(
                    &templates.references(body, html),
                    known,
                    &place,
                    &mut self.p.list,
                );
            }
        }
    }

    /// A length of time such as "7 days", "24h" or "1h 30m".
    fn duration(&mut self, text: &Spanned<String>) -> Option<Duration> {
        match units::parse_duration(text.get_ref()) {
            Ok(d) => Some(d),
            Err(DurationError::Zero) => {
                self.problem(text.span(), "this length of time is zero", None);
                None
            }
            Err(DurationError::Unreadable(_)) => {
                self.problem(
                    text.span(),
                    "this is not a length of time tripline can read",
                    Some(format!("write it like {DURATION_EXAMPLES}")),
                );
                None
            }
        }
    }

    fn paths(&mut self, list: &[Spanned<String>]) -> Vec<FieldPath> {
        list.iter().filter_map(|p| self.path(p)).collect()
    }

    fn field(
        &mut self,
        key: &Spanned<String>,
        condition: Spanned<ConditionConfig>,
    ) -> Option<Condition> {
        let path = self.path(key)?;
        let span = condition.span();
        let problems_before = self.p.list.len();
        let tests = match condition.into_inner() {
            ConditionConfig::Equals(v) => vec![Test::Equals(toml_to_json_value(&v))],
            ConditionConfig::OneOf(list) => {
                vec![Test::In(list.iter().map(toml_to_json_value).collect())]
            }
            ConditionConfig::Operators(ops) => self.operators(*ops),
        };
        if self.p.list.len() > problems_before {
            return None;
        }
        if tests.is_empty() {
            self.problem(
                span,
                "this condition has no operator",
                Some(
                    "write for example { exists = true }, { gt = 5 } or { in = [\"a\", \"b\"] }"
                        .into(),
                ),
            );
            return None;
        }
        let mut conditions: Vec<Condition> = tests
            .into_iter()
            .map(|test| Condition::Field {
                path: path.clone(),
                test,
            })
            .collect();
        Some(match conditions.len() {
            1 => conditions.pop().expect("one condition"),
            _ => Condition::All(conditions),
        })
    }

    fn operators(&mut self, ops: OperatorsConfig) -> Vec<Test> {
        let mut tests = Vec::new();
        let json = |v: Spanned<toml::Value>| toml_to_json_value(v.get_ref());
        let list =
            |v: Spanned<Vec<toml::Value>>| v.get_ref().iter().map(toml_to_json_value).collect();
        if let Some(v) = ops.equals {
            tests.push(Test::Equals(json(v)));
        }
        if let Some(v) = ops.not_equals {
            tests.push(Test::NotEquals(json(v)));
        }
        if let Some(v) = ops.in_ {
            tests.push(Test::In(list(v)));
        }
        if let Some(v) = ops.not_in {
            tests.push(Test::NotIn(list(v)));
        }
        if let Some(v) = ops.contains {
            tests.push(Test::Contains(json(v)));
        }
        if let Some(v) = ops.starts_with {
            tests.push(Test::StartsWith(v.into_inner()));
        }
        if let Some(v) = ops.ends_with {
            tests.push(Test::EndsWith(v.into_inner()));
        }
        if let Some(v) = ops.matches {
            match RegexBuilder::new(v.get_ref()).size_limit(REGEX_SIZE_LIMIT).build() {
                Ok(re) => tests.push(Test::Matches(re)),
                Err(e) => self.problem(
                    v.span(),
                    format!("this regular expression is not valid: {}", regex_reason(&e)),
                    Some("in TOML, write patterns in single quotes so backslashes stay as typed: matches = '^v\\d+$'".into()),
                ),
            }
        }
        for (value, make) in [
            (ops.gt, Test::Gt as fn(f64) -> Test),
            (ops.gte, Test::Gte),
            (ops.lt, Test::Lt),
            (ops.lte, Test::Lte),
        ] {
            if let Some(v) = value {
                tests.push(make(*v.get_ref()));
            }
        }
        for (value, make) in [
            (ops.before, Test::Before as fn(_) -> Test),
            (ops.after, Test::After),
        ] {
            if let Some(v) = value {
                let text = match v.get_ref() {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Datetime(d) => d.to_string(),
                    _ => String::new(),
                };
                match parse_timestamp(&text) {
                    Some(t) => tests.push(make(t)),
                    None => self.problem(
                        v.span(),
                        "this is not a date tripline can read",
                        Some("write a date like \"2025-06-14\" or \"2025-06-14T09:00:00Z\"".into()),
                    ),
                }
            }
        }
        if let Some(v) = ops.exists {
            tests.push(Test::Exists(*v.get_ref()));
        }
        tests
    }

    fn email(
        &mut self,
        e: Spanned<EmailConfig>,
        rule: &str,
        templates: &mut Templates,
    ) -> Option<EmailAction> {
        let e = e.into_inner();
        let mut ok = true;
        let template = e.template.get_ref().clone();
        if !templates.has_body(&template) {
            if templates.file_of(&template, false).is_some() {
                self.problem(
                    e.template.span(),
                    format!("the template \"{template}\" cannot be used: {template}.text.hbs has a problem"),
                    Some("see the problem reported for that file".into()),
                );
            } else {
                let hint = match did_you_mean(&template, templates.body_names()) {
                    Some(close) => format!("did you mean \"{close}\"?"),
                    None => {
                        let names: Vec<&str> = templates.body_names().collect();
                        if names.is_empty() {
                            "the templates folder has no templates yet".into()
                        } else {
                            format!("the templates that exist are: {}", names.join(", "))
                        }
                    }
                };
                self.problem(
                    e.template.span(),
                    format!("there is no template \"{template}\": tripline looked for {template}.text.hbs in the templates folder"),
                    Some(hint),
                );
            }
            ok = false;
        }
        let to_key = inline_key(rule, "to");
        let subject_key = inline_key(rule, "subject");
        for (key, text, what) in [
            (&to_key, &e.to, "`to`"),
            (&subject_key, &e.subject, "`subject`"),
        ] {
            if let Err(err) = templates.add_inline(key, text.get_ref()) {
                let d = template_diagnostic(self.p.file, self.p.source, &err);
                self.problem(text.span(), format!("{what}: {}", d.message), d.hint);
                ok = false;
            }
        }
        let from = match &e.from {
            Some(from) => {
                match from.get_ref().parse() {
                    Ok(m) => Some(m),
                    Err(_) => {
                        self.problem(
                        from.span(),
                        "`from` is not an email address",
                        Some("write from = \"Growth team <growth@example.com>\" or just the address".into()),
                    );
                        ok = false;
                        None
                    }
                }
            }
            None => None,
        };
        ok.then_some(EmailAction {
            template,
            to_key,
            subject_key,
            from,
        })
    }

    fn jsonl(&mut self, j: Spanned<JsonlConfig>) -> Option<JsonlAction> {
        let j = j.into_inner();
        let file = match output_path(j.file.get_ref()) {
            Ok(file) => Some(file),
            Err(e) => {
                self.problem(j.file.span(), format!("`file`: {}", e.0), Some("write a file name like \"training_data.jsonl\"; it is created in the data folder".into()));
                None
            }
        };
        if j.fields.get_ref().is_empty() {
            self.problem(
                j.fields.span(),
                "[jsonl.fields] lists no fields, so every line would be empty",
                Some("add a line like distinctId = \"distinct_id\"".into()),
            );
        }
        let mut fields = Vec::new();
        let mut ok = true;
        for (key, spec) in j.fields.into_inner() {
            let span = spec.span();
            let field = match spec.into_inner() {
                FieldConfig::Path(p) => self.path(&Spanned::new(span, p)).map(|from| OutputField {
                    key,
                    from,
                    trim: false,
                    max_chars: None,
                    default: Value::Null,
                }),
                FieldConfig::Options(o) => {
                    let max_chars = match &o.max_chars {
                        Some(m) if *m.get_ref() < 1 => {
                            self.problem(m.span(), "`max_chars` must be 1 or more", None);
                            ok = false;
                            None
                        }
                        Some(m) => Some(*m.get_ref() as usize),
                        None => None,
                    };
                    self.path(&o.from).map(|from| OutputField {
                        key,
                        from,
                        trim: o.trim,
                        max_chars,
                        default: o.default.as_ref().map_or(Value::Null, toml_to_json_value),
                    })
                }
            };
            match field {
                Some(f) => fields.push(f),
                None => ok = false,
            }
        }
        (ok && file.is_some()).then(|| JsonlAction {
            file: file.expect("checked above"),
            fields,
        })
    }
}

/// The key under which a rule's `to` or `subject` line is registered as a template.
fn inline_key(rule: &str, part: &str) -> String {
    format!("rule:{rule}:{part}")
}

fn actions_summary(email: Option<&EmailAction>, jsonl: Option<&JsonlAction>) -> Value {
    let mut actions = Vec::new();
    if let Some(e) = email {
        actions.push(json!({"kind": "email", "template": e.template}));
    }
    if let Some(j) = jsonl {
        actions.push(json!({
            "kind": "jsonl",
            "file": j.file.display().to_string(),
            "fields": j.fields.iter().map(|f| f.key.clone()).collect::<Vec<_>>(),
        }));
    }
    Value::Array(actions)
}

/// The `[when]` table as the author wrote it, for `GET /rules`.
fn when_as_written(source: &str) -> Value {
    toml::from_str::<toml::Table>(source)
        .ok()
        .and_then(|t| t.get("when").map(toml_to_json_value))
        .unwrap_or(Value::Null)
}

/// A TOML value as JSON (dates become RFC 3339 text).
pub fn toml_to_json_value(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => json!(i),
        toml::Value::Float(f) => json!(f),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(toml_to_json_value).collect()),
        toml::Value::Table(t) => Value::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json_value(v)))
                .collect(),
        ),
    }
}

fn regex_reason(e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(s) => s
            .lines()
            .rev()
            .find(|l| l.starts_with("error:"))
            .map(|l| l.trim_start_matches("error:").trim().to_string())
            .unwrap_or_else(|| s.clone()),
        regex::Error::CompiledTooBig(_) => "it is too large".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(source: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.text.hbs"), "Hi").unwrap();
        let (mut templates, _) = Templates::load(dir.path());
        match compile(Path::new("r.toml"), source, &mut templates) {
            Ok(_) => vec![],
            Err(p) => p.iter().map(|d| d.to_string()).collect(),
        }
    }

    const JSONL: &str = "[jsonl]\nfile = \"o.jsonl\"\nfields = { who = \"distinct_id\" }\n";

    #[test]
    fn a_template_that_cannot_be_read_is_named_as_such_not_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.text.hbs"), "Hi {{#if x}}").unwrap();
        let (mut templates, template_problems) = Templates::load(dir.path());
        assert_eq!(template_problems.len(), 1);
        let source = "name = \"r\"\n[when]\nevent = \"x\"\n[email]\nto = \"a@b.c\"\nsubject = \"s\"\ntemplate = \"hello\"\n";
        let problems = compile(Path::new("r.toml"), source, &mut templates).unwrap_err();
        let message = problems[0].to_string();
        assert!(
            message.contains("the template \"hello\" cannot be used: hello.text.hbs has a problem"),
            "{message}"
        );
    }

    #[test]
    fn a_good_rule_compiles() {
        let src = format!(
            "name = \"r\"\n[when]\nevent = \"x\"\n\"properties.a\" = {{ gt = 1, lt = 9 }}\n{JSONL}"
        );
        assert_eq!(problems(&src), Vec::<String>::new());
    }

    #[test]
    fn unknown_keys_get_did_you_mean() {
        let src = format!(
            "name = \"r\"\n[when]\nevent = \"x\"\n[count]\nper = [\"distinct_id\"]\nat_lest = 5\n{JSONL}"
        );
        let p = problems(&src);
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("r.toml:6:1: unknown key `at_lest` (did you mean `at_least`?"),
            "{p:?}"
        );
        let src = format!(
            "name = \"r\"\n[when]\nevent = \"x\"\n\"properties.a\" = {{ gtt = 1 }}\n{JSONL}"
        );
        let p = problems(&src);
        assert!(
            p[0].contains("unknown key `gtt` (did you mean `gt`?"),
            "{p:?}"
        );
    }

    #[test]
    fn every_misspelled_key_of_a_file_is_reported_then_the_rest_is_checked() {
        let src = format!(
            "name = \"r\"\ndescripton = \"x\"\n[when]\nevent = \"x\"\n\"propreties.a\" = 1\n\
             [count]\nper = [\"distinct_id\"]\nat_least = 2\nwithn = \"7 days\"\n{JSONL}"
        );
        let p = problems(&src);
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(
            p[0].starts_with("r.toml:2:1: unknown key `descripton`"),
            "{p:?}"
        );
        assert!(p[1].starts_with("r.toml:9:1: unknown key `withn`"), "{p:?}");
        assert!(
            p[2].starts_with("r.toml:5:1: `propreties.a` is not a field"),
            "{p:?}"
        );
    }

    #[test]
    fn every_semantic_problem_is_reported() {
        let src = "name = \"r\"\n[when]\nevent = \"x\"\n\"propreties.a\" = 1\n\"properties.b\" = { matches = \"(\" }\n\
                   [email]\nto = \"{{person.properties.email}}\"\nsubject = \"s\"\ntemplate = \"helo\"\n\
                   [jsonl]\nfile = \"../x.jsonl\"\nfields = { a = \"distinct_id\" }\n";
        let p = problems(src);
        assert_eq!(p.len(), 4, "{p:#?}");
        assert!(
            p[0].starts_with("r.toml:4:1: `propreties.a` is not a field"),
            "{p:?}"
        );
        assert!(
            p[1].starts_with("r.toml:5:30: this regular expression is not valid: unclosed group"),
            "{p:?}"
        );
        assert!(
            p[2].contains("no template \"helo\"") && p[2].contains("did you mean \"hello\"?"),
            "{p:?}"
        );
        assert!(p[3].contains("`..` is not allowed"), "{p:?}");
    }

    #[test]
    fn event_is_required_and_an_action_too() {
        let p = problems("name = \"r\"\n[when]\n\"properties.a\" = 1\n");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("[when] must say which event"));
        assert!(p[1].contains("no action"));
    }
}
