//! Compiled `[when]` conditions and how an event is tested against them.
//!
//! Everything here is built once at load time (regexes compiled, dates parsed, paths split); a
//! test while handling an event only compares values.

use chrono::{DateTime, Utc};
use regex::Regex;
use serde_json::Value;

use crate::ingest::event::Event;
use crate::ingest::path::FieldPath;
use crate::units::parse_timestamp;

/// A compiled condition tree.
#[derive(Debug, Clone)]
pub enum Condition {
    /// Every condition holds (an empty list holds).
    All(Vec<Condition>),
    /// At least one condition holds.
    Any(Vec<Condition>),
    /// The condition does not hold.
    Not(Box<Condition>),
    /// A test on one field.
    Field { path: FieldPath, test: Test },
}

/// A test on one field's value. Tests other than `NotEquals`, `NotIn` and `Exists(false)` fail
/// when the event does not have the field.
#[derive(Debug, Clone)]
pub enum Test {
    Equals(Value),
    NotEquals(Value),
    In(Vec<Value>),
    NotIn(Vec<Value>),
    Contains(Value),
    StartsWith(String),
    EndsWith(String),
    Matches(Regex),
    Gt(f64),
    Gte(f64),
    Lt(f64),
    Lte(f64),
    Before(DateTime<Utc>),
    After(DateTime<Utc>),
    Exists(bool),
}

impl Condition {
    /// Every field path the condition tests.
    pub fn paths(&self) -> Vec<&FieldPath> {
        match self {
            Condition::All(list) | Condition::Any(list) => {
                list.iter().flat_map(Condition::paths).collect()
            }
            Condition::Not(inner) => inner.paths(),
            Condition::Field { path, .. } => vec![path],
        }
    }

    /// Whether `event` satisfies this condition.
    pub fn holds(&self, event: &Event) -> bool {
        match self {
            Condition::All(list) => list.iter().all(|c| c.holds(event)),
            Condition::Any(list) => list.iter().any(|c| c.holds(event)),
            Condition::Not(c) => !c.holds(event),
            Condition::Field { path, test } => test.holds(path.lookup(event)),
        }
    }
}

impl Condition {
    /// Why `event` does not satisfy this condition, in words, with the value it has: the first
    /// part that fails (for `any`, every alternative); `None` if it holds.
    pub fn why_not(&self, event: &Event) -> Option<String> {
        match self {
            Condition::All(list) => list.iter().find_map(|c| c.why_not(event)),
            Condition::Any(list) => {
                let reasons: Option<Vec<String>> = list.iter().map(|c| c.why_not(event)).collect();
                reasons.map(|r| format!("none of its alternatives holds: {}", r.join("; or ")))
            }
            Condition::Not(inner) => inner.holds(event).then(|| {
                format!(
                    "it must not be that {}, and it is",
                    inner
                        .describe()
                        .unwrap_or_else(|| "all of these hold".into())
                )
            }),
            Condition::Field { path, test } => {
                let value = path.lookup(event);
                if test.holds(value) {
                    return None;
                }
                Some(match value {
                    Some(v) => format!("`{path}` is {}; the rule wants {}", shown(v), test.wants()),
                    None => format!("the event has no `{path}`; the rule wants {}", test.wants()),
                })
            }
        }
    }

    /// What a single test asks, in words (`None` for a group of tests).
    fn describe(&self) -> Option<String> {
        match self {
            Condition::Field { path, test } => Some(format!("`{path}` is {}", test.wants())),
            Condition::All(list) if list.len() == 1 => list[0].describe(),
            _ => None,
        }
    }
}

/// A value as `why_not` shows it: JSON, cut at 100 characters.
fn shown(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(100) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

impl Test {
    /// What the test asks of a value, in words.
    fn wants(&self) -> String {
        let list = |l: &[Value]| l.iter().map(shown).collect::<Vec<_>>().join(", ");
        match self {
            Test::Equals(v) => shown(v),
            Test::NotEquals(v) => format!("anything but {}", shown(v)),
            Test::In(l) => format!("one of {}", list(l)),
            Test::NotIn(l) => format!("none of {}", list(l)),
            Test::Contains(v) => format!("something containing {}", shown(v)),
            Test::StartsWith(w) => format!("text starting with {w:?}"),
            Test::EndsWith(w) => format!("text ending with {w:?}"),
            Test::Matches(re) => format!("text matching '{}'", re.as_str()),
            Test::Gt(n) => format!("a number above {n}"),
            Test::Gte(n) => format!("a number of at least {n}"),
            Test::Lt(n) => format!("a number below {n}"),
            Test::Lte(n) => format!("a number of at most {n}"),
            Test::Before(t) => format!("a time before {}", t.to_rfc3339()),
            Test::After(t) => format!("a time after {}", t.to_rfc3339()),
            Test::Exists(true) => "it to be there".into(),
            Test::Exists(false) => "it not to be there".into(),
        }
    }

    fn holds(&self, value: Option<&Value>) -> bool {
        let Some(value) = value else {
            return matches!(
                self,
                Test::NotEquals(_) | Test::NotIn(_) | Test::Exists(false)
            );
        };
        match self {
            Test::Equals(want) => same(value, want),
            Test::NotEquals(want) => !same(value, want),
            Test::In(list) => list.iter().any(|w| same(value, w)),
            Test::NotIn(list) => !list.iter().any(|w| same(value, w)),
            Test::Contains(want) => match (value, want) {
                (Value::String(s), Value::String(w)) => s.contains(w.as_str()),
                (Value::Array(items), _) => items.iter().any(|i| same(i, want)),
                _ => false,
            },
            Test::StartsWith(w) => value.as_str().is_some_and(|s| s.starts_with(w.as_str())),
            Test::EndsWith(w) => value.as_str().is_some_and(|s| s.ends_with(w.as_str())),
            Test::Matches(re) => value.as_str().is_some_and(|s| re.is_match(s)),
            Test::Gt(n) => number(value).is_some_and(|v| v > *n),
            Test::Gte(n) => number(value).is_some_and(|v| v >= *n),
            Test::Lt(n) => number(value).is_some_and(|v| v < *n),
            Test::Lte(n) => number(value).is_some_and(|v| v <= *n),
            Test::Before(t) => date(value).is_some_and(|v| v < *t),
            Test::After(t) => date(value).is_some_and(|v| v > *t),
            Test::Exists(present) => *present,
        }
    }
}

/// Equality as a rule author expects it: numbers by value (`5` equals `5.0`), everything else
/// exactly; text never equals a number.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// A number, or text that is a number (`"42"`), as PostHog properties often carry numbers as text.
fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// An ISO 8601 date in text, or a number of seconds since 1970 (PostHog's `$time`).
fn date(value: &Value) -> Option<DateTime<Utc>> {
    match value {
        Value::String(s) => parse_timestamp(s),
        Value::Number(n) => {
            let secs = n.as_f64()?;
            DateTime::from_timestamp_millis((secs * 1000.0) as i64)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(test: Test, value: Option<Value>) -> bool {
        test.holds(value.as_ref())
    }

    #[test]
    fn equality_and_lists() {
        assert!(check(Test::Equals(json!(5)), Some(json!(5.0))));
        assert!(!check(Test::Equals(json!("5")), Some(json!(5))));
        assert!(check(
            Test::In(vec![json!("a"), json!("b")]),
            Some(json!("b"))
        ));
        assert!(check(Test::NotIn(vec![json!("a")]), None));
        assert!(check(Test::NotEquals(json!("a")), None));
        assert!(!check(Test::Equals(json!("a")), None));
    }

    #[test]
    fn text_tests() {
        assert!(check(Test::Contains(json!("oo")), Some(json!("food"))));
        assert!(check(Test::Contains(json!(2)), Some(json!([1, 2]))));
        assert!(check(
            Test::StartsWith("$".into()),
            Some(json!("$pageview"))
        ));
        assert!(check(
            Test::EndsWith("@x.com".into()),
            Some(json!("a@x.com"))
        ));
        assert!(check(
            Test::Matches(Regex::new("^v[0-9]+$").unwrap()),
            Some(json!("v12"))
        ));
        assert!(!check(
            Test::Matches(Regex::new("x").unwrap()),
            Some(json!(1))
        ));
    }

    #[test]
    fn numbers_and_dates() {
        assert!(check(Test::Gt(5000.0), Some(json!(30000))));
        assert!(check(Test::Lte(3.0), Some(json!("3"))));
        assert!(!check(Test::Lt(3.0), Some(json!("three"))));
        let t = parse_timestamp("2025-06-14T00:00:00Z").unwrap();
        assert!(check(
            Test::After(t),
            Some(json!("2025-06-14T09:21:33.412Z"))
        ));
        assert!(check(Test::Before(t), Some(json!(1_700_000_000.5))));
    }

    #[test]
    fn why_not_names_the_first_failing_test_with_the_value() {
        let body = json!({
            "event": "feature_used", "distinct_id": "dana",
            "properties": {"feature": "import", "seats": 3},
        });
        let limits = crate::ingest::event::BodyLimits::LOCAL_FILES;
        let events = crate::ingest::event::decode(body.to_string().as_bytes(), Utc::now(), &limits);
        let event = &events.unwrap()[0];
        let field = |path: &str, test| Condition::Field {
            path: FieldPath::parse(path).unwrap(),
            test,
        };
        let all = Condition::All(vec![
            field("properties.seats", Test::Gte(1.0)),
            field("properties.feature", Test::Equals(json!("export"))),
            field("properties.plan", Test::Equals(json!("pro"))),
        ]);
        assert_eq!(
            all.why_not(event).unwrap(),
            "`properties.feature` is \"import\"; the rule wants \"export\""
        );
        let missing = field(
            "properties.plan",
            Test::In(vec![json!("pro"), json!("team")]),
        );
        assert_eq!(
            missing.why_not(event).unwrap(),
            "the event has no `properties.plan`; the rule wants one of \"pro\", \"team\""
        );
        let not = Condition::Not(Box::new(field("properties.seats", Test::Lt(5.0))));
        assert_eq!(
            not.why_not(event).unwrap(),
            "it must not be that `properties.seats` is a number below 5, and it is"
        );
        let any = Condition::Any(vec![missing, field("properties.seats", Test::Gt(10.0))]);
        assert!(
            any.why_not(event)
                .unwrap()
                .contains("; or `properties.seats` is 3")
        );
        assert_eq!(
            field("properties.seats", Test::Gte(1.0)).why_not(event),
            None
        );
    }

    #[test]
    fn exists_and_missing() {
        assert!(check(Test::Exists(true), Some(json!(""))));
        assert!(check(Test::Exists(false), None));
        assert!(!check(Test::Exists(true), None));
    }
}
