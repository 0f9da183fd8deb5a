//! Rule test cases: the `*.test.toml` files beside the rules, run with no side effects by
//! `tripline test`.
//!
//! A case sends its events through the whole rule set, with state in memory and a virtual clock
//! (a manual [`Clock`]: events without a timestamp are one second apart, `after = "3 days"` jumps
//! ahead, and each event is handled when the clock reaches its time, without waiting), then
//! compares what the rules did with what the case expects. Loading a file checks it completely
//! (unknown keys, unreadable fixtures, events that would be refused) and reports problems the
//! same way as rule files, so `tripline check` can validate test files too.

use chrono::{DateTime, Datelike, SecondsFormat, TimeDelta, Utc};
use lettre::message::Mailbox;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use toml::Spanned;

use crate::actions::email::Queued;
use crate::actions::http::Request;
use crate::actions::{Env, Output};
use crate::authoring::event_file;
use crate::clock::Clock;
use crate::diag::toml_diagnostic;
use crate::diag::{Diagnostic, did_you_mean};
use crate::engine::{self, Effect, Outcome, Report};
use crate::ingest::event::{self, Event};
use crate::rules::RuleSet;
use crate::store::MemoryStore;
use crate::store::aggregates::Counted;
use crate::store::remembered::Remembered;
use crate::units::{self, DURATION_EXAMPLES, DurationError, toml_to_json_value};
use crate::user_file;

/// Where the virtual clock starts when a case does not say.
const DEFAULT_START: &str = "2026-01-01T00:00:00Z";

/// The keys an inline test event may have besides `file`, `repeat` and `after`: those of a flat
/// event or of the webhook envelope. Anything else is most likely a typo (`repat = 5`).
const EVENT_KEYS: &[&str] = &[
    "event",
    "name",
    "uuid",
    "distinct_id",
    "timestamp",
    "properties",
    "person",
    "elements_chain",
    "captured_at",
    "url",
];

/// The most copies one `repeat` may make, so a typo cannot exhaust memory.
const MAX_REPEAT: i64 = 100_000;

/// A test file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    /// The cases, each a `[[test]]` table.
    #[serde(default)]
    test: Vec<Spanned<CaseConfig>>,
}

/// One `[[test]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseConfig {
    /// What the case shows, in words.
    name: String,
    /// When the virtual clock starts.
    #[serde(default)]
    start: Option<Spanned<toml::Value>>,
    /// The events to send, in order.
    events: Vec<Spanned<EventEntry>>,
    /// What should happen.
    expect: Expect,
}

/// One `[[test.events]]`: an event written inline (any shape `/webhook` accepts), or `file`.
#[derive(Debug, Deserialize)]
struct EventEntry {
    /// A JSON file of events (a webhook body, a list, or JSON lines), relative to the test file.
    #[serde(default)]
    file: Option<String>,
    /// Send this many copies, each a new event (its own uuid), one second apart.
    #[serde(default)]
    repeat: Option<i64>,
    /// Move the virtual clock forward this long before these events ("3 days").
    #[serde(default)]
    after: Option<String>,
    /// The configured source the events come from, for rules limited to sources.
    #[serde(default)]
    source: Option<String>,
    /// The event itself.
    #[serde(flatten)]
    event: toml::Table,
}

/// `[test.expect]`: only what is given is checked.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The rules that act, in order, one entry per time; `[]` means nothing acts.
    pub fired: Option<Vec<String>>,
    /// Every email, in order.
    pub emails: Option<Vec<ExpectEmail>>,
    /// Every JSONL line, in order.
    pub lines: Option<Vec<ExpectLine>>,
    /// Every HTTP request (`[http]`), in order.
    pub requests: Option<Vec<ExpectRequest>>,
    /// Every event kept by a `[remember]` rule, in order.
    pub remembered: Option<Vec<ExpectRemembered>>,
    /// Every event counted by an `[aggregate]` rule, in order.
    pub counted: Option<Vec<ExpectCounted>>,
    /// The rules whose action failed (an email that could not be filled in).
    pub failed: Option<Vec<String>>,
    /// The rules with a wait still pending at the end, one entry per wait, by name.
    pub pending: Option<Vec<String>>,
    /// The rules held back when they would have acted (`[limits]`), one entry per time, in
    /// order.
    pub suppressed: Option<Vec<String>>,
    /// The rules that acted outside their `[send_window]` (their actions held until it opened),
    /// one entry per time, in order.
    pub held: Option<Vec<String>>,
    /// The rules whose wait an `unless` event cancelled, one entry per time, in order.
    pub cancelled: Option<Vec<String>>,
    /// The rules whose wait ended without acting (no `until` event came in time, or `then` did
    /// not hold), one entry per time, in order.
    pub expired: Option<Vec<String>>,
}

impl Expect {
    /// Whether it expects nothing at all.
    fn is_empty(&self) -> bool {
        [
            &self.fired,
            &self.failed,
            &self.pending,
            &self.suppressed,
            &self.held,
            &self.cancelled,
            &self.expired,
        ]
        .iter()
        .all(|e| e.is_none())
            && self.emails.is_none()
            && self.lines.is_none()
            && self.requests.is_none()
            && self.remembered.is_none()
            && self.counted.is_none()
    }
}

/// One expected email.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectEmail {
    pub to: Option<String>,
    pub subject: Option<String>,
    /// Pieces of text the plain-text body must contain.
    #[serde(default)]
    pub body_contains: Vec<String>,
}

/// One expected JSONL line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectLine {
    /// The output file, as the rule names it.
    pub file: Option<String>,
    /// A table: the line's JSON has exactly these keys and values. Text: the exact line.
    pub line: toml::Value,
}

/// One expected HTTP request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectRequest {
    /// The endpoint's name.
    pub endpoint: Option<String>,
    /// `POST` or `PUT`.
    pub method: Option<String>,
    /// The path added to the endpoint's address, as sent (`/v3/example.com/messages`).
    pub path: Option<String>,
    /// The JSON body: exactly these keys and values.
    pub json: Option<toml::Value>,
    /// The form body: exactly these fields and values.
    pub form: Option<toml::Table>,
}

/// One expected remembered event.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectRemembered {
    /// Whose it is.
    pub distinct_id: Option<String>,
    /// The label, exactly.
    pub label: Option<String>,
    /// The fields: exactly these keys and values.
    pub fields: Option<toml::Value>,
}

/// One expected count of an `[aggregate]` rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectCounted {
    /// Whose it is.
    pub distinct_id: Option<String>,
    /// The group, from the event's `by` field.
    pub group: Option<String>,
    /// Whether it is the rule's conversion event.
    pub conversion: Option<bool>,
}

/// A case ready to run.
#[derive(Debug)]
pub struct Case {
    pub name: String,
    /// When the case's clock starts.
    pub start: DateTime<Utc>,
    /// The events, each sent when the case's clock reaches its time.
    pub events: Vec<Event>,
    /// Where the clock is at the end: the last event's time, or later after an `after` alone.
    pub end: DateTime<Utc>,
    pub expect: Expect,
}

/// Reads and checks one test file.
pub fn load(file: &Path) -> Result<Vec<Case>, Vec<Diagnostic>> {
    let source = user_file::read_text(file, user_file::TEST_FILE).map_err(|e| {
        vec![Diagnostic::whole_file(
            file,
            format!("cannot read this file: {e}"),
        )]
    })?;
    let parsed: TestFile =
        toml::from_str(&source).map_err(|e| vec![toml_diagnostic(file, &source, &e)])?;
    if parsed.test.is_empty() {
        return Err(vec![
            Diagnostic::whole_file(file, "this test file has no tests")
                .with_hint("add a [[test]] table with a name, [[test.events]] and [test.expect]"),
        ]);
    }
    let mut problems = Vec::new();
    let mut cases = Vec::new();
    for (index, case) in parsed.test.into_iter().enumerate() {
        let span = case.span();
        let case = case.into_inner();
        let start = match &case.start {
            None => DEFAULT_START.parse().expect("a valid constant date"),
            Some(v) => {
                let text = match v.get_ref() {
                    toml::Value::Datetime(d) => d.to_string(),
                    toml::Value::String(s) => s.clone(),
                    _ => String::new(),
                };
                match units::parse_timestamp(&text) {
                    Some(t) => t,
                    None => {
                        problems.push(
                            Diagnostic::at(file, &source, v.span(), "`start` is not a date")
                                .with_hint("write start = 2026-03-01T09:00:00Z"),
                        );
                        continue;
                    }
                }
            }
        };
        if case.events.is_empty() {
            problems.push(Diagnostic::at(
                file,
                &source,
                span,
                format!("test \"{}\" sends no events", case.name),
            ));
            continue;
        }
        if case.expect.is_empty() {
            problems.push(
                Diagnostic::at(
                    file,
                    &source,
                    span.clone(),
                    format!("test \"{}\" expects nothing, so it could never fail", case.name),
                )
                .with_hint("under [test.expect], say what should happen: fired = [\"rule-name\"], emails = [...], lines = [...], requests = [...], remembered = [...] or fired = [] for nothing"),
            );
        }
        let mut clock = start;
        let mut end = start;
        let mut events = Vec::new();
        for entry in case.events {
            match entry_events(file, entry.get_ref(), &mut clock, index, events.len()) {
                Ok(more) if more.is_empty() => end = clock,
                Ok(mut more) => {
                    end = more.last().map_or(end, |e| e.time);
                    events.append(&mut more);
                }
                Err(message) => problems.push(
                    Diagnostic::at(file, &source, entry.span(), message.0).with_hint(message.1),
                ),
            }
        }
        if events.is_empty() && problems.is_empty() {
            problems.push(Diagnostic::at(
                file,
                &source,
                span,
                format!("test \"{}\" sends no events", case.name),
            ));
            continue;
        }
        cases.push(Case {
            name: case.name,
            start,
            events,
            end,
            expect: case.expect,
        });
    }
    if problems.is_empty() {
        Ok(cases)
    } else {
        Err(problems)
    }
}

/// The events of one `[[test.events]]` entry, timed on the virtual `clock`. Errors are a
/// message and a hint.
fn entry_events(
    test_file: &Path,
    entry: &EventEntry,
    clock: &mut DateTime<Utc>,
    case_index: usize,
    sent_before: usize,
) -> Result<Vec<Event>, (String, String)> {
    if let Some(after) = &entry.after {
        let d = match units::parse_duration(after) {
            Ok(d) => d,
            Err(DurationError::Zero) => std::time::Duration::ZERO,
            Err(e) => {
                return Err((
                    format!("`after`: {e}"),
                    format!("write it like {DURATION_EXAMPLES}"),
                ));
            }
        };
        *clock = TimeDelta::from_std(d)
            .ok()
            .and_then(|d| clock.checked_add_signed(d))
            .filter(|t| t.year() <= 9999)
            .ok_or_else(|| {
                (
                    "`after` is too long: the virtual clock would pass the year 9999".to_string(),
                    "use a length under a few thousand years".to_string(),
                )
            })?;
    }
    if let Some(key) = entry
        .event
        .keys()
        .find(|k| !EVENT_KEYS.contains(&k.as_str()))
    {
        let allowed = ["file", "repeat", "after", "source"]
            .iter()
            .chain(EVENT_KEYS);
        let hint = match did_you_mean(key, allowed.copied()) {
            Some(close) => format!("did you mean `{close}`?"),
            None => format!(
                "an event has {}; an entry may also have file, repeat, after and source",
                EVENT_KEYS[..7].join(", ")
            ),
        };
        return Err((format!("unknown key `{key}` in this event"), hint));
    }
    // `after` alone moves the clock: waits due meanwhile end.
    if entry.after.is_some()
        && entry.file.is_none()
        && entry.event.is_empty()
        && entry.repeat.is_none()
        && entry.source.is_none()
    {
        return Ok(Vec::new());
    }
    let repeat = entry.repeat.unwrap_or(1);
    if !(1..=MAX_REPEAT).contains(&repeat) {
        return Err((
            format!("`repeat` must be between 1 and {MAX_REPEAT}"),
            "repeat = 5 sends the event five times".into(),
        ));
    }
    let originals = match (&entry.file, entry.event.is_empty()) {
        (Some(name), true) => {
            let path = test_file.parent().unwrap_or(Path::new(".")).join(name);
            let bytes = user_file::read(&path, user_file::TEST_EVENTS_FILE).map_err(|e| {
                (
                    format!("cannot read the events file {}: {e}", path.display()),
                    "`file` is relative to the test file".to_string(),
                )
            })?;
            decode_any(&bytes, *clock).map_err(|e| {
                (
                    format!("{}: {e}", path.display()),
                    "the file must hold what /webhook accepts, or one such body per line"
                        .to_string(),
                )
            })?
        }
        (Some(_), false) => {
            return Err((
                "an entry has either `file` or an event written inline, not both".into(),
                "split it into two [[test.events]] entries".into(),
            ));
        }
        (None, _) => {
            let body = Value::Object(
                entry
                    .event
                    .iter()
                    .map(|(k, v)| (k.clone(), toml_to_json_value(v)))
                    .collect(),
            );
            let body = serde_json::to_vec(&body).expect("a JSON value serializes");
            event::decode(&body, *clock, &event::BodyLimits::LOCAL_FILES).map_err(|e| {
                let why = match e {
                    event::DecodeError::InvalidEvent { problem, .. } => problem,
                    other => other.to_string(),
                };
                (
                    format!("tripline would refuse this event: {why}"),
                    "write it like event = \"feature_used\", distinct_id = \"user-1\", properties = { ... }"
                        .to_string(),
                )
            })?
        }
    };
    // Events without their own timestamp were decoded at `decoded_at`; they, and every copy
    // after the first, take the clock's time, one second apart.
    let decoded_at = *clock;
    let mut events = Vec::new();
    for copy in 0..repeat {
        for original in &originals {
            let mut e = original.clone();
            if let Some(source) = &entry.source {
                e.source = Value::String(source.clone());
            }
            if copy > 0 || e.time == decoded_at {
                e.time = *clock;
            }
            e.timestamp = Value::String(e.time.to_rfc3339_opts(SecondsFormat::AutoSi, true));
            if copy > 0 || e.uuid.is_null() {
                let n = sent_before + events.len() + 1;
                e.uuid = Value::String(format!("test-{}-{n}", case_index + 1));
            }
            *clock = e.time + TimeDelta::seconds(1);
            events.push(e);
        }
    }
    Ok(events)
}

/// The events of an events file (JSON lines, one body, or a JSON list: see
/// [`event_file::read_items`]), each decoded as `/webhook` would, at `now` when it has no
/// timestamp.
pub fn decode_any(bytes: &[u8], now: DateTime<Utc>) -> Result<Vec<Event>, String> {
    let mut events = Vec::new();
    let mut problem = None;
    event_file::read_items(bytes, |at, item| {
        match event::decode(item, now, &event::BodyLimits::LOCAL_FILES) {
            Ok(mut more) => events.append(&mut more),
            Err(e) => problem = Some(format!("{at}: {e}")),
        }
        problem.is_none()
    })?;
    match problem {
        Some(p) => Err(p),
        None => Ok(events),
    }
}

/// Runs one case against `rules`; returns each way the outcome differs from what was expected
/// (empty when the case passes).
pub fn run(case: &Case, rules: &RuleSet, default_from: &Mailbox) -> Vec<String> {
    let mut store = MemoryStore::default();
    let mut effects = Vec::new();
    let env = Env::offline(default_from);
    // Each event arrives when the case's clock reads its time: what depends on the time of
    // handling sees the case's time, never the machine's, and nothing waits. Waits end as the
    // clock passes their deadline (no grace period: the case's events come in order).
    let clock = Clock::manual(case.start);
    let mut report = Report::default();
    let mut run = |store: &mut MemoryStore, until: DateTime<Utc>, event: Option<&Event>| {
        let until_ms = until.timestamp_millis();
        // A wait ending at the event's own time still sees it: those due before it end first.
        let due_by = if event.is_some() {
            until_ms - 1
        } else {
            until_ms
        };
        clock.advance_to(until);
        let now = clock.unix();
        report.append(engine::end_due_waits(
            rules,
            store,
            due_by,
            usize::MAX,
            &env,
            now,
            &mut effects,
        )?);
        if let Some(event) = event {
            let events = std::slice::from_ref(event);
            report.append(engine::run(rules, events, store, &env, now, &mut effects)?);
        }
        Ok::<_, crate::store::StoreError>(())
    };
    for event in &case.events {
        if let Err(e) = run(&mut store, event.time, Some(event)) {
            return vec![e.to_string()];
        }
    }
    if let Err(e) = run(&mut store, case.end.max(clock.now()), None) {
        return vec![e.to_string()];
    }
    let mut problems = Vec::new();
    let e = &case.expect;
    if let Some(pending) = &e.pending {
        let actual: Vec<String> = (store.waiting().into_iter())
            .flat_map(|(rule, n)| std::iter::repeat_n(rule, n as usize))
            .collect();
        let mut wanted = pending.clone();
        wanted.sort();
        compare_rule_names("be waiting", &wanted, &actual, rules, &mut problems);
    }
    if let Some(suppressed) = &e.suppressed {
        let actual = report.rules_where(rules, |o| o.suppressed().is_some());
        compare_rule_names("be held back", suppressed, &actual, rules, &mut problems);
    }
    if let Some(held) = &e.held {
        let actual = report.rules_where(rules, |o| matches!(o, Outcome::Held { .. }));
        compare_rule_names(
            "be held for their send window",
            held,
            &actual,
            rules,
            &mut problems,
        );
    }
    if let Some(cancelled) = &e.cancelled {
        let actual = report.rules_where(rules, |o| *o == Outcome::Cancelled);
        compare_rule_names(
            "have a wait cancelled",
            cancelled,
            &actual,
            rules,
            &mut problems,
        );
    }
    if let Some(expired) = &e.expired {
        let actual = report.rules_where(rules, |o| matches!(o, Outcome::Expired { .. }));
        compare_rule_names(
            "have a wait end without acting",
            expired,
            &actual,
            rules,
            &mut problems,
        );
    }
    if let Some(fired) = &e.fired {
        let actual = report.fired(rules);
        compare_rule_names("act", fired, &actual, rules, &mut problems);
    }
    if let Some(failed) = &e.failed {
        let actual = report.rules_where(rules, |o| {
            matches!(o, Outcome::Failed { .. } | Outcome::PartlyFailed { .. })
        });
        compare_rule_names("fail", failed, &actual, rules, &mut problems);
    }
    if let Some(wanted) = &e.emails {
        compare_emails(wanted, &effects, &mut problems);
    }
    if let Some(wanted) = &e.lines {
        compare_lines(wanted, &effects, &mut problems);
    }
    if let Some(wanted) = &e.requests {
        compare_requests(wanted, &effects, &mut problems);
    }
    if let Some(wanted) = &e.remembered {
        compare_remembered(wanted, &effects, &mut problems);
    }
    if let Some(wanted) = &e.counted {
        compare_counted(wanted, &effects, &mut problems);
    }
    if !problems.is_empty() {
        let failures = report.failures(rules);
        if !failures.is_empty() {
            problems.push(format!("failed actions: {}", failures.join("; ")));
        }
    }
    problems
}

/// Compares the rules expected to `verb` ("act", "fail") with those that did; a name that no
/// rule has is reported first, with the closest one.
fn compare_rule_names(
    verb: &str,
    wanted: &[String],
    actual: &[String],
    rules: &RuleSet,
    problems: &mut Vec<String>,
) {
    for name in wanted {
        if !rules.rules().iter().any(|r| &r.name == name) {
            let hint = did_you_mean(name, rules.rules().iter().map(|r| r.name.as_str()))
                .map(|c| format!(" (did you mean \"{c}\"?)"))
                .unwrap_or_default();
            problems.push(format!("there is no rule named \"{name}\"{hint}"));
        }
    }
    if actual != wanted {
        problems.push(format!(
            "expected these rules to {verb}: {}\n  but these did: {}",
            list(wanted),
            list(actual)
        ));
    }
}

/// What `pick` takes of the actions' outputs among `effects`, in order.
fn outputs<'e, T>(effects: &'e [Effect], pick: impl Fn(&'e Output) -> Option<T>) -> Vec<T> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Output { output, .. } => pick(output),
            Effect::Failed { .. } => None,
        })
        .collect()
}

fn compare_emails(wanted: &[ExpectEmail], effects: &[Effect], problems: &mut Vec<String>) {
    let actual: Vec<Queued> = outputs(effects, |output| match output {
        Output::Delivery(d) => Queued::of(d),
        _ => None,
    });
    if actual.len() != wanted.len() {
        let got: Vec<String> = actual
            .iter()
            .map(|q| format!("to {} \"{}\"", q.to.join(", "), q.subject))
            .collect();
        problems.push(count_differs("email(s)", wanted.len(), &got, false));
        return;
    }
    for (n, (want, got)) in wanted.iter().zip(actual).enumerate() {
        let n = n + 1;
        if let Some(to) = &want.to
            && !got.to.iter().any(|t| t.eq_ignore_ascii_case(to))
        {
            problems.push(format!(
                "email {n}: expected to {to}, but it goes to {}",
                got.to.join(", ")
            ));
        }
        if let Some(subject) = &want.subject
            && subject != &got.subject
        {
            problems.push(format!(
                "email {n}: expected the subject {subject:?}\n  but it is {:?}",
                got.subject
            ));
        }
        for piece in &want.body_contains {
            if !got.text.contains(piece.as_str()) {
                problems.push(format!(
                    "email {n}: the body does not contain {piece:?}; it is:\n{}",
                    indent(&got.text)
                ));
            }
        }
    }
}

fn compare_requests(wanted: &[ExpectRequest], effects: &[Effect], problems: &mut Vec<String>) {
    let actual: Vec<Request> = outputs(effects, |output| match output {
        Output::Delivery(d) => Request::of(d),
        _ => None,
    });
    if actual.len() != wanted.len() {
        let got: Vec<String> = actual
            .iter()
            .map(|r| format!("to {}: {}", r.endpoint, r.body))
            .collect();
        problems.push(count_differs("request(s)", wanted.len(), &got, true));
        return;
    }
    for (n, (want, got)) in wanted.iter().zip(actual).enumerate() {
        let n = n + 1;
        let path = format!("/{}", got.path.join("/"));
        let method = serde_json::to_value(got.method).unwrap_or_default();
        let checks = [
            ("endpoint", want.endpoint.as_deref(), got.endpoint.as_str()),
            (
                "method",
                want.method.as_deref(),
                method.as_str().unwrap_or_default(),
            ),
            ("path", want.path.as_deref(), path.as_str()),
        ];
        for (what, want, got) in checks {
            if let Some(want) = want
                && !want.eq_ignore_ascii_case(got)
            {
                problems.push(format!(
                    "request {n}: expected the {what} {want:?}, but it is {got:?}"
                ));
            }
        }
        if let Some(json) = &want.json {
            let expected = toml_to_json_value(json);
            if serde_json::from_str::<Value>(&got.body).ok() != Some(expected.clone()) {
                problems.push(format!(
                    "request {n}: expected the JSON body\n    {expected}\n  but it is\n    {}",
                    got.body
                ));
            }
        }
        if let Some(form) = &want.form {
            let mut expected: Vec<(String, String)> = Vec::new();
            for (name, value) in form {
                let values = match value {
                    toml::Value::Array(items) => items.clone(),
                    one => vec![one.clone()],
                };
                for v in values {
                    let text = match v {
                        toml::Value::String(s) => s,
                        other => toml_to_json_value(&other).to_string(),
                    };
                    expected.push((name.clone(), text));
                }
            }
            let sent: Vec<(String, String)> = url::form_urlencoded::parse(got.body.as_bytes())
                .into_owned()
                .collect();
            if sent != expected {
                problems.push(format!(
                    "request {n}: expected the form\n    {expected:?}\n  but it is\n    {sent:?}"
                ));
            }
        }
    }
}

fn compare_remembered(wanted: &[ExpectRemembered], effects: &[Effect], problems: &mut Vec<String>) {
    let actual: Vec<&Remembered> = outputs(effects, |output| match output {
        Output::Remember(r) => Some(r.as_ref()),
        _ => None,
    });
    if actual.len() != wanted.len() {
        let kept: Vec<String> = actual
            .iter()
            .map(|r| {
                let label = r.entry.label.as_deref().unwrap_or("(no label)");
                format!("for {}: {label} {}", r.distinct_id, r.entry.fields)
            })
            .collect();
        problems.push(count_differs(
            "remembered event(s)",
            wanted.len(),
            &kept,
            true,
        ));
        return;
    }
    for (n, (want, got)) in wanted.iter().zip(actual).enumerate() {
        let n = n + 1;
        if let Some(who) = &want.distinct_id
            && who != &got.distinct_id
        {
            problems.push(format!(
                "remembered {n}: expected for {who:?}, but it is for {:?}",
                got.distinct_id
            ));
        }
        if let Some(label) = &want.label
            && Some(label) != got.entry.label.as_ref()
        {
            problems.push(format!(
                "remembered {n}: expected the label {label:?}\n  but it is {:?}",
                got.entry.label
            ));
        }
        if let Some(fields) = &want.fields {
            let expected = toml_to_json_value(fields);
            if expected != got.entry.fields {
                problems.push(format!(
                    "remembered {n}: expected the fields\n    {expected}\n  but they are\n    {}",
                    got.entry.fields
                ));
            }
        }
    }
}

fn compare_counted(wanted: &[ExpectCounted], effects: &[Effect], problems: &mut Vec<String>) {
    let actual: Vec<&Counted> = outputs(effects, |output| match output {
        Output::Aggregate(c) => Some(c.as_ref()),
        _ => None,
    });
    if actual.len() != wanted.len() {
        let counted: Vec<String> = actual.iter().map(|c| c.describe()).collect();
        problems.push(count_differs(
            "counted event(s)",
            wanted.len(),
            &counted,
            true,
        ));
        return;
    }
    for (n, (want, got)) in wanted.iter().zip(actual).enumerate() {
        let n = n + 1;
        if let Some(who) = &want.distinct_id
            && who != &got.distinct_id
        {
            problems.push(format!(
                "counted {n}: expected for {who:?}, but it is for {:?}",
                got.distinct_id
            ));
        }
        if want.group.is_some() && want.group != got.group {
            problems.push(format!(
                "counted {n}: expected in group {:?}, but it is {}",
                want.group.as_deref().unwrap_or_default(),
                got.describe()
            ));
        }
        if let Some(conversion) = want.conversion
            && conversion != got.conversion
        {
            let was = if got.conversion { "is" } else { "is not" };
            problems.push(format!("counted {n}: it {was} a conversion"));
        }
    }
}

fn compare_lines(wanted: &[ExpectLine], effects: &[Effect], problems: &mut Vec<String>) {
    let actual: Vec<(&PathBuf, &str)> = outputs(effects, |output| match output {
        Output::Line { file, line } => Some((file, line.trim_end_matches('\n'))),
        _ => None,
    });
    if actual.len() != wanted.len() {
        let got: Vec<String> = actual
            .iter()
            .map(|(f, l)| format!("{}: {l}", f.display()))
            .collect();
        problems.push(count_differs("line(s)", wanted.len(), &got, true));
        return;
    }
    for (n, (want, (file, line))) in wanted.iter().zip(actual).enumerate() {
        let n = n + 1;
        if let Some(f) = &want.file
            && Path::new(f) != file.as_path()
        {
            problems.push(format!(
                "line {n}: expected it in {f}, but it went to {}",
                file.display()
            ));
        }
        let same = match &want.line {
            toml::Value::String(text) => text == line,
            table => serde_json::from_str::<Value>(line).ok() == Some(toml_to_json_value(table)),
        };
        if !same {
            let expected = match &want.line {
                toml::Value::String(text) => text.clone(),
                table => toml_to_json_value(table).to_string(),
            };
            problems.push(format!(
                "line {n}: expected\n    {expected}\n  but got\n    {line}"
            ));
        }
    }
}

/// "expected 2 email(s), got 1: ..." with what there was, on one line or (`lines`) one each.
fn count_differs(what: &str, wanted: usize, got: &[String], lines: bool) -> String {
    let listed = match (got.is_empty(), lines) {
        (true, _) => String::new(),
        (false, true) => format!(":\n{}", indent(&got.join("\n"))),
        (false, false) => format!(": {}", got.join("; ")),
    };
    format!("expected {wanted} {what}, got {}{listed}", got.len())
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "(none)".into()
    } else {
        names.join(", ")
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: &str = r#"
name = "weekly"
[when]
event = "used"
[count]
per = ["distinct_id"]
at_least = 3
within = "7 days"
[limits]
once_per = ["distinct_id"]
again_after = "30 days"
[jsonl]
file = "out.jsonl"
fields = { who = "distinct_id", at = "timestamp" }
"#;

    fn setup(
        tests: &str,
    ) -> (
        tempfile::TempDir,
        RuleSet,
        Result<Vec<Case>, Vec<Diagnostic>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules");
        std::fs::create_dir(&rules).unwrap();
        std::fs::write(rules.join("weekly.toml"), RULE).unwrap();
        std::fs::write(rules.join("weekly.test.toml"), tests).unwrap();
        let set = RuleSet::load(&crate::config::Declared::folders(
            &rules,
            &dir.path().join("t"),
            dir.path(),
        ))
        .unwrap();
        let cases = load(&rules.join("weekly.test.toml"));
        (dir, set, cases)
    }

    /// What loading this test file reports, as `file:line:col: message` lines.
    fn problems_of(tests: &str) -> Vec<String> {
        let (_dir, _set, cases) = setup(tests);
        cases.unwrap_err().iter().map(|d| d.to_string()).collect()
    }

    fn from() -> Mailbox {
        "t <t@localhost>".parse().unwrap()
    }

    #[test]
    fn virtual_time_makes_windows_and_again_after_testable() {
        let (_dir, set, cases) = setup(
            r#"
[[test]]
name = "three uses in a week act; spread over two weeks they do not"
[[test.events]]
event = "used"
distinct_id = "a"
repeat = 2
[[test.events]]
event = "used"
distinct_id = "a"
after = "8 days"
repeat = 3
[[test.events]]
event = "used"
distinct_id = "a"
after = "31 days"
repeat = 3
[test.expect]
fired = ["weekly", "weekly"]
lines = [
  { line = { who = "a", at = "2026-01-09T00:00:04Z" } },
  { file = "out.jsonl", line = '{"who":"a","at":"2026-02-09T00:00:07Z"}' },
]
"#,
        );
        let cases = cases.unwrap();
        assert_eq!(cases[0].events.len(), 8);
        assert_eq!(run(&cases[0], &set, &from()), Vec::<String>::new());
    }

    #[test]
    fn a_wrong_expectation_says_what_differs() {
        let (_dir, set, cases) = setup(
            r#"
[[test]]
name = "wrong"
[[test.events]]
event = "used"
distinct_id = "a"
repeat = 3
[test.expect]
fired = ["weekley"]
lines = []
"#,
        );
        let problems = run(&cases.unwrap()[0], &set, &from());
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert_eq!(
            problems[0],
            "there is no rule named \"weekley\" (did you mean \"weekly\"?)"
        );
        assert_eq!(
            problems[1],
            "expected these rules to act: weekley\n  but these did: weekly"
        );
        assert!(
            problems[2].starts_with("expected 0 line(s), got 1:"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_broken_test_file_is_reported_with_its_position() {
        let problems = problems_of(
            "[[test]]\nname = \"x\"\n[[test.events]]\nevent = 5\n[test.expect]\nfierd = []\n",
        );
        assert!(
            problems[0].contains("weekly.test.toml:6:1: unknown key `fierd`")
                && problems[0].contains("did you mean `fired`"),
            "{problems:?}"
        );
        let problems = problems_of(
            "[[test]]\nname = \"x\"\n[[test.events]]\nevent = 5\n[test.expect]\nfired = []\n",
        );
        assert!(
            problems[0].ends_with(
                "weekly.test.toml:3:1: tripline would refuse this event: the event name (`event`) must be text, got a number \
                 (write it like event = \"feature_used\", distinct_id = \"user-1\", properties = { ... })"
            ),
            "{problems:?}"
        );
    }

    #[test]
    fn an_after_past_the_calendar_is_reported_not_a_crash() {
        for after in ["1000000 years", "300000 years"] {
            let problems = problems_of(&format!(
                "[[test]]\nname = \"x\"\n[[test.events]]\nevent = \"used\"\nafter = \"{after}\"\n[test.expect]\nfired = []\n"
            ));
            assert!(
                problems[0].contains("`after` is too long"),
                "{after}: {problems:?}"
            );
        }
    }

    #[test]
    fn a_typo_in_an_inline_event_is_not_silently_sent() {
        let problems = problems_of(
            "[[test]]\nname = \"x\"\n[[test.events]]\nevent = \"used\"\nrepat = 3\n[test.expect]\nfired = []\n",
        );
        assert!(
            problems[0].ends_with(
                "weekly.test.toml:3:1: unknown key `repat` in this event (did you mean `repeat`?)"
            ),
            "{problems:?}"
        );
    }

    #[test]
    fn retried_uuids_count_once_and_repeat_makes_new_events() {
        let (_dir, set, cases) = setup(
            r#"
[[test]]
name = "the same uuid twice is one event"
[[test.events]]
event = "used"
distinct_id = "a"
uuid = "same"
[[test.events]]
event = "used"
distinct_id = "a"
uuid = "same"
[[test.events]]
event = "used"
distinct_id = "a"
uuid = "other"
repeat = 2
[test.expect]
fired = ["weekly"]
"#,
        );
        assert_eq!(run(&cases.unwrap()[0], &set, &from()), Vec::<String>::new());
    }

    #[test]
    fn an_events_file_is_read_as_replay_reads_it() {
        let now: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let names = |text: &str| -> Vec<String> {
            decode_any(text.as_bytes(), now)
                .unwrap()
                .iter()
                .map(|e| e.name().to_string())
                .collect()
        };
        assert_eq!(names("{\"event\":\"a\"}\n{\"event\":\"b\"}\n"), ["a", "b"]);
        assert_eq!(
            names("[{\"event\":\"a\"},\n {\"event\":\"b\"}]"),
            ["a", "b"]
        );
        assert_eq!(names("{\n  \"batch\": [{\"event\":\"a\"}]\n}"), ["a"]);
        let broken = decode_any(b"{\"event\":\"a\"}\n{\"event\": 5}\n", now).unwrap_err();
        assert!(broken.starts_with("line 2: "), "{broken}");
    }
}
