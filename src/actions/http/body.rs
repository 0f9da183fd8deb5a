//! An `[http]` body as written (`json = {...}` or `form = {...}`), compiled, and filled in from
//! an event.
//!
//! Every string is a template, checked as strictly as an email's. A string that is exactly one
//! field reference (`"{{properties.total}}"`) keeps the field's JSON type in a `json` body, so a
//! number stays a number; numbers and booleans written in the rule are sent as written.

use indexmap::IndexMap;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use std::fmt;
use std::ops::Range;
use std::sync::LazyLock;
use toml::Spanned;

use crate::actions::Compile;
use crate::actions::email::templates::{ReferenceKind, Rendering, template_diagnostic};

/// A body value as written.
#[derive(Debug)]
pub enum Written {
    /// A template.
    Text(String),
    /// A number or a boolean, sent as written.
    Plain(Value),
    Table(IndexMap<String, Spanned<Written>>),
    List(Vec<Spanned<Written>>),
}

impl<'de> Deserialize<'de> for Written {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WrittenVisitor;
        impl<'de> Visitor<'de> for WrittenVisitor {
            type Value = Written;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("text, a number, true or false, a table or a list")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Written, E> {
                Ok(Written::Text(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Written, E> {
                Ok(Written::Plain(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Written, E> {
                Ok(Written::Plain(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Written, E> {
                Ok(Written::Plain(v.into()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Written, E> {
                Ok(Written::Plain(v.into()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Written, A::Error> {
                let mut table = IndexMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    table.insert(key, map.next_value()?);
                }
                Ok(Written::Table(table))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Written, A::Error> {
                let mut list = Vec::new();
                while let Some(item) = seq.next_element()? {
                    list.push(item);
                }
                Ok(Written::List(list))
            }
        }
        deserializer.deserialize_any(WrittenVisitor)
    }
}

/// A compiled body value.
#[derive(Debug)]
pub enum Part {
    /// A template, registered under `key`.
    Text { key: String, span: Range<usize> },
    /// Exactly one field reference: the field's value, of its own type (also registered as a
    /// template under `key`, so that it is checked like the others).
    Field {
        path: Vec<String>,
        key: String,
        span: Range<usize>,
    },
    Plain(Value),
    Table(Vec<(String, Part)>),
    List(Vec<Part>),
}

/// `{{ a.b }}` and nothing else.
static ONE_REFERENCE: LazyLock<regex::Regex> = LazyLock::new(|| {
    regex::Regex::new(r"^\{\{\s*[^\s{}#/>!^*~]+\s*\}\}$").expect("a valid pattern")
});

/// Compiles the strings of bodies and paths into templates named `<prefix>:<n>`.
pub struct Compiler<'c, 'a, 'f> {
    pub cx: &'c mut Compile<'a, 'f>,
    pub prefix: String,
    pub next: usize,
}

impl Compiler<'_, '_, '_> {
    /// Registers `text` as a template; its key, or `None` (with a problem) if it is not one.
    pub fn template(&mut self, text: &str, span: Range<usize>, what: &str) -> Option<String> {
        let key = format!("{}:{}", self.prefix, self.next);
        self.next += 1;
        match self.cx.templates.add_inline(&key, text) {
            Ok(()) => Some(key),
            Err(err) => {
                let d = template_diagnostic(self.cx.problems.file, self.cx.problems.source, &err);
                self.cx
                    .problems
                    .add(span, format!("{what}: {}", d.message), d.hint);
                None
            }
        }
    }

    /// A `json` body value.
    pub fn json(&mut self, written: Spanned<Written>) -> Option<Part> {
        let span = written.span();
        Some(match written.into_inner() {
            Written::Text(text) => {
                let key = self.template(&text, span.clone(), "in `json`")?;
                match self.cx.templates.references(&key, false).as_slice() {
                    [reference] if ONE_REFERENCE.is_match(text.trim()) => match &reference.kind {
                        ReferenceKind::Field(path) => Part::Field {
                            path: path.clone(),
                            key,
                            span,
                        },
                        _ => Part::Text { key, span },
                    },
                    _ => Part::Text { key, span },
                }
            }
            Written::Plain(value) => Part::Plain(value),
            Written::Table(table) => {
                let mut parts = Vec::new();
                for (name, value) in table {
                    parts.push((name, self.json(value)?));
                }
                Part::Table(parts)
            }
            Written::List(list) => {
                let parts: Option<Vec<Part>> = list.into_iter().map(|v| self.json(v)).collect();
                Part::List(parts?)
            }
        })
    }

    /// A `form` body: a table of text (or lists of text, sent as the same name repeated).
    pub fn form(&mut self, written: Spanned<Written>) -> Option<Vec<(String, Part)>> {
        let span = written.span();
        let Written::Table(table) = written.into_inner() else {
            self.cx.problems.add(
                span,
                "`form` must be a table of names and texts",
                Some("write form = { to = \"{{person.properties.email}}\", subject = \"Hi\" }".into()),
            );
            return None;
        };
        let mut fields = Vec::new();
        let mut ok = true;
        for (name, value) in table {
            let span = value.span();
            let part = match value.into_inner() {
                Written::Text(text) => self
                    .template(&text, span.clone(), "in `form`")
                    .map(|key| Part::Text { key, span }),
                Written::Plain(value) => Some(Part::Plain(value)),
                Written::List(list) => {
                    let mut items = Vec::new();
                    for item in list {
                        let span = item.span();
                        match item.into_inner() {
                            Written::Text(text) => items.extend(
                                self.template(&text, span.clone(), "in `form`")
                                    .map(|key| Part::Text { key, span }),
                            ),
                            Written::Plain(value) => items.push(Part::Plain(value)),
                            _ => self.not_form_text(&name, span),
                        }
                    }
                    Some(Part::List(items))
                }
                Written::Table(_) => {
                    self.not_form_text(&name, span);
                    None
                }
            };
            match part {
                Some(part) => fields.push((name, part)),
                None => ok = false,
            }
        }
        ok.then_some(fields)
    }

    fn not_form_text(&mut self, name: &str, span: Range<usize>) {
        self.cx.problems.add(
            span,
            format!("the form field `{name}` must be text (or a list of texts)"),
            Some("a form cannot hold tables; use `json` for a nested body".into()),
        );
    }
}

impl Part {
    /// Every template in it, with where it is written, for the checks of the whole rule.
    pub fn templates<'p>(&'p self, out: &mut Vec<(&'p str, &'p Range<usize>)>) {
        match self {
            Part::Text { key, span } | Part::Field { key, span, .. } => out.push((key, span)),
            Part::Plain(_) => {}
            Part::Table(parts) => parts.iter().for_each(|(_, p)| p.templates(out)),
            Part::List(parts) => parts.iter().for_each(|p| p.templates(out)),
        }
    }

    /// The value for `data`.
    pub fn render(&self, rendering: &Rendering, data: &Value) -> Result<Value, String> {
        Ok(match self {
            Part::Text { key, .. } => rendering.text(key)?.into(),
            Part::Field { path, .. } => lookup(data, path)
                .ok_or_else(|| format!("the event has no field `{}`", path.join(".")))?
                .clone(),
            Part::Plain(value) => value.clone(),
            Part::Table(parts) => Value::Object(
                parts
                    .iter()
                    .map(|(name, p)| Ok((name.clone(), p.render(rendering, data)?)))
                    .collect::<Result<_, String>>()?,
            ),
            Part::List(parts) => Value::Array(
                parts
                    .iter()
                    .map(|p| p.render(rendering, data))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }
}

/// `form` fields, encoded as `application/x-www-form-urlencoded`.
pub fn render_form(
    fields: &[(String, Part)],
    rendering: &Rendering,
    data: &Value,
) -> Result<String, String> {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    for (name, part) in fields {
        let value = part.render(rendering, data)?;
        let values = match value {
            Value::Array(items) => items,
            one => vec![one],
        };
        for value in values {
            match value {
                Value::String(text) => form.append_pair(name, &text),
                other => form.append_pair(name, &other.to_string()),
            };
        }
    }
    Ok(form.finish())
}

/// The value at `path` in `data` (objects by name, lists by position).
fn lookup<'v>(data: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(data, |value, segment| match value {
        Value::Object(map) => map.get(segment),
        Value::Array(items) => items.get(segment.parse::<usize>().ok()?),
        _ => None,
    })
}
