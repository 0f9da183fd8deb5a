//! Turning one parsed rule file into a runnable [`Rule`], collecting every problem on the way.

use crate::config::Declared;
use regex::RegexBuilder;
use serde_json::{Value, json};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

use crate::actions::email::template_check::Known;
use crate::actions::email::templates::Templates;
use crate::actions::{self, Compile};
use crate::diag::{Diagnostic, Problems, did_you_mean, toml_diagnostic};
use crate::ingest::path::FieldPath;
use crate::rules::calendar::{Calendar, Period, SendWindow, Zone, zone_names};
use crate::rules::condition::{Condition, Test};
use crate::rules::file::*;
use crate::rules::{Cap, Caps, Count, Digest, Ends, Limits, Rule, Wait};
use crate::units::{self, DURATION_EXAMPLES, DurationError, parse_timestamp, toml_to_json_value};
use chrono_tz::Tz;
use std::sync::Arc;

/// The largest compiled size of one regular expression, so a rule cannot eat the server's memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The most events one digest lists.
const MAX_DIGEST_KEEP: i64 = 100;

/// The largest threshold of a `[count]` with `within`: its state holds one time per counted event.
const MAX_AT_LEAST_WITHIN: i64 = 1000;

/// Compiles the rule in `source` (the text of `file`). Inline templates (`to`, `subject`) are
/// added to `templates`. Returns every problem found, not just the first.
pub fn compile(
    file: &Path,
    source: &str,
    templates: &mut Templates,
    caps: &Caps,
    declared: &Declared,
) -> Result<Rule, Vec<Diagnostic>> {
    let mut c = Compiler {
        p: Problems::new(file, source),
    };
    let parsed = parse_reporting_every_unknown_key(file, source, &mut c.p.list)
        .ok_or_else(|| c.p.list.clone())?;
    let rule = c.rule(parsed, templates, caps, declared);
    match rule {
        Some(rule) if c.p.list.is_empty() => Ok(rule),
        _ => Err(c.p.list),
    }
}

/// Compiles `rules/_caps.toml` (the text of `file`): one table per cap group.
/// Returns the groups, and every problem (the groups are named even when one has a problem).
pub fn caps(file: &Path, source: &str) -> (Caps, Vec<Diagnostic>) {
    let mut c = Compiler {
        p: Problems::new(file, source),
    };
    let parsed: std::collections::BTreeMap<String, Spanned<CapConfig>> =
        match toml::from_str(source) {
            Ok(parsed) => parsed,
            Err(e) => return (Caps::new(), vec![toml_diagnostic(file, source, &e)]),
        };
    let mut caps = Caps::new();
    for (name, config) in parsed {
        let span = config.span();
        let config = config.into_inner();
        let at_most = *config.at_most.get_ref();
        if at_most < 1 {
            c.problem(config.at_most.span(), "`at_most` must be 1 or more", None);
        }
        let per = match &config.per {
            None => vec![FieldPath::parse("distinct_id").expect("a valid path")],
            Some(list) => c.paths(list),
        };
        let period = c.calendar(
            &config.per_period,
            config.timezone.as_ref(),
            config.timezone_fallback.as_ref(),
        );
        if name.trim().is_empty() || name.chars().any(char::is_control) {
            c.problem(span, "a cap group needs a name, like [marketing]", None);
        }
        // A group with a problem is still named, so that rules naming it are not reported as
        // naming an unknown group on top (nothing loads until the problem is fixed anyway).
        let period = period.unwrap_or(Calendar {
            period: Period::Day,
            zone: Zone::Fixed(chrono_tz::UTC),
        });
        let cap = Cap {
            name: name.clone(),
            at_most: at_most.max(1) as u64,
            per,
            period,
        };
        caps.insert(name, Arc::new(cap));
    }
    (caps, c.p.list)
}

/// Parses the file. serde stops at its first error; so that a file with several misspelled keys
/// shows them all, each line holding an unknown key is blanked out (spaces, so every position
/// stays the same) and the text parsed again. Any other structural error ends the parse.
fn parse_reporting_every_unknown_key(
    file: &Path,
    source: &str,
    problems: &mut Vec<Diagnostic>,
) -> Option<RuleFile> {
    const MAX_ROUNDS: usize = 50;
    let mut text = source.to_string();
    for _ in 0..MAX_ROUNDS {
        // After unknown keys were blanked, the rest of the file is still checked; the reported
        // problems keep it from loading.
        let e = match toml::from_str::<RuleFile>(&text) {
            Ok(parsed) => return Some(parsed),
            Err(e) => e,
        };
        // A key misspelled earlier is now missing: the "did you mean" already says so.
        let suggested = |key: &str| {
            let wanted = format!("did you mean `{key}`?");
            problems
                .iter()
                .any(|p| p.hint.as_deref().is_some_and(|h| h.contains(&wanted)))
        };
        match e.message().strip_prefix("missing field `") {
            Some(rest) if suggested(rest.trim_end().trim_end_matches('`')) => return None,
            _ => problems.push(toml_diagnostic(file, source, &e)),
        }
        let line = e
            .span()
            .filter(|_| e.message().starts_with("unknown field"))
            .and_then(|span| whole_line_entry(&text, span.start))?;
        text.replace_range(line.clone(), &" ".repeat(line.len()));
    }
    None
}

/// The byte range of the line at `at` if it is one whole `key = value` entry on its own line
/// (so blanking it leaves valid TOML).
fn whole_line_entry(text: &str, at: usize) -> Option<Range<usize>> {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line = &text[start..end];
    let entry = line.trim();
    let key_first = text[start..at].trim().is_empty();
    let opens = entry.ends_with('[')
        || entry.ends_with('{')
        || entry.ends_with("\"\"\"")
        || entry.ends_with("'''");
    (key_first && entry.contains('=') && !opens).then_some(start..end)
}

struct Compiler<'a> {
    p: Problems<'a>,
}

impl Compiler<'_> {
    fn problem(&mut self, span: Range<usize>, message: impl Into<String>, hint: Option<String>) {
        self.p.add(span, message, hint);
    }

    fn rule(
        &mut self,
        f: RuleFile,
        templates: &mut Templates,
        caps: &Caps,
        declared: &Declared,
    ) -> Option<Rule> {
        let name = f.name.get_ref().trim().to_string();
        if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
            self.problem(
                f.name.span(),
                "the rule's `name` must be a short piece of text (1 to 100 characters)",
                Some("for example name = \"power-user-discount\"".into()),
            );
        }

        let when_span = f.when.span();
        let when = f.when.into_inner();
        let events = self.event_selector(
            &when,
            when_span,
            "[when] must say which event the rule is about",
        );
        let condition = self.when(when, true);

        let count = f.count.map(|count| {
            let at_least = *count.at_least.get_ref();
            let within = count.within.as_ref().and_then(|w| self.duration(w));
            let period = count.in_.as_ref().and_then(|p| {
                self.calendar(p, count.timezone.as_ref(), count.timezone_fallback.as_ref())
            });
            self.zone_without_period(count.in_.is_none(), &count.timezone, "in");
            if let (Some(_), Some(p)) = (&count.within, &count.in_) {
                self.problem(
                    p.span(),
                    "`[count]` has `within` or `in`, not both",
                    Some("`within = \"7 days\"`: the last 7 days before each event; `in = \"week\"`: this calendar week".into()),
                );
            }
            let distinct = count.distinct.as_ref().and_then(|d| self.path(d));
            let remembered = within.is_some() || distinct.is_some();
            if at_least < 1 {
                self.problem(count.at_least.span(), "`at_least` must be 1 or more", None);
            } else if remembered && at_least > MAX_AT_LEAST_WITHIN {
                self.problem(
                    count.at_least.span(),
                    format!("with `within` or `distinct`, `at_least` can be at most {MAX_AT_LEAST_WITHIN}"),
                    Some("tripline remembers each counted event's time (or value), up to `at_least` of them per key".into()),
                );
            }
            Count {
                per: self.paths(&count.per),
                at_least: at_least.max(1) as u64,
                within,
                period,
                distinct,
            }
        });
        let limits = f.limits.map(|l| {
            let limits_span = l.span();
            let l = l.into_inner();
            let period = l.once_per_period.as_ref().and_then(|p| {
                self.calendar(p, l.timezone.as_ref(), l.timezone_fallback.as_ref())
            });
            self.zone_without_period(l.once_per_period.is_none(), &l.timezone, "once_per_period");
            if let (Some(_), Some(p)) = (&l.again_after, &l.once_per_period) {
                self.problem(
                    p.span(),
                    "`[limits]` has `again_after` or `once_per_period`, not both",
                    Some("`again_after = \"24 hours\"`: a day after the last time; `once_per_period = \"day\"`: once each calendar day".into()),
                );
            }
            if l.once_per.is_none() {
                let without = [
                    l.again_after.as_ref().map(|a| ("again_after", a.span())),
                    l.once_per_period.as_ref().map(|p| ("once_per_period", p.span())),
                ];
                for (key, span) in without.into_iter().flatten() {
                    self.problem(
                        span,
                        format!("`{key}` needs `once_per`: once per what?"),
                        Some("add once_per = [\"distinct_id\"] (once per user)".into()),
                    );
                }
                if l.cap_group.is_none() {
                    self.problem(
                        limits_span.clone(),
                        "[limits] needs `once_per` or `cap_group`",
                        Some("once_per = [\"distinct_id\"]: once per user; cap_group = \"marketing\": a cap from rules/_caps.toml".into()),
                    );
                }
            }
            let cap = l.cap_group.as_ref().and_then(|g| self.cap(g, caps));
            Limits {
                once_per: l.once_per.as_ref().map(|o| self.paths(o)),
                cap,
                again_after: l.again_after.as_ref().and_then(|a| self.duration(a)),
                period,
            }
        });

        let wait = f.wait.map(|w| self.wait(w));
        let send_window = f.send_window.map(|w| self.send_window(w));
        let digest_span = f.digest.as_ref().map(|d| d.span());
        let digest = f.digest.map(|d| self.digest(d));
        if let Some(span) = digest_span
            && (wait.is_some() || send_window.is_some())
        {
            self.problem(
                span,
                "a rule with [digest] cannot also have [wait] or [send_window]",
                Some("a digest is sent at its own time (`at`): split the rule in two".into()),
            );
        }

        let no_action = f.actions.is_empty();
        let mut actions = Vec::new();
        let mut cx = Compile {
            rule: &name,
            problems: &mut self.p,
            templates,
            declared,
            events: events.as_ref().and_then(|e| e.as_deref()),
        };
        for table in f.actions {
            actions.extend((table.compile)(&mut cx));
        }
        if no_action {
            cx.problems.add(
                0..0,
                "this rule does nothing: it has no action",
                Some(format!("add {} table", one_of(&actions::tables()))),
            );
        }
        // Checked once every action is compiled (and even when one has problems, so that every
        // problem shows): templates may use the fields the rule deals with anywhere.
        let mut paths: Vec<&FieldPath> = condition.iter().flat_map(|c| c.paths()).collect();
        paths.extend(count.iter().flat_map(|c| &c.per));
        paths.extend(limits.iter().flat_map(|l| l.once_per.iter().flatten()));
        let wait_paths: Vec<&FieldPath> = match &wait {
            Some(Some(w)) => w.paths(),
            _ => Vec::new(),
        };
        paths.extend(wait_paths);
        paths.extend(actions.iter().flat_map(|a| a.fields()));
        let mut known = Known::new(paths, count.is_some());
        if let Some(Some(w)) = &wait {
            known = known.waiting(matches!(w.ends, Ends::Until(_)));
        }
        // Even a [digest] with a problem: its templates are checked as a digest's.
        if digest.is_some() {
            known = known.digest();
        }
        let known = known;
        for action in &actions {
            action.check(&known, &mut cx);
        }

        let summary = json!({
            "name": name,
            "description": f.description,
            "file": self.p.file.display().to_string(),
            "when": table_as_written(self.p.source, "when"),
            "count": count.as_ref().map(|c| {
                let mut summary = json!({
                    "per": c.per.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                    "at_least": c.at_least,
                });
                if let Some(d) = c.within {
                    summary["within"] = units::format_duration(d).into();
                }
                if let Some(cal) = &c.period {
                    summary["in"] = cal.period.name().into();
                    summary["timezone"] = cal.zone.to_string().into();
                }
                if let Some(d) = &c.distinct {
                    summary["distinct"] = d.to_string().into();
                }
                summary
            }),
            "limits": limits.as_ref().map(|l| {
                let mut summary = json!({
                    "once_per": l.once_per.as_ref().map(|o| o.iter().map(|p| p.to_string()).collect::<Vec<_>>()),
                });
                if let Some(d) = l.again_after {
                    summary["again_after"] = units::format_duration(d).into();
                }
                if let Some(cal) = &l.period {
                    summary["once_per_period"] = cal.period.name().into();
                    summary["timezone"] = cal.zone.to_string().into();
                }
                if let Some(cap) = &l.cap {
                    summary["cap_group"] = json!({
                        "name": cap.name,
                        "at_most": cap.at_most,
                        "per_period": cap.period.period.name(),
                        "per": cap.per.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                        "timezone": cap.period.zone.to_string(),
                    });
                }
                summary
            }),
            "wait": table_as_written(self.p.source, "wait"),
            "send_window": table_as_written(self.p.source, "send_window"),
            "digest": table_as_written(self.p.source, "digest"),
            "actions": actions.iter().map(|a| a.summary()).collect::<Vec<_>>(),
        });
        Some(Rule {
            name,
            file: self.p.file.to_path_buf(),
            events: events?,
            when: condition?,
            count,
            limits,
            wait: wait.map_or(Some(None), |w| w.map(Some))?,
            send_window: send_window.map_or(Some(None), |w| w.map(Some))?,
            digest: digest.map_or(Some(None), |d| d.map(Some))?,
            actions,
            summary,
            tenant: None,
        })
    }

    /// Compiles `[wait]`.
    fn wait(&mut self, config: Spanned<WaitConfig>) -> Option<Wait> {
        let span = config.span();
        let w = config.into_inner();
        let for_ = self.duration(&w.for_);
        let same = match &w.same {
            None => vec![FieldPath::parse("distinct_id").expect("a valid path")],
            Some(list) if list.is_empty() => {
                self.problem(
                    span.clone(),
                    "`same` is empty: every event would belong to one single wait",
                    Some(
                        "list the fields later events must share, like same = [\"distinct_id\"]"
                            .into(),
                    ),
                );
                Vec::new()
            }
            Some(list) => self.paths(list),
        };
        // `unless` or `until`: compiled whole (event name included), indexed by event name.
        let mut watches = Some(Some(Vec::new()));
        let mut ending = |c: Spanned<WhenConfig>, this: &mut Self| {
            let span = c.span();
            let c = c.into_inner();
            watches = this.event_selector(
                &c,
                span,
                "`unless` and `until` must say which event they wait for",
            );
            this.when(c, false)
        };
        let ends = match (w.unless, w.until) {
            (Some(_), Some(until)) => {
                self.problem(
                    until.span(),
                    "a wait has `unless` or `until`, not both",
                    Some("`unless`: act when no such event comes in time; `until`: act when one does".into()),
                );
                None
            }
            (Some(c), None) => ending(c, self).map(Ends::Unless),
            (None, Some(c)) => ending(c, self).map(Ends::Until),
            (None, None) => Some(Ends::AtTime),
        };
        let then = w.then.map(|t| self.when(t.into_inner(), false));
        // A `then` is checked on the latest event of the wait's values, whatever its name.
        let watches = match &then {
            Some(_) => Some(None),
            None => watches,
        };
        Some(Wait {
            for_: for_?,
            same,
            ends: ends?,
            then: then.map_or(Some(None), |t| t.map(Some))?,
            if_pending: w.if_pending.unwrap_or_default(),
            watches: watches?,
        })
    }

    /// Which event names the rule is indexed under; `None` in the result means every event.
    /// The `event` key is required so that a rule always says what it is about.
    fn event_selector(
        &mut self,
        when: &WhenConfig,
        when_span: Range<usize>,
        missing: &str,
    ) -> Option<Option<Vec<String>>> {
        let Some((_, entry)) = when.entries.iter().find(|(k, _)| k.get_ref() == "event") else {
            self.problem(
                when_span,
                missing,
                Some("add event = \"feature_used\", a list like event = [\"a\", \"b\"], or event = \"*\" for every event".into()),
            );
            return None;
        };
        let WhenEntry::Field(condition) = entry else {
            unreachable!("`event` is parsed as a field")
        };
        Some(match condition.get_ref() {
            ConditionConfig::Equals(toml::Value::String(s)) if s == "*" => None,
            ConditionConfig::Equals(toml::Value::String(s)) => Some(vec![s.clone()]),
            ConditionConfig::OneOf(list) => {
                let names: Option<Vec<String>> =
                    list.iter().map(|v| v.as_str().map(String::from)).collect();
                if names.is_none() {
                    self.problem(condition.span(), "event names must be text", None);
                }
                if names.as_ref().is_some_and(|n| {
                    n.len() > 1 && n.iter().any(|name| name == super::SUPPRESSED_EVENT)
                }) {
                    self.problem(
                        condition.span(),
                        "a rule about `$tripline_suppressed` (tripline's own event: another rule was held back) is about that event only",
                        Some("write event = \"$tripline_suppressed\", and the other events in another rule".into()),
                    );
                }
                names
            }
            ConditionConfig::Equals(_) => {
                self.problem(
                    condition.span(),
                    "an event name must be text",
                    Some("write event = \"feature_used\" (in quotes)".into()),
                );
                None
            }
            // Operators (starts_with, ...) are checked per event, for every event name.
            ConditionConfig::Operators(_) => None,
        })
    }

    /// Compiles a `[when]` table. At the top level, a plain `event` name or list is left out:
    /// the rule set's index by event name already settles it (see `event_selector`).
    fn when(&mut self, when: WhenConfig, top: bool) -> Option<Condition> {
        let mut all = Vec::new();
        let mut ok = true;
        for (key, entry) in when.entries {
            let compiled = match entry {
                WhenEntry::Field(condition) => {
                    let settled = match condition.get_ref() {
                        ConditionConfig::Equals(toml::Value::String(s)) => top || s == "*",
                        ConditionConfig::OneOf(_) => top,
                        _ => false,
                    };
                    if key.get_ref() == "event" && settled {
                        continue;
                    }
                    self.field(&key, condition)
                }
                WhenEntry::All(list) => self.when_list(list).map(Condition::All),
                WhenEntry::Any(list) => {
                    if list.is_empty() {
                        self.problem(
                            key.span(),
                            "`any` needs at least one table of conditions",
                            None,
                        );
                    }
                    self.when_list(list).map(Condition::Any)
                }
                WhenEntry::Not(inner) => self
                    .when(inner.into_inner(), false)
                    .map(|c| Condition::Not(Box::new(c))),
            };
            match compiled {
                Some(c) => all.push(c),
                None => ok = false,
            }
        }
        ok.then(|| match all.len() {
            1 => all.pop().expect("one condition"),
            _ => Condition::All(all),
        })
    }

    fn when_list(&mut self, list: Vec<Spanned<WhenConfig>>) -> Option<Vec<Condition>> {
        let compiled: Vec<Option<Condition>> = list
            .into_iter()
            .map(|w| self.when(w.into_inner(), false))
            .collect();
        compiled.into_iter().collect()
    }

    fn path(&mut self, text: &Spanned<String>) -> Option<FieldPath> {
        FieldPath::parse_reporting(text, &mut self.p)
    }

    /// A calendar period (`in`, `once_per_period`) in the zone `timezone` names (UTC without
    /// one): an IANA name, or a field holding one with `timezone_fallback` for events without.
    fn calendar(
        &mut self,
        period: &Spanned<String>,
        timezone: Option<&Spanned<String>>,
        fallback: Option<&Spanned<String>>,
    ) -> Option<Calendar> {
        let name = period.get_ref().trim();
        let period = match Period::named(name) {
            Some(p) => Some(p),
            None => {
                let hint = match did_you_mean(name, Period::NAMES) {
                    Some(close) => format!("did you mean \"{close}\"?"),
                    None => "periods are \"day\", \"week\" (Monday to Sunday) and \"month\"".into(),
                };
                self.problem(
                    period.span(),
                    format!("`{name}` is not a period"),
                    Some(hint),
                );
                None
            }
        };
        let zone = self.zone(timezone, fallback);
        Some(Calendar {
            period: period?,
            zone: zone?,
        })
    }

    /// The zone `timezone` names (UTC without one): an IANA name, or a field holding one with
    /// `timezone_fallback` for events without.
    fn zone(
        &mut self,
        timezone: Option<&Spanned<String>>,
        fallback: Option<&Spanned<String>>,
    ) -> Option<Zone> {
        let field = timezone.is_some_and(|t| looks_like_a_field(t.get_ref()));
        if let (false, Some(f)) = (field, fallback) {
            self.problem(
                f.span(),
                "`timezone_fallback` is only used when `timezone` names a field",
                Some("for example timezone = \"person.properties.$geoip_time_zone\"".into()),
            );
        }
        let fallback = fallback.and_then(|f| self.zone_name(f));
        match timezone {
            None => Some(Zone::Fixed(chrono_tz::UTC)),
            Some(text) if text.get_ref().parse::<Tz>().is_ok() => {
                Some(Zone::Fixed(text.get_ref().parse().expect("checked above")))
            }
            Some(text) if looks_like_a_field(text.get_ref()) => {
                self.path(text).map(|path| Zone::Field {
                    path,
                    fallback: fallback.unwrap_or(chrono_tz::UTC),
                })
            }
            Some(text) => self.zone_name(text).map(Zone::Fixed),
        }
    }

    /// `[digest]`.
    fn digest(&mut self, config: Spanned<DigestConfig>) -> Option<Digest> {
        let d = config.into_inner();
        let every = self.duration(&d.every);
        let days = match every.map(|e| e.as_secs()) {
            Some(86_400) => Some([true; 7]),
            Some(604_800) => Some([true, false, false, false, false, false, false]),
            Some(_) => {
                self.problem(
                    d.every.span(),
                    "a digest is sent every day or every week",
                    Some("write every = \"1 day\" or every = \"1 week\" (on Mondays)".into()),
                );
                None
            }
            None => None,
        };
        let text = d.at.get_ref().trim();
        let at = crate::units::parse_time_of_day(text);
        if at.is_none() {
            self.problem(
                d.at.span(),
                format!("`{text}` is not a time of day"),
                Some("write at = \"09:00\" (24-hour clock, local time)".into()),
            );
        }
        let keep = d.keep.as_ref().map_or(Some(20), |k| {
            let n = *k.get_ref();
            if !(1..=MAX_DIGEST_KEEP).contains(&n) {
                self.problem(
                    k.span(),
                    format!("`keep` must be between 1 and {MAX_DIGEST_KEEP}"),
                    Some("the digest lists the first `keep` events and counts them all".into()),
                );
                return None;
            }
            Some(n as usize)
        });
        let per = d.per.as_ref().map_or(Vec::new(), |p| self.paths(p));
        let zone = self.zone(d.timezone.as_ref(), d.timezone_fallback.as_ref());
        Some(Digest {
            days: days?,
            at: at?,
            zone: zone?,
            per,
            keep: keep?,
        })
    }

    /// `[send_window]`.
    fn send_window(&mut self, config: Spanned<SendWindowConfig>) -> Option<SendWindow> {
        let w = config.into_inner();
        let mut days = [w.days.is_none(); 7];
        let mut unknown = false;
        for day in w.days.iter().flat_map(|d| d.get_ref()) {
            match SendWindow::DAYS
                .iter()
                .position(|d| *d == day.trim().to_lowercase())
            {
                Some(i) => days[i] = true,
                None => {
                    unknown = true;
                    let hint = match did_you_mean(day, SendWindow::DAYS) {
                        Some(close) => format!("did you mean \"{close}\"?"),
                        None => "days are \"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\" and \"sun\"".into(),
                    };
                    let span = w.days.as_ref().map_or(0..0, |d| d.span());
                    self.problem(span, format!("`{day}` is not a day"), Some(hint));
                }
            }
        }
        if days.iter().all(|d| !d) && !unknown {
            let span = w.days.as_ref().map_or(0..0, |d| d.span());
            self.problem(span, "a send window needs at least one day", None);
        }
        let hours = w.hours.get_ref().trim();
        let parse = crate::units::parse_time_of_day;
        let times = hours
            .split_once('-')
            .and_then(|(from, until)| Some((parse(from)?, parse(until)?)));
        let times = match times {
            Some((from, until)) if from < until => Some((from, until)),
            Some(_) => {
                self.problem(
                    w.hours.span(),
                    "the window must end after it starts, the same day",
                    Some("for quiet hours at night, give the day's open hours: hours = \"08:00-22:00\"".into()),
                );
                None
            }
            None => {
                self.problem(
                    w.hours.span(),
                    format!("`{hours}` is not a range of hours"),
                    Some("write hours = \"09:00-18:00\" (24-hour clock, local time)".into()),
                );
                None
            }
        };
        let zone = self.zone(w.timezone.as_ref(), w.timezone_fallback.as_ref());
        let (from, until) = times?;
        Some(SendWindow {
            days,
            from,
            until,
            zone: zone?,
        })
    }

    /// The cap group `name` names, from `rules/_caps.toml`.
    fn cap(&mut self, name: &Spanned<String>, caps: &Caps) -> Option<Arc<Cap>> {
        if let Some(cap) = caps.get(name.get_ref()) {
            return Some(cap.clone());
        }
        let hint = match did_you_mean(name.get_ref(), caps.keys().map(String::as_str)) {
            Some(close) => format!("did you mean \"{close}\"?"),
            None if caps.is_empty() => "declare it in rules/_caps.toml, like [marketing] at_most = 2, per_period = \"week\"".into(),
            None => format!(
                "the groups of rules/_caps.toml are: {}",
                caps.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
            ),
        };
        self.problem(
            name.span(),
            format!("there is no cap group \"{}\"", name.get_ref()),
            Some(hint),
        );
        None
    }

    /// A time zone's IANA name, or a problem with the closest one.
    fn zone_name(&mut self, text: &Spanned<String>) -> Option<Tz> {
        zone_name(text, &mut self.p, true)
    }

    /// A `timezone` given without the period it is for.
    fn zone_without_period(
        &mut self,
        no_period: bool,
        timezone: &Option<Spanned<String>>,
        key: &str,
    ) {
        if let (true, Some(tz)) = (no_period, timezone) {
            self.problem(
                tz.span(),
                format!("`timezone` is only used with `{key}`"),
                Some(format!(
                    "add {key} = \"day\" (or \"week\", \"month\"), or remove `timezone`"
                )),
            );
        }
    }

    /// A length of time such as "7 days", "24h" or "1h 30m".
    fn duration(&mut self, text: &Spanned<String>) -> Option<Duration> {
        match units::parse_duration(text.get_ref()) {
            Ok(d) => Some(d),
            Err(DurationError::Zero) => {
                self.problem(text.span(), "this length of time is zero", None);
                None
            }
            Err(DurationError::Unreadable(_)) => {
                self.problem(
                    text.span(),
                    "this is not a length of time tripline can read",
                    Some(format!("write it like {DURATION_EXAMPLES}")),
                );
                None
            }
        }
    }

    fn paths(&mut self, list: &[Spanned<String>]) -> Vec<FieldPath> {
        list.iter().filter_map(|p| self.path(p)).collect()
    }

    fn field(
        &mut self,
        key: &Spanned<String>,
        condition: Spanned<ConditionConfig>,
    ) -> Option<Condition> {
        let path = self.path(key)?;
        let span = condition.span();
        let problems_before = self.p.list.len();
        let tests = match condition.into_inner() {
            ConditionConfig::Equals(v) => vec![Test::Equals(toml_to_json_value(&v))],
            ConditionConfig::OneOf(list) => {
                vec![Test::In(list.iter().map(toml_to_json_value).collect())]
            }
            ConditionConfig::Operators(ops) => self.operators(*ops),
        };
        if self.p.list.len() > problems_before {
            return None;
        }
        if tests.is_empty() {
            self.problem(
                span,
                "this condition has no operator",
                Some(
                    "write for example { exists = true }, { gt = 5 } or { in = [\"a\", \"b\"] }"
                        .into(),
                ),
            );
            return None;
        }
        let mut conditions: Vec<Condition> = tests
            .into_iter()
            .map(|test| Condition::Field {
                path: path.clone(),
                test,
            })
            .collect();
        Some(match conditions.len() {
            1 => conditions.pop().expect("one condition"),
            _ => Condition::All(conditions),
        })
    }

    fn operators(&mut self, ops: OperatorsConfig) -> Vec<Test> {
        let mut tests = Vec::new();
        let json = |v: Spanned<toml::Value>| toml_to_json_value(v.get_ref());
        let list =
            |v: Spanned<Vec<toml::Value>>| v.get_ref().iter().map(toml_to_json_value).collect();
        if let Some(v) = ops.equals {
            tests.push(Test::Equals(json(v)));
        }
        if let Some(v) = ops.not_equals {
            tests.push(Test::NotEquals(json(v)));
        }
        if let Some(v) = ops.in_ {
            tests.push(Test::In(list(v)));
        }
        if let Some(v) = ops.not_in {
            tests.push(Test::NotIn(list(v)));
        }
        if let Some(v) = ops.contains {
            tests.push(Test::Contains(json(v)));
        }
        if let Some(v) = ops.starts_with {
            tests.push(Test::StartsWith(v.into_inner()));
        }
        if let Some(v) = ops.ends_with {
            tests.push(Test::EndsWith(v.into_inner()));
        }
        if let Some(v) = ops.matches {
            match RegexBuilder::new(v.get_ref()).size_limit(REGEX_SIZE_LIMIT).build() {
                Ok(re) => tests.push(Test::Matches(re)),
                Err(e) => self.problem(
                    v.span(),
                    format!("this regular expression is not valid: {}", regex_reason(&e)),
                    Some("in TOML, write patterns in single quotes so backslashes stay as typed: matches = '^v\\d+$'".into()),
                ),
            }
        }
        for (value, make) in [
            (ops.gt, Test::Gt as fn(f64) -> Test),
            (ops.gte, Test::Gte),
            (ops.lt, Test::Lt),
            (ops.lte, Test::Lte),
        ] {
            if let Some(v) = value {
                tests.push(make(*v.get_ref()));
            }
        }
        for (value, make) in [
            (ops.before, Test::Before as fn(_) -> Test),
            (ops.after, Test::After),
        ] {
            if let Some(v) = value {
                let text = match v.get_ref() {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Datetime(d) => d.to_string(),
                    _ => String::new(),
                };
                match parse_timestamp(&text) {
                    Some(t) => tests.push(make(t)),
                    None => self.problem(
                        v.span(),
                        "this is not a date tripline can read",
                        Some("write a date like \"2025-06-14\" or \"2025-06-14T09:00:00Z\"".into()),
                    ),
                }
            }
        }
        if let Some(v) = ops.exists {
            tests.push(Test::Exists(*v.get_ref()));
        }
        tests
    }
}

/// Whether a `timezone` names a field (`person.properties.$geoip_time_zone`) rather than a zone.
fn looks_like_a_field(text: &str) -> bool {
    let root = text.split('.').next().unwrap_or_default();
    text.contains('.') && matches!(root, "properties" | "person")
}

/// `an [email] or a [jsonl]`: each table, the last one after "or".
fn one_of(tables: &[&str]) -> String {
    let named: Vec<String> = tables
        .iter()
        .map(|t| {
            // `http` is read letter by letter: "an aitch...".
            let article = if t.starts_with(['a', 'e', 'i', 'o', 'u']) || *t == "http" {
                "an"
            } else {
                "a"
            };
            format!("{article} [{t}]")
        })
        .collect();
    match named.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// A table (`[when]`, `[wait]`) as the author wrote it, for `GET /rules`.
fn table_as_written(source: &str, table: &str) -> Value {
    toml::from_str::<toml::Table>(source)
        .ok()
        .and_then(|t| t.get(table).map(toml_to_json_value))
        .unwrap_or(Value::Null)
}

fn regex_reason(e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(s) => s
            .lines()
            .rev()
            .find(|l| l.starts_with("error:"))
            .map(|l| l.trim_start_matches("error:").trim().to_string())
            .unwrap_or_else(|| s.clone()),
        regex::Error::CompiledTooBig(_) => "it is too large".into(),
        other => other.to_string(),
    }
}

/// The time zone `text` names, or a problem at it (with the closest name, if one is close).
/// `or_field`: whether the key may also name a field, which the hint then says.
pub(crate) fn zone_name(text: &Spanned<String>, p: &mut Problems, or_field: bool) -> Option<Tz> {
    let name = text.get_ref().trim();
    if let Ok(tz) = name.parse::<Tz>() {
        return Some(tz);
    }
    let hint = match (did_you_mean(name, zone_names()), or_field) {
        (Some(close), _) => format!("did you mean \"{close}\"?"),
        (None, true) => "write an IANA time-zone name like \"Europe/Paris\", \"America/New_York\" or \"UTC\", or a field holding one like \"person.properties.$geoip_time_zone\"".into(),
        (None, false) => "write an IANA time-zone name like \"Europe/Paris\", \"America/New_York\" or \"UTC\"".into(),
    };
    p.add(
        text.span(),
        format!("`{name}` is not a time zone tripline knows"),
        Some(hint),
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `source` compiled as `r.toml`, with no cap group and nothing declared.
    fn compile_rule(source: &str, templates: &mut Templates) -> Result<Rule, Vec<Diagnostic>> {
        compile(
            Path::new("r.toml"),
            source,
            templates,
            &Caps::new(),
            &Declared::default(),
        )
    }

    fn problems(source: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.text.hbs"), "Hi").unwrap();
        let (mut templates, _) = Templates::load(dir.path());
        match compile_rule(source, &mut templates) {
            Ok(_) => vec![],
            Err(p) => p.iter().map(|d| d.to_string()).collect(),
        }
    }

    const JSONL: &str = "[jsonl]\nfile = \"o.jsonl\"\nfields = { who = \"distinct_id\" }\n";

    #[test]
    fn a_template_that_cannot_be_read_is_named_as_such_not_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.text.hbs"), "Hi {{#if x}}").unwrap();
        let (mut templates, template_problems) = Templates::load(dir.path());
        assert_eq!(template_problems.len(), 1);
        let source = "name = \"r\"\n[when]\nevent = \"x\"\n[email]\nto = \"a@b.c\"\nsubject = \"s\"\ntemplate = \"hello\"\n";
        let problems = compile_rule(source, &mut templates).unwrap_err();
        let message = problems[0].to_string();
        assert!(
            message.contains("the template \"hello\" cannot be used: hello.text.hbs has a problem"),
            "{message}"
        );
    }

    #[test]
    fn a_good_rule_compiles() {
        let src = format!(
            "name = \"r\"\n[when]\nevent = \"x\"\n\"properties.a\" = {{ gt = 1, lt = 9 }}\n{JSONL}"
        );
        assert_eq!(problems(&src), Vec::<String>::new());
    }

    #[test]
    fn a_digests_email_must_use_its_events() {
        let digest = |body: &str| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("d.text.hbs"), body).unwrap();
            let (mut templates, _) = Templates::load(dir.path());
            let source = "name = \"r\"\n[when]\nevent = \"x\"\n[digest]\nevery = \"1 day\"\nat = \"09:00\"\n\
                          [email]\nto = \"a@b.c\"\nsubject = \"s\"\ntemplate = \"d\"\n";
            match compile_rule(source, &mut templates) {
                Ok(_) => vec![],
                Err(p) => p.iter().map(|d| d.to_string()).collect(),
            }
        };
        let none = digest("{{events_count}} orders");
        assert!(
            none.len() == 1 && none[0].contains("never lists its events"),
            "{none:?}"
        );
        assert_eq!(
            digest("{{#each events}}- {{distinct_id}}\n{{/each}}"),
            Vec::<String>::new()
        );
        assert_eq!(
            digest("{{#each events as |e|}}- {{e.distinct_id}}\n{{/each}}"),
            Vec::<String>::new()
        );
        assert_eq!(
            digest("{{#each events~}} x {{~/each}}"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_rule_about_held_back_rules_is_about_nothing_else() {
        let src =
            format!("name = \"r\"\n[when]\nevent = [\"$tripline_suppressed\", \"x\"]\n{JSONL}");
        let p = problems(&src);
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("r.toml:3:9: a rule about `$tripline_suppressed`"),
            "{p:?}"
        );
        let src = format!("name = \"r\"\n[when]\nevent = \"$tripline_suppressed\"\n{JSONL}");
        assert_eq!(problems(&src), Vec::<String>::new());
    }

    #[test]
    fn unknown_keys_get_did_you_mean() {
        let src = format!(
            "name = \"r\"\n[when]\nevent = \"x\"\n[count]\nper = [\"distinct_id\"]\nat_lest = 5\n{JSONL}"
        );
        let p = problems(&src);
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("r.toml:6:1: unknown key `at_lest` (did you mean `at_least`?"),
            "{p:?}"
        );
        let src = format!(
            "name = \"r\"\n[when]\nevent = \"x\"\n\"properties.a\" = {{ gtt = 1 }}\n{JSONL}"
        );
        let p = problems(&src);
        assert!(
            p[0].contains("unknown key `gtt` (did you mean `gt`?"),
            "{p:?}"
        );
    }

    #[test]
    fn every_misspelled_key_of_a_file_is_reported_then_the_rest_is_checked() {
        let src = format!(
            "name = \"r\"\ndescripton = \"x\"\n[when]\nevent = \"x\"\n\"propreties.a\" = 1\n\
             [count]\nper = [\"distinct_id\"]\nat_least = 2\nwithn = \"7 days\"\n{JSONL}"
        );
        let p = problems(&src);
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(
            p[0].starts_with("r.toml:2:1: unknown key `descripton`"),
            "{p:?}"
        );
        assert!(p[1].starts_with("r.toml:9:1: unknown key `withn`"), "{p:?}");
        assert!(
            p[2].starts_with("r.toml:5:1: `propreties.a` is not a field"),
            "{p:?}"
        );
    }

    #[test]
    fn every_semantic_problem_is_reported() {
        let src = "name = \"r\"\n[when]\nevent = \"x\"\n\"propreties.a\" = 1\n\"properties.b\" = { matches = \"(\" }\n\
                   [email]\nto = \"{{person.properties.email}}\"\nsubject = \"s\"\ntemplate = \"helo\"\n\
                   [jsonl]\nfile = \"../x.jsonl\"\nfields = { a = \"distinct_id\" }\n";
        let p = problems(src);
        assert_eq!(p.len(), 4, "{p:#?}");
        assert!(
            p[0].starts_with("r.toml:4:1: `propreties.a` is not a field"),
            "{p:?}"
        );
        assert!(
            p[1].starts_with("r.toml:5:30: this regular expression is not valid: unclosed group"),
            "{p:?}"
        );
        assert!(
            p[2].contains("no template \"helo\"") && p[2].contains("did you mean \"hello\"?"),
            "{p:?}"
        );
        assert!(p[3].contains("`..` is not allowed"), "{p:?}");
    }

    #[test]
    fn wait_tables_are_checked_like_every_other() {
        let rule =
            |wait: &str| format!("name = \"r\"\n[when]\nevent = \"x\"\n[wait]\n{wait}\n{JSONL}");
        assert_eq!(
            problems(&rule("for = \"30 minutes\"\nunless = { event = \"y\" }")),
            Vec::<String>::new()
        );
        let p = problems(&rule("for = \"30 minutes\"\nunles = { event = \"y\" }"));
        assert!(
            p[0].contains("unknown key `unles` (did you mean `unless`?"),
            "{p:?}"
        );
        let p = problems(&rule("for = \"soon\""));
        assert!(p[0].contains("not a length of time"), "{p:?}");
        let p = problems(&rule(
            "for = \"1h\"\nunless = { event = \"y\" }\nuntil = { event = \"z\" }",
        ));
        assert!(p[0].contains("`unless` or `until`, not both"), "{p:?}");
        let p = problems(&rule("for = \"1h\"\nuntil = { \"properties.a\" = 1 }"));
        assert!(p[0].contains("must say which event they wait for"), "{p:?}");
        let p = problems(&rule(
            "for = \"1h\"\nthen = { \"propreties.plan\" = \"free\" }",
        ));
        assert!(p[0].contains("`propreties.plan` is not a field"), "{p:?}");
        let p = problems(&rule("for = \"1h\"\nif_pending = \"again\""));
        assert!(p[0].contains("unknown variant `again`"), "{p:?}");
    }

    #[test]
    fn templates_of_a_waiting_rule_know_until_and_waited() {
        let email = |wait: &str, subject: &str| {
            format!(
                "name = \"r\"\n[when]\nevent = \"x\"\n{wait}[email]\nto = \"a@b.c\"\nsubject = \"{subject}\"\ntemplate = \"hello\"\n"
            )
        };
        let until = "[wait]\nfor = \"1h\"\nuntil = { event = \"y\" }\n";
        assert_eq!(
            problems(&email(until, "{{until.properties.role}} after {{waited}}")),
            Vec::<String>::new()
        );
        let p = problems(&email(until, "{{until.propreties.role}}"));
        assert!(p[0].contains("not a field"), "{p:?}");
        let delay = "[wait]\nfor = \"1h\"\n";
        let p = problems(&email(delay, "{{until.properties.role}}"));
        assert!(
            p[0].contains("only filled in for rules whose [wait] has `until`"),
            "{p:?}"
        );
        let p = problems(&email("", "{{waited}}"));
        assert!(
            p[0].contains("only filled in for rules with a [wait] table"),
            "{p:?}"
        );
    }

    #[test]
    fn limits_need_once_per_or_a_cap_group_that_exists() {
        let rule = |limits: &str| {
            format!("name = \"r\"\n[when]\nevent = \"x\"\n[limits]\n{limits}\n{JSONL}")
        };
        let p = problems(&rule("again_after = \"1 day\""));
        assert!(p[0].contains("`again_after` needs `once_per`"), "{p:?}");
        assert!(
            p[1].contains("[limits] needs `once_per` or `cap_group`"),
            "{p:?}"
        );
        let p = problems(&rule("cap_group = \"marketing\""));
        assert!(
            p[0].contains("there is no cap group \"marketing\""),
            "{p:?}"
        );
        let (caps, list) = caps(
            Path::new("_caps.toml"),
            "[marketing]\nat_most = 2\nper_period = \"week\"\n",
        );
        assert!(list.is_empty(), "{list:?}");
        let dir = tempfile::tempdir().unwrap();
        let (mut templates, _) = Templates::load(dir.path());
        let mut problems = |text: &str| match compile(
            Path::new("r.toml"),
            text,
            &mut templates,
            &caps,
            &Declared::default(),
        ) {
            Ok(_) => vec![],
            Err(p) => p.iter().map(|d| d.to_string()).collect(),
        };
        assert_eq!(
            problems(&rule("cap_group = \"marketing\"")),
            Vec::<String>::new()
        );
        let p = problems(&rule("cap_group = \"marketting\""));
        assert!(p[0].contains("did you mean \"marketing\"?"), "{p:?}");
    }

    #[test]
    fn send_windows_are_checked() {
        let rule =
            |w: &str| format!("name = \"r\"\n[when]\nevent = \"x\"\n[send_window]\n{w}\n{JSONL}");
        assert_eq!(
            problems(&rule(
                "days = [\"mon\"]\nhours = \"09:00-18:00\"\ntimezone = \"Europe/Paris\""
            )),
            Vec::<String>::new()
        );
        let p = problems(&rule("days = [\"mnd\"]\nhours = \"9-18\""));
        assert!(
            p[0].contains("`mnd` is not a day (did you mean \"mon\"?"),
            "{p:?}"
        );
        assert!(p[1].contains("`9-18` is not a range of hours"), "{p:?}");
        let p = problems(&rule("hours = \"22:00-06:00\""));
        assert!(p[0].contains("must end after it starts"), "{p:?}");
    }

    #[test]
    fn digests_are_checked() {
        let rule = |d: &str| format!("name = \"r\"\n[when]\nevent = \"x\"\n[digest]\n{d}\n{JSONL}");
        assert_eq!(
            problems(&rule("every = \"1 day\"\nat = \"09:00\"")),
            Vec::<String>::new()
        );
        let p = problems(&rule("every = \"2 days\"\nat = \"25:00\"\nkeep = 0"));
        assert!(p[0].contains("every day or every week"), "{p:?}");
        assert!(p[1].contains("`25:00` is not a time of day"), "{p:?}");
        assert!(p[2].contains("`keep` must be between 1 and 100"), "{p:?}");
        let p = problems(&format!(
            "name = \"r\"\n[when]\nevent = \"x\"\n[wait]\nfor = \"1h\"\n[digest]\nevery = \"1 day\"\nat = \"09:00\"\n{JSONL}"
        ));
        assert!(p[0].contains("cannot also have [wait]"), "{p:?}");
    }

    #[test]
    fn event_is_required_and_an_action_too() {
        let p = problems("name = \"r\"\n[when]\n\"properties.a\" = 1\n");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("[when] must say which event"));
        assert!(p[1].contains("no action"));
    }
}
