//! The `[aggregate]` action: count a rule's events per day and group, with their distinct users
//! and conversions, for `GET /aggregates/{rule}` (an A/B test's summary per variant).
//!
//! The action only says what to count ([`Counted`]: the event's day in the rule's time zone,
//! its group from the `by` field, whether it is the conversion event); the store adds it to the
//! day's row in the batch's transaction (see `store/aggregates.rs`).

use chrono_tz::Tz;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;
use toml::Spanned;

use super::{Action, Compile, Input, Kind, Output};
use crate::ingest::path::FieldPath;
use crate::rules::compile::zone_name;
use crate::store::aggregates::{Counted, day_number, group_name};
use crate::units::{self, DURATION_EXAMPLES};

/// The kind's name, as its table is written.
pub const KIND: &str = "aggregate";

/// How long counts are kept when the rule does not say.
const DEFAULT_KEEP_FOR: Duration = Duration::from_secs(400 * 86_400);

/// The longest a rule may keep its counts: ten years.
const MAX_KEEP_FOR: Duration = Duration::from_secs(3660 * 86_400);

/// The `[aggregate]` kind.
pub struct Aggregate;

/// `[aggregate]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// The field whose value is the event's group ("properties.$feature/new-checkout").
    pub by: Spanned<String>,
    /// Whose days: a time-zone name (UTC by default).
    #[serde(default)]
    pub timezone: Option<Spanned<String>>,
    /// The event that counts as a conversion: `{ event = "purchase" }`.
    #[serde(default)]
    pub conversion: Option<Spanned<ConversionConfig>>,
    /// How long each day's counts are kept ("400 days" by default).
    #[serde(default)]
    pub keep_for: Option<Spanned<String>>,
}

/// `conversion = { event = "purchase" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversionConfig {
    pub event: Spanned<String>,
}

/// A compiled `[aggregate]` table.
#[derive(Debug)]
pub struct AggregateAction {
    by: FieldPath,
    zone: Tz,
    conversion: Option<String>,
    keep_days: u32,
}

impl Kind for Aggregate {
    type Config = AggregateConfig;

    fn compile(config: Spanned<AggregateConfig>, cx: &mut Compile) -> Option<Box<dyn Action>> {
        let a = config.into_inner();
        let by = FieldPath::parse_reporting(&a.by, cx.problems);
        let zone = match &a.timezone {
            None => Some(chrono_tz::UTC),
            Some(name) => zone_name(name, cx.problems, false),
        };
        let keep_for = match &a.keep_for {
            None => Some(DEFAULT_KEEP_FOR),
            Some(text) => match units::parse_duration(text.get_ref()) {
                Ok(d) if d >= Duration::from_secs(86_400) && d <= MAX_KEEP_FOR => Some(d),
                Ok(_) => {
                    cx.problems.add(
                        text.span(),
                        "`keep_for` must be from 1 day to 3660 days",
                        Some("keep_for = \"400 days\" keeps each day's counts for 400 days".into()),
                    );
                    None
                }
                Err(e) => {
                    cx.problems.add(
                        text.span(),
                        format!("`keep_for`: {e}"),
                        Some(format!("write a length of time such as {DURATION_EXAMPLES}")),
                    );
                    None
                }
            },
        };
        let conversion = a.conversion.map(|c| c.into_inner().event);
        if let (Some(event), Some(selected)) = (&conversion, cx.events)
            && !selected.iter().any(|name| name == event.get_ref())
        {
            not_selected(event, selected, cx);
        }
        Some(Box::new(AggregateAction {
            by: by?,
            zone: zone?,
            conversion: conversion.map(Spanned::into_inner),
            keep_days: u32::try_from(keep_for?.as_secs() / 86_400).unwrap_or(u32::MAX),
        }))
    }
}

/// The conversion event is not one the rule's `[when]` selects, so the rule would never see it.
fn not_selected(event: &Spanned<String>, selected: &[String], cx: &mut Compile) {
    let mut names: Vec<String> = selected.iter().map(|n| format!("{n:?}")).collect();
    names.push(format!("{:?}", event.get_ref()));
    cx.problems.add(
        event.span(),
        format!(
            "the conversion event `{}` is not one of the events in [when], so this rule never sees it",
            event.get_ref()
        ),
        Some(format!("write event = [{}] in [when]", names.join(", "))),
    );
}

impl Action for AggregateAction {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn run(&self, input: &Input) -> Result<Output, String> {
        let event = input.event;
        let Some(distinct_id) = event.distinct_id.as_str() else {
            return Err(
                "not counted: the event has no `distinct_id`, so there is no one to count".into(),
            );
        };
        let day = event.time.with_timezone(&self.zone).date_naive();
        Ok(Output::Aggregate(Box::new(Counted {
            rule: input.rule.to_string(),
            distinct_id: distinct_id.to_string(),
            day: day_number(day),
            group: self.by.lookup(event).and_then(group_name),
            conversion: self.conversion.as_deref() == Some(event.name()),
            keep_days: self.keep_days,
        })))
    }

    fn summary(&self) -> Value {
        json!({
            "kind": KIND,
            "by": self.by.to_string(),
            "timezone": self.zone.name(),
            "conversion": self.conversion,
            "keep_days": self.keep_days,
        })
    }

    fn fields(&self) -> Vec<&FieldPath> {
        vec![&self.by]
    }
}
