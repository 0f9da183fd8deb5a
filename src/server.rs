//! The HTTP edge: routes, status codes, and starting and stopping the service.
//!
//! `POST /webhook` takes the raw body (whatever the `Content-Type`), decodes every event in it,
//! and only then runs them through one snapshot of the rules. A client's mistake is a specific
//! 4xx with a JSON `{"error": ...}`; a fault on our side is a 503 so that PostHog retries.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::future::Future;
use std::sync::Arc;
use tracing::{error, info, info_span};

use crate::actions::email::Mailer;
use crate::actions::jsonl::JsonlWriters;
use crate::config::ServeConfig;
use crate::engine::{Engine, EngineError};
use crate::event::{self, DecodeError};
use crate::reload::{self, LiveRules};
use crate::store::MemoryStore;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub rules: Arc<LiveRules>,
    pub engine: Arc<Engine>,
}

/// The routes, with the body limit applied.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/webhook", post(webhook))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/rules", get(rules))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Runs the service until `shutdown` completes, then stops accepting, lets requests in flight
/// finish, and returns.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.rules.is_dir(),
        "the rules folder {} does not exist (set it with --rules or TRIPLINE_RULES)",
        config.rules.display()
    );
    std::fs::create_dir_all(&config.data).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the data folder {}: {e}",
            config.data.display()
        )
    })?;
    let mailer = Mailer::new(&config.data, config.email_from.clone())?;
    let engine = Engine::new(
        Arc::new(MemoryStore::default()),
        JsonlWriters::new(&config.data),
        mailer,
    );
    let live = Arc::new(LiveRules::load(
        &config.rules,
        &config.templates,
        &config.data,
    ));
    let _watcher = reload::watch(live.clone())
        .map_err(|e| anyhow::anyhow!("cannot watch {} for changes: {e}", config.rules.display()))?;
    let state = AppState {
        rules: live,
        engine: Arc::new(engine),
    };
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(state, config.max_body_bytes))
        .with_graceful_shutdown(shutdown)
        .await?;
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
    let span = info_span!("request", events = events.len());
    let engine = state.engine.clone();
    let count = events.len();
    let report =
        tokio::task::spawn_blocking(move || span.in_scope(|| engine.handle(&rules, &events)))
            .await
            .map_err(|e| AppError::Internal(format!("event processing stopped: {e}")))??;
    Ok(Json(json!({
        "accepted": count,
        "fired": report.fired,
        "failed": report.failed,
    })))
}

async fn rules(State(state): State<AppState>) -> Json<Value> {
    let running: Vec<Value> = state
        .rules
        .snapshot()
        .map(|set| set.rules().iter().map(|r| r.summary.clone()).collect())
        .unwrap_or_default();
    Json(json!({
        "rules": running,
        "last_reload": state.rules.status(),
    }))
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
    #[error(transparent)]
    Engine(#[from] EngineError),
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
            AppError::NoRules | AppError::Engine(_) | AppError::Internal(_) => {
                error!("{self}");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}
