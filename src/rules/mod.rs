//! Rules: loading `rules/*.toml` (with the templates they use) into an immutable, indexed
//! [`RuleSet`].
//!
//! `file.rs` mirrors the TOML, `compile.rs` turns it into runnable [`Rule`]s, `condition.rs`
//! holds what matching needs (with the field paths of `ingest/path.rs`); problems are
//! `crate::diag` diagnostics. A set is loaded whole
//! or not at all: one problem anywhere means the caller keeps whatever set it had.

pub mod calendar;
pub mod compile;
pub mod condition;
pub mod file;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::actions::Action;
use crate::actions::email::templates::Templates;
use crate::config::{Declared, Folders};
use crate::diag::{Diagnostic, Warning};
use crate::ingest::event::Event;
use crate::ingest::path::FieldPath;
use crate::user_file::{self, Listing};
use calendar::{Calendar, Period, SendWindow};
use condition::Condition;
pub use file::IfPending;

/// How a test file's name ends: `power_user_email.test.toml` tests `power_user_email.toml`.
pub const TEST_SUFFIX: &str = ".test.toml";

/// The name of the event tripline makes each time a rule is held back (by `[limits]` or a cap),
/// when some rule is about it: it has the held-back rule's `distinct_id` and person, and says
/// which rule, why and on what event in its properties. Only tripline makes such events: one a
/// sender posts starts none of these rules.
pub const SUPPRESSED_EVENT: &str = "$tripline_suppressed";

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// The rule's identity; state is keyed by it.
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    /// The event names it is indexed under; `None` means every event.
    pub events: Option<Vec<String>>,
    /// Every `[when]` condition other than the plain event-name selection, which the rule set's
    /// index by event name settles.
    pub when: Condition,
    pub count: Option<Count>,
    pub limits: Option<Limits>,
    /// `[wait]`: act later rather than on the event.
    pub wait: Option<Wait>,
    /// `[send_window]`: actions decided outside it are held until it opens.
    pub send_window: Option<SendWindow>,
    /// `[digest]`: the matching events are collected and the actions run once per period.
    pub digest: Option<Digest>,
    /// What it does when it acts, in file order.
    pub actions: Vec<Box<dyn Action>>,
    /// What `GET /rules` shows for it.
    pub summary: Value,
    /// The source whose rule it is, when its file is in `rules/<source>/`: it sees only that
    /// source's events, and that source's read token may read what it did.
    pub tenant: Option<String>,
}

impl Rule {
    /// Makes it the rule of `tenant` (its file is in `rules/<tenant>/`): it sees only events
    /// from that source.
    fn belong_to(&mut self, tenant: String) {
        let from_tenant = Condition::Field {
            path: FieldPath::parse("source").expect("`source` is a field"),
            test: condition::Test::Equals(Value::String(tenant.clone())),
        };
        let when = std::mem::replace(&mut self.when, Condition::All(Vec::new()));
        self.when = Condition::All(vec![from_tenant, when]);
        self.summary["source"] = Value::String(tenant.clone());
        self.tenant = Some(tenant);
    }

    /// Whether the rule is about [`SUPPRESSED_EVENT`], tripline's own event.
    pub fn is_about_suppressions(&self) -> bool {
        matches!(self.events.as_deref(), Some([name]) if name == SUPPRESSED_EVENT)
    }

    /// Whether the rule keeps pending records: waits, actions held for its send window, or a
    /// digest being collected. Those of a rule that no longer does are dropped.
    pub fn keeps_pending(&self) -> bool {
        self.wait.is_some() || self.send_window.is_some() || self.digest.is_some()
    }
}

/// `[count]`: act from the `at_least`-th matching event for each key on.
#[derive(Debug)]
pub struct Count {
    pub per: Vec<FieldPath>,
    pub at_least: u64,
    /// Count only the events this close before each one (by the events' own timestamps).
    pub within: Option<Duration>,
    /// Count per calendar period instead (`in`).
    pub period: Option<Calendar>,
    /// Count the different values of this field instead of the events.
    pub distinct: Option<FieldPath>,
}

impl Count {
    /// The kind of state key it counts under: each way of counting has its own, so that
    /// changing how a rule counts starts afresh instead of misreading what was kept.
    pub fn key_kind(&self) -> &'static str {
        match (&self.distinct, &self.period, self.within) {
            (None, None, _) => "count",
            (None, Some(c), _) => match c.period {
                Period::Day => "count in day",
                Period::Week => "count in week",
                Period::Month => "count in month",
            },
            (Some(_), None, None) => "distinct",
            (Some(_), None, Some(_)) => "distinct within",
            (Some(_), Some(c), _) => match c.period {
                Period::Day => "distinct in day",
                Period::Week => "distinct in week",
                Period::Month => "distinct in month",
            },
        }
    }
}

/// `[limits]`: act once for each key, or again only after a while.
#[derive(Debug)]
pub struct Limits {
    /// `None`: no once-limit (a rule limited by its cap group only).
    pub once_per: Option<Vec<FieldPath>>,
    /// The frequency cap its actions count against.
    pub cap: Option<Arc<Cap>>,
    pub again_after: Option<Duration>,
    /// Once per calendar period instead (`once_per_period`).
    pub period: Option<Calendar>,
}

/// `[wait]`: act `for` after the triggering event, unless or once a later event of the same
/// values (`same`) comes, and if `then` holds.
#[derive(Debug)]
pub struct Wait {
    pub for_: Duration,
    pub same: Vec<FieldPath>,
    pub ends: Ends,
    pub then: Option<Condition>,
    pub if_pending: IfPending,
    /// The event names of `unless` or `until`, which the rule set indexes it under; `None`
    /// means every event (a `then` looks at every event of its values).
    pub watches: Option<Vec<String>>,
}

/// What a later event does to a pending wait.
#[derive(Debug)]
pub enum Ends {
    /// Nothing: the wait ends at its time (a plain delay, perhaps with `then`).
    AtTime,
    /// `unless`: an event that meets this cancels it.
    Unless(Condition),
    /// `until`: an event that meets this completes it, and the rule acts then.
    Until(Condition),
}

impl Wait {
    /// Every field path it names.
    pub fn paths(&self) -> Vec<&FieldPath> {
        let mut paths: Vec<&FieldPath> = self.same.iter().collect();
        if let Ends::Unless(c) | Ends::Until(c) = &self.ends {
            paths.extend(c.paths());
        }
        paths.extend(self.then.iter().flat_map(|c| c.paths()));
        paths
    }

    /// Whether `event` matters to a pending wait of this rule (cancels, completes or, with
    /// `then`, is the latest one seen): the name index settled part of it already.
    pub fn watches(&self, event: &Event) -> bool {
        match &self.ends {
            Ends::Unless(c) | Ends::Until(c) if c.holds(event) => true,
            _ => self.then.is_some(),
        }
    }
}

/// `[digest]`: collect the matching events per key (`per`) and act once a day or week at `at`
/// (local time in `zone`), with the first `keep` of them listed and all of them counted.
#[derive(Debug)]
pub struct Digest {
    /// Every day, or every Monday.
    pub days: [bool; 7],
    pub at: chrono::NaiveTime,
    pub zone: calendar::Zone,
    pub per: Vec<FieldPath>,
    pub keep: usize,
}

impl Digest {
    /// When the digest of an event at `t_ms` is sent: the next `at` after it.
    pub fn next_send(&self, t_ms: i64, event: &Event) -> i64 {
        calendar::next_time(&self.days, self.at, self.zone.of(event), t_ms)
    }
}

/// A frequency cap shared by rules (`rules/_caps.toml`): at most `at_most` actions per period
/// per recipient (the values of `per`), across every rule that names it.
#[derive(Debug)]
pub struct Cap {
    pub name: String,
    pub at_most: u64,
    pub per: Vec<FieldPath>,
    pub period: Calendar,
}

impl Cap {
    /// The owner and kind of the group's state keys: its name, and a kind no rule's state has
    /// (so a rule named like the group never shares a key with it), with the period, so that a
    /// group whose period changes starts afresh.
    pub fn key_parts(&self) -> (&str, &'static str) {
        let kind = match self.period.period {
            Period::Day => "cap in day",
            Period::Week => "cap in week",
            Period::Month => "cap in month",
        };
        (&self.name, kind)
    }
}

/// The caps of a rules folder, by name.
pub type Caps = std::collections::BTreeMap<String, Arc<Cap>>;

/// The file of a rules folder that declares the cap groups.
pub const CAPS_FILE: &str = "_caps.toml";

/// Every rule of a rules folder, compiled, with the templates they use.
pub struct RuleSet {
    rules: Vec<Rule>,
    /// For each event name some rule names: the indices of the rules to try, in file order
    /// (rules for every event included).
    by_event: foldhash::HashMap<String, Vec<usize>>,
    /// The rules for every event: what an event whose name no rule names is tried against.
    any_event: Vec<usize>,
    /// The same two for the events that matter to pending waits (see [`Wait::watches`]).
    waits_by_event: foldhash::HashMap<String, Vec<usize>>,
    waits_any_event: Vec<usize>,
    /// The rules about [`SUPPRESSED_EVENT`]: only tripline's own such events start them.
    on_suppressed: Vec<usize>,
    /// The templates, including each rule's `to` and `subject` lines.
    pub templates: Templates,
    /// A short hash of every rule and template file's name and text: the same files give the
    /// same hash, so what runs can be compared with what is on disk.
    pub hash: String,
    /// When the set was loaded.
    pub loaded_at: DateTime<Utc>,
    /// Which load of the service this set is (the later, the higher; 0 outside the service), so
    /// that what acts on "the rules now" never acts on an older set than one already used.
    pub generation: u64,
}

impl RuleSet {
    /// Loads every `*.toml` file of the rules folder and every template of the templates
    /// folder, against the endpoints the operator declared. The data folder is where output
    /// files go (used to check their paths). Warnings (entries that are skipped) are dropped:
    /// use [`load_with_warnings`](Self::load_with_warnings) where a person will see the outcome.
    pub fn load(declared: &Declared) -> Result<RuleSet, Vec<Diagnostic>> {
        Self::load_with_warnings(declared).0
    }

    /// [`load`](Self::load), with what the load noticed that does not stop it, whether it
    /// succeeded or not.
    pub fn load_with_warnings(
        declared: &Declared,
    ) -> (Result<RuleSet, Vec<Diagnostic>>, Vec<Warning>) {
        let Folders {
            rules: rules_dir,
            templates: templates_dir,
            data: data_dir,
        } = &declared.folders;
        let (mut templates, mut problems) = Templates::load(templates_dir);
        let mut warnings = templates.warnings().to_vec();
        let files = match rule_files(rules_dir) {
            Ok(listing) => {
                warnings.extend(listing.warnings);
                listing
                    .files
                    .into_iter()
                    .map(|f| (f, None))
                    .collect::<Vec<_>>()
            }
            Err(e) => {
                problems.push(Diagnostic::whole_file(
                    rules_dir,
                    format!("cannot read the rules folder: {e}"),
                ));
                return (Err(problems), warnings);
            }
        };
        let mut files = files;
        for (folder, tenant) in tenant_folders(rules_dir) {
            if !declared.sources.contains(&tenant) {
                let known: Vec<&str> = declared.sources.iter().map(String::as_str).collect();
                problems.push(Diagnostic::whole_file(
                    &folder,
                    format!(
                        "the rules in a folder apply to the source it is named after, and there is no source `{tenant}` (sources: {}); add [sources.{tenant}] to tripline.toml or rename the folder",
                        known.join(", ")
                    ),
                ));
                continue;
            }
            match rule_files(&folder) {
                Ok(listing) => {
                    warnings.extend(listing.warnings);
                    files.extend(listing.files.into_iter().map(|f| (f, Some(tenant.clone()))));
                }
                Err(e) => problems.push(Diagnostic::whole_file(
                    &folder,
                    format!("cannot read this folder: {e}"),
                )),
            }
        }
        let mut rules: Vec<Rule> = Vec::new();
        let mut hasher = Sha256::new();
        let caps_file = rules_dir.join(CAPS_FILE);
        let caps = match user_file::read_text(&caps_file, user_file::RULE_FILE) {
            Ok(source) => {
                hash_file(&mut hasher, "caps", &caps_file, &source);
                let (caps, mut p) = compile::caps(&caps_file, &source);
                problems.append(&mut p);
                caps
            }
            Err(user_file::ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                Caps::new()
            }
            Err(e) => {
                problems.push(Diagnostic::whole_file(
                    &caps_file,
                    format!("cannot read this file: {e}"),
                ));
                Caps::new()
            }
        };
        for (file, tenant) in files {
            let source = match user_file::read_text(&file, user_file::RULE_FILE) {
                Ok(s) => s,
                Err(e) => {
                    problems.push(Diagnostic::whole_file(
                        &file,
                        format!("cannot read this file: {e}"),
                    ));
                    continue;
                }
            };
            hash_file(&mut hasher, "rule", &file, &source);
            match compile::compile(&file, &source, &mut templates, &caps, declared) {
                Ok(mut rule) => {
                    if let Some(tenant) = tenant {
                        rule.belong_to(tenant);
                    }
                    if let Some(first) = rules.iter().find(|r| r.name == rule.name) {
                        problems.push(duplicate_name(&file, &source, &rule.name, &first.file));
                    } else {
                        rules.push(rule);
                    }
                }
                Err(mut p) => problems.append(&mut p),
            }
        }
        if !problems.is_empty() {
            problems.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
            // A template file used by several rules would report the same problem for each.
            problems.dedup();
            return (Err(problems), warnings);
        }
        warnings.extend(unwritable_outputs(&rules, data_dir));
        for (name, source) in templates.files() {
            hash_file(&mut hasher, "template", name, source);
        }
        let hash = hasher.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        (Ok(RuleSet::index(rules, templates, hash)), warnings)
    }

    fn index(rules: Vec<Rule>, templates: Templates, hash: String) -> RuleSet {
        let on_suppressed: Vec<usize> = (0..rules.len())
            .filter(|&i| rules[i].is_about_suppressions())
            .collect();
        let (by_event, any_event) = by_name(&rules, |r| {
            Some(&r.events).filter(|_| !r.is_about_suppressions())
        });
        let (waits_by_event, waits_any_event) =
            by_name(&rules, |r| r.wait.as_ref().map(|w| &w.watches));
        RuleSet {
            rules,
            by_event,
            any_event,
            waits_by_event,
            waits_any_event,
            on_suppressed,
            templates,
            hash,
            loaded_at: Utc::now(),
            generation: 0,
        }
    }

    /// Every rule, in file-name order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule named `name`, with its index.
    pub fn named(&self, name: &str) -> Option<(usize, &Rule)> {
        self.rules.iter().enumerate().find(|(_, r)| r.name == name)
    }

    /// The rules for an event named `name` with their indices in [`rules`](Self::rules), in
    /// file-name order. The event name is settled by this index; each rule's `when` holds the
    /// rest of its conditions.
    pub fn candidates<'s>(&'s self, name: &str) -> impl Iterator<Item = (usize, &'s Rule)> + 's {
        self.by_event
            .get(name)
            .unwrap_or(&self.any_event)
            .iter()
            .map(|&i| (i, &self.rules[i]))
    }

    /// Whether some rule is tried on events called `name` (whatever its `[when]` says of the
    /// rest), or some pending wait may care: events no rule is tried on need not be decoded.
    pub fn wants(&self, name: &str) -> bool {
        self.candidates(name).next().is_some()
            || !self.waits_any_event.is_empty()
            || self.waits_by_event.contains_key(name)
    }

    /// The rules with `[wait]` to which `event` matters if a wait is pending for its values
    /// (see [`Wait::watches`]), with their indices, in file-name order.
    pub fn watching<'s>(
        &'s self,
        event: &'s Event,
    ) -> impl Iterator<Item = (usize, &'s Rule)> + 's {
        self.waits_by_event
            .get(event.name())
            .unwrap_or(&self.waits_any_event)
            .iter()
            .map(|&i| (i, &self.rules[i]))
            .filter(|(_, rule)| rule.wait.as_ref().is_some_and(|w| w.watches(event)))
    }

    /// Whether some rule does something with `event`: starts a wait or acts on it, or cares for
    /// it while waiting. Only such events need the committer.
    pub fn involves(&self, event: &Event) -> bool {
        self.matching(event).next().is_some() || self.watching(event).next().is_some()
    }

    /// Whether some rule names `event`'s name in its `[when]` (not only `event = "*"`).
    pub fn names(&self, event: &Event) -> bool {
        self.by_event.contains_key(event.name())
    }

    /// Whether some rule is about [`SUPPRESSED_EVENT`]: only then does the engine make one
    /// each time a rule is held back.
    pub fn heeds_suppressions(&self) -> bool {
        !self.on_suppressed.is_empty()
    }

    /// The rules about [`SUPPRESSED_EVENT`] whose `[when]` holds for `event`, one tripline made,
    /// with their indices, in file-name order.
    pub fn on_suppression<'s>(
        &'s self,
        event: &'s Event,
    ) -> impl Iterator<Item = (usize, &'s Rule)> + 's {
        // A source's rule hears of its own source's rules only: not of the operator's, nor of
        // another source's, even when they were held back on its events.
        let held = event.properties["rule"].as_str().unwrap_or_default();
        let tenant_of_held = self
            .rules
            .iter()
            .find(|r| r.name == held)
            .and_then(|r| r.tenant.as_deref());
        self.on_suppressed
            .iter()
            .map(|&i| (i, &self.rules[i]))
            .filter(move |(_, rule)| {
                rule.tenant.is_none() || rule.tenant.as_deref() == tenant_of_held
            })
            .filter(|(_, rule)| rule.when.holds(event))
    }

    /// The rules whose `[when]` holds for `event`, with their indices, in file-name order.
    pub fn matching<'s>(
        &'s self,
        event: &'s Event,
    ) -> impl Iterator<Item = (usize, &'s Rule)> + 's {
        self.candidates(event.name())
            .filter(|(_, rule)| rule.when.holds(event))
    }
}

/// An index of `rules` by event name: for each name some rule lists, the rules to try (those for
/// every event included), and the rules for every event. `names` gives a rule's list (`None`
/// inside: every event), or `None` when the rule is not to be indexed at all.
#[allow(clippy::type_complexity)]
fn by_name<'r>(
    rules: &'r [Rule],
    names: impl Fn(&'r Rule) -> Option<&'r Option<Vec<String>>>,
) -> (foldhash::HashMap<String, Vec<usize>>, Vec<usize>) {
    let any: Vec<usize> = (0..rules.len())
        .filter(|&i| matches!(names(&rules[i]), Some(None)))
        .collect();
    let mut by: foldhash::HashMap<String, Vec<usize>> = foldhash::HashMap::default();
    for (i, rule) in rules.iter().enumerate() {
        for name in names(rule).into_iter().flatten().flatten() {
            by.entry(name.clone()).or_default().push(i);
        }
    }
    for list in by.values_mut() {
        list.extend(&any);
        list.sort_unstable();
        list.dedup();
    }
    (by, any)
}

/// A warning for each rule whose output file cannot be written because of what is in the data
/// folder now (a file where its folder should be...). Such a rule loads, and fails on its own
/// until the way is clear; `tripline check` counts these as problems.
pub fn unwritable_outputs(rules: &[Rule], data_dir: &Path) -> Vec<Warning> {
    rules
        .iter()
        .flat_map(|rule| rule.actions.iter().map(move |a| (rule, a)))
        .filter_map(|(rule, action)| {
            let file = action.file()?;
            let written = file.to_string_lossy();
            let why = crate::actions::jsonl::output_place(data_dir, file, &written).err()?;
            Some(Warning {
                file: rule.file.clone(),
                message: format!(
                    "rule \"{}\" cannot write `{written}` in the data folder now: {}; it does nothing until this is fixed",
                    rule.name, why.0
                ),
            })
        })
        .collect()
}

/// Adds one file to the content hash: its kind, name and text, each length-prefixed so that no
/// two different sets of files hash the same way by concatenation.
fn hash_file(hasher: &mut Sha256, kind: &str, file: &Path, source: &str) {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    for part in [kind, &name, source] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
}

/// The rule files of a folder, sorted: `*.toml`, skipping hidden files (editors' locks and swaps)
/// and test files (`*.test.toml`).
fn rule_files(dir: &Path) -> std::io::Result<Listing> {
    user_file::list(dir, |name| {
        name.ends_with(".toml") && !name.ends_with(TEST_SUFFIX) && name != CAPS_FILE
    })
}

/// The test files (`*.test.toml`) of a folder and of its folders one level down (a source's
/// rules, `rules/<source>/`), sorted, skipping hidden files.
pub fn test_files(dir: &Path) -> std::io::Result<Listing> {
    let mut listing = user_file::list(dir, |name| name.ends_with(TEST_SUFFIX))?;
    for (folder, _) in tenant_folders(dir) {
        let inner = user_file::list(&folder, |name| name.ends_with(TEST_SUFFIX))?;
        listing.files.extend(inner.files);
        listing.warnings.extend(inner.warnings);
    }
    Ok(listing)
}

/// The folders of the rules folder (not hidden) that hold `.toml` files, each with its name: a
/// source's rules. Other folders (`rules/test-events/`, files of events for tests) are left
/// alone.
fn tenant_folders(dir: &Path) -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let holds_toml = |folder: &Path| {
        std::fs::read_dir(folder).is_ok_and(|mut files| {
            files.any(|f| f.is_ok_and(|f| f.file_name().to_string_lossy().ends_with(".toml")))
        })
    };
    let mut folders: Vec<(PathBuf, String)> = entries
        .filter_map(|e| e.ok())
        // A link is not followed: `rules/acme -> ..` must not make the operator's rules acme's.
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()) && holds_toml(&e.path()))
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            (!name.starts_with('.')).then(|| (e.path(), name))
        })
        .collect();
    folders.sort();
    folders
}

fn duplicate_name(file: &Path, source: &str, name: &str, first: &Path) -> Diagnostic {
    let at = source.find(&format!("\"{name}\"")).unwrap_or(0);
    Diagnostic::at(
        file,
        source,
        at..at + 1,
        format!(
            "another rule is already named \"{name}\": {}",
            first.display()
        ),
    )
    .with_hint("every rule needs its own name; its counters are kept under that name")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::event::decode;

    fn set(rules: &[(&str, &str)]) -> (tempfile::TempDir, RuleSet) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        for (name, when) in rules {
            let rule = format!(
                "name = \"{name}\"\n[when]\n{when}\n[jsonl]\nfile = \"o.jsonl\"\nfields = {{ e = \"event\" }}\n"
            );
            std::fs::write(dir.path().join(format!("rules/{name}.toml")), rule).unwrap();
        }
        let set = RuleSet::load(&crate::config::Declared::folders(
            &dir.path().join("rules"),
            &dir.path().join("t"),
            dir.path(),
        ))
        .unwrap();
        (dir, set)
    }

    /// The names of the rules that hold for a flat event `{"event": name, "properties": props}`.
    fn fired(set: &RuleSet, name: &str, props: &str) -> Vec<String> {
        let body = format!(r#"{{"event":"{name}","properties":{props}}}"#);
        let event = &decode(
            body.as_bytes(),
            chrono::Utc::now(),
            &crate::ingest::event::BodyLimits::LOCAL_FILES,
        )
        .unwrap()[0];
        set.candidates(event.name())
            .map(|(_, r)| r)
            .filter(|r| r.when.holds(event))
            .map(|r| r.name.clone())
            .collect()
    }

    #[test]
    fn event_selection_by_name_list_star_and_operator() {
        let (_dir, set) = set(&[
            ("a-list", r#"event = ["a", "b"]"#),
            ("b-any-x", "event = \"*\"\n\"properties.x\" = 1"),
            ("c-prefix", r#"event = { starts_with = "s" }"#),
            (
                "d-nested",
                r#"event = "*"
any = [ { event = "a" }, { event = "z" } ]"#,
            ),
        ]);
        assert_eq!(fired(&set, "a", "{}"), ["a-list", "d-nested"]);
        assert_eq!(fired(&set, "b", r#"{"x": 1}"#), ["a-list", "b-any-x"]);
        assert_eq!(fired(&set, "s1", r#"{"x": 2}"#), ["c-prefix"]);
        assert_eq!(fired(&set, "z", "{}"), ["d-nested"]);
        assert!(fired(&set, "c", "{}").is_empty());
    }
}
