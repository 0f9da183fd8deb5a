//! Checks, when rules load, what a rule's email templates use: fields that no event can have
//! (`{{propreties.plan}}`), likely typos of known fields (`{{person.properties.emial}}`),
//! `{{count}}` in a rule that does not count, helpers that are not allowed, and includes.
//!
//! Whether a given event has a field is only known when it arrives; then a missing field fails
//! the email with its reason (see `engine.rs`). What can be caught from the files is caught here.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::Path;

use crate::actions::email::templates::{HELPERS, Reference, ReferenceKind};
use crate::diag::{Diagnostic, did_you_mean};
use crate::ingest::elements::KEYS as ELEMENT_KEYS;
use crate::ingest::event::Field;
use crate::ingest::path::FieldPath;

/// What a template may name at its top level: the event's fields (a person's under `person`)
/// and `count`.
fn roots() -> impl Iterator<Item = &'static str> {
    Field::ALL
        .into_iter()
        .filter_map(|f| f.name().split('.').next())
        .chain(["elements", "count", "until", "waited", "events", "events_count"])
}

/// Person properties PostHog users commonly set: typos of these are caught.
const PERSON_PROPERTIES: &[&str] = &[
    "email",
    "name",
    "first_name",
    "last_name",
    "plan",
    "company",
    "role",
    "language",
    "$geoip_country_code",
    "$geoip_city_name",
];

/// Event properties PostHog's libraries send: typos of these are caught.
const EVENT_PROPERTIES: &[&str] = &[
    "$current_url",
    "$pathname",
    "$host",
    "$browser",
    "$os",
    "$device_type",
    "$referrer",
    "$referring_domain",
    "$lib",
    "$session_id",
    "utm_source",
    "utm_medium",
    "utm_campaign",
];

/// The property names a rule is known to deal with: the ones it names anywhere (conditions,
/// counters, limits, output fields) and PostHog's common ones.
pub struct Known {
    event: BTreeSet<String>,
    person: BTreeSet<String>,
    has_count: bool,
    /// `[wait]`: `waited` is filled in; with `until`, the completing event too.
    wait: Option<bool>,
    /// `[digest]`: `events` and `events_count` are filled in.
    pub digest: bool,
}

impl Known {
    /// From every path the rule names, and whether it has `[count]`.
    pub fn new<'a>(paths: impl IntoIterator<Item = &'a FieldPath>, has_count: bool) -> Known {
        let mut known = Known {
            event: EVENT_PROPERTIES.iter().map(|s| s.to_string()).collect(),
            person: PERSON_PROPERTIES.iter().map(|s| s.to_string()).collect(),
            has_count,
            wait: None,
            digest: false,
        };
        for path in paths {
            match path.property() {
                Some((true, name)) => known.person.insert(name.to_string()),
                Some((false, name)) => known.event.insert(name.to_string()),
                None => false,
            };
        }
        known
    }

    /// For a rule with `[digest]`.
    pub fn digest(mut self) -> Known {
        self.digest = true;
        self
    }

    /// For a rule with `[wait]` (`until`: whether it completes on an event).
    pub fn waiting(mut self, until: bool) -> Known {
        self.wait = Some(until);
        self
    }
}

/// Where a template's text is, to point at it.
pub enum Place<'a> {
    /// A one-line template in the rule file (`to`, `subject`), at this byte span.
    Rule {
        file: &'a Path,
        source: &'a str,
        span: Range<usize>,
    },
    /// A template file; references carry their own line and column.
    File { file: &'a Path, source: &'a str },
}

/// Adds a diagnostic for each problem among `references`.
pub fn check(references: &[Reference], known: &Known, place: &Place, out: &mut Vec<Diagnostic>) {
    for r in references {
        let Some((message, hint)) = problem(r, known) else {
            continue;
        };
        let d = match place {
            Place::Rule { file, source, span } => {
                Diagnostic::at(file, source, span.clone(), message)
            }
            Place::File { file, source } => {
                Diagnostic::at_line(file, source, r.line, r.column, message)
            }
        };
        out.push(d.with_hint(hint));
    }
}

/// What is wrong with one reference, and how to fix it.
fn problem(r: &Reference, known: &Known) -> Option<(String, String)> {
    let segments = match &r.kind {
        ReferenceKind::Include => {
            return Some((
                "a template cannot include another template (`{{> ...}}`)".into(),
                "write the text into this template".into(),
            ));
        }
        ReferenceKind::Helper(name) if HELPERS.contains(&name.as_str()) => return None,
        ReferenceKind::Helper(name) => {
            return Some((
                format!("`{name}` cannot be used in templates"),
                format!("templates can use: {}", HELPERS.join(", ")),
            ));
        }
        ReferenceKind::Field(segments) => segments,
    };
    let root = segments.first()?.as_str();
    let rest = &segments[1..];
    match root {
        _ if Field::named(root).is_some_and(|f| !f.has_parts()) && rest.is_empty() => None,
        _ if Field::named(root).is_some_and(|f| !f.has_parts()) => Some((
            format!("`{}`: `{root}` is text and has no parts", r.text),
            format!("write {{{{{root}}}}}"),
        )),
        "count" if !known.has_count => Some((
            "`count` is only filled in for rules with a [count] table".into(),
            "remove {{count}} from the template, or add [count] to the rule".into(),
        )),
        "count" => None,
        "events" | "events_count" if !known.digest => Some((
            format!("`{root}` is only filled in for rules with a [digest] table"),
            "a digest lists its events under `events` ({{#each events}}) and counts them in `events_count`".into(),
        )),
        "events" | "events_count" => None,
        "waited" if known.wait.is_none() => Some((
            "`waited` is only filled in for rules with a [wait] table".into(),
            "remove {{waited}} from the template, or add [wait] to the rule".into(),
        )),
        "waited" if rest.is_empty() => None,
        "until" if known.wait != Some(true) => Some((
            "`until` is only filled in for rules whose [wait] has `until`".into(),
            "the event that completed the wait is under until. (until.properties.x)".into(),
        )),
        "until" => match rest.first() {
            Some(_) => problem(
                &Reference {
                    kind: ReferenceKind::Field(rest.to_vec()),
                    text: r.text.trim_start_matches("until.").to_string(),
                    line: r.line,
                    column: r.column,
                },
                known,
            ),
            None => Some((
                "`until` holds the event that completed the wait: name one of its fields".into(),
                "write {{until.properties.role}} or {{until.timestamp}}".into(),
            )),
        },
        "properties" => typo(rest, &known.event, "properties"),
        "elements" => elements_problem(rest, &r.text),
        "person" => match rest.first().map(String::as_str) {
            Some("properties") => typo(&rest[1..], &known.person, "person.properties"),
            _ => Some((
                format!(
                    "`{}`: a person's fields are under person.properties",
                    r.text
                ),
                format!(
                    "write {{{{person.properties.{}}}}}",
                    rest.first().map_or("email", String::as_str)
                ),
            )),
        },
        other => {
            let hint = if known.person.contains(other) {
                format!("did you mean {{{{person.properties.{other}}}}}?")
            } else if known.event.contains(other) {
                format!("did you mean {{{{properties.{other}}}}}?")
            } else if let Some(close) = did_you_mean(other, roots()) {
                format!("did you mean `{close}`?")
            } else {
                "fields start with properties., person.properties., event, distinct_id, uuid, timestamp or count"
                    .into()
            };
            Some((format!("`{}` is not a field of an event", r.text), hint))
        }
    }
}

/// What is wrong with `elements.<rest>` (see `ingest/elements.rs`), if anything.
fn elements_problem(rest: &[String], text: &str) -> Option<(String, String)> {
    let example = "{{elements.0.text}} (the clicked element's text) or {{elements.1.tag_name}} (its parent's tag)";
    let (position, key) = match rest {
        [] => return None,
        [position, key @ ..] => (position, key.first()),
    };
    if position.parse::<usize>().is_err() {
        return Some((
            format!("`{text}`: `elements` is a list, the clicked element first"),
            format!("write {example}"),
        ));
    }
    let key = key?;
    if ELEMENT_KEYS.contains(&key.as_str()) {
        return None;
    }
    let hint = match did_you_mean(key, ELEMENT_KEYS.iter().copied()) {
        Some(close) => format!("did you mean `{close}`?"),
        None => format!("an element has {}", ELEMENT_KEYS.join(", ")),
    };
    Some((format!("`{text}`: an element has no `{key}`"), hint))
}

/// A property name one typo away from a known one (and not itself known) is most likely that typo.
fn typo(rest: &[String], known: &BTreeSet<String>, prefix: &str) -> Option<(String, String)> {
    let name = rest.first()?;
    if known.contains(name) {
        return None;
    }
    let close = known.iter().find(|k| {
        let distance = strsim::damerau_levenshtein(name, k);
        distance == 1 || (distance == 2 && name.chars().count() >= 8)
    })?;
    Some((
        format!("`{prefix}.{name}` looks like a typo of `{prefix}.{close}`"),
        format!(
            "if `{name}` is right, add \"{prefix}.{name}\" = {{ exists = true }} to [when]: the rule then only acts on events that have it"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(path: &str) -> Reference {
        Reference {
            kind: ReferenceKind::Field(path.split('.').map(String::from).collect()),
            text: path.to_string(),
            line: 1,
            column: 1,
        }
    }

    #[test]
    fn every_field_of_an_event_is_known_to_templates() {
        let known = Known::new([], true);
        for ok in [
            "event",
            "uuid",
            "distinct_id",
            "timestamp",
            "source",
            "count",
            "properties.plan",
            "person.properties.email",
        ] {
            assert_eq!(problem(&field(ok), &known), None, "{ok}");
        }
        let (message, _) = problem(&field("source.name"), &known).unwrap();
        assert!(message.contains("has no parts"), "{message}");
        let (message, hint) = problem(&field("sorce"), &known).unwrap();
        assert!(message.contains("not a field"), "{message}");
        assert!(hint.contains("`source`"), "{hint}");
    }
}
