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

impl Test {
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
    fn exists_and_missing() {
        assert!(check(Test::Exists(true), Some(json!(""))));
        assert!(check(Test::Exists(false), None));
        assert!(!check(Test::Exists(true), None));
    }
}
