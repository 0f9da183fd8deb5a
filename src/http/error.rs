//! The one error type of the HTTP edge: each way a request can fail, the status it gets, and
//! the JSON `{"error": ...}` a sender reads.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::{debug, error};

use crate::ingest::event::DecodeError;
use crate::pipeline::committer::CommitError;
use crate::telemetry;

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
    /// Without sources the admin endpoints need no token, so they answer only requests that
    /// name the server by its address.
    #[error(
        "without a configured source, this endpoint answers only requests to an address (http://127.0.0.1:PORT) or localhost, not to a name: a web page could otherwise read it through a name it points at this machine. Configure a source and an admin token to use a name"
    )]
    AdminByName,
    #[error("too many requests from this source; retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("the server is handling as many requests as it can; retry in a moment")]
    Overloaded,
    #[error(
        "no rules are loaded because the rule files have errors (see GET /rules); try again once they are fixed"
    )]
    NoRules,
    /// What went wrong is logged by the committer, once for its whole batch; the sender is told
    /// only to try again (a disk's error message is nothing it can act on).
    #[error("the events could not be stored right now; try again")]
    Commit(#[from] CommitError),
    /// A request that changes something, sent from a web page (it has an `Origin` header): not
    /// what an operator's curl or script sends, so a page they visit cannot use the endpoint.
    #[error("refused from a web page: send it with curl or a script")]
    FromWebPage,
    /// A query string this endpoint cannot use; the message says what to change.
    #[error("{0}")]
    BadQuery(String),
    /// A source's read token, on an endpoint it does not open.
    #[error(
        "a source's read token opens only GET /users, /aggregates, /explain and /status, for that source's rules"
    )]
    ReaderNotHere,
    /// Nothing by that name: the message says what was looked for.
    #[error("{0}")]
    NotFound(String),
    /// An internal fault: logged once, when answered; the sender gets a generic message.
    #[error("an internal error stopped this request; try again")]
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
            AppError::AdminByName => (StatusCode::FORBIDDEN, "admin_by_name"),
            AppError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            AppError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            AppError::NoRules => (StatusCode::SERVICE_UNAVAILABLE, "no_rules"),
            AppError::BadQuery(_) => (StatusCode::BAD_REQUEST, "bad_query"),
            AppError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AppError::ReaderNotHere => (StatusCode::FORBIDDEN, "reader_not_here"),
            AppError::FromWebPage => (StatusCode::FORBIDDEN, "from_web_page"),
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
            AppError::Internal(detail) => error!("request failed on an internal error: {detail}"),
            // The committer logged why its batch failed; the reload logged why no rules run.
            AppError::Commit(e) => debug!(%reason, "request not stored: {e}"),
            _ => debug!(%reason, "request refused"),
        }
        if !matches!(
            self,
            AppError::AdminClosed
                | AppError::AdminDenied
                | AppError::AdminByName
                | AppError::ReaderNotHere
        ) {
            telemetry::rejected(reason);
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
