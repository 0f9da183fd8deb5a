//! `GET /status`: a page a non-developer can read, on a phone too: the rules running (and the
//! last change to their files, with its problems in words), what each rule did in the last hour
//! and day, the latest actions (each with a link to why), what waits to be sent, and failed
//! deliveries with a button to try them again. Rendered on the server (askama: the templates in
//! `pages/` are checked when tripline is compiled); no script, a refresh every 15 seconds.
//!
//! Once sources are configured it needs the admin token: in an `Authorization` header, or
//! through the sign-in form (`POST /status/login`), which sets a cookie the browser sends back
//! (`HttpOnly`, `SameSite=Strict`); the token is never in a URL.

use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;

use super::AppState;
use super::admin::{Access, who_asks};
use super::error::AppError;
use crate::ingest::auth::{COOKIE, COOKIE_LIFETIME, cookie_value};
use crate::pipeline::activity::Counts;
use crate::store::queue::OutboxRecord;

/// Deliveries listed, waiting and failed.
const SHOWN: usize = 20;

#[derive(Template)]
#[template(path = "status.html")]
struct StatusPage {
    /// Whether the operator is asking (a tenant sees neither the rule set's hash nor the
    /// store's errors).
    operator: bool,
    /// Why the store could not be read, if it could not: the counts of waits and deliveries
    /// are then unknown, and the page says so.
    store_error: Option<String>,
    as_of: String,
    started: String,
    running: Option<Running>,
    reload_ok: bool,
    reload_at: String,
    errors: Vec<String>,
    warnings: Vec<String>,
    rules: Vec<RuleRow>,
    held_reasons: String,
    recent: Vec<FiringRow>,
    outbox_pending: u64,
    failed_total: u64,
    waiting: Vec<DeliveryRow>,
    failures: Vec<DeliveryRow>,
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    failed: bool,
}

struct Running {
    hash: String,
    loaded_at: String,
}

struct RuleRow {
    name: String,
    description: String,
    hour: Row,
    day: Row,
    /// Pending waits, held actions or digests: a number, or "-" for a rule that keeps none.
    waiting: String,
}

/// A rule's counts as the page shows them ("held back" is limits and caps together).
#[derive(Default)]
struct Row {
    matched: u64,
    fired: u64,
    counting: u64,
    held: u64,
    failed: u64,
}

impl From<Counts> for Row {
    fn from(c: Counts) -> Row {
        Row {
            matched: c.matched,
            fired: c.fired,
            counting: c.counting,
            held: c.limited + c.capped,
            failed: c.failed,
        }
    }
}

struct FiringRow {
    at: String,
    rule: String,
    uuid: Option<String>,
}

struct DeliveryRow {
    id: u64,
    kind: String,
    rule: String,
    to: String,
    attempts: u32,
    last_error: String,
    /// Whether the operator may queue it again (a delivery that was never made may not).
    can_retry: bool,
}

impl DeliveryRow {
    /// `r`, with its retry button for the operator.
    fn of(id: u64, r: &OutboxRecord, operator: bool) -> DeliveryRow {
        DeliveryRow {
            id,
            kind: r.kind.clone(),
            rule: r.rule.clone(),
            to: r.destination.clone(),
            attempts: r.attempts,
            last_error: r.last_error.clone().unwrap_or_default(),
            can_retry: operator && !r.payload.is_empty(),
        }
    }
}

pub async fn status(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    // As the admin endpoints, but a visitor without a token gets the sign-in form.
    let access = match who_asks(&state, &headers) {
        Err(e) => return e.into_response(),
        Ok(None) if state.admin.is_none() => return AppError::AdminClosed.into_response(),
        Ok(None) => return login_page(false),
        Ok(Some(access)) => access,
    };
    let now = state.clock.now();
    let now_ms = now.timestamp_millis();
    let set = state.rules.snapshot();
    let reload = state.rules.status();
    let (activity, recent, started_ms) = state.committer.activity(now_ms);
    let store = state.store.clone();
    let read = tokio::task::spawn_blocking(move || {
        let waiting: std::collections::HashMap<String, u64> =
            store.waiting()?.into_iter().collect();
        Ok::<_, crate::store::StoreError>((waiting, store.outbox_status(SHOWN)?))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r.map_err(|e| e.to_string()));
    // The page still shows what it can when the store cannot be read, and says so.
    let (store_error, (waiting, outbox)) = match read {
        Ok((w, o)) => (None, (w, Some(o))),
        Err(e) => (Some(e), Default::default()),
    };
    // A tenant's page shows its own rules, what they did and sent, and its folder's problems.
    let sees = |rule: &str| access.sees(set.as_deref(), rule);
    let (activity, mut recent) = (activity, recent);
    let activity: Vec<_> = activity.into_iter().filter(|a| sees(&a.rule)).collect();
    recent.retain(|f| sees(&f.rule));
    let (mut errors, mut warnings) = (reload.errors, reload.warnings);
    let mut outbox = outbox;
    if let Access::Tenant(t) = &access {
        // The problems of its own folder: each starts with its file's path.
        let folder = state.rules.rules_dir().join(t).display().to_string();
        let own = |text: &String| {
            text.strip_prefix(&folder)
                .is_some_and(|rest| rest.starts_with('/') || rest.starts_with(':'))
        };
        errors.retain(own);
        warnings.retain(own);
        if let Some(o) = &mut outbox {
            o.waiting.retain(|(_, r)| sees(&r.rule));
            o.failures.retain(|(_, r)| sees(&r.rule));
            // Only what is shown is theirs to count; and the retry is the operator's.
            (o.pending, o.failed) = (o.waiting.len() as u64, o.failures.len() as u64);
        }
    }
    let operator = access == Access::All;
    let rules: Vec<RuleRow> = (set.iter().flat_map(|s| s.rules()))
        .filter(|r| sees(&r.name))
        .map(|r| {
            let a = activity.iter().find(|a| a.rule == r.name);
            RuleRow {
                name: r.name.clone(),
                description: r.summary["description"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                hour: a.map(|a| a.hour.into()).unwrap_or_default(),
                day: a.map(|a| a.day.into()).unwrap_or_default(),
                waiting: match r.keeps_pending() {
                    true => waiting.get(&r.name).copied().unwrap_or(0).to_string(),
                    false => "-".into(),
                },
            }
        })
        .collect();
    // Of the rules running: the table shows those only.
    let running = |name: &str| set.iter().flat_map(|s| s.rules()).any(|r| r.name == name);
    let (limited, capped) = (activity.iter().filter(|a| running(&a.rule)))
        .fold((0, 0), |(l, c), a| (l + a.day.limited, c + a.day.capped));
    let page = StatusPage {
        operator,
        store_error,
        as_of: minute(now),
        started: minute(DateTime::from_timestamp_millis(started_ms).unwrap_or_default()),
        running: set.as_ref().map(|s| Running {
            hash: s.hash.clone(),
            loaded_at: minute(s.loaded_at),
        }),
        // A tenant is told of its own folder's problems only.
        reload_ok: if operator {
            reload.ok
        } else {
            errors.is_empty()
        },
        reload_at: DateTime::parse_from_rfc3339(&reload.at)
            .map_or(reload.at.clone(), |t| minute(t.with_timezone(&Utc))),
        errors,
        warnings,
        rules,
        held_reasons: format!(
            "in the last day, {limited} by limits (already acted for the same person or values) and {capped} by cap groups"
        ),
        recent: recent
            .into_iter()
            .map(|f| FiringRow {
                at: minute(DateTime::from_timestamp_millis(f.at_ms).unwrap_or_default()),
                rule: f.rule,
                uuid: f.uuid,
            })
            .collect(),
        outbox_pending: outbox.as_ref().map_or(0, |o| o.pending),
        failed_total: outbox.as_ref().map_or(0, |o| o.failed),
        waiting: (outbox.iter().flat_map(|o| &o.waiting))
            .map(|(id, r)| DeliveryRow::of(*id, r, operator))
            .collect(),
        failures: (outbox.iter().flat_map(|o| &o.failures))
            .map(|(id, r)| DeliveryRow::of(*id, r, operator))
            .collect(),
    };
    match page.render() {
        Ok(html) => not_framed(Html(html).into_response()),
        Err(e) => AppError::Internal(format!("the status page: {e}")).into_response(),
    }
}

/// `response`, which no other site may show in a frame: its buttons must not be clicked
/// through someone else's page.
fn not_framed(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    response
}

/// The sign-in form's fields.
#[derive(Deserialize)]
pub struct Login {
    token: String,
}

/// `POST /status/login`: with the admin token, or a source's read token (its rules only),
/// sets the cookie and goes to the page.
pub async fn login(State(state): State<Arc<AppState>>, Form(login): Form<Login>) -> Response {
    if state.sources.is_empty() {
        // Nothing to sign in to.
        return Redirect::to("/status").into_response();
    }
    let admin = (state.admin.as_ref())
        .filter(|admin| admin.accepts_token(&login.token))
        .map(|_| Sha256::digest(login.token.as_bytes()).into());
    let Some(digest) = admin.or_else(|| state.sources.read_token(&login.token)) else {
        return login_page(true);
    };
    let cookie = format!(
        "{COOKIE}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict",
        cookie_value(&digest, state.clock.unix()),
        COOKIE_LIFETIME.as_secs()
    );
    let mut response = Redirect::to("/status").into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

fn login_page(failed: bool) -> Response {
    match (LoginPage { failed }).render() {
        Ok(html) => not_framed((StatusCode::UNAUTHORIZED, Html(html)).into_response()),
        Err(e) => AppError::Internal(format!("the sign-in page: {e}")).into_response(),
    }
}

/// A time on the page: `2026-12-04 18:20 UTC`.
fn minute(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}
