//! The HTTP edge: connections, admission, the routes and their limits, status codes.
//!
//! `POST /webhook` (`webhook.rs`) takes the raw body (whatever the `Content-Type`), decodes every event in it,
//! and only then runs them through one snapshot of the rules. A client's mistake is a specific
//! 4xx with a JSON `{"error": ...}` (`error.rs`); a fault on our side is a 503 so that PostHog
//! retries. `admin.rs` holds the endpoints that show the service.

pub mod admin;
pub mod admission;
pub mod aggregates;
pub mod connections;
pub mod error;
pub mod explain;
pub mod status;
pub mod users;
pub mod webhook;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use metrics_exporter_prometheus::PrometheusHandle;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower_http::timeout::TimeoutLayer;

use crate::actions::Senders;
use crate::clock::Clock;
use crate::config::Limits;
use crate::ingest::auth::{Source, Sources};
use crate::ingest::event::BodyLimits;
use crate::pipeline::committer::Committer;
use crate::pipeline::reload::LiveRules;
use crate::store::Backend;
use crate::telemetry;
use error::AppError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The time of day: when a request is received.
    pub clock: Clock,
    pub rules: Arc<LiveRules>,
    pub committer: Committer,
    /// Everything the service keeps.
    pub store: Arc<dyn Backend>,
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
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// Places for signed requests whose body is being read and checked.
    pub unverified: Arc<Semaphore>,
    /// Where /readyz checks it can write.
    pub data_dir: PathBuf,
    /// The senders of deliveries, for what `/outbox` shows of them.
    pub senders: Senders,
    /// Wakes the outbox's sender when a delivery is queued again.
    pub deliveries_queued: Arc<tokio::sync::Notify>,
    /// Why rules did not act on the events of requests no rule acted on (see `explain.rs`).
    pub explained: Arc<crate::explain::Recent>,
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
    // Shared, not copied: a request's handlers and layers each take the state, and a copy is
    // a dozen reference counts to change and drop (a few percent of a request, by perf).
    let state = Arc::new(state);
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
        .route("/rules", get(admin::rules))
        .route("/outbox", get(admin::outbox))
        .route("/outbox/{id}/retry", post(admin::retry))
        .route("/metrics", get(admin::metrics))
        .route("/aggregates/{rule}", get(aggregates::aggregates))
        .route("/explain/{uuid}", get(explain::explain))
        .route(
            "/users/{distinct_id}",
            get(users::user).delete(users::forget),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            admin::admin_only,
        ));
    Router::new()
        .route("/webhook", post(webhook::webhook).layer(webhook_limits))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(admin::readyz))
        // The page signs its visitors in itself (a form, then a cookie).
        .route("/status", get(status::status))
        .route("/status/login", post(status::login))
        .merge(admin)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(state)
}

/// Times every request to /webhook, shed ones included (and counts those cut off by the time
/// limit).
async fn timed(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        telemetry::rejected("timeout");
    }
    metrics::histogram!(telemetry::REQUEST_DURATION.name).record(started.elapsed().as_secs_f64());
    response
}
