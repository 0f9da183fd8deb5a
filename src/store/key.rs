//! The key of one piece of rule state: a rule's name, a kind of state and field values.

use sha2::{Digest, Sha256};
use std::fmt::Write;

/// A key in the store: a rule name, a kind of state and field values, encoded unambiguously.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateKey(String);

/// Field values longer than this (encoded) are kept as their SHA-256 digest, so a sender cannot
/// make a rule store large strings: a key stays under about 100 bytes plus the rule's name.
pub const MAX_VALUES_BYTES: usize = 128;

impl StateKey {
    /// The key for `kind` ("count", "once") of `rule` at these field values.
    /// Long values are replaced by their digest under the kind `KIND#sha256`, which no short key
    /// has, so the two forms never collide.
    pub fn new(rule: &str, kind: &str, values: &[&serde_json::Value]) -> StateKey {
        // One buffer for the values (each after a comma), written straight from the values.
        let mut encoded = String::with_capacity(32);
        for v in values {
            encoded.push(',');
            match v {
                // The same text as `{v}`, without the formatting machinery: most values are.
                serde_json::Value::String(s) => push_json_str(&mut encoded, s),
                _ => {
                    let _ = write!(encoded, "{v}");
                }
            }
        }
        let mut key = String::with_capacity(rule.len() + kind.len() + encoded.len().min(80) + 12);
        key.push('[');
        push_json_str(&mut key, rule);
        key.push(',');
        if encoded.len() > MAX_VALUES_BYTES {
            let digest = Sha256::digest(&encoded.as_bytes()[1..]);
            push_json_str(&mut key, &format!("{kind}#sha256"));
            let _ = write!(key, ",\"{digest:x}\"]");
            return StateKey(key);
        }
        push_json_str(&mut key, kind);
        key.push_str(&encoded);
        key.push(']');
        StateKey(key)
    }

    /// Whether `value` is one of the key's values, as text: a key of `per = ["distinct_id"]`
    /// holds the person's id, one of `per = ["properties.company"]` or `once_per = []` does not.
    /// A key of long values, kept as their digest, holds none that can be told.
    pub fn holds(&self, value: &str) -> bool {
        let mut quoted = String::with_capacity(value.len() + 2);
        push_json_str(&mut quoted, value);
        // Values come after the rule and the kind, each after a comma; the last before `]`.
        self.0.match_indices(quoted.as_str()).any(|(at, _)| {
            let end = at + quoted.len();
            self.0[..at].ends_with(',')
                && matches!(self.0.as_bytes().get(end), Some(b',' | b']'))
                && self.0[..at].matches(',').count() >= 2
        })
    }

    /// The encoded key.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A key as a store gave it back (made by [`StateKey::new`] before).
    pub fn stored(encoded: &str) -> StateKey {
        StateKey(encoded.to_string())
    }

    /// What every key of `kind` of `rule` starts with (long values' kind `KIND#sha256` too), to
    /// find them all in a sorted store.
    pub fn prefix(rule: &str, kind: &str) -> String {
        format!("[{},\"{kind}", serde_json::Value::from(rule))
    }
}

/// Appends `s` as a JSON string: as it is between quotes when nothing in it needs escaping (rule
/// names and kinds, nearly always), else escaped by serde_json.
fn push_json_str(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::Value::from(s).to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_do_not_collide_across_rules_kinds_or_types() {
        let a = StateKey::new("r", "count", &[&json!("1")]);
        assert_ne!(a, StateKey::new("r", "count", &[&json!(1)]));
        assert_ne!(a, StateKey::new("r", "once", &[&json!("1")]));
        assert_ne!(
            StateKey::new("a,b", "count", &[]),
            StateKey::new("a", "count", &[&json!("b")])
        );
    }

    #[test]
    fn long_values_are_kept_as_a_digest() {
        let long = json!("x".repeat(10_000));
        let key = StateKey::new("r", "count", &[&long]);
        assert!(key.as_str().len() < 100, "{}", key.as_str());
        assert_ne!(
            key,
            StateKey::new("r", "count", &[&json!("x".repeat(9_999))])
        );
        assert_eq!(key, StateKey::new("r", "count", &[&long]));
        // Short keys are written as they always were, so databases from before still match.
        assert_eq!(
            StateKey::new("r", "once", &[&json!("a"), &json!(1)]).as_str(),
            r#"["r","once","a",1]"#
        );
        assert_eq!(
            StateKey::new("say \"hi\"\n", "count", &[&json!({"a": [1, "é"]})]).as_str(),
            r#"["say \"hi\"\n","count",{"a":[1,"é"]}]"#
        );
        assert_eq!(
            StateKey::new("r", "once", &[&json!("tab\tquote\"é")]).as_str(),
            r#"["r","once","tab\tquote\"é"]"#
        );
        // And long ones too (the digest of the values, comma-separated).
        let long = json!("y".repeat(200));
        let digest = Sha256::digest(format!("{long},1").as_bytes());
        assert_eq!(
            StateKey::new("r", "count", &[&long, &json!(1)]).as_str(),
            format!("[\"r\",\"count#sha256\",\"{digest:x}\"]")
        );
    }

    #[test]
    fn a_key_holds_a_value_only_as_one_of_its_values() {
        let dana = serde_json::json!("dana");
        let key = StateKey::new("r", "count", &[&dana, &serde_json::json!("export")]);
        assert!(key.holds("dana") && key.holds("export"));
        assert!(!key.holds("dan") && !key.holds("count") && !key.holds("r"));
        // The rule's own name is not a value.
        assert!(!StateKey::new("dana", "once", &[]).holds("dana"));
        assert!(!StateKey::new("r", "once", &[&serde_json::json!("acme")]).holds("dana"));
    }
}
