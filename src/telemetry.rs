//! Every metric the service exports, with its name and what it counts, in one table; and the
//! Prometheus recorder that renders them for `GET /metrics`.
//!
//! Code that counts something names the metric through a constant here
//! (`metrics::counter!(telemetry::EVENTS_RECEIVED.name, ...)`), so a name is written once and
//! every metric is described.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::{Mutex, OnceLock, PoisonError};

/// One metric.
pub struct Metric {
    pub name: &'static str,
    kind: Kind,
    help: &'static str,
}

enum Kind {
    Counter,
    Gauge,
    /// A histogram in seconds.
    Seconds,
}

const fn counter(name: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Counter,
        help,
    }
}

const fn gauge(name: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Gauge,
        help,
    }
}

pub const EVENTS_RECEIVED: Metric = counter(
    "tripline_events_received_total",
    "Events accepted and made durable, by source (retried deliveries included)",
);
pub const EVENTS_DUPLICATE: Metric = counter(
    "tripline_events_duplicate_total",
    "Events a rule matched that were skipped because their uuid was handled before (a retried delivery)",
);
pub const EVENTS_CLOCK_CLAMPED: Metric = counter(
    "tripline_events_clock_clamped_total",
    "Events stamped later than their receipt plus max_clock_skew, timed at that limit for windows and limits, by source",
);
pub const WAITS_PENDING: Metric =
    gauge("tripline_waits_pending", "Waits pending, by rule ([wait])");
pub const WAITS_STARTED: Metric = counter(
    "tripline_waits_started_total",
    "Triggering events a rule with [wait] waited on: a wait started, started again, or (if_pending = \"keep\") already pending, by rule",
);
pub const WAITS_CANCELLED: Metric = counter(
    "tripline_waits_cancelled_total",
    "Waits cancelled by an `unless` event, by rule",
);
pub const WAITS_FIRED: Metric = counter(
    "tripline_waits_fired_total",
    "Waits that ended with the rule acting (at the deadline, or on an `until` event), by rule",
);
pub const WAITS_EXPIRED: Metric = counter(
    "tripline_waits_expired_total",
    "Waits that ended without the rule acting (no `until` event, `then` did not hold, [limits] held it back, or no action could be made), by rule",
);
pub const WAITS_DROPPED: Metric = counter(
    "tripline_waits_dropped_total",
    "Waits dropped unfired, by rule and reason: rule_gone (the rule was deleted, renamed or lost [wait]) or max_pending (none started: the rule had as many pending as allowed)",
);
pub const ACTIONS_HELD: Metric = counter(
    "tripline_actions_held_total",
    "Times a rule acted outside its [send_window]: its actions were held until the window opened, by rule",
);
pub const WAIT_LATENESS: Metric = Metric {
    name: "tripline_wait_lateness_seconds",
    kind: Kind::Seconds,
    help: "How long after its deadline plus the grace period each wait ended (late after a restart, or under load)",
};
pub const REQUESTS_REJECTED: Metric = counter(
    "tripline_requests_rejected_total",
    "Requests to /webhook refused, by reason; a refused body changes nothing",
);
pub const REQUEST_DURATION: Metric = Metric {
    name: "tripline_request_duration_seconds",
    kind: Kind::Seconds,
    help: "Time to answer POST /webhook, durable write included",
};
pub const RULE_MATCHES: Metric = counter(
    "tripline_rule_matches_total",
    "Events whose [when] held for the rule",
);
pub const RULE_FIRES: Metric = counter("tripline_rule_fires_total", "Events the rule acted on");
pub const RULE_SUPPRESSIONS: Metric = counter(
    "tripline_rule_suppressions_total",
    "Times the rule would have acted and was held back, by reason (limits: its [limits] once-keys; cap: its cap group)",
);
pub const ACTIONS_SUCCEEDED: Metric = counter(
    "tripline_actions_succeeded_total",
    "Actions done: lines written (kind jsonl) and emails delivered (kind email), by rule",
);
pub const ACTIONS_FAILED: Metric = counter(
    "tripline_actions_failed_total",
    "Actions that failed: emails that could not be made from an event or that the mail server refused for good, lines whose file cannot be written, by kind and rule",
);
pub const LINES_WAITING_BYTES: Metric = gauge(
    "tripline_lines_waiting_bytes",
    "Bytes of JSONL lines acknowledged (durable in the store) and not yet written into their file, by file",
);
pub const LINES_LAG: Metric = gauge(
    "tripline_lines_lag_seconds",
    "How long the oldest line waiting for its file has waited (at most), by file: 0 when the file is up to date",
);
pub const LINES_WRITE_ERRORS: Metric = counter(
    "tripline_lines_write_errors_total",
    "Failed writes of acknowledged lines into their file (a full disk...), by file: the lines wait in the store and are tried again every second",
);
pub const BATCHES_PANICKED: Metric = counter(
    "tripline_batches_panicked_total",
    "Batches stopped by an internal error: answered 503, nothing applied, the next batch goes on",
);
pub const BATCHES_CONFLICTED: Metric = counter(
    "tripline_batches_conflicted_total",
    "Batches run again because another instance changed the same state at once (PostgreSQL only)",
);
pub const OUTBOX_PENDING: Metric =
    gauge("tripline_outbox_pending", "Emails waiting to be delivered");
pub const RULES_LOADED: Metric = gauge("tripline_rules_loaded", "Rules running now");
pub const RULES_RELOAD_SUCCESS: Metric = gauge(
    "tripline_rules_reload_success",
    "1 if the last load of the rule files succeeded, 0 if it failed (the previous rules keep running)",
);
pub const RULES_LAST_RELOAD: Metric = gauge(
    "tripline_rules_last_reload_timestamp_seconds",
    "When the rule files were last loaded, successfully or not (Unix time)",
);
pub const RULES_RELOADS: Metric = counter(
    "tripline_rules_reloads_total",
    "Loads of the rule files since start, by result (ok, or failed: the previous rules keep running)",
);

/// Every metric, described once the recorder is installed.
const ALL: &[&Metric] = &[
    &EVENTS_RECEIVED,
    &EVENTS_DUPLICATE,
    &EVENTS_CLOCK_CLAMPED,
    &REQUESTS_REJECTED,
    &REQUEST_DURATION,
    &RULE_MATCHES,
    &RULE_FIRES,
    &RULE_SUPPRESSIONS,
    &ACTIONS_SUCCEEDED,
    &ACTIONS_FAILED,
    &LINES_WAITING_BYTES,
    &LINES_LAG,
    &LINES_WRITE_ERRORS,
    &BATCHES_PANICKED,
    &BATCHES_CONFLICTED,
    &OUTBOX_PENDING,
    &RULES_LOADED,
    &RULES_RELOAD_SUCCESS,
    &RULES_LAST_RELOAD,
    &RULES_RELOADS,
    &WAITS_PENDING,
    &WAITS_STARTED,
    &WAITS_CANCELLED,
    &WAITS_FIRED,
    &WAITS_EXPIRED,
    &WAITS_DROPPED,
    &WAIT_LATENESS,
    &ACTIONS_HELD,
];

/// Counts a request to `/webhook` that was refused, by why.
pub fn rejected(reason: &'static str) {
    metrics::counter!(REQUESTS_REJECTED.name, "reason" => reason).increment(1);
}

/// The process's Prometheus recorder, installed (and every metric described) on first use.
pub fn recorder() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    // Two services started at once in one process (tests) must not both install one.
    static INSTALLING: Mutex<()> = Mutex::new(());
    let _installing = INSTALLING.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(REQUEST_DURATION.name.into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )
        .map_err(|e| anyhow::anyhow!("cannot set up the latency histogram: {e}"))?
        .set_buckets_for_metric(
            Matcher::Full(WAIT_LATENESS.name.into()),
            &[
                0.1, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0,
            ],
        )
        .map_err(|e| anyhow::anyhow!("cannot set up the lateness histogram: {e}"))?
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot start the metrics recorder: {e}"))?;
    for metric in ALL {
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(metric.name, metric.help),
            Kind::Gauge => metrics::describe_gauge!(metric.name, metric.help),
            Kind::Seconds => {
                metrics::describe_histogram!(metric.name, metrics::Unit::Seconds, metric.help)
            }
        }
    }
    Ok(HANDLE.get_or_init(|| handle).clone())
}
