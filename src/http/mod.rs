//! The HTTP edge: routes, status codes, and starting and stopping the service.
//!
//! `POST /webhook` takes the raw body (whatever the `Content-Type`), decodes every event in it,
//! and only then runs them through one snapshot of the rules. A client's mistake is a specific
//! 4xx with a JSON `{"error": ...}`; a fault on our side is a 503 so that PostHog retries.

pub mod admission;
pub mod connections;

use axum::body::Bytes;
use axum::error_handling::HandleErrorLayer;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::SecondsFormat;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};
use std::future::Future;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, watch};
use tower::ServiceBuilder;
use tower_http::timeout::TimeoutLayer;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::actions::jsonl::JsonlFiles;
use crate::config::{Limits, ServeConfig};
use crate::engine::{Outcome, Report};
use crate::ingest::auth::{Source, Sources};
use crate::ingest::event::{self, BodyLimits, DecodeError};
use crate::pipeline::committer::{CommitError, Committer, Retention};
use crate::pipeline::outbox::{self, OutboxRecord, Transport};
use crate::pipeline::reload::{self, LiveRules};
use crate::rules::RuleSet;
use crate::store::redb::Db;
use admission::Sender;
use connections::ConnectionLimits;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub rules: Arc<LiveRules>,
    pub committer: Committer,
    pub db: Arc<Db>,
    pub metrics: PrometheusHandle,
    /// Who may send events; empty when requests are not authenticated (loopback only).
    pub sources: Arc<Sources>,
    /// The admin token that unlocks /rules, /outbox and /metrics when sources are configured.
    pub admin: Option<Arc<Source>>,
    /// Requests per second per source.
    pub rate_limiter: Arc<DefaultKeyedRateLimiter<String>>,
    pub body_limits: BodyLimits,
    /// Largest body read, and the longest a request may take (for signed requests, whose body
    /// is read before the request is admitted).
    pub body_limits_bytes: usize,
    pub request_timeout: Duration,
    /// Places for signed requests whose body is being read and checked.
    pub unverified: Arc<Semaphore>,
    /// Where /readyz checks it can write.
    pub data_dir: PathBuf,
}

impl AppState {
    /// The rate limiter for `limits`: each source gets its own bucket.
    pub fn rate_limiter(limits: &Limits) -> Arc<DefaultKeyedRateLimiter<String>> {
        let period = Duration::from_secs_f64(1.0 / limits.rate_limit);
        let burst = NonZeroU32::new(limits.rate_limit_burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        Arc::new(RateLimiter::keyed(quota))
    }
}

/// The routes. `/webhook` gets the limits: admission (who sent it, before any place is taken;
/// see `http/admission.rs`), then at most `max_concurrent_requests` at once (more are shed with 503
/// rather than queued), a time limit and the body size. The read-only endpoints need the admin
/// token once sources are configured; the health checks are open.
pub fn router(state: AppState, limits: &Limits) -> Router {
    let webhook_limits = ServiceBuilder::new()
        .layer(middleware::from_fn(timed))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            admission::admit,
        ))
        .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
            AppError::Overloaded
        }))
        .load_shed()
        .concurrency_limit(limits.max_concurrent_requests)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ));
    let admin = Router::new()
        .route("/rules", get(rules))
        .route("/outbox", get(outbox))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), admin_only));
    Router::new()
        .route("/webhook", post(webhook).layer(webhook_limits))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(admin)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(state)
}

/// Runs the service until `shutdown` completes, then stops in order: stop accepting, finish the
/// requests in flight (their batches commit), stop the committer, stop the email sender.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.folders.rules.is_dir(),
        "the rules folder {} does not exist (set it with --rules or TRIPLINE_RULES)",
        config.folders.rules.display()
    );
    std::fs::create_dir_all(&config.folders.data).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the data folder {}: {e}",
            config.folders.data.display()
        )
    })?;
    let metrics = metrics_recorder()?;
    let db = Arc::new(Db::open(&config.folders.data).map_err(|e| {
        let why = if e.0.contains("Cannot acquire lock") {
            "another tripline is already running with this data folder".to_string()
        } else {
            e.to_string()
        };
        anyhow::anyhow!(
            "cannot open the state database in {}: {why}",
            config.folders.data.display()
        )
    })?);
    let transport = Arc::new(Transport::from_config(&config)?);
    let emails_queued = Arc::new(Notify::new());
    let days = |n: u64| Duration::from_secs(n.saturating_mul(86_400));
    let retention = Retention {
        // Signed deliveries' ids are kept with event ids: never for less than a signature stays
        // valid, or a captured request could be replayed once its id is forgotten.
        event_ids: days(config.dedupe_retention_days).max(config.limits.signature_tolerance),
        idle_state: days(config.state_idle_days),
    };
    let (committer, committer_thread) = Committer::start(
        db.clone(),
        JsonlFiles::new(&config.folders.data),
        config.email_from.clone(),
        retention,
        emails_queued.clone(),
    )?;
    let (stop_sender, stopped) = watch::channel(false);
    let sender = tokio::spawn(outbox::run_sender(
        db.clone(),
        transport,
        emails_queued,
        stopped,
    ));

    let live = Arc::new(LiveRules::load(
        &config.folders.rules,
        &config.folders.templates,
        &config.folders.data,
    ));
    let _watcher = reload::watch(live.clone()).map_err(|e| {
        anyhow::anyhow!(
            "cannot watch {} for changes: {e}",
            config.folders.rules.display()
        )
    })?;
    let state = AppState {
        rules: live,
        committer,
        db,
        metrics,
        sources: config.sources.clone(),
        admin: config.admin.clone(),
        rate_limiter: AppState::rate_limiter(&config.limits),
        body_limits: BodyLimits {
            max_depth: config.limits.max_json_depth,
            max_events: config.limits.max_events_per_body,
            max_clock_skew: Some(config.limits.max_clock_skew),
        },
        body_limits_bytes: config.limits.max_body_bytes,
        request_timeout: config.limits.request_timeout,
        unverified: Arc::new(Semaphore::new(config.limits.max_unverified_requests)),
        data_dir: config.folders.data.clone(),
    };
    let connection_limits = ConnectionLimits {
        max_connections: connections::connection_capacity(config.limits.max_connections),
        header_timeout: config.limits.header_timeout,
        shutdown_timeout: config.limits.shutdown_timeout,
    };
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    if config.sources.is_empty() {
        if config.accept_unauthenticated {
            warn!(
                "no source is configured and --dangerously-accept-unauthenticated-events is set: \
                 anyone who can reach this port can send events"
            );
        } else {
            info!(
                "no source is configured: events are accepted without a secret, on loopback only"
            );
        }
    } else {
        let names: Vec<&str> = config.sources.names().collect();
        info!(sources = %names.join(", "), "events need a source's bearer token or signature");
    }
    info!("listening on http://{}", listener.local_addr()?);
    connections::serve(
        listener,
        router(state, &config.limits),
        connection_limits,
        shutdown,
    )
    .await;
    // Every connection is closed and the router (with its committer handles) is gone, so the
    // committer thread ends once its last batch is committed.
    tokio::task::spawn_blocking(move || committer_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the committer thread panicked"))?;
    let _ = stop_sender.send(true);
    sender.await?;
    info!("stopped");
    Ok(())
}

/// POST /webhook: read the body (within the size and time limits), check who sent it, apply
/// the source's rate limit, decode every event, run them through one snapshot of the rules, and
/// answer once their effects are durable.
async fn webhook(
    State(state): State<AppState>,
    Extension(sender): Extension<Sender>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, AppError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => AppError::TooLarge,
        _ => AppError::Unreadable(rejection.body_text()),
    })?;
    let now = chrono::Utc::now();
    let Sender { source, delivery } = sender;
    let rules = state.rules.snapshot();
    let decoded = event::decode_wanted(&body, now, &state.body_limits, |name| {
        rules.as_ref().is_none_or(|rules| rules.wants(name))
    })?;
    let Some(rules) = rules else {
        return Err(AppError::NoRules);
    };
    if decoded.clamped > 0 {
        warn!(
            events = decoded.clamped,
            "events stamped later than now plus max_clock_skew: timed at that limit for windows and limits"
        );
        metrics::counter!("tripline_events_clock_clamped_total", "source" => source.clone())
            .increment(decoded.clamped as u64);
    }
    let count = decoded.received;
    let mut events = decoded.events;
    for e in &mut events {
        e.source = Value::String(source.clone());
    }
    let span = info_span!(
        "request",
        source = %source,
        events = count,
        event.uuid = events.first().and_then(|e| e.uuid()).unwrap_or("-")
    );
    // Events no rule wants (not even decoded past their fields' kinds) have no effect to make
    // durable: answered at once, without a commit.
    let report = if events.iter().any(|e| rules.matching(e).next().is_some()) {
        state
            .committer
            .submit(rules.clone(), events, delivery)
            .instrument(span)
            .await?
    } else {
        Report::default()
    };
    record_outcomes(&source, count, &report, &rules);
    Ok(Json(json!({
        "accepted": count,
        "duplicates": report.duplicates,
        "fired": report.fired(&rules),
        "failed": report.failures(&rules),
    })))
}

/// Counts a committed request's events and what each rule did with them.
fn record_outcomes(source: &str, events: usize, report: &Report, rules: &RuleSet) {
    metrics::counter!("tripline_events_received_total", "source" => source.to_string())
        .increment(events as u64);
    metrics::counter!("tripline_events_duplicate_total").increment(report.duplicates as u64);
    for (index, outcome) in &report.outcomes {
        let rule = rules.rules()[*index].name.clone();
        metrics::counter!("tripline_rule_matches_total", "rule" => rule.clone()).increment(1);
        match outcome {
            Outcome::Fired => {
                metrics::counter!("tripline_rule_fires_total", "rule" => rule).increment(1);
            }
            Outcome::Suppressed => {
                metrics::counter!("tripline_rule_suppressions_total", "rule" => rule).increment(1);
            }
            Outcome::Counting { .. } | Outcome::NoKey { .. } | Outcome::Failed { .. } => {}
        }
    }
}

/// Counts a request that was refused, by why.
fn rejected(reason: &'static str) {
    metrics::counter!("tripline_requests_rejected_total", "reason" => reason).increment(1);
}

/// Times every request to /webhook, shed ones included (and counts those cut off by the time
/// limit).
async fn timed(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        rejected("timeout");
    }
    metrics::histogram!("tripline_request_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    response
}

/// Lets a request to the read-only endpoints through when no source is configured (loopback
/// only), or when it carries the admin token.
async fn admin_only(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, AppError> {
    if state.sources.is_empty() {
        return Ok(next.run(request).await);
    }
    match &state.admin {
        None => Err(AppError::AdminClosed),
        Some(admin) if admin.accepts_bearer(request.headers()) => Ok(next.run(request).await),
        Some(_) => Err(AppError::AdminDenied),
    }
}

/// GET /readyz: 200 when events can be taken (a write to the store can commit, the committer
/// runs, rules are loaded, the data folder is writable), else 503 with what is wrong.
async fn readyz(State(state): State<AppState>) -> Response {
    let db = state.db.clone();
    let data_dir = state.data_dir.clone();
    let checks = tokio::task::spawn_blocking(move || {
        let store = db.check().map_err(|e| e.to_string());
        (store, probe_writable(&data_dir))
    })
    .await;
    let (store, writable) = checks.unwrap_or_else(|e| (Err(e.to_string()), Err(String::new())));
    let rules = match state.rules.snapshot() {
        Some(_) => Ok(()),
        None => Err("no rules are loaded: the rule files have errors (see GET /rules)".to_string()),
    };
    let committer = state.committer.health();
    let show = |r: &Result<(), String>| match r {
        Ok(()) => json!("ok"),
        Err(e) => json!(e),
    };
    let ready = store.is_ok() && writable.is_ok() && rules.is_ok() && committer.is_ok();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ready,
        "store": show(&store),
        "committer": show(&committer),
        "rules": show(&rules),
        "data_folder": show(&writable),
    });
    (status, Json(body)).into_response()
}

/// Writes and removes a small file in the data folder. Its name starts with `.tripline` (which
/// no rule may write to), is new each time, and is created only if nothing has that name, so the
/// probe can never touch a file it did not make.
fn probe_writable(data_dir: &std::path::Path) -> Result<(), String> {
    static PROBES: AtomicU64 = AtomicU64::new(0);
    let n = PROBES.fetch_add(1, Ordering::Relaxed);
    let probe = data_dir.join(format!(".tripline-ready-{}-{n}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"ok"))
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| format!("cannot write in {}: {e}", data_dir.display()))
}

/// The email queue: how many wait and the oldest 50 of them (with the last error), and what was
/// recently sent or gave up.
async fn outbox(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    let db = state.db.clone();
    let status = tokio::task::spawn_blocking(move || db.outbox_status(50))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?
        .map_err(|e| AppError::Internal(e.to_string()))?;
    let show = |(id, r): &(u64, OutboxRecord)| {
        json!({
            "id": id, "rule": r.rule, "to": r.to_masked, "status": r.status, "attempts": r.attempts,
            "last_error": r.last_error, "created_unix": r.created_unix, "finished_unix": r.finished_unix,
        })
    };
    Ok(Json(json!({
        "pending": status.pending,
        "finished": status.finished,
        "waiting": status.waiting.iter().map(show).collect::<Vec<_>>(),
        "recent": status.recent.iter().map(show).collect::<Vec<_>>(),
    })))
}

/// The running rules with their files, the running set's content hash and load time, and the
/// outcome of the last reload.
async fn rules(State(state): State<AppState>) -> Json<Value> {
    let set = state.rules.snapshot();
    let unwritable = state.committer.unwritable();
    let running: Vec<Value> = set
        .as_ref()
        .map(|set| {
            set.rules()
                .iter()
                .map(|r| {
                    let mut summary = r.summary.clone();
                    if let Some(why) = r.jsonl.as_ref().and_then(|j| unwritable.get(&j.file)) {
                        summary["failing"] = json!(format!(
                            "its output file cannot be written, so the rule does nothing: {why}"
                        ));
                    }
                    summary
                })
                .collect()
        })
        .unwrap_or_default();
    Json(json!({
        "hash": set.as_ref().map(|s| s.hash.clone()),
        "loaded_at": set.as_ref().map(|s| s.loaded_at.to_rfc3339_opts(SecondsFormat::Millis, true)),
        "rules": running,
        "last_reload": state.rules.status(),
    }))
}

/// Prometheus text format.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let db = state.db.clone();
    if let Ok(Ok(pending)) = tokio::task::spawn_blocking(move || db.pending_count()).await {
        metrics::gauge!("tripline_outbox_pending").set(pending as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// The process's Prometheus recorder, installed on first use.
fn metrics_recorder() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("tripline_request_duration_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )
        .map_err(|e| anyhow::anyhow!("cannot set up the latency histogram: {e}"))?
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot start the metrics recorder: {e}"))?;
    metrics::describe_gauge!(
        "tripline_rules_reload_success",
        "1 if the last load of the rule files succeeded, 0 if it failed (the previous rules keep running)"
    );
    metrics::describe_gauge!(
        "tripline_rules_last_reload_timestamp_seconds",
        "When the rule files were last loaded, successfully or not (Unix time)"
    );
    metrics::describe_gauge!("tripline_rules_loaded", "Rules running now");
    metrics::describe_counter!(
        "tripline_rules_reloads_total",
        "Loads of the rule files since start, by result (ok, or failed: the previous rules keep running)"
    );
    metrics::describe_counter!(
        "tripline_actions_failed_total",
        "Actions that failed: emails that could not be made from an event or that the mail server refused for good, by kind and rule"
    );
    metrics::describe_counter!(
        "tripline_actions_succeeded_total",
        "Actions done: lines written (kind jsonl) and emails delivered (kind email), by rule"
    );
    metrics::describe_counter!(
        "tripline_events_received_total",
        "Events accepted and made durable, by source (retried deliveries included)"
    );
    metrics::describe_counter!(
        "tripline_events_duplicate_total",
        "Events a rule matched that were skipped because their uuid was handled before (a retried delivery)"
    );
    metrics::describe_counter!(
        "tripline_requests_rejected_total",
        "Requests to /webhook refused, by reason; a refused body changes nothing"
    );
    metrics::describe_counter!(
        "tripline_rule_matches_total",
        "Events whose [when] held for the rule"
    );
    metrics::describe_counter!("tripline_rule_fires_total", "Events the rule acted on");
    metrics::describe_counter!(
        "tripline_rule_suppressions_total",
        "Events the rule was held back on by its [limits]"
    );
    metrics::describe_gauge!("tripline_outbox_pending", "Emails waiting to be delivered");
    metrics::describe_histogram!(
        "tripline_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time to answer POST /webhook, durable write included"
    );
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Every way a request can fail, and the status each one gets.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("the body is larger than this server accepts (see max_body_bytes)")]
    TooLarge,
    #[error("the body could not be read: {0}")]
    Unreadable(String),
    #[error("the body took longer than the request timeout to arrive")]
    SlowUpload,
    /// Deliberately says nothing of what was wrong (missing header, wrong secret, old timestamp).
    #[error("unauthorized")]
    Unauthorized,
    #[error(
        "this endpoint needs an admin token once sources are configured: set TRIPLINE_ADMIN_TOKEN (or [admin] in tripline.toml)"
    )]
    AdminClosed,
    #[error("unauthorized")]
    AdminDenied,
    #[error("too many requests from this source; retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("the server is handling as many requests as it can; retry in a moment")]
    Overloaded,
    #[error(
        "no rules are loaded because the rule files have errors (see GET /rules); try again once they are fixed"
    )]
    NoRules,
    #[error("the event could not be stored, try again: {0}")]
    Commit(#[from] CommitError),
    #[error("{0}")]
    Internal(String),
}

impl AppError {
    /// The status, and the reason label counted in `tripline_requests_rejected_total`.
    fn status(&self) -> (StatusCode, &'static str) {
        match self {
            AppError::Decode(DecodeError::Empty | DecodeError::NotJson(_)) => {
                (StatusCode::BAD_REQUEST, "not_json")
            }
            AppError::Decode(DecodeError::TooDeep { .. }) => (StatusCode::BAD_REQUEST, "too_deep"),
            AppError::Decode(DecodeError::TooManyEvents { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_many_events")
            }
            AppError::Decode(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_event"),
            AppError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            AppError::Unreadable(_) => (StatusCode::BAD_REQUEST, "unreadable"),
            AppError::SlowUpload => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            AppError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AppError::AdminClosed => (StatusCode::FORBIDDEN, "admin_closed"),
            AppError::AdminDenied => (StatusCode::UNAUTHORIZED, "admin_denied"),
            AppError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            AppError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            AppError::NoRules => (StatusCode::SERVICE_UNAVAILABLE, "no_rules"),
            AppError::Commit(_) | AppError::Internal(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_failed")
            }
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, reason) = self.status();
        match &self {
            AppError::NoRules | AppError::Commit(_) | AppError::Internal(_) => error!("{self}"),
            _ => debug!(%reason, "request refused"),
        }
        if !matches!(self, AppError::AdminClosed | AppError::AdminDenied) {
            rejected(reason);
        }
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        match &self {
            AppError::Unauthorized | AppError::AdminDenied => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            AppError::Overloaded => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            AppError::RateLimited { retry_after_secs } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            _ => {}
        }
        response
    }
}
