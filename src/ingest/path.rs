//! Field paths: how a rule names a field of an event (`properties.feature_name`,
//! `person.properties.email`, `properties.[utm.source]`).
//!
//! A path is parsed once when the rule loads; looking it up while an event is handled is a walk
//! over already-split segments.

use serde_json::Value;
use std::fmt;

use crate::diag::{Problems, did_you_mean};
use crate::ingest::event::{Event, Field};

/// A parsed field path. Segments after `properties` / `person.properties` walk into nested
/// objects (and into arrays by position, `properties.tags.0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    root: Field,
    segments: Vec<String>,
    text: String,
}

/// Why a path could not be understood, with a hint when one helps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathError {
    pub message: String,
    pub hint: Option<String>,
}

impl FieldPath {
    /// Parses a path written in a user's file, adding a problem at its place if it is not one.
    pub fn parse_reporting(
        text: &toml::Spanned<String>,
        problems: &mut Problems,
    ) -> Option<FieldPath> {
        match FieldPath::parse(text.get_ref()) {
            Ok(p) => Some(p),
            Err(e) => {
                problems.add(text.span(), e.message, e.hint);
                None
            }
        }
    }

    /// Parses a path as a rule author writes it. A name containing dots is written in square
    /// brackets: `properties.[utm.source]`.
    pub fn parse(text: &str) -> Result<FieldPath, PathError> {
        let parts = split_segments(text)?;
        let mut parts = parts.into_iter();
        let first = parts.next().unwrap_or_default();
        let root = match (first.as_str(), Field::named(&first)) {
            (_, Some(field)) => field,
            ("person", None) => match parts.next().as_deref() {
                Some("properties") => Field::PersonProperties,
                _ => {
                    return Err(PathError {
                        message: format!("`{text}` is not a field tripline knows"),
                        hint: Some(
                            "a person's fields are under `person.properties.`, for example `person.properties.email`"
                                .into(),
                        ),
                    });
                }
            },
            (other, None) => {
                let roots = Field::ALL.map(Field::name);
                let hint = match did_you_mean(other, roots) {
                    Some(close) => format!("did you mean `{close}`?"),
                    None => format!(
                        "a field starts with one of: {}",
                        roots.map(|r| format!("`{r}`")).join(", ")
                    ),
                };
                return Err(PathError {
                    message: format!("`{text}` is not a field tripline knows"),
                    hint: Some(hint),
                });
            }
        };
        let segments: Vec<String> = parts.collect();
        if !segments.is_empty() && !root.has_parts() {
            return Err(PathError {
                message: format!("`{first}` is a single value and has no fields inside it"),
                hint: Some(format!("write just `{first}`")),
            });
        }
        Ok(FieldPath {
            root,
            segments,
            text: text.to_string(),
        })
    }

    /// The value at this path in `event`, or `None` when the event does not have it.
    /// A JSON `null` counts as not having it.
    pub fn lookup<'e>(&self, event: &'e Event) -> Option<&'e Value> {
        let mut value = self.root.of(event);
        for segment in &self.segments {
            value = match value {
                Value::Object(map) => map.get(segment)?,
                Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        (!value.is_null()).then_some(value)
    }
}

impl FieldPath {
    /// For `properties.x…` and `person.properties.x…`: whether it is a person property, and `x`.
    pub fn property(&self) -> Option<(bool, &str)> {
        let first = self.segments.first()?;
        match self.root {
            Field::Properties => Some((false, first)),
            Field::PersonProperties => Some((true, first)),
            _ => None,
        }
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn split_segments(text: &str) -> Result<Vec<String>, PathError> {
    let error = |message: String, hint: &str| PathError {
        message,
        hint: Some(hint.to_string()),
    };
    let mut segments = Vec::new();
    let mut rest = text;
    loop {
        let segment;
        if let Some(inner) = rest.strip_prefix('[') {
            let Some(end) = inner.find(']') else {
                return Err(error(
                    format!("`{text}` opens a `[` that is never closed"),
                    "write a name containing dots in brackets: `properties.[utm.source]`",
                ));
            };
            segment = &inner[..end];
            rest = &inner[end + 1..];
            if !(rest.is_empty() || rest.starts_with('.')) {
                return Err(error(
                    format!("`{text}` has text right after `]`"),
                    "put a dot between names: `properties.[a.b].c`",
                ));
            }
        } else {
            let end = rest.find('.').unwrap_or(rest.len());
            segment = &rest[..end];
            rest = &rest[end..];
        }
        if segment.is_empty() {
            return Err(error(
                format!("`{text}` has an empty name between dots"),
                "a field looks like `properties.feature_name`",
            ));
        }
        segments.push(segment.to_string());
        match rest.strip_prefix('.') {
            Some(after) => rest = after,
            None => return Ok(segments),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> Event {
        Event {
            name: json!("feature_used"),
            uuid: json!("u-1"),
            distinct_id: json!("user_1"),
            timestamp: json!("2025-06-14T09:21:33.412Z"),
            time: "2025-06-14T09:21:33.412Z".parse().unwrap(),
            properties: json!({"$lib": "web", "utm.source": "news", "$set": {"email": "a@b.c"}, "tags": ["x", "y"], "gone": null}),
            person_properties: json!({"email": "dana@example.com"}),
            elements_chain: Value::Null,
            source: json!("posthog"),
        }
    }

    fn get(path: &str) -> Option<Value> {
        FieldPath::parse(path).unwrap().lookup(&event()).cloned()
    }

    #[test]
    fn looks_up_every_root() {
        assert_eq!(get("event"), Some(json!("feature_used")));
        assert_eq!(get("uuid"), Some(json!("u-1")));
        assert_eq!(get("distinct_id"), Some(json!("user_1")));
        assert_eq!(get("timestamp"), Some(json!("2025-06-14T09:21:33.412Z")));
        assert_eq!(
            get("person.properties.email"),
            Some(json!("dana@example.com"))
        );
    }

    #[test]
    fn dollar_names_nesting_brackets_and_arrays() {
        assert_eq!(get("properties.$lib"), Some(json!("web")));
        assert_eq!(get("properties.$set.email"), Some(json!("a@b.c")));
        assert_eq!(get("properties.[utm.source]"), Some(json!("news")));
        assert_eq!(get("properties.tags.1"), Some(json!("y")));
        assert_eq!(get("properties.tags.9"), None);
        assert_eq!(get("properties.gone"), None);
        assert_eq!(get("properties.missing"), None);
    }

    #[test]
    fn rejects_unknown_roots_with_a_hint() {
        let e = FieldPath::parse("propreties.x").unwrap_err();
        assert_eq!(e.hint.as_deref(), Some("did you mean `properties`?"));
        let e = FieldPath::parse("person.email").unwrap_err();
        assert!(e.hint.unwrap().contains("person.properties.email"));
        assert!(FieldPath::parse("event.name").is_err());
        assert!(FieldPath::parse("properties..x").is_err());
        assert!(FieldPath::parse("properties.[a.b").is_err());
        assert!(FieldPath::parse("").is_err());
    }
}
