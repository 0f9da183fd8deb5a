//! Admission to `/webhook`: who sent a request is settled before it may take a place among the
//! requests being handled, and before its body is read where that can be done.
//!
//! - A bearer token is checked from the headers alone: a request without a valid one is refused
//!   at once (401) and its body is never read, so unauthenticated clients cannot hold the places
//!   of real senders by uploading slowly.
//! - A Standard Webhooks signature covers the body, so the body must be read first: such reads
//!   happen in a pool of their own (`max_unverified_requests`, 503 when full), with the body and
//!   time limits, and only a verified request goes on.
//! - Then the source's rate limit (429), and the request goes on to the concurrency limit and the
//!   handler, carrying its [`Sender`].

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use std::sync::Arc;
use tracing::debug;

use crate::http::{AppError, AppState};
use crate::ingest::auth::{Credentials, Refusal, Sources};

/// Who sent a request, as admission established it.
#[derive(Debug, Clone)]
pub struct Sender {
    /// The source's name (`local` when no source is configured).
    pub source: String,
    /// A signed request's `webhook-id`, remembered so that a replay has no effect.
    pub webhook_id: Option<String>,
}

/// Admits a request to `/webhook` (see the module's documentation).
pub async fn admit(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, AppError> {
    let (sender, mut request) = if state.sources.is_empty() {
        let local = Sender {
            source: "local".into(),
            webhook_id: None,
        };
        (local, request)
    } else {
        match Sources::credentials(request.headers()) {
            Credentials::Bearer => match state.sources.bearer(request.headers()) {
                Ok(source) => {
                    let sender = Sender {
                        source: source.name.clone(),
                        webhook_id: None,
                    };
                    (sender, request)
                }
                Err(refusal) => return Err(refused(refusal)),
            },
            Credentials::Signature => verify_signed(&state, request).await?,
            Credentials::None => return Err(refused(Refusal::NoCredentials)),
        }
    };
    if let Err(not_until) = state.rate_limiter.check_key(&sender.source) {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        return Err(AppError::RateLimited {
            retry_after_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
        });
    }
    request.extensions_mut().insert(sender);
    Ok(next.run(request).await)
}

/// Reads a signed request's body in the pool for unverified requests, and checks the signature.
async fn verify_signed(state: &AppState, request: Request) -> Result<(Sender, Request), AppError> {
    let Ok(_place) = Arc::clone(&state.unverified).try_acquire_owned() else {
        return Err(AppError::Overloaded);
    };
    let (parts, body) = request.into_parts();
    let body = read_body(body, state.max_body_bytes, state.request_timeout).await?;
    let now = state.clock.now().timestamp();
    let (source, id) = state
        .sources
        .signed(&parts.headers, &body, now)
        .map_err(refused)?;
    let sender = Sender {
        source: source.name.clone(),
        webhook_id: Some(id.to_string()),
    };
    Ok((sender, Request::from_parts(parts, Body::from(body))))
}

/// The whole body, within `max_bytes` and `timeout`.
async fn read_body(
    body: Body,
    max_bytes: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, AppError> {
    let collected = tokio::time::timeout(timeout, Limited::new(body, max_bytes).collect())
        .await
        .map_err(|_| AppError::SlowUpload)?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(AppError::TooLarge),
        Err(e) => Err(AppError::Unreadable(e.to_string())),
    }
}

fn refused(refusal: Refusal) -> AppError {
    debug!(
        reason = refusal.label(),
        "request refused: not from a configured source"
    );
    AppError::Unauthorized
}
