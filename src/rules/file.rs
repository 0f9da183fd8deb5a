//! The rule file as written: serde types that mirror the TOML one to one.
//!
//! Unknown keys are errors (`deny_unknown_fields`), and values that a later check must point at
//! keep their byte span (`Spanned`). Turning these into runnable rules is `compile.rs`'s job.
//! Each action's table is its kind's own (`actions/<kind>/`).

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;
use std::sync::LazyLock;
use toml::Spanned;

use crate::actions::{self, Table};

/// One `rules/*.toml` file: one rule.
#[derive(Debug)]
pub struct RuleFile {
    /// The rule's identity: counters and once-keys are stored under it.
    pub name: Spanned<String>,
    /// Free text for people reading the rule.
    pub description: Option<String>,
    /// Which events the rule looks at.
    pub when: Spanned<WhenConfig>,
    /// Act only once a counter reaches a threshold.
    pub count: Option<CountConfig>,
    /// Limits on how often the rule acts.
    pub limits: Option<Spanned<LimitsConfig>>,
    /// Act later: after a while, unless or once another event comes.
    pub wait: Option<Spanned<WaitConfig>>,
    /// Run the actions only on these days and hours; hold them until then otherwise.
    pub send_window: Option<Spanned<SendWindowConfig>>,
    /// Collect the matching events and act once per period with all of them.
    pub digest: Option<Spanned<DigestConfig>>,
    /// What the rule does: one table per kind of action (`[email]`, `[jsonl]`), in file order.
    pub actions: Vec<Table>,
}

/// The keys of a rule file that are not actions.
const RULE_KEYS: &[&str] = &[
    "name",
    "description",
    "when",
    "count",
    "limits",
    "wait",
    "send_window",
    "digest",
];

/// Every key a rule file may have, for "unknown key" messages.
static ALL_KEYS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    let mut keys = RULE_KEYS.to_vec();
    keys.extend(actions::tables());
    keys
});

/// A key of a rule file, refused at once if unknown (so that the error points at the key).
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                match ALL_KEYS.contains(&v) {
                    true => Ok(Key(v.to_string())),
                    false => Err(E::unknown_field(v, ALL_KEYS.as_slice())),
                }
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// By hand rather than derived, so that the action tables come from the action list
/// (`actions::parse_table`); unknown keys are refused as `deny_unknown_fields` would.
impl<'de> Deserialize<'de> for RuleFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RuleVisitor;
        impl<'de> Visitor<'de> for RuleVisitor {
            type Value = RuleFile;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a rule")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RuleFile, A::Error> {
                let (mut name, mut description, mut when, mut count, mut limits, mut wait) =
                    (None, None, None, None, None, None);
                let (mut send_window, mut digest) = (None, None);
                let mut actions = Vec::new();
                while let Some(Key(key)) = map.next_key()? {
                    match key.as_str() {
                        "name" => name = Some(map.next_value()?),
                        "description" => description = Some(map.next_value()?),
                        "when" => when = Some(map.next_value()?),
                        "count" => count = Some(map.next_value()?),
                        "limits" => limits = Some(map.next_value()?),
                        "wait" => wait = Some(map.next_value()?),
                        "send_window" => send_window = Some(map.next_value()?),
                        "digest" => digest = Some(map.next_value()?),
                        other => match actions::parse_table(other, &mut map)? {
                            Some(table) => actions.push(table),
                            None => {
                                return Err(de::Error::unknown_field(other, ALL_KEYS.as_slice()));
                            }
                        },
                    }
                }
                Ok(RuleFile {
                    name: name.ok_or_else(|| de::Error::missing_field("name"))?,
                    description,
                    when: when.ok_or_else(|| de::Error::missing_field("when"))?,
                    count,
                    limits,
                    wait,
                    send_window,
                    digest,
                    actions,
                })
            }
        }
        deserializer.deserialize_map(RuleVisitor)
    }
}

/// A `[when]` table: field conditions, all of which must hold, plus `all`, `any` and `not`.
#[derive(Debug, Default)]
pub struct WhenConfig {
    pub entries: Vec<(Spanned<String>, WhenEntry)>,
}

/// One key of a `[when]` table.
#[derive(Debug)]
pub enum WhenEntry {
    /// `"properties.x" = ...`
    Field(Spanned<ConditionConfig>),
    /// `all = [ {...}, {...} ]`: every table holds.
    All(Vec<Spanned<WhenConfig>>),
    /// `any = [ {...}, {...} ]`: at least one table holds.
    Any(Vec<Spanned<WhenConfig>>),
    /// `not = {...}`: the table does not hold.
    Not(Box<Spanned<WhenConfig>>),
}

/// What a field must be: a plain value (equals), a list (one of), or a table of operators.
#[derive(Debug)]
pub enum ConditionConfig {
    Equals(toml::Value),
    OneOf(Vec<toml::Value>),
    Operators(Box<OperatorsConfig>),
}

/// `{ gt = 5, lt = 10 }`: every operator given must hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorsConfig {
    /// The field equals this value.
    pub equals: Option<Spanned<toml::Value>>,
    /// The field is missing or differs from this value.
    pub not_equals: Option<Spanned<toml::Value>>,
    /// The field equals one of these values.
    #[serde(rename = "in")]
    pub in_: Option<Spanned<Vec<toml::Value>>>,
    /// The field is missing or equals none of these values.
    pub not_in: Option<Spanned<Vec<toml::Value>>>,
    /// Text contains this text, or a list contains this value.
    pub contains: Option<Spanned<toml::Value>>,
    /// Text starts with this text.
    pub starts_with: Option<Spanned<String>>,
    /// Text ends with this text.
    pub ends_with: Option<Spanned<String>>,
    /// Text matches this regular expression.
    pub matches: Option<Spanned<String>>,
    /// Number greater than.
    pub gt: Option<Spanned<f64>>,
    /// Number greater than or equal to.
    pub gte: Option<Spanned<f64>>,
    /// Number less than.
    pub lt: Option<Spanned<f64>>,
    /// Number less than or equal to.
    pub lte: Option<Spanned<f64>>,
    /// Date strictly before this date.
    pub before: Option<Spanned<toml::Value>>,
    /// Date strictly after this date.
    pub after: Option<Spanned<toml::Value>>,
    /// `true`: the field is present; `false`: it is missing.
    pub exists: Option<Spanned<bool>>,
}

/// `[count]`: count matching events per key; act from the `at_least`-th on.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountConfig {
    /// The fields whose values make the counter's key.
    pub per: Vec<Spanned<String>>,
    /// The count at which the rule starts acting.
    pub at_least: Spanned<i64>,
    /// Count only the events within this long before each event ("7 days", "24h").
    #[serde(default)]
    pub within: Option<Spanned<String>>,
    /// Count per calendar period instead: "day", "week" or "month".
    #[serde(default, rename = "in")]
    pub in_: Option<Spanned<String>>,
    /// The time zone of the periods: an IANA name, or a field holding one.
    #[serde(default)]
    pub timezone: Option<Spanned<String>>,
    /// The zone for events without one, when `timezone` names a field (UTC by default).
    #[serde(default)]
    pub timezone_fallback: Option<Spanned<String>>,
    /// Count the different values of this field instead of the events.
    #[serde(default)]
    pub distinct: Option<Spanned<String>>,
}

/// `[limits]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Act at most once for each combination of these fields' values.
    #[serde(default)]
    pub once_per: Option<Vec<Spanned<String>>>,
    /// Count the rule's actions against this frequency cap (declared in `rules/_caps.toml`).
    #[serde(default)]
    pub cap_group: Option<Spanned<String>>,
    /// Allow acting again for the same values this long after the last time ("7 days").
    #[serde(default)]
    pub again_after: Option<Spanned<String>>,
    /// Act at most once per calendar period for the same values: "day", "week" or "month".
    #[serde(default)]
    pub once_per_period: Option<Spanned<String>>,
    /// The time zone of the periods: an IANA name, or a field holding one.
    #[serde(default)]
    pub timezone: Option<Spanned<String>>,
    /// The zone for events without one, when `timezone` names a field (UTC by default).
    #[serde(default)]
    pub timezone_fallback: Option<Spanned<String>>,
}

/// `[wait]`: the rule acts some time after its triggering event, or when a later event comes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitConfig {
    /// How long after the triggering event ("30 minutes").
    #[serde(rename = "for")]
    pub for_: Spanned<String>,
    /// The fields whose values a later event must share to belong to the same wait.
    #[serde(default)]
    pub same: Option<Vec<Spanned<String>>>,
    /// An event that cancels the wait (absence): the actions run when it ends without one.
    #[serde(default)]
    pub unless: Option<Spanned<WhenConfig>>,
    /// An event that completes the wait (sequence): the actions run when it comes in time.
    #[serde(default)]
    pub until: Option<Spanned<WhenConfig>>,
    /// A check on the latest event seen when the wait ends: act only if it holds.
    #[serde(default)]
    pub then: Option<Spanned<WhenConfig>>,
    /// What a triggering event does while a wait is already pending for its values.
    #[serde(default)]
    pub if_pending: Option<IfPending>,
}

/// What a triggering event does while a wait is pending for the same values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IfPending {
    /// The wait starts again from this event (what abandonment needs: the latest checkout counts).
    #[default]
    Restart,
    /// The first wait goes on; this event only counts as the latest one seen.
    Keep,
}

impl<'de> Deserialize<'de> for WhenConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WhenVisitor;
        impl<'de> Visitor<'de> for WhenVisitor {
            type Value = WhenConfig;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table of conditions, like { \"properties.plan\" = \"pro\" }")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WhenConfig, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    let entry = match key.get_ref().as_str() {
                        "all" => WhenEntry::All(map.next_value()?),
                        "any" => WhenEntry::Any(map.next_value()?),
                        "not" => WhenEntry::Not(Box::new(map.next_value()?)),
                        _ => WhenEntry::Field(map.next_value()?),
                    };
                    entries.push((key, entry));
                }
                Ok(WhenConfig { entries })
            }
        }
        deserializer.deserialize_map(WhenVisitor)
    }
}

impl<'de> Deserialize<'de> for ConditionConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ConditionVisitor;
        impl<'de> Visitor<'de> for ConditionVisitor {
            type Value = ConditionConfig;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value, a list of values, or a table of operators like { gt = 5 }")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(ConditionConfig::Equals(toml::Value::Boolean(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(ConditionConfig::Equals(toml::Value::Integer(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(ConditionConfig::Equals(toml::Value::Float(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ConditionConfig::Equals(toml::Value::String(v.to_string())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))
                    .map(ConditionConfig::OneOf)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Deserialize::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(ConditionConfig::Operators)
            }
        }
        deserializer.deserialize_any(ConditionVisitor)
    }
}

/// One group of `rules/_caps.toml`: at most `at_most` actions per period per recipient, shared
/// by every rule whose `[limits]` names the group.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapConfig {
    /// The most actions per period and recipient.
    pub at_most: Spanned<i64>,
    /// "day", "week" or "month".
    pub per_period: Spanned<String>,
    /// The fields that say who the recipient is (default `["distinct_id"]`).
    #[serde(default)]
    pub per: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub timezone: Option<Spanned<String>>,
    #[serde(default)]
    pub timezone_fallback: Option<Spanned<String>>,
}

/// `[send_window]`: the days and hours when the rule's actions may run.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendWindowConfig {
    /// "mon" ... "sun" (every day when absent).
    #[serde(default)]
    pub days: Option<Spanned<Vec<String>>>,
    /// "09:00-18:00", local time.
    pub hours: Spanned<String>,
    #[serde(default)]
    pub timezone: Option<Spanned<String>>,
    #[serde(default)]
    pub timezone_fallback: Option<Spanned<String>>,
}

/// `[digest]`: the matching events are collected, and the actions run once per period with all
/// of them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigestConfig {
    /// "1 day" or "1 week" (on Mondays).
    pub every: Spanned<String>,
    /// The local time it is sent: "09:00" (or "09:00:30").
    pub at: Spanned<String>,
    #[serde(default)]
    pub timezone: Option<Spanned<String>>,
    #[serde(default)]
    pub timezone_fallback: Option<Spanned<String>>,
    /// One digest per combination of these fields' values (one for the whole rule without).
    #[serde(default)]
    pub per: Option<Vec<Spanned<String>>>,
    /// How many events a digest lists at most (the total counts them all).
    #[serde(default)]
    pub keep: Option<Spanned<i64>>,
}
