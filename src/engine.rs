//! The engine: decides what a batch of events does under one rule set.
//!
//! For each event not seen before (by `uuid`), each candidate rule (indexed by event name) is
//! checked in file order: `[when]` → `[count]` (bump the counter or time window, act from
//! `at_least` on) → `[limits]` (once per key, or again after a while) → actions. Each rule whose
//! `[when]` held gets an [`Outcome`].
//!
//! It works in two steps so that a store can load a whole batch's state at once: a [`Plan`]
//! matches the events and works out the state keys their rules need (no state read), the store
//! loads them into a [`State`], and [`Plan::decide`] decides on that state in memory. The engine
//! performs no I/O: it returns the [`Effect`]s (each action's output, or why it could not be
//! made), which the committer makes durable together with the changed state, and which
//! `tripline test` and `replay` inspect instead. Each action of a rule stands on its own: a failed
//! email does not keep the rule's line from being written.

use tracing::{debug, info, info_span, warn};

use crate::actions::{DigestInput, Env, Input, Output, Waited};
use crate::ingest::event::Event;
use crate::ingest::path::FieldPath;
use crate::rules::{Digest, Ends, IfPending, Rule, RuleSet, SUPPRESSED_EVENT, Wait};
use crate::store::pending::Collected;
use crate::store::{Distinct, Held, Pending, RuleState, State, StateKey, StoreError, Wants};
use sha2::{Digest as _, Sha256};

/// Something a rule did, to be made durable.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// An action's output, for the rule at index `rule` of the rule set.
    Output { rule: usize, output: Output },
    /// An action that could not be made from the event, with why. Retrying the same event
    /// would not help; a delivered kind's failure is kept in the delivery history.
    Failed {
        rule: usize,
        kind: &'static str,
        delivered: bool,
        reason: String,
    },
}

/// What one rule did with one event whose `[when]` held.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The rule acted.
    Fired,
    /// `[count]` counted the event and is still below `at_least`.
    Counting { count: u64 },
    /// `[limits]` held the rule back: it already acted for these values, at `last_ms`; it may
    /// act again from `until_ms` (`None`: never, a once-ever limit).
    Suppressed { last_ms: i64, until_ms: Option<i64> },
    /// `[limits] cap_group`: the group has had as many actions for this recipient this period
    /// as it allows (`at_most`); the next period starts at `until_ms`.
    Capped {
        group: String,
        at_most: u64,
        until_ms: i64,
    },
    /// The event has no value for a field the rule counts or limits by (`per`, `once_per`).
    NoKey { field: String },
    /// The rule acted, but some of its actions could not be made from this event, for these
    /// reasons; the others were.
    PartlyFailed { reasons: Vec<String> },
    /// None of the rule's actions could be made from this event (a field its email uses is
    /// missing...), or its `[wait]` could not start: it did not act. Retrying the same event
    /// would not help, so it is reported, not answered with an error.
    Failed { reasons: Vec<String> },
    /// `[wait]`: the rule waits (a wait started, started again, or goes on: see `if_pending`)
    /// and ends at this time (milliseconds since 1970).
    Waiting { until_ms: i64 },
    /// `[wait] unless`: the event cancelled the rule's pending wait.
    Cancelled,
    /// A wait ended without acting: no `until` event came in time, or `then` did not hold.
    Expired { why: &'static str },
    /// `[wait]`: no wait could start (the rule has as many pending as it may).
    WaitRefused { reason: String },
    /// `[send_window]`: the rule acted outside its window; its actions are held until it opens
    /// (milliseconds since 1970), and run then.
    Held { until_ms: i64 },
    /// `[digest]`: the event was added to the digest sent at this time.
    Collected { until_ms: i64 },
}

impl Outcome {
    /// Whether the rule acted (some of its actions, at least).
    pub fn acted(&self) -> bool {
        matches!(self, Outcome::Fired | Outcome::PartlyFailed { .. })
    }

    /// Why the rule was held back when it would have acted, if it was: never silent, this is
    /// counted per rule and reason, and shown in the reply and at `GET /rules`.
    pub fn suppressed(&self) -> Option<&'static str> {
        match self {
            Outcome::Suppressed { .. } => Some("limits"),
            Outcome::Capped { .. } => Some("cap"),
            _ => None,
        }
    }
}

/// The event an outcome is about: its uuid and whose it is; and, for an outcome that ended a
/// pending wait (`until`, `unless`), the uuid of the event that started it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct About {
    pub uuid: Option<String>,
    pub who: Option<String>,
    pub ended: Option<String>,
}

/// What happened to a batch of events.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    /// For each event and each rule whose `[when]` held, in order: the rule's index in the
    /// rule set and what it did.
    pub outcomes: Vec<(usize, Outcome)>,
    /// The event each of `outcomes` is about (for a wait that ended, the event that started
    /// it), for `GET /explain`.
    pub about: Vec<About>,
    /// Events skipped because their `uuid` was handled before (a retried delivery).
    pub duplicates: usize,
    /// Pending waits ended unfired because their rule no longer waits (deleted, renamed, or
    /// without `[wait]` now), by rule name.
    pub dropped: Vec<String>,
    /// The `$tripline_suppressed` events made for rules held back, when some rule is about them:
    /// [`follow_suppressions`] runs them, in the same transaction.
    pub suppressions: Vec<Event>,
}

impl Report {
    /// Adds what `later` did, as if it had been part of this report.
    pub fn append(&mut self, later: Report) {
        self.outcomes.extend(later.outcomes);
        self.about.extend(later.about);
        self.duplicates += later.duplicates;
        self.dropped.extend(later.dropped);
        self.suppressions.extend(later.suppressions);
    }

    /// Records `outcome` of the rule at `index` for `event` (at `t_ms`), with the
    /// `$tripline_suppressed` event it makes if it held the rule back and some rule heeds that.
    fn push(&mut self, rules: &RuleSet, index: usize, outcome: Outcome, event: &Event, t_ms: i64) {
        if let (Some(reason), true) = (outcome.suppressed(), rules.heeds_suppressions()) {
            let group = match &outcome {
                Outcome::Capped { group, .. } => Some(group.as_str()),
                _ => None,
            };
            let rule = &rules.rules()[index].name;
            self.suppressions
                .push(suppression_event(rule, reason, group, event, t_ms));
        }
        self.outcomes.push((index, outcome));
        self.about.push(About {
            uuid: event.uuid().map(str::to_string),
            who: event.distinct_id.as_str().map(str::to_string),
            ended: None,
        });
    }

    /// The names of the rules that acted, once per event they acted on.
    pub fn fired(&self, rules: &RuleSet) -> Vec<String> {
        self.rules_where(rules, Outcome::acted)
    }

    /// The names of the rules whose outcome passes `test`, once per event, in order.
    pub fn rules_where(&self, rules: &RuleSet, test: impl Fn(&Outcome) -> bool) -> Vec<String> {
        self.outcomes
            .iter()
            .filter(|(_, o)| test(o))
            .map(|(i, _)| rules.rules()[*i].name.clone())
            .collect()
    }

    /// Each failed action as `rule "name": reason`.
    pub fn failures(&self, rules: &RuleSet) -> Vec<String> {
        self.outcomes
            .iter()
            .flat_map(|(i, o)| {
                let reasons = match o {
                    Outcome::Failed { reasons } | Outcome::PartlyFailed { reasons } => {
                        reasons.as_slice()
                    }
                    Outcome::WaitRefused { reason } => std::slice::from_ref(reason),
                    _ => &[],
                };
                let name = &rules.rules()[*i].name;
                reasons.iter().map(move |r| format!("rule \"{name}\": {r}"))
            })
            .collect()
    }
}

/// Runs `events` through `rules`: loads the state they need from `store`, decides, and saves what
/// changed, pushing effects onto `effects`. `now_unix` is the time of handling (it dates handled
/// ids); windows and `again_after` go by the events' own timestamps, so a replay of old events
/// behaves as they did.
pub fn run(
    rules: &RuleSet,
    events: &[Event],
    store: &mut dyn RuleState,
    env: &Env,
    now_unix: u64,
    effects: &mut Vec<Effect>,
) -> Result<Report, StoreError> {
    let plan = Plan::new(rules, events);
    let mut wants = Wants::default();
    plan.add_wants(rules, events, &mut wants);
    let mut state = store.load(&wants)?;
    let limits = plan.limits_of_waits(rules, &state);
    if !limits.is_empty() {
        state.merge(store.load(&Wants::keys(&limits))?);
    }
    let mut report = plan.decide(rules, events, &mut state, env, effects);
    follow_suppressions(
        rules,
        &mut report,
        &mut state,
        |w| store.load(w),
        env,
        effects,
    )?;
    store.save(state, now_unix)?;
    Ok(report)
}

/// Ends the pending waits due by `until_ms` (at most `max`): loads what they need from `store`,
/// decides, and saves, pushing effects onto `effects`. What `tripline test` and `replay` do as
/// their clock passes deadlines; the service does the same in its committer.
pub fn end_due_waits(
    rules: &RuleSet,
    store: &mut dyn RuleState,
    until_ms: i64,
    max: usize,
    env: &Env,
    now_unix: u64,
    effects: &mut Vec<Effect>,
) -> Result<Report, StoreError> {
    let due = DuePlan::new(rules, store.due_waits(until_ms, max)?);
    let mut wants = Wants::default();
    due.add_wants(&mut wants);
    let mut state = store.load(&wants)?;
    let mut report = due.decide(rules, &mut state, until_ms, env, effects, &mut Vec::new());
    follow_suppressions(
        rules,
        &mut report,
        &mut state,
        |w| store.load(w),
        env,
        effects,
    )?;
    store.save(state, now_unix)?;
    Ok(report)
}

/// Runs the `$tripline_suppressed` events in `report` (made when rules were held back) through
/// the rules about them, as a second step on the same `state`: loads what they need with `load`
/// (from the same transaction), decides, and adds what they did to `report`. A rule about them
/// that is held back in turn makes no further event.
pub fn follow_suppressions(
    rules: &RuleSet,
    report: &mut Report,
    state: &mut State,
    mut load: impl FnMut(&Wants) -> Result<State, StoreError>,
    env: &Env,
    effects: &mut Vec<Effect>,
) -> Result<(), StoreError> {
    if report.suppressions.is_empty() {
        return Ok(());
    }
    let events = std::mem::take(&mut report.suppressions);
    let plan = Plan::of_suppressions(rules, &events);
    let mut wants = Wants::default();
    plan.add_wants(rules, &events, &mut wants);
    // What is in `state` already was loaded and may have changed: it is kept as it is.
    state.merge(load(&wants)?);
    let limits = plan.limits_of_waits(rules, state);
    if !limits.is_empty() {
        state.merge(load(&Wants::keys(&limits))?);
    }
    let mut more = plan.decide(rules, &events, state, env, effects);
    more.suppressions.clear();
    report.append(more);
    Ok(())
}

/// The `$tripline_suppressed` event for `rule` held back for `reason` (and cap `group`) on
/// `event` at `t_ms`: the same person, and what happened in its properties. It has no uuid of its
/// own: it is made once, with the event that caused it, which is deduplicated.
fn suppression_event(
    rule: &str,
    reason: &str,
    group: Option<&str>,
    event: &Event,
    t_ms: i64,
) -> Event {
    use serde_json::{Value, json};
    let time = chrono::DateTime::from_timestamp_millis(t_ms).unwrap_or(event.time);
    let mut properties = json!({
        "rule": rule,
        "reason": reason,
        "event": event.name,
        "event_uuid": event.uuid,
    });
    if let Some(group) = group {
        properties["cap_group"] = Value::from(group);
    }
    Event {
        name: Value::from(SUPPRESSED_EVENT),
        uuid: Value::Null,
        distinct_id: event.distinct_id.clone(),
        timestamp: Value::String(time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        time,
        properties,
        person_properties: event.person_properties.clone(),
        elements_chain: Value::Null,
        source: event.source.clone(),
    }
}

/// The rules each event of a batch matched, and the state keys each of them counts and limits
/// by: everything that can be worked out before any state is read, so that a store can load it
/// all at once.
pub struct Plan {
    /// Every rule each event matched, by event then file order: an event no rule wants has none.
    matched: Vec<Matched>,
}

/// One rule an event matched, with the keys of its `[count]`, `[limits]` and `[wait]`, or why
/// the event has none (a missing field).
struct Matched {
    /// The event's index in the batch.
    event: usize,
    rule: usize,
    /// Whether the rule's `[when]` held, or the event only matters to a pending wait.
    role: Role,
    count: Result<Option<StateKey>, Outcome>,
    limits: Result<LimitKeys, Outcome>,
    wait: Result<Option<StateKey>, Outcome>,
}

/// The `[limits]` keys of a rule for one event: its once-key and its cap group's key.
#[derive(Debug, Default, Clone)]
struct LimitKeys {
    once: Option<StateKey>,
    cap: Option<StateKey>,
}

impl Matched {
    /// The rule at `index` whose `[when]` holds for the event at `i`, with its keys.
    fn trigger(i: usize, index: usize, rule: &Rule, event: &Event) -> Matched {
        Matched {
            event: i,
            rule: index,
            role: Role::Trigger,
            count: match &rule.count {
                Some(c) => state_key(&rule.name, c.key_kind(), &c.per, event).map(Some),
                None => Ok(None),
            },
            limits: limit_keys(rule, event),
            wait: wait_key(rule, event),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `[when]` held: the rule counts, acts or starts waiting.
    Trigger,
    /// The event may cancel, complete or (for `then`) update the rule's pending wait.
    Watch,
}

impl Plan {
    /// Matches `events` against `rules` and works out their keys. No state is read.
    pub fn new(rules: &RuleSet, events: &[Event]) -> Plan {
        let mut matched = Vec::new();
        for (i, event) in events.iter().enumerate() {
            // A pending wait sees the event before the rule may start a new one with it.
            for (index, rule) in rules.watching(event) {
                matched.push(Matched {
                    event: i,
                    rule: index,
                    role: Role::Watch,
                    count: Ok(None),
                    limits: Ok(LimitKeys::default()),
                    wait: wait_key(rule, event),
                });
            }
            for (index, rule) in rules.matching(event) {
                matched.push(Matched::trigger(i, index, rule, event));
            }
        }
        Plan { matched }
    }

    /// Matches `$tripline_suppressed` events (see [`follow_suppressions`]) against the rules
    /// about them. They end no waits.
    fn of_suppressions(rules: &RuleSet, events: &[Event]) -> Plan {
        let mut matched = Vec::new();
        for (i, event) in events.iter().enumerate() {
            for (index, rule) in rules.on_suppression(event) {
                matched.push(Matched::trigger(i, index, rule, event));
            }
        }
        Plan { matched }
    }

    /// Adds the state this plan reads to `wants`: the ids of the events some rule wants (only
    /// those are deduplicated) and the keys their rules count and limit by.
    pub fn add_wants<'a>(&'a self, rules: &'a RuleSet, events: &'a [Event], wants: &mut Wants<'a>) {
        for (i, m) in self.matched.iter().enumerate() {
            // Once per event, though it may match several rules.
            let first_of_event = i == 0 || self.matched[i - 1].event != m.event;
            if let (true, Some(uuid)) = (first_of_event, events[m.event].uuid()) {
                wants.uuids.push(uuid);
            }
            if let Ok(Some(key)) = &m.count {
                wants.keys.push(key);
            }
            if let Ok(keys) = &m.limits {
                wants.keys.extend(keys.once.iter().chain(&keys.cap));
            }
            if let Ok(Some(key)) = &m.wait {
                wants.waits.push(key);
                wants.waiting(&rules.rules()[m.rule].name);
            }
            let rule = &rules.rules()[m.rule];
            if rule.send_window.is_some() {
                wants.waiting(&rule.name);
            }
        }
    }

    /// The `[limits]` keys of the pending waits this plan's events may end (an `until` event,
    /// or a trigger after a wait's end): they come from each wait's triggering event, so they
    /// are known once the waits are loaded.
    pub fn limits_of_waits(&self, rules: &RuleSet, state: &State) -> Vec<StateKey> {
        let mut keys = Vec::new();
        for m in &self.matched {
            let Some(key) = m.wait.as_ref().ok().and_then(Option::as_ref) else {
                continue;
            };
            let Some(pending) = state.wait(key) else {
                continue;
            };
            if let Ok(its) = limit_keys(&rules.rules()[m.rule], &pending.trigger) {
                keys.extend(its.once.into_iter().chain(its.cap));
            }
        }
        keys
    }

    /// Decides what `events` do, changing `state` and pushing effects onto `effects`.
    pub fn decide(
        &self,
        rules: &RuleSet,
        events: &[Event],
        state: &mut State,
        env: &Env,
        effects: &mut Vec<Effect>,
    ) -> Report {
        let mut report = Report::default();
        // An event no rule wants has no effect to make durable, so nothing records it either:
        // only events with a match are in the plan.
        for matched in self.matched.chunk_by(|a, b| a.event == b.event) {
            let event = &events[matched[0].event];
            let _span = info_span!(
                "event",
                event.uuid = event.uuid().unwrap_or("-"),
                event.name = event.name()
            )
            .entered();
            if let Some(uuid) = event.uuid()
                && !state.first_delivery(uuid)
            {
                debug!("already handled: a retried delivery has no second effect");
                report.duplicates += 1;
                continue;
            }
            if let Some(who) = event.distinct_id.as_str() {
                for m in matched.iter().filter(|m| m.role == Role::Trigger) {
                    let limits = m.limits.as_ref().ok();
                    let keys = (m.count.as_ref().ok().and_then(Option::as_ref).into_iter())
                        .chain(limits.and_then(|l| l.once.as_ref()))
                        .chain(limits.and_then(|l| l.cap.as_ref()));
                    keys.for_each(|key| state.own(key, who));
                }
            }
            for m in matched {
                let rule = &rules.rules()[m.rule];
                let _rule_span = info_span!("rule", rule.id = %rule.name).entered();
                let mut ended = None;
                // The event that started a wait this one ended (`until`, `unless`).
                let mut started_by = None;
                let outcome = match m.role {
                    Role::Trigger => Some(apply(rules, m, event, state, env, effects, &mut ended)),
                    Role::Watch => watch(rules, m, event, state, env, effects).map(|(o, by)| {
                        started_by = by;
                        o
                    }),
                };
                if let Some((outcome, pending)) = ended {
                    let t_ms = pending.deadline_ms;
                    report.push(rules, m.rule, outcome, &pending.trigger, t_ms);
                }
                let Some(outcome) = outcome else { continue };
                match outcome {
                    Outcome::Fired => info!("rule fired"),
                    Outcome::Waiting { .. } => debug!("waiting"),
                    Outcome::Cancelled => info!("wait cancelled"),
                    _ => {}
                }
                report.push(rules, m.rule, outcome, event, event.time.timestamp_millis());
                if let Some(about) = report.about.last_mut() {
                    about.ended = started_by;
                }
            }
        }
        report
    }
}

/// Applies one matching rule. A pending wait the event comes after the end of ends first, its
/// outcome in `ended`.
fn apply(
    rules: &RuleSet,
    matched: &Matched,
    event: &Event,
    state: &mut State,
    env: &Env,
    effects: &mut Vec<Effect>,
    ended: &mut Option<(Outcome, Pending)>,
) -> Outcome {
    let index = matched.rule;
    let rule = &rules.rules()[index];
    let t_ms = event.time.timestamp_millis();
    let mut count = None;
    let count_key = match &matched.count {
        Ok(key) => key,
        Err(no_key) => return no_key.clone(),
    };
    if let (Some(c), Some(key)) = (&rule.count, count_key) {
        state.touch(key);
        let keep = usize::try_from(c.at_least).unwrap_or(usize::MAX);
        let window_ms = c
            .within
            .map(|w| i64::try_from(w.as_millis()).unwrap_or(i64::MAX));
        let n = match (&c.distinct, &c.period, window_ms) {
            (None, None, None) => state.increment(key),
            (None, None, Some(window_ms)) => state.count_within(key, t_ms, window_ms, keep),
            (None, Some(cal), _) => state.count_in_period(key, cal.period_of(t_ms, event)),
            (Some(field), period, window_ms) => {
                let Some(value) = field.lookup(event) else {
                    debug!(field = %field, "not counted: the event has no value for `distinct`");
                    return Outcome::NoKey {
                        field: field.to_string(),
                    };
                };
                let how = match (period, window_ms) {
                    (Some(cal), _) => Distinct::InPeriod(cal.period_of(t_ms, event)),
                    (None, Some(window_ms)) => Distinct::Within(window_ms),
                    (None, None) => Distinct::Ever,
                };
                state.count_distinct(key, digest(value), t_ms, how, keep)
            }
        };
        if n < c.at_least {
            debug!(count = n, at_least = c.at_least, "counted");
            return Outcome::Counting { count: n };
        }
        count = Some(n);
    }
    let keys = match &matched.limits {
        Ok(keys) => keys,
        Err(no_key) => return no_key.clone(),
    };
    if let Some(held) = held_back(rule, keys, t_ms, event, state) {
        debug!(?held, "held back by [limits]");
        return held;
    }
    if let (Some(digest), Ok(Some(key))) = (&rule.digest, &matched.wait) {
        return collect(rule, digest, key, event, count, state, env);
    }
    match &rule.wait {
        Some(wait) => match &matched.wait {
            Ok(Some(key)) => {
                // A wait this event comes after the end of, and that is due by the clock, is
                // over: it ends first, as it would have if the timer had come before this event.
                // One not due yet (within the grace period, or the event's clock is ahead) goes
                // on, and ends first when the timer comes; this event starts no other.
                let past = state.wait(key).filter(|p| p.deadline_ms < t_ms);
                if let Some(pending) = past.filter(|p| p.deadline_ms > env.waits_due_by_ms) {
                    return Outcome::Waiting {
                        until_ms: pending.deadline_ms,
                    };
                }
                let over = past.is_some();
                if over {
                    let pending = state.end_wait(key).expect("there is a wait");
                    let its_keys = limit_keys(rule, &pending.trigger).unwrap_or_default();
                    let outcome =
                        at_deadline(index, rules, &pending, &its_keys, state, env, effects);
                    *ended = Some((outcome, pending));
                }
                start_wait(rule, wait, key, event, count, state, env)
            }
            Ok(None) => unreachable!("a rule with [wait] has a wait key"),
            Err(no_key) => no_key.clone(),
        },
        None => hold(rule, event, count, None, keys, t_ms, state, env).unwrap_or_else(|| {
            act(
                index, rule, rules, event, count, None, keys, t_ms, state, env, effects,
            )
        }),
    }
}

/// Whether `[limits]` holds the rule back at `t_ms`, and how: `Suppressed` when it acted for
/// the once-key before, and not `again_after` ago, or in the same calendar period (in the zone
/// of `event`'s user; an event from a period before the last action's is held back too);
/// `Capped` when its cap group has had `at_most` actions for the recipient this period.
fn held_back(
    rule: &Rule,
    keys: &LimitKeys,
    t_ms: i64,
    event: &Event,
    state: &mut State,
) -> Option<Outcome> {
    let limits = rule.limits.as_ref()?;
    if let Some(key) = &keys.once {
        state.touch(key);
        if let Some(last) = state.last_acted(key) {
            // Whether it is held back, and from when it may act again.
            let (held, until_ms) = match (&limits.period, limits.again_after) {
                (Some(cal), _) => {
                    let tz = cal.zone.of(event);
                    let held = cal.period_in(tz, t_ms) <= cal.period_in(tz, last);
                    (held, Some(cal.next_start_in(tz, last)))
                }
                (None, Some(after)) => {
                    let after_ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
                    let held = t_ms.saturating_sub(last) < after_ms;
                    (held, Some(last.saturating_add(after_ms)))
                }
                (None, None) => (true, None),
            };
            if held {
                return Some(Outcome::Suppressed {
                    last_ms: last,
                    until_ms,
                });
            }
        }
    }
    if let (Some(cap), Some(key)) = (&limits.cap, &keys.cap) {
        state.touch(key);
        let period = cap.period.period_of(t_ms, event);
        if state.period_count(key, period) >= cap.at_most {
            let tz = cap.period.zone.of(event);
            return Some(Outcome::Capped {
                group: cap.name.clone(),
                at_most: cap.at_most,
                until_ms: cap.period.next_start_in(tz, t_ms),
            });
        }
    }
    None
}

/// Runs every action of the rule on `event`; each one's output or failure is its own. A rule
/// none of whose actions could be made is not marked as having acted, so a later event retries.
#[allow(clippy::too_many_arguments)]
fn act(
    index: usize,
    rule: &Rule,
    rules: &RuleSet,
    event: &Event,
    count: Option<u64>,
    waited: Option<Waited>,
    keys: &LimitKeys,
    t_ms: i64,
    state: &mut State,
    env: &Env,
    effects: &mut Vec<Effect>,
) -> Outcome {
    let input = Input {
        rule: &rule.name,
        event,
        count,
        waited,
        digest: None,
        templates: &rules.templates,
        env,
    };
    let outcome = run_actions(index, rule, &input, effects);
    if outcome.acted() {
        mark_acted(rule, keys, t_ms, event, state);
    }
    outcome
}

/// Runs every action of the rule; each one's output or failure is its own.
fn run_actions(index: usize, rule: &Rule, input: &Input, effects: &mut Vec<Effect>) -> Outcome {
    let mut reasons = Vec::new();
    for action in &rule.actions {
        match action.run(input) {
            Ok(mut output) => {
                // Whom a delivery is about, for `GET /users` and `DELETE /users`, and which
                // event it comes from, for `GET /explain`.
                if let Output::Delivery(delivery) = &mut output {
                    delivery.person = input.event.distinct_id.as_str().map(String::from);
                    delivery.event = input.event.uuid().map(String::from);
                }
                effects.push(Effect::Output {
                    rule: index,
                    output,
                });
            }
            Err(reason) => {
                warn!(%reason, action.kind = action.kind(), "action failed");
                effects.push(Effect::Failed {
                    rule: index,
                    kind: action.kind(),
                    delivered: action.delivered(),
                    reason: reason.clone(),
                });
                reasons.push(reason);
            }
        }
    }
    if reasons.len() == rule.actions.len() {
        return Outcome::Failed { reasons };
    }
    match reasons.is_empty() {
        true => Outcome::Fired,
        false => Outcome::PartlyFailed { reasons },
    }
}

/// Records that the rule acted at `t_ms`: for `[limits]` (the once-key) and its cap group.
fn mark_acted(rule: &Rule, keys: &LimitKeys, t_ms: i64, event: &Event, state: &mut State) {
    if let Some(key) = &keys.once {
        state.mark_acted(key, t_ms);
    }
    if let (Some(cap), Some(key)) = (rule.limits.as_ref().and_then(|l| l.cap.as_ref()), &keys.cap) {
        state.count_in_period(key, cap.period.period_of(t_ms, event));
    }
}

/// If the rule's `[send_window]` is closed at `t_ms` where `event`'s user is: holds the action
/// (a pending record, due when the window opens, that runs it then), and counts it as the
/// rule acting now for `[limits]` and its cap, so that a second event before the window opens
/// is held back rather than held twice. `None` when the rule may act now.
#[allow(clippy::too_many_arguments)]
fn hold(
    rule: &Rule,
    event: &Event,
    count: Option<u64>,
    waited: Option<Waited>,
    keys: &LimitKeys,
    t_ms: i64,
    state: &mut State,
    env: &Env,
) -> Option<Outcome> {
    let until_ms = rule.send_window.as_ref()?.next_open(t_ms, event)?;
    if let Err(refused) = room_for_pending(rule, state, env) {
        return Some(refused);
    }
    // One record per decision: the event (its id, or its time) and the moment decided.
    let key = StateKey::new(
        &rule.name,
        "held",
        &[&event.uuid, &serde_json::Value::from(t_ms)],
    );
    let held = Held {
        until: waited.and_then(|w| w.until.cloned()),
        waited_ms: waited.map(|w| u64::try_from(w.after.as_millis()).unwrap_or(u64::MAX)),
    };
    state.set_wait(
        &key,
        Pending {
            rule: rule.name.clone(),
            deadline_ms: until_ms,
            trigger: event.clone(),
            latest: None,
            count,
            held: Some(held),
            digest: None,
        },
    );
    mark_acted(rule, keys, t_ms, event, state);
    info!(until_ms, "held until the send window opens");
    Some(Outcome::Held { until_ms })
}

/// A triggering event for a rule with `[wait]`: starts a wait for its values, or, if one is
/// pending, starts it again from this event (`if_pending = "restart"`, unless the event is older
/// than the one that started it) or lets it go on with this event as the latest seen (`keep`).
fn start_wait(
    rule: &Rule,
    wait: &Wait,
    key: &StateKey,
    event: &Event,
    count: Option<u64>,
    state: &mut State,
    env: &Env,
) -> Outcome {
    let t_ms = event.time.timestamp_millis();
    if let Some(pending) = state.wait(key) {
        let older = event.time < pending.trigger.time;
        if wait.if_pending == IfPending::Keep || older {
            let mut pending = pending.clone();
            if wait.then.is_some() {
                see(&mut pending, event);
            }
            let until_ms = pending.deadline_ms;
            state.set_wait(key, pending);
            return Outcome::Waiting { until_ms };
        }
    } else if let Err(refused) = room_for_pending(rule, state, env) {
        return refused;
    }
    let for_ms = i64::try_from(wait.for_.as_millis()).unwrap_or(i64::MAX);
    let until_ms = t_ms.saturating_add(for_ms);
    state.set_wait(
        key,
        Pending {
            rule: rule.name.clone(),
            deadline_ms: until_ms,
            trigger: event.clone(),
            latest: None,
            count,
            held: None,
            digest: None,
        },
    );
    Outcome::Waiting { until_ms }
}

/// Whether `rule` may keep one more pending record (a wait, a held action, a digest being
/// collected): at most `[waits] max_pending_per_rule` of them, together.
fn room_for_pending(rule: &Rule, state: &State, env: &Env) -> Result<(), Outcome> {
    if state.waiting(&rule.name) < env.max_pending_waits {
        return Ok(());
    }
    let reason = format!(
        "not kept for later: the rule already has {} pending waits, held actions or digests, the most one rule may have ([waits] max_pending_per_rule)",
        env.max_pending_waits
    );
    warn!(%reason);
    Err(Outcome::WaitRefused { reason })
}

/// Keeps `event` as the latest one seen by a pending wait, if it is (by its own time).
fn see(pending: &mut Pending, event: &Event) {
    if event.time >= pending.latest().time {
        pending.latest = Some(event.clone());
    }
}

/// An event that may matter to the rule's pending wait for its values: `unless` cancels it,
/// `until` completes it (the rule acts now), and with `then` it becomes the latest seen. An
/// event stamped after the wait's end is ignored, as is one with no pending wait: `None`.
fn watch(
    rules: &RuleSet,
    matched: &Matched,
    event: &Event,
    state: &mut State,
    env: &Env,
    effects: &mut Vec<Effect>,
) -> Option<(Outcome, Option<String>)> {
    let rule = &rules.rules()[matched.rule];
    let wait = rule.wait.as_ref()?;
    let key = matched.wait.as_ref().ok()?.as_ref()?;
    let pending = state.wait(key)?;
    let t_ms = event.time.timestamp_millis();
    if t_ms > pending.deadline_ms {
        debug!("stamped after the wait ended: it does not count for it");
        return None;
    }
    if event.time < pending.trigger.time {
        debug!("stamped before the event that started the wait: it belongs to an earlier one");
        return None;
    }
    match &wait.ends {
        Ends::Unless(c) if c.holds(event) => {
            let pending = state.end_wait(key)?;
            Some((
                Outcome::Cancelled,
                pending.trigger.uuid().map(str::to_string),
            ))
        }
        Ends::Until(c) if c.holds(event) => {
            let pending = state.end_wait(key)?;
            let by = pending.trigger.uuid().map(str::to_string);
            let outcome = until(
                rules, matched, rule, wait, &pending, event, state, env, effects,
            );
            Some((outcome, by))
        }
        _ => {
            if wait.then.is_some() {
                let mut pending = pending.clone();
                see(&mut pending, event);
                state.set_wait(key, pending);
            }
            None
        }
    }
}

/// A pending wait of `rule` ended by its `until` event `event`: acts on the event that started
/// it (`pending.trigger`) unless `then` does not hold or its limits hold it back.
#[allow(clippy::too_many_arguments)]
fn until(
    rules: &RuleSet,
    matched: &Matched,
    rule: &Rule,
    wait: &Wait,
    pending: &Pending,
    event: &Event,
    state: &mut State,
    env: &Env,
    effects: &mut Vec<Effect>,
) -> Outcome {
    let t_ms = event.time.timestamp_millis();
    if wait.then.as_ref().is_some_and(|then| !then.holds(event)) {
        return Outcome::Expired { why: THEN_FAILED };
    }
    let keys = match limit_keys(rule, &pending.trigger) {
        Ok(keys) => keys,
        Err(no_key) => return no_key,
    };
    if let Some(held) = held_back(rule, &keys, t_ms, &pending.trigger, state) {
        return held;
    }
    let waited = Waited {
        until: Some(event),
        after: (event.time - pending.trigger.time)
            .to_std()
            .unwrap_or_default(),
    };
    let trigger = &pending.trigger;
    let count = pending.count;
    hold(rule, trigger, count, Some(waited), &keys, t_ms, state, env).unwrap_or_else(|| {
        let (index, waited) = (matched.rule, Some(waited));
        act(
            index, rule, rules, trigger, count, waited, &keys, t_ms, state, env, effects,
        )
    })
}

/// Why a wait ended without acting.
const THEN_FAILED: &str = "`then` did not hold on the latest event";
const UNTIL_MISSED: &str = "no `until` event came in time";

/// Pending waits that are due, and the `[limits]` keys of their rules.
pub struct DuePlan {
    due: Vec<(StateKey, Pending, LimitKeys)>,
}

impl DuePlan {
    /// The waits `due` (as a store listed them), with their `[limits]` keys.
    pub fn new(rules: &RuleSet, due: Vec<(StateKey, Pending)>) -> DuePlan {
        let due = due
            .into_iter()
            .map(|(key, pending)| {
                let keys = rules
                    .named(&pending.rule)
                    .and_then(|(_, rule)| limit_keys(rule, &pending.trigger).ok())
                    .unwrap_or_default();
                (key, pending, keys)
            })
            .collect();
        DuePlan { due }
    }

    /// How many waits were due.
    pub fn len(&self) -> usize {
        self.due.len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }

    /// Adds the state this plan reads to `wants`.
    pub fn add_wants<'a>(&'a self, wants: &mut Wants<'a>) {
        for (key, pending, keys) in &self.due {
            wants.waits.push(key);
            wants.waiting(&pending.rule);
            wants.keys.extend(keys.once.iter().chain(&keys.cap));
        }
    }

    /// Ends each due wait that is still due by `until_ms` in `state` (a batch may have cancelled
    /// or restarted it meanwhile): the rule acts at the wait's deadline if its `then` holds on
    /// the latest event seen, unless it waited for an `until` event that never came. A wait
    /// whose rule no longer waits is dropped.
    /// `ended` gets each ended wait's rule and deadline.
    pub fn decide(
        &self,
        rules: &RuleSet,
        state: &mut State,
        until_ms: i64,
        env: &Env,
        effects: &mut Vec<Effect>,
        ended: &mut Vec<(usize, i64)>,
    ) -> Report {
        let mut report = Report::default();
        for (key, listed, keys) in &self.due {
            let Some(pending) = state.wait(key).filter(|p| p.deadline_ms <= until_ms) else {
                continue;
            };
            let rule_name = pending.rule.clone();
            let pending = state.end_wait(key).expect("there is a wait");
            // A held action runs as decided while its rule keeps pending records at all (as the
            // reload's sweep keeps them); a wait or a digest needs its table.
            let goes_on = |r: &Rule| match (&pending.held, &pending.digest) {
                (Some(_), _) => r.keeps_pending(),
                (None, Some(_)) => r.digest.is_some(),
                (None, None) => r.wait.is_some(),
            };
            let Some((index, _)) = rules.named(&rule_name).filter(|(_, r)| goes_on(r)) else {
                info!(rule.id = %rule_name, "dropped a pending wait: its rule no longer waits");
                report.dropped.push(rule_name);
                continue;
            };
            ended.push((index, pending.deadline_ms));
            let outcome = match (&pending.held, &pending.digest) {
                (Some(held), _) => release(index, rules, &pending, held, env, effects),
                (None, Some(collected)) => {
                    send_digest(index, rules, &pending, collected, env, effects)
                }
                (None, None) => {
                    // A wait started again in this batch has another trigger than the one listed:
                    // its keys (loaded with that batch's event) are the ones that count.
                    let restarted = (pending.trigger.uuid != listed.trigger.uuid)
                        || (pending.trigger.time != listed.trigger.time);
                    let keys = match restarted {
                        true => {
                            &limit_keys(&rules.rules()[index], &pending.trigger).unwrap_or_default()
                        }
                        false => keys,
                    };
                    at_deadline(index, rules, &pending, keys, state, env, effects)
                }
            };
            report.push(rules, index, outcome, &pending.trigger, pending.deadline_ms);
        }
        report
    }
}

/// Runs a held action now that its send window is open: as decided, once ([limits] and the cap
/// counted it when it was held).
fn release(
    index: usize,
    rules: &RuleSet,
    pending: &Pending,
    held: &Held,
    env: &Env,
    effects: &mut Vec<Effect>,
) -> Outcome {
    let rule = &rules.rules()[index];
    let waited = held.waited_ms.map(|ms| Waited {
        until: held.until.as_ref(),
        after: std::time::Duration::from_millis(ms),
    });
    let input = Input {
        rule: &rule.name,
        event: &pending.trigger,
        count: pending.count,
        waited,
        digest: None,
        templates: &rules.templates,
        env,
    };
    run_actions(index, rule, &input, effects)
}

/// Sends a digest at its time: the rule's actions run once, on the first event collected,
/// with the events listed (`{{#each events}}`) and counted (`{{events_count}}`).
fn send_digest(
    index: usize,
    rules: &RuleSet,
    pending: &Pending,
    collected: &Collected,
    env: &Env,
    effects: &mut Vec<Effect>,
) -> Outcome {
    let rule = &rules.rules()[index];
    let input = Input {
        rule: &rule.name,
        event: &pending.trigger,
        count: pending.count,
        waited: None,
        digest: Some(DigestInput {
            events: &collected.events,
            total: collected.total,
        }),
        templates: &rules.templates,
        env,
    };
    run_actions(index, rule, &input, effects)
}

/// Adds `event` to the rule's digest for its values (`per`), starting one if none is being
/// collected: sent at the digest's next time after the event.
fn collect(
    rule: &Rule,
    digest: &Digest,
    key: &StateKey,
    event: &Event,
    count: Option<u64>,
    state: &mut State,
    env: &Env,
) -> Outcome {
    let mut pending = match state.wait(key) {
        Some(pending) => pending.clone(),
        None if let Err(refused) = room_for_pending(rule, state, env) => return refused,
        None => Pending {
            rule: rule.name.clone(),
            deadline_ms: digest.next_send(event.time.timestamp_millis(), event),
            trigger: event.clone(),
            latest: None,
            count,
            held: None,
            digest: Some(Collected {
                events: Vec::new(),
                total: 0,
            }),
        },
    };
    let until_ms = pending.deadline_ms;
    if let Some(collected) = &mut pending.digest {
        collected.total += 1;
        if collected.events.len() < digest.keep {
            collected.events.push(event.clone());
        }
    }
    state.set_wait(key, pending);
    Outcome::Collected { until_ms }
}

/// Ends a wait at its deadline: the rule acts then, on the triggering event, if `then` holds on
/// the latest event seen and `[limits]` lets it, unless it waited for an `until` event that
/// never came. `once` is the `[limits]` key of the wait's triggering event.
fn at_deadline(
    index: usize,
    rules: &RuleSet,
    pending: &Pending,
    keys: &LimitKeys,
    state: &mut State,
    env: &Env,
    effects: &mut Vec<Effect>,
) -> Outcome {
    let rule = &rules.rules()[index];
    let wait = rule.wait.as_ref().expect("a rule with [wait]");
    let _span = info_span!(
        "wait",
        rule.id = %rule.name,
        event.uuid = pending.trigger.uuid().unwrap_or("-")
    )
    .entered();
    let t_ms = pending.deadline_ms;
    let outcome = if matches!(wait.ends, Ends::Until(_)) {
        Outcome::Expired { why: UNTIL_MISSED }
    } else if wait
        .then
        .as_ref()
        .is_some_and(|c| !c.holds(pending.latest()))
    {
        Outcome::Expired { why: THEN_FAILED }
    } else if let Some(held) = held_back(rule, keys, t_ms, &pending.trigger, state) {
        held
    } else {
        // As long as the wait was when it started (the rule may have been edited since).
        let waited = Waited {
            until: None,
            after: (pending.deadline_ms - pending.trigger.time.timestamp_millis())
                .try_into()
                .map(std::time::Duration::from_millis)
                .unwrap_or_default(),
        };
        let (trigger, count) = (&pending.trigger, pending.count);
        hold(rule, trigger, count, Some(waited), keys, t_ms, state, env).unwrap_or_else(|| {
            let waited = Some(waited);
            act(
                index, rule, rules, trigger, count, waited, keys, t_ms, state, env, effects,
            )
        })
    };
    match &outcome {
        Outcome::Fired => info!("wait ended: rule fired"),
        other => debug!(?other, "wait ended"),
    }
    outcome
}

/// A field's value as a number for `[count] distinct`: the first 8 bytes of the SHA-256 of its
/// JSON text, the same on every machine and version.
fn digest(value: &serde_json::Value) -> i64 {
    let hash = Sha256::digest(value.to_string().as_bytes());
    i64::from_le_bytes(hash[..8].try_into().expect("8 bytes"))
}

/// The `[limits]` keys of `rule` for `event`: its once-key, and its cap group's key for the
/// recipient (the group's own state, shared by every rule that names it).
fn limit_keys(rule: &Rule, event: &Event) -> Result<LimitKeys, Outcome> {
    let Some(limits) = &rule.limits else {
        return Ok(LimitKeys::default());
    };
    let once = match &limits.once_per {
        Some(once_per) => Some(state_key(&rule.name, "once", once_per, event)?),
        None => None,
    };
    let cap = match &limits.cap {
        Some(cap) => {
            let (owner, kind) = cap.key_parts();
            Some(state_key(owner, kind, &cap.per, event)?)
        }
        None => None,
    };
    Ok(LimitKeys { once, cap })
}

/// The `[wait]` key of `rule` for `event` (its `same` fields), if it waits.
fn wait_key(rule: &Rule, event: &Event) -> Result<Option<StateKey>, Outcome> {
    match (&rule.wait, &rule.digest) {
        (Some(w), _) => state_key(&rule.name, "wait", &w.same, event).map(Some),
        (None, Some(d)) => state_key(&rule.name, "digest", &d.per, event).map(Some),
        (None, None) => Ok(None),
    }
}

/// The state key for `rule` at the values of `paths` in `event`, or [`Outcome::NoKey`] when the
/// event lacks one of them (the rule then does not act on it).
fn state_key(
    owner: &str,
    kind: &str,
    paths: &[FieldPath],
    event: &Event,
) -> Result<StateKey, Outcome> {
    let mut values = Vec::with_capacity(paths.len());
    for path in paths {
        match path.lookup(event) {
            Some(v) => values.push(v),
            None => {
                debug!(field = %path, "not acting: the event has no value for this field");
                return Err(Outcome::NoKey {
                    field: path.to_string(),
                });
            }
        }
    }
    Ok(StateKey::new(owner, kind, &values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::email::Queued;
    use crate::ingest::event::decode;
    use crate::store::MemoryStore;
    use lettre::message::Mailbox;
    use std::path::Path;

    const RULE: &str = r#"
name = "fifth"
[when]
event = "used"
[count]
per = ["distinct_id"]
at_least = 2
[limits]
once_per = ["distinct_id"]
[email]
to = "{{person.properties.email}}"
subject = "hi"
template = "t"
[jsonl]
file = "out.jsonl"
fields = { who = "distinct_id" }
"#;

    /// Events run through one rule file with state in memory, every effect kept.
    struct Runs {
        _dir: tempfile::TempDir,
        set: RuleSet,
        store: MemoryStore,
        effects: Vec<Effect>,
        /// What the clock says is due (see `Env::waits_due_by_ms`).
        due_by: i64,
    }

    impl Runs {
        fn new(rule: &str) -> Runs {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("rules")).unwrap();
            std::fs::create_dir(dir.path().join("templates")).unwrap();
            std::fs::write(dir.path().join("rules/r.toml"), rule).unwrap();
            std::fs::write(dir.path().join("templates/t.text.hbs"), "count {{count}}").unwrap();
            let set = RuleSet::load(&crate::config::Declared::folders(
                &dir.path().join("rules"),
                &dir.path().join("templates"),
                dir.path(),
            ))
            .unwrap();
            Runs {
                _dir: dir,
                set,
                store: MemoryStore::default(),
                effects: Vec::new(),
                due_by: i64::MAX,
            }
        }

        fn run(&mut self, events: &[Event]) -> Report {
            let from: Mailbox = "t <t@localhost>".parse().unwrap();
            let env = Env {
                max_pending_waits: 3,
                waits_due_by_ms: self.due_by,
                ..Env::offline(&from)
            };
            run(
                &self.set,
                events,
                &mut self.store,
                &env,
                0,
                &mut self.effects,
            )
            .unwrap()
        }

        /// One `used` event by `d`, with this email address in the person's properties.
        fn used(&mut self, uuid: &str, email: Option<&str>) -> Report {
            let person = email.map_or("null".to_string(), |e| {
                format!(r#"{{"properties":{{"email":"{e}"}}}}"#)
            });
            self.run(&decoded(&format!(
                r#"{{"event":{{"event":"used","uuid":"{uuid}","distinct_id":"d"}},"person":{person}}}"#
            )))
        }
    }

    fn decoded(body: &str) -> Vec<Event> {
        decode(
            body.as_bytes(),
            chrono::Utc::now(),
            &crate::ingest::event::BodyLimits::LOCAL_FILES,
        )
        .unwrap()
    }

    /// The email an effect queues, if it does.
    fn email(effect: &Effect) -> Option<Queued> {
        match effect {
            Effect::Output {
                output: Output::Delivery(d),
                ..
            } => Queued::of(d),
            _ => None,
        }
    }

    #[test]
    fn counts_then_acts_once_and_ignores_retried_uuids() {
        let mut r = Runs::new(RULE);
        assert_eq!(
            r.used("1", Some("a@x.io")).outcomes,
            [(0, Outcome::Counting { count: 1 })]
        );
        assert_eq!(
            r.used("1", Some("a@x.io")).duplicates,
            1,
            "same uuid: no second count"
        );
        assert_eq!(r.used("3", Some("a@x.io")).fired(&r.set), ["fifth"]);
        assert!(matches!(
            r.used("4", Some("a@x.io")).outcomes[..],
            [(0, Outcome::Suppressed { until_ms: None, .. })]
        ));
        let effects = &r.effects;
        assert_eq!(effects.len(), 2, "{effects:?}");
        // In the order the rule file lists its actions: [email], then [jsonl].
        assert_eq!(
            effects[1],
            Effect::Output {
                rule: 0,
                output: Output::Line {
                    file: Path::new("out.jsonl").into(),
                    line: "{\"who\":\"d\"}\n".into()
                }
            }
        );
        let email = email(&effects[0]).expect("an email");
        assert_eq!(email.to, ["a@x.io"]);
        assert_eq!(email.to_masked, "a***@x.io");
        assert!(email.message.contains("count 2"), "{}", email.message);
        assert_eq!(
            (email.subject.as_str(), email.text.as_str()),
            ("hi", "count 2")
        );
    }

    #[test]
    fn a_failed_email_does_not_keep_the_rules_line_from_being_written() {
        let mut r = Runs::new(RULE);
        r.used("1", None);
        // The 2nd use has no address: the line is written, the email fails on its own.
        let report = r.used("2", None);
        assert!(
            matches!(&report.outcomes[..], [(0, Outcome::PartlyFailed { reasons })] if reasons.len() == 1),
            "{report:?}"
        );
        assert_eq!(report.fired(&r.set), ["fifth"], "the rule acted");
        let failures = report.failures(&r.set);
        assert!(
            failures[0].starts_with("rule \"fifth\": email not sent")
                && failures[0].contains("person.properties.email"),
            "{failures:?}"
        );
        let effects = &r.effects;
        assert!(
            matches!(
                &effects[0],
                Effect::Failed {
                    kind: "email",
                    delivered: true,
                    ..
                }
            ),
            "a failed email is kept as failed: {effects:?}"
        );
        assert!(
            matches!(
                &effects[1],
                Effect::Output {
                    output: Output::Line { .. },
                    ..
                }
            ),
            "{effects:?}"
        );
        let report = r.used("3", Some("a@x.io"));
        assert!(
            matches!(
                report.outcomes[..],
                [(0, Outcome::Suppressed { until_ms: None, .. })]
            ),
            "[limits] counts the line"
        );
    }

    #[test]
    fn a_rule_none_of_whose_actions_can_be_made_changes_no_state() {
        let mut r = Runs::new(RULE.split("[jsonl]").next().unwrap());
        r.used("1", Some("a@x.io"));
        // The 2nd use has no address: nothing happens, and the once-key stays free.
        let report = r.used("2", None);
        let failures = report.failures(&r.set);
        assert!(
            failures[0].starts_with("rule \"fifth\": email not sent")
                && failures[0].contains("person.properties.email"),
            "{failures:?}"
        );
        assert!(matches!(report.outcomes[..], [(0, Outcome::Failed { .. })]));
        assert_eq!(r.used("3", Some("a@x.io")).fired(&r.set), ["fifth"]);
        assert!(matches!(
            r.used("4", Some("a@x.io")).outcomes[..],
            [(0, Outcome::Suppressed { until_ms: None, .. })]
        ));
        assert_eq!(r.effects.len(), 2, "{:?}", r.effects);
        assert!(matches!(
            &r.effects[0],
            Effect::Failed { kind: "email", .. }
        ));
        let email = email(&r.effects[1]).expect("an email");
        assert!(email.message.contains("count 3"), "{}", email.message);
    }

    const WAIT: &str = r#"
name = "w"
[when]
event = "started"
[wait]
for = "10 minutes"
same = ["properties.k"]
unless = { event = "stopped" }
[jsonl]
file = "out.jsonl"
fields = { k = "properties.k", at = "timestamp" }
"#;

    /// An event `name` for key `k` at minute `minute` of 2026-01-01.
    fn at(name: &str, k: &str, minute: i64) -> Event {
        let t = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH + chrono::TimeDelta::minutes(minute);
        let uuid = format!("{name}-{k}-{minute}");
        decoded(&format!(
            r#"{{"event":"{name}","uuid":"{uuid}","distinct_id":"d","timestamp":"{}","properties":{{"k":"{k}"}}}}"#,
            t.to_rfc3339()
        ))
        .remove(0)
    }

    impl Runs {
        /// Ends the waits due by `minute`.
        fn end_due(&mut self, minute: i64) -> Report {
            let from: Mailbox = "t <t@localhost>".parse().unwrap();
            let env = Env {
                max_pending_waits: 3,
                ..Env::offline(&from)
            };
            let until_ms = minute * 60_000;
            end_due_waits(
                &self.set,
                &mut self.store,
                until_ms,
                usize::MAX,
                &env,
                0,
                &mut self.effects,
            )
            .unwrap()
        }

        /// The `at` of every line written, in order.
        fn lines_at(&self) -> Vec<String> {
            (self.effects.iter())
                .filter_map(|e| match e {
                    Effect::Output {
                        output: Output::Line { line, .. },
                        ..
                    } => {
                        let v: serde_json::Value = serde_json::from_str(line).unwrap();
                        Some(format!("{}@{}", v["k"].as_str()?, v["at"].as_str()?))
                    }
                    _ => None,
                })
                .collect()
        }
    }

    #[test]
    fn a_wait_restarts_on_a_newer_trigger_but_not_on_an_older_one() {
        let mut r = Runs::new(WAIT);
        assert_eq!(
            r.run(&[at("started", "a", 0)]).outcomes,
            [(
                0,
                Outcome::Waiting {
                    until_ms: 10 * 60_000
                }
            )]
        );
        assert_eq!(
            r.run(&[at("started", "a", 5)]).outcomes,
            [(
                0,
                Outcome::Waiting {
                    until_ms: 15 * 60_000
                }
            )],
            "restarted"
        );
        assert_eq!(
            r.run(&[at("started", "a", 3)]).outcomes,
            [(
                0,
                Outcome::Waiting {
                    until_ms: 15 * 60_000
                }
            )],
            "an older event (a late delivery) does not move it back"
        );
        assert!(r.end_due(14).outcomes.is_empty());
        assert_eq!(r.end_due(15).outcomes, [(0, Outcome::Fired)]);
        assert_eq!(
            r.lines_at(),
            ["a@1970-01-01T00:05:00Z"],
            "acts on the newest trigger"
        );
    }

    #[test]
    fn a_trigger_after_a_waits_end_ends_it_first_then_starts_the_next() {
        let mut r = Runs::new(WAIT);
        r.run(&[at("started", "a", 0)]);
        // Minute 12: the timer has not come yet (grace); the old wait ends, a new one starts.
        let report = r.run(&[at("started", "a", 12)]);
        assert_eq!(
            report.outcomes,
            [
                (0, Outcome::Fired),
                (
                    0,
                    Outcome::Waiting {
                        until_ms: 22 * 60_000
                    }
                )
            ]
        );
        // A stop stamped after the first wait's end only cancels the second.
        assert_eq!(
            r.run(&[at("stopped", "a", 13)]).outcomes,
            [(0, Outcome::Cancelled)]
        );
        assert!(r.end_due(60).outcomes.is_empty());
        assert_eq!(r.lines_at(), ["a@1970-01-01T00:00:00Z"]);
    }

    #[test]
    fn an_unless_event_older_than_the_waits_trigger_belongs_to_an_earlier_wait() {
        let mut r = Runs::new(WAIT);
        r.run(&[at("started", "a", 20)]);
        // A stop that happened at minute 15 (delivered late) was about an earlier start.
        assert!(r.run(&[at("stopped", "a", 15)]).outcomes.is_empty());
        assert_eq!(r.end_due(30).outcomes, [(0, Outcome::Fired)]);
    }

    #[test]
    fn a_trigger_after_a_waits_end_but_before_the_timer_is_due_leaves_the_wait_to_the_timer() {
        let mut r = Runs::new(WAIT);
        r.run(&[at("started", "a", 0)]);
        // Minute 11 by the event (a client clock ahead, or within the grace period), but the
        // clock less the grace says minute 9: the first wait is not due, and goes on.
        r.due_by = 9 * 60_000;
        assert_eq!(
            r.run(&[at("started", "a", 11)]).outcomes,
            [(
                0,
                Outcome::Waiting {
                    until_ms: 10 * 60_000
                }
            )]
        );
        // An order stamped before its end still cancels it, until the timer comes.
        assert_eq!(
            r.run(&[at("stopped", "a", 9)]).outcomes,
            [(0, Outcome::Cancelled)]
        );
        assert!(r.end_due(60).outcomes.is_empty());
    }

    #[test]
    fn a_rule_at_its_cap_of_pending_waits_starts_no_more_and_says_so() {
        let mut r = Runs::new(WAIT);
        for k in ["a", "b", "c"] {
            r.run(&[at("started", k, 0)]);
        }
        let report = r.run(&[at("started", "d", 0)]);
        assert!(
            matches!(&report.outcomes[..], [(0, Outcome::WaitRefused { reason })] if reason.contains("3 pending waits")),
            "{report:?}"
        );
        assert_eq!(
            report.failures(&r.set).len(),
            1,
            "shown in the reply's `failed`"
        );
        // Once one ends, there is room again.
        r.run(&[at("stopped", "a", 1)]);
        assert!(matches!(
            r.run(&[at("started", "d", 2)]).outcomes[..],
            [(0, Outcome::Waiting { .. })]
        ));
    }

    #[test]
    fn held_actions_count_against_the_cap_of_pending_records() {
        // 1970-01-01 was a Thursday: the window, on Mondays, is closed.
        let mut r = Runs::new(
            "name = \"office\"\n[when]\nevent = \"started\"\n[send_window]\ndays = [\"mon\"]\n\
             hours = \"09:00-10:00\"\n[jsonl]\nfile = \"o.jsonl\"\nfields = { e = \"event\" }\n",
        );
        for k in ["a", "b", "c"] {
            assert!(matches!(
                r.run(&[at("started", k, 0)]).outcomes[..],
                [(0, Outcome::Held { .. })]
            ));
        }
        let report = r.run(&[at("started", "d", 0)]);
        assert!(
            matches!(&report.outcomes[..], [(0, Outcome::WaitRefused { reason })] if reason.contains("held actions")),
            "{report:?}"
        );
    }

    #[test]
    fn an_event_no_rule_matches_records_nothing() {
        let mut r = Runs::new(RULE);
        let events = decoded(r#"{"event":{"event":"other","uuid":"9","distinct_id":"d"}}"#);
        for _ in 0..2 {
            let report = r.run(&events);
            assert_eq!((report.duplicates, report.outcomes.len()), (0, 0));
        }
        assert!(r.effects.is_empty());
        assert!(
            r.store.load(&Wants::default()).unwrap().first_delivery("9"),
            "its id was not recorded"
        );
    }
}
