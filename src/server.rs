//! The HTTP edge: routes, status codes, and starting and stopping the service.
//!
//! `POST /webhook` takes the raw body (whatever the `Content-Type`), decodes every event in it,
//! and only then runs them through one snapshot of the rules. A client's mistake is a specific
//! 4xx with a JSON `{"error": ...}`; a fault on our side is a 503 so that PostHog retries.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::SecondsFormat;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tracing::{error, info};

use crate::actions::jsonl::JsonlFiles;
use crate::committer::{CommitError, Committer};
use crate::config::ServeConfig;
use crate::db::Db;
use crate::event::{self, DecodeError};
use crate::outbox::{self, OutboxRecord, Transport};
use crate::reload::{self, LiveRules};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub rules: Arc<LiveRules>,
    pub committer: Committer,
    pub db: Arc<Db>,
    pub metrics: PrometheusHandle,
}

/// The routes, with the body limit applied.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/webhook", post(webhook))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/rules", get(rules))
        .route("/outbox", get(outbox))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body_bytes))
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
    let retention = Duration::from_secs(config.dedupe_retention_days.saturating_mul(86_400));
    let (committer, committer_thread) = Committer::start(
        db.clone(),
        JsonlFiles::new(&config.folders.data),
        config.sender.email_from.clone(),
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
    };
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(state, config.max_body_bytes))
        .with_graceful_shutdown(shutdown)
        .await?;
    // Every request has been answered and the router (with its committer handles) is gone, so the
    // committer thread ends once its last batch is committed.
    tokio::task::spawn_blocking(move || committer_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the committer thread panicked"))?;
    let _ = stop_sender.send(true);
    sender.await?;
    info!("stopped");
    Ok(())
}

async fn webhook(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, AppError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => AppError::TooLarge,
        _ => AppError::Unreadable(rejection.body_text()),
    })?;
    let events = event::decode(&body, chrono::Utc::now())?;
    let Some(rules) = state.rules.snapshot() else {
        return Err(AppError::NoRules);
    };
    let count = events.len();
    let report = state.committer.submit(rules.clone(), events).await?;
    Ok(Json(json!({
        "accepted": count,
        "duplicates": report.duplicates,
        "fired": report.fired(&rules),
        "failed": report.failures(&rules),
    })))
}

/// The email queue: what waits (with the last error), and what was recently sent or gave up.
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
        "pending": status.pending.len(),
        "finished": status.finished,
        "waiting": status.pending.iter().take(50).map(show).collect::<Vec<_>>(),
        "recent": status.recent.iter().map(show).collect::<Vec<_>>(),
    })))
}

/// The running rules with their files, the running set's content hash and load time, and the
/// outcome of the last reload.
async fn rules(State(state): State<AppState>) -> Json<Value> {
    let set = state.rules.snapshot();
    let running: Vec<Value> = set
        .as_ref()
        .map(|set| set.rules().iter().map(|r| r.summary.clone()).collect())
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
        "tripline_actions_failed_total",
        "Actions that could not be made from an event (an email whose fields are missing), by kind and rule"
    );
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Every way a request can fail, and the status each one gets.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("the body is larger than this server accepts (see --max-body-bytes)")]
    TooLarge,
    #[error("the body could not be read: {0}")]
    Unreadable(String),
    #[error(
        "no rules are loaded because the rule files have errors (see GET /rules); try again once they are fixed"
    )]
    NoRules,
    #[error("the event could not be stored, try again: {0}")]
    Commit(#[from] CommitError),
    #[error("{0}")]
    Internal(String),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = match &self {
            AppError::Decode(
                DecodeError::Empty | DecodeError::NotJson(_) | DecodeError::TooDeep,
            ) => StatusCode::BAD_REQUEST,
            AppError::Decode(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::Unreadable(_) => StatusCode::BAD_REQUEST,
            AppError::NoRules | AppError::Commit(_) | AppError::Internal(_) => {
                error!("{self}");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}
