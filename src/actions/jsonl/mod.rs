//! The `[jsonl]` action: project an event onto a whitelist of fields and append it as one line
//! of a JSONL file in the data directory.
//!
//! Only the listed fields are written, under the names the rule gives them, so nothing else from
//! the event can leak into the file. Only the committer thread writes, a batch of whole lines at
//! a time, synced before the batch is acknowledged; files stay open across reloads.
//!
//! - `mod.rs`: the `[jsonl]` table, its compile, and the line an event becomes.
//! - `path.rs`: which output paths are allowed, checked when rules load and before opening.
//! - `files.rs`: the open files, appended to durably by the committer.

pub mod files;
pub mod path;

use indexmap::IndexMap;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use toml::Spanned;

use super::{Action, Compile, Input, Kind, Output};
use crate::ingest::event::Event;
use crate::ingest::path::FieldPath;
use crate::units::toml_to_json_value;
pub use files::{JsonlFiles, is_path_error};
pub use path::{UnsafePath, check_output_path, output_path, output_place};

/// The kind's name, as its table is written.
pub const KIND: &str = "jsonl";

/// Output files that cannot be written, with why: an action writing to one fails on its own (see
/// the committer), while the rule's other actions and every other rule go on.
pub type Unwritable = HashMap<PathBuf, String>;

/// The `[jsonl]` kind.
pub struct Jsonl;

/// `[jsonl]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// Output file, relative to the data directory.
    pub file: Spanned<String>,
    /// Output keys, in order, and where each comes from.
    pub fields: Spanned<IndexMap<String, Spanned<FieldConfig>>>,
}

/// One output field: a plain path, or a table of options.
#[derive(Debug)]
pub enum FieldConfig {
    Path(String),
    Options(FieldOptions),
}

/// `{ from = "properties.x", trim = true, max_chars = 100, default = "" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldOptions {
    /// Where the value comes from.
    pub from: Spanned<String>,
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
                    .map(FieldConfig::Options)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(FieldConfig::Path(v.to_string()))
            }
        }
        deserializer.deserialize_any(FieldVisitor)
    }
}

impl Kind for Jsonl {
    type Config = JsonlConfig;

    fn compile(config: Spanned<JsonlConfig>, cx: &mut Compile) -> Option<Box<dyn Action>> {
        let j = config.into_inner();
        let file = match output_path(j.file.get_ref()) {
            Ok(file) => Some(file),
            Err(e) => {
                cx.problems.add(j.file.span(), format!("`file`: {}", e.0), Some("write a file name like \"training_data.jsonl\"; it is created in the data folder".into()));
                None
            }
        };
        if j.fields.get_ref().is_empty() {
            cx.problems.add(
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
                FieldConfig::Path(p) => {
                    FieldPath::parse_reporting(&Spanned::new(span, p), cx.problems).map(|from| {
                        OutputField {
                            key,
                            from,
                            trim: false,
                            max_chars: None,
                            default: Value::Null,
                        }
                    })
                }
                FieldConfig::Options(o) => {
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
                    FieldPath::parse_reporting(&o.from, cx.problems).map(|from| OutputField {
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
        let action = JsonlAction {
            file: file?,
            fields,
        };
        ok.then(|| Box::new(action) as Box<dyn Action>)
    }
}

/// A compiled `[jsonl]` table.
#[derive(Debug, Clone)]
pub struct JsonlAction {
    /// The output file, relative to the data directory (checked to stay inside it).
    pub file: PathBuf,
    /// The output keys in the order the rule lists them.
    pub fields: Vec<OutputField>,
}

/// One output key.
#[derive(Debug, Clone)]
pub struct OutputField {
    pub key: String,
    pub from: FieldPath,
    pub trim: bool,
    pub max_chars: Option<usize>,
    /// Written when the event does not have the field (JSON null unless the rule says otherwise).
    pub default: Value,
}

impl Action for JsonlAction {
    fn kind(&self) -> &'static str {
        KIND
    }

    /// The line, unless its file cannot be written now (see [`Unwritable`]).
    fn run(&self, input: &Input) -> Result<Output, String> {
        if let Some(why) = input.env.unwritable.get(&self.file) {
            return Err(format!(
                "line not written: cannot write {}: {why}",
                self.file.display()
            ));
        }
        Ok(Output::Line {
            file: self.file.clone(),
            line: self.project(input.event),
        })
    }

    fn summary(&self) -> Value {
        json!({
            "kind": KIND,
            "file": self.file.display().to_string(),
            "fields": self.fields.iter().map(|f| f.key.clone()).collect::<Vec<_>>(),
        })
    }

    fn fields(&self) -> Vec<&FieldPath> {
        self.fields.iter().map(|f| &f.from).collect()
    }

    fn file(&self) -> Option<&Path> {
        Some(&self.file)
    }
}

impl JsonlAction {
    /// The line this event becomes, newline included. Written straight from the event's
    /// values, in the rule's order, without building an object first (this runs for every
    /// event a `[jsonl]` rule takes).
    pub fn project(&self, event: &Event) -> String {
        let mut line = Vec::with_capacity(128);
        line.push(b'{');
        for (i, field) in self.fields.iter().enumerate() {
            if i > 0 {
                line.push(b',');
            }
            write_json(&mut line, &field.key);
            line.push(b':');
            match field.from.lookup(event) {
                Some(Value::String(s)) => write_json(&mut line, field.shape_text(s)),
                Some(other) => write_json(&mut line, other),
                None => write_json(&mut line, &field.default),
            }
        }
        line.extend_from_slice(b"}\n");
        String::from_utf8(line).expect("serde_json writes UTF-8")
    }
}

/// Appends `value` as compact JSON.
fn write_json(out: &mut Vec<u8>, value: &(impl serde::Serialize + ?Sized)) {
    serde_json::to_writer(out, value).expect("text and JSON values always serialize");
}

impl OutputField {
    /// Trims, then cuts to `max_chars` characters (Unicode scalar values; never half of one).
    fn shape_text<'a>(&self, s: &'a str) -> &'a str {
        let s = if self.trim { s.trim() } else { s };
        match self.max_chars.and_then(|max| s.char_indices().nth(max)) {
            Some((cut, _)) => &s[..cut],
            None => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(key: &str, from: &str, trim: bool, max_chars: Option<usize>) -> OutputField {
        OutputField {
            key: key.into(),
            from: FieldPath::parse(from).unwrap(),
            trim,
            max_chars,
            default: Value::Null,
        }
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
            source: Value::Null,
        }
    }

    #[test]
    fn projects_only_listed_fields_in_order() {
        let event = event_with(json!({"r": "  héllo wörld  ", "secret": "s"}));
        let mut with_default = field("gone", "properties.nope", false, None);
        with_default.default = json!("n/a");
        let action = JsonlAction {
            file: "x.jsonl".into(),
            fields: vec![
                field("who", "distinct_id", false, None),
                field("reason", "properties.r", true, Some(7)),
                field("missing", "properties.nope", false, None),
                with_default,
            ],
        };
        assert_eq!(
            action.project(&event),
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
        let action = JsonlAction {
            file: "x.jsonl".into(),
            fields: keys
                .iter()
                .map(|k| field(k, &format!("properties.{k}"), false, None))
                .collect(),
        };
        // What building the object and printing it gives, field by field in the rule's order.
        let mut object = serde_json::Map::new();
        for k in keys {
            object.insert(
                k.to_string(),
                properties.get(k).cloned().unwrap_or(Value::Null),
            );
        }
        let line = action.project(&event);
        assert_eq!(line, format!("{}\n", Value::Object(object)));
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap()["nested"],
            properties["nested"]
        );
    }

    #[test]
    fn truncation_counts_characters_not_bytes() {
        let f = field("k", "event", false, Some(3));
        assert_eq!(f.shape_text("🏠🛏️é"), "🏠🛏\u{fe0f}");
        assert_eq!(f.shape_text("ab"), "ab");
    }
}
