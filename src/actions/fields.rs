//! The fields of a line: `[jsonl.fields]`, and `[remember.fields]` with the same syntax.
//!
//! Each output key says where its value comes from (`from`, a field of the event, or `template`,
//! a text made from its fields) and what is done to it (`trim`, `redact`, `max_chars`, `hash`,
//! a `default` when the event lacks it). Only the listed keys are written, so nothing else from
//! the event can leak into what is kept. Compiled once when the rules load; an event becomes
//! one JSON object, written straight from its values in the rule's order.

use indexmap::IndexMap;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use std::fmt;
use std::ops::Range;
use toml::Spanned;

use super::{Compile, Input};
use crate::actions::email::template_check::Known;
use crate::actions::email::templates::template_diagnostic;
use crate::ingest::path::FieldPath;
use crate::redact::{HASH_KEY_ENV, HashKey, MIN_HASH_KEY_CHARS, Pii, Redactor};
use crate::units::toml_to_json_value;

/// One output field: a plain path, or a table of options.
#[derive(Debug)]
pub enum FieldConfig {
    Path(String),
    Options(Box<FieldOptions>),
}

/// `{ from = "properties.x", trim = true, max_chars = 100, default = "" }`, or
/// `{ template = "Viewed {{properties.$pathname}}" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldOptions {
    /// Where the value comes from.
    #[serde(default)]
    pub from: Option<Spanned<String>>,
    /// A text made from the event's fields, instead of `from`.
    #[serde(default)]
    pub template: Option<Spanned<String>>,
    /// Personal data replaced by placeholders (`["email", "phone", "card", "ip", "secret"]`).
    #[serde(default)]
    pub redact: Option<Spanned<Vec<Spanned<String>>>>,
    /// Write a keyed hash of the value instead of the value (the key is the operator's).
    #[serde(default)]
    pub hash: Option<Spanned<bool>>,
    /// Remove spaces and line breaks at both ends of text.
    #[serde(default)]
    pub trim: bool,
    /// Cut text to at most this many characters.
    #[serde(default)]
    pub max_chars: Option<Spanned<i64>>,
    /// The value written when the event does not have the field.
    #[serde(default)]
    pub default: Option<toml::Value>,
}

impl<'de> Deserialize<'de> for FieldConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl<'de> Visitor<'de> for FieldVisitor {
            type Value = FieldConfig;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a field such as \"properties.x\", or a table like { from = \"properties.x\", max_chars = 100 }",
                )
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Deserialize::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|o| FieldConfig::Options(Box::new(o)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(FieldConfig::Path(v.to_string()))
            }
        }
        deserializer.deserialize_any(FieldVisitor)
    }
}

/// The output keys, in the order the rule lists them.
#[derive(Debug, Clone)]
pub struct Fields(pub Vec<OutputField>);

impl Fields {
    /// Compiles a table of fields (`table` names it in messages: `[jsonl.fields]`), with the
    /// `redact` written for the whole line, if any; `None` if anything is wrong (each problem
    /// added to `cx.problems`).
    pub fn compile(
        table: &str,
        fields: Spanned<IndexMap<String, Spanned<FieldConfig>>>,
        redact: Option<&Spanned<Vec<Spanned<String>>>>,
        cx: &mut Compile,
    ) -> Option<Fields> {
        let line_redact = redact.map(|r| redactor(r, cx));
        let mut compiled = Vec::new();
        let mut ok = true;
        for (key, spec) in fields.into_inner() {
            let span = spec.span();
            let field = match spec.into_inner() {
                FieldConfig::Path(p) => {
                    FieldPath::parse_reporting(&Spanned::new(span, p), cx.problems).map(|from| {
                        OutputField {
                            key,
                            value: FieldValue::From(from),
                            trim: false,
                            max_chars: None,
                            default: Value::Null,
                            redact: line_redact.unwrap_or_default(),
                            hash: None,
                        }
                    })
                }
                FieldConfig::Options(o) => compile_options(table, key, *o, span, line_redact, cx),
            };
            match field {
                Some(f) => compiled.push(f),
                None => ok = false,
            }
        }
        ok.then_some(Fields(compiled))
    }

    /// The output keys, in order.
    pub fn keys(&self) -> Vec<String> {
        self.0.iter().map(|f| f.key.clone()).collect()
    }

    /// The event fields read (not those templates read).
    pub fn paths(&self) -> Vec<&FieldPath> {
        (self.0.iter())
            .filter_map(|f| match &f.value {
                FieldValue::From(path) => Some(path),
                FieldValue::Template { .. } => None,
            })
            .collect()
    }

    /// Checks the templates against the fields the rule knows.
    pub fn check(&self, known: &Known, cx: &mut Compile) {
        for field in &self.0 {
            if let FieldValue::Template { key, span } = &field.value {
                cx.check_inline_template(key, span, known);
            }
        }
    }

    /// The JSON object this event becomes. Written straight from the event's values, in the
    /// rule's order, without building an object first (this runs for every event such a rule
    /// takes). Fails only when a template cannot be filled in.
    pub fn object(&self, input: &Input) -> Result<String, String> {
        // Only a line with a template needs what templates see.
        let data = (self.0.iter())
            .any(|f| matches!(f.value, FieldValue::Template { .. }))
            .then(|| input.template_data());
        let rendering = data.as_ref().map(|d| input.templates.rendering(d));
        let mut line = Vec::with_capacity(128);
        line.push(b'{');
        for (i, field) in self.0.iter().enumerate() {
            if i > 0 {
                line.push(b',');
            }
            write_json(&mut line, &field.key);
            line.push(b':');
            match &field.value {
                FieldValue::From(path) => match path.lookup(input.event) {
                    Some(value) => field.write(&mut line, value),
                    None => write_json(&mut line, &field.default),
                },
                FieldValue::Template { key, .. } => {
                    let rendering = rendering
                        .as_ref()
                        .expect("made when a field has a template");
                    let text = rendering
                        .text(key)
                        .map_err(|e| format!("cannot fill in `{}`: {e}", field.key))?;
                    field.write(&mut line, &Value::String(text));
                }
            }
        }
        line.push(b'}');
        Ok(String::from_utf8(line).expect("serde_json writes UTF-8"))
    }
}

/// The kinds of personal data a `redact` list names, each unknown name a problem at its place.
pub fn redactor(list: &Spanned<Vec<Spanned<String>>>, cx: &mut Compile) -> Redactor {
    let mut kinds = Vec::new();
    for name in list.get_ref() {
        match name.get_ref().parse::<Pii>() {
            Ok(kind) => kinds.push(kind),
            Err(e) => cx.problems.add(name.span(), e.to_string(), None),
        }
    }
    Redactor::new(&kinds)
}

/// One field written as a table of options.
fn compile_options(
    table: &str,
    key: String,
    o: FieldOptions,
    span: Range<usize>,
    line_redact: Option<Redactor>,
    cx: &mut Compile,
) -> Option<OutputField> {
    let mut ok = true;
    let max_chars = match &o.max_chars {
        Some(m) if *m.get_ref() < 1 => {
            cx.problems
                .add(m.span(), "`max_chars` must be 1 or more", None);
            ok = false;
            None
        }
        Some(m) => Some(*m.get_ref() as usize),
        None => None,
    };
    let redact = match &o.redact {
        Some(list) => redactor(list, cx),
        None => line_redact.unwrap_or_default(),
    };
    let hash = match &o.hash {
        Some(h) if *h.get_ref() => match &cx.declared.hash_key {
            Some(key) => {
                if o.redact.is_some() || o.max_chars.is_some() {
                    cx.problems.add(
                        h.span(),
                        "`hash` replaces the whole value, so `redact` and `max_chars` beside it would do nothing",
                        Some("keep `hash = true`, or remove it to redact or cut the text".into()),
                    );
                    ok = false;
                }
                Some(key.clone())
            }
            None => {
                cx.problems.add(
                    h.span(),
                    format!("`hash = true` needs the operator's key, and {HASH_KEY_ENV} is not set"),
                    Some(format!("the operator sets {HASH_KEY_ENV} (at least {MIN_HASH_KEY_CHARS} characters, for example from `openssl rand -hex 32`) where tripline runs")),
                );
                ok = false;
                None
            }
        },
        _ => None,
    };
    let value = match (&o.from, &o.template) {
        (Some(from), None) => FieldPath::parse_reporting(from, cx.problems).map(FieldValue::From),
        (None, Some(text)) if o.default.is_some() => {
            cx.problems.add(
                text.span(),
                "`default` does nothing beside `template`: a template always makes a text",
                Some(
                    "use {{#if field}}...{{else}}...{{/if}} in the template for a missing field"
                        .into(),
                ),
            );
            None
        }
        (None, Some(text)) => {
            let template_key = format!("rule:{}:{table}:{key}", cx.rule);
            match cx.templates.add_inline(&template_key, text.get_ref()) {
                Ok(()) => Some(FieldValue::Template {
                    key: template_key,
                    span: text.span(),
                }),
                Err(err) => {
                    let d = template_diagnostic(cx.problems.file, cx.problems.source, &err);
                    cx.problems
                        .add(text.span(), format!("`template`: {}", d.message), d.hint);
                    None
                }
            }
        }
        (Some(_), Some(template)) => {
            cx.problems
                .add(template.span(), "give `from` or `template`, not both", None);
            None
        }
        (None, None) => {
            cx.problems.add(
                span,
                format!("the field `{key}` says neither where its value comes from nor how to make it"),
                Some("add from = \"properties.x\", or template = \"Viewed {{properties.$pathname}}\"".into()),
            );
            None
        }
    };
    let field = OutputField {
        key,
        value: value?,
        trim: o.trim,
        max_chars,
        default: o.default.as_ref().map_or(Value::Null, toml_to_json_value),
        redact,
        hash,
    };
    ok.then_some(field)
}

/// One output key.
#[derive(Debug, Clone)]
pub struct OutputField {
    pub key: String,
    pub value: FieldValue,
    pub trim: bool,
    pub max_chars: Option<usize>,
    /// Written when the event does not have the field (JSON null unless the rule says otherwise).
    pub default: Value,
    /// Personal data replaced in its text.
    pub redact: Redactor,
    /// Written as a keyed hash, with this key.
    pub hash: Option<HashKey>,
}

/// Where an output key's value comes from.
#[derive(Debug, Clone)]
pub enum FieldValue {
    /// A field of the event.
    From(FieldPath),
    /// A template, registered under `key`; `span` is where it is written.
    Template { key: String, span: Range<usize> },
}

/// Appends `value` as compact JSON.
fn write_json(out: &mut Vec<u8>, value: &(impl serde::Serialize + ?Sized)) {
    serde_json::to_writer(out, value).expect("text and JSON values always serialize");
}

impl OutputField {
    /// Writes `value` as the rule says: hashed, or trimmed, redacted and cut.
    fn write(&self, out: &mut Vec<u8>, value: &Value) {
        if let Some(key) = &self.hash {
            let hashed = match value {
                Value::String(s) => key.hash(if self.trim { s.trim() } else { s }),
                Value::Null => return write_json(out, value),
                other => key.hash(&other.to_string()),
            };
            return write_json(out, &hashed);
        }
        match value {
            Value::String(s) => {
                let s = if self.trim { s.trim() } else { s };
                // Redacted before it is cut, so that a cut never leaves part of a card number
                // that the whole would have been recognized as.
                let s = self.redact.redact(s);
                write_json(out, self.cut(&s));
            }
            other if self.redact.is_empty() => write_json(out, other),
            other => write_json(out, self.redact.redact_value(other).as_ref()),
        }
    }

    /// Cuts to `max_chars` characters (Unicode scalar values; never half of one).
    fn cut<'a>(&self, s: &'a str) -> &'a str {
        match self.max_chars.and_then(|max| s.char_indices().nth(max)) {
            Some((cut, _)) => &s[..cut],
            None => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::Env;
    use crate::actions::email::templates::Templates;
    use crate::ingest::event::Event;
    use serde_json::json;

    fn field(key: &str, from: &str, trim: bool, max_chars: Option<usize>) -> OutputField {
        OutputField {
            key: key.into(),
            value: FieldValue::From(FieldPath::parse(from).unwrap()),
            trim,
            max_chars,
            default: Value::Null,
            redact: Redactor::default(),
            hash: None,
        }
    }

    /// The object `fields` make of `event`, and a line break, as a `[jsonl]` line.
    fn project(fields: &Fields, event: &Event) -> String {
        let from = "t <t@localhost>".parse().unwrap();
        let env = Env::offline(&from);
        let (templates, _) = Templates::load(std::path::Path::new("no-templates"));
        let input = Input {
            rule: "r",
            event,
            count: None,
            waited: None,
            digest: None,
            templates: &templates,
            env: &env,
        };
        fields.object(&input).unwrap() + "\n"
    }

    /// An event by `d` with these properties.
    fn event_with(properties: Value) -> Event {
        Event {
            name: json!("x"),
            uuid: Value::Null,
            distinct_id: json!("d"),
            timestamp: json!("2025-01-01T00:00:00Z"),
            time: "2025-01-01T00:00:00Z".parse().unwrap(),
            properties,
            person_properties: json!({}),
            elements_chain: Value::Null,
            source: Value::Null,
        }
    }

    #[test]
    fn projects_only_listed_fields_in_order() {
        let event = event_with(json!({"r": "  héllo wörld  ", "secret": "s"}));
        let mut with_default = field("gone", "properties.nope", false, None);
        with_default.default = json!("n/a");
        let action = Fields(vec![
            field("who", "distinct_id", false, None),
            field("reason", "properties.r", true, Some(7)),
            field("missing", "properties.nope", false, None),
            with_default,
        ]);
        assert_eq!(
            project(&action, &event),
            "{\"who\":\"d\",\"reason\":\"héllo w\",\"missing\":null,\"gone\":\"n/a\"}\n"
        );
    }

    #[test]
    fn a_line_is_exactly_the_json_object_of_its_fields() {
        let properties = json!({
            "nested": {"b": [1, 2.5, -0.0, 1e300, null], "a": "\"quoted\" \\ \n\t\u{1}"},
            "big": 18446744073709551615u64,
            "neg": -9223372036854775808i64,
            "flag": false,
            "emoji": "👩🏽‍💻 \u{2028}",
        });
        let event = event_with(properties.clone());
        let keys = ["nested", "big", "neg", "flag", "emoji", "k\"ey"];
        let action = Fields(
            keys.iter()
                .map(|k| field(k, &format!("properties.{k}"), false, None))
                .collect(),
        );
        // What building the object and printing it gives, field by field in the rule's order.
        let mut object = serde_json::Map::new();
        for k in keys {
            object.insert(
                k.to_string(),
                properties.get(k).cloned().unwrap_or(Value::Null),
            );
        }
        let line = project(&action, &event);
        assert_eq!(line, format!("{}\n", Value::Object(object)));
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap()["nested"],
            properties["nested"]
        );
    }

    #[test]
    fn truncation_counts_characters_not_bytes() {
        let f = field("k", "event", false, Some(3));
        assert_eq!(f.cut("🏠🛏️é"), "🏠🛏\u{fe0f}");
        assert_eq!(f.cut("ab"), "ab");
    }
}
