//! Lengths of time and dates as people write them: in rule files (`within = "7 days"`), test
//! files (`after = "3 days"`), flags and `tripline.toml` (`request_timeout = "10s"`), and in the
//! events themselves (`timestamp`). One reader for each, so that every place accepts the same
//! forms and explains them with the same examples.

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use std::time::Duration;

/// How a length of time is written, for messages.
pub const DURATION_EXAMPLES: &str = "\"30 minutes\", \"24 hours\", \"7 days\" or \"1h 30m\"";

/// Why a length of time was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("this length of time is zero")]
    Zero,
    /// What the parser said was wrong.
    #[error("this is not a length of time tripline can read ({0})")]
    Unreadable(String),
}

/// A length of time longer than zero: "30 minutes", "24h", "7 days", "1h 30m" (humantime's
/// forms).
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.is_zero() => Err(DurationError::Zero),
        Ok(d) => Ok(d),
        Err(e) => Err(DurationError::Unreadable(e.to_string())),
    }
}

/// A length of time as [`parse_duration`] reads it ("7days", "1h 30m").
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A length of time in words, to the second, for people: "3 days 2 hours", "30 minutes",
/// "1 second" ("0 seconds" under a second).
pub fn duration_in_words(d: Duration) -> String {
    let mut left = d.as_secs();
    let mut parts = Vec::new();
    for (unit, secs) in [
        ("day", 86_400),
        ("hour", 3_600),
        ("minute", 60),
        ("second", 1),
    ] {
        let n = left / secs;
        left %= secs;
        if n > 0 {
            parts.push(format!("{n} {unit}{}", if n == 1 { "" } else { "s" }));
        }
    }
    match parts.is_empty() {
        true => "0 seconds".into(),
        false => parts.join(" "),
    }
}

/// Parses the timestamp forms PostHog is known to send: RFC 3339 with 0–9 fractional digits and
/// `Z` or an offset, the same without an offset (taken as UTC), ClickHouse's `YYYY-MM-DD HH:MM:SS`,
/// and a bare date.
pub fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// A local time of day as rules write it: `09:00`, or `09:00:30` (24-hour clock).
pub fn parse_time_of_day(text: &str) -> Option<NaiveTime> {
    let text = text.trim();
    NaiveTime::parse_from_str(text, "%H:%M")
        .or_else(|_| NaiveTime::parse_from_str(text, "%H:%M:%S"))
        .ok()
}

/// A TOML value as JSON (dates become RFC 3339 text).
pub fn toml_to_json_value(v: &toml::Value) -> serde_json::Value {
    match v {
        toml::Value::String(s) => serde_json::Value::String(s.clone()),
        toml::Value::Integer(i) => serde_json::json!(i),
        toml::Value::Float(f) => serde_json::json!(f),
        toml::Value::Boolean(b) => serde_json::Value::Bool(*b),
        toml::Value::Datetime(d) => serde_json::Value::String(d.to_string()),
        toml::Value::Array(a) => {
            serde_json::Value::Array(a.iter().map(toml_to_json_value).collect())
        }
        toml::Value::Table(t) => serde_json::Value::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json_value(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_of_time_as_people_write_them() {
        assert_eq!(parse_duration(" 1h 30m "), Ok(Duration::from_secs(5400)));
        assert_eq!(
            parse_duration("7 days"),
            Ok(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(parse_duration("0s"), Err(DurationError::Zero));
        assert!(matches!(
            parse_duration("soon"),
            Err(DurationError::Unreadable(_))
        ));
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h 30m");
        assert_eq!(
            duration_in_words(Duration::from_millis(90_061_500)),
            "1 day 1 hour 1 minute 1 second"
        );
        assert_eq!(duration_in_words(Duration::from_secs(7200)), "2 hours");
        assert_eq!(duration_in_words(Duration::from_millis(300)), "0 seconds");
    }
}
