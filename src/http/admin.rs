//! The endpoints that show the service: `/readyz` (open, like `/healthz`), and `/rules`,
//! `/outbox` and `/metrics`, which need the admin token once sources are configured.

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::SecondsFormat;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::AppState;
use super::error::AppError;
use crate::rules::RuleSet;
use crate::store::StoreError;
use crate::store::queue::{OutboxRecord, Retry};
use crate::telemetry;
use tracing::info;

/// Who a request to the admin endpoints is from: the operator (everything), or a source's read
/// token (a tenant: its own rules' data, on the endpoints [`tenant_may`] lists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    All,
    Tenant(String),
}

impl Access {
    /// Whether it may see what the rule named `rule` did: the operator always; a tenant only
    /// for a rule of its own that runs now.
    pub fn sees(&self, rules: Option<&RuleSet>, rule: &str) -> bool {
        match self {
            Access::All => true,
            Access::Tenant(t) => rules.is_some_and(|set| {
                (set.rules().iter()).any(|r| r.name == rule && r.tenant.as_deref() == Some(t))
            }),
        }
    }
}

/// Whether a tenant's read token opens `path` for `method`.
fn tenant_may(method: &axum::http::Method, path: &str) -> bool {
    method == axum::http::Method::GET
        && ["/users/", "/aggregates/", "/explain/"]
            .iter()
            .any(|p| path.starts_with(p))
}

/// Lets a request to the admin endpoints through when no source is configured (loopback
/// only) and it names the server by an address, or when it carries the admin token, or a
/// source's read token for what a tenant may read; says which ([`Access`]).
pub async fn admin_only(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Result<Response, AppError> {
    let access = match who_asks(&state, request.headers())? {
        Some(Access::Tenant(_)) if !tenant_may(request.method(), request.uri().path()) => {
            return Err(AppError::ReaderNotHere);
        }
        Some(access) => access,
        None if state.admin.is_none() => return Err(AppError::AdminClosed),
        None => return Err(AppError::AdminDenied),
    };
    request.extensions_mut().insert(access);
    Ok(next.run(request).await)
}

/// Who a request to the admin endpoints or the status page is from, by its headers; `None` when
/// sources are configured and it carries neither the admin token (a header, or the status
/// page's cookie) nor a source's read token. Without sources, the operator, when the request
/// names the server by an address.
pub(super) fn who_asks(state: &AppState, headers: &HeaderMap) -> Result<Option<Access>, AppError> {
    if state.sources.is_empty() {
        // Without a token, a web page could reach these through a name of its own that it
        // points at 127.0.0.1 (DNS rebinding): only an address, or `localhost`, is let in.
        let host = headers.get(header::HOST).map(|h| h.to_str());
        return match host {
            Some(Ok(host)) if !names_an_address(host) => Err(AppError::AdminByName),
            Some(Err(_)) => Err(AppError::AdminByName),
            _ => Ok(Some(Access::All)),
        };
    }
    let now = state.clock.unix();
    let operator = state.admin.as_ref().is_some_and(|admin| {
        // The token in a header (scripts), or the status page's login cookie (a browser).
        admin.accepts_bearer(headers) || admin.accepts_cookie(headers, now)
    });
    if operator {
        return Ok(Some(Access::All));
    }
    Ok(state
        .sources
        .reader(headers, now)
        .map(|tenant| Access::Tenant(tenant.to_string())))
}

/// Whether a `Host` header names the server by an IP address or as `localhost` (with or
/// without a port), rather than by a name someone else may control.
fn names_an_address(host: &str) -> bool {
    if host.starts_with('[') {
        // An IPv6 address, `[::1]:8080`.
        return host
            .split(']')
            .next()
            .and_then(|a| a.strip_prefix('['))
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
    }
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// GET /readyz: 200 when events can be taken (a write to the store can commit, the committer
/// runs, rules are loaded, the data folder is writable), else 503 with what is wrong.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let store = state.store.clone();
    let data_dir = state.data_dir.clone();
    let checks = tokio::task::spawn_blocking(move || {
        let store = store.check().map_err(|e| e.to_string());
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
    // Lines acknowledged and not yet in their file: shown, but events are still taken (they
    // wait in the store, up to a bound per file).
    let now_ms = state.clock.now().timestamp_millis();
    let lines: serde_json::Map<String, serde_json::Value> = state
        .committer
        .lines_waiting()
        .into_iter()
        .map(|(file, w)| {
            let seconds = w
                .since_ms
                .map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0);
            let shown = json!({ "bytes": w.bytes, "waiting_seconds": seconds, "error": w.error });
            (file, shown)
        })
        .collect();
    let body = json!({
        "ready": ready,
        "store": show(&store),
        "committer": show(&committer),
        "rules": show(&rules),
        "data_folder": show(&writable),
        "lines_waiting": lines,
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
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| format!("cannot write in {}: {e}", data_dir.display()))?;
    // Removed whether the write worked or not (on a full disk, it does not).
    let written = std::io::Write::write_all(&mut file, b"ok");
    drop(file);
    let removed = std::fs::remove_file(&probe);
    written
        .and(removed)
        .map_err(|e| format!("cannot write in {}: {e}", data_dir.display()))
}

/// The delivery queue: how many wait and the oldest 50 of them (with the last error), the 50
/// newest finished, delivered or not, the 50 newest failures (kept apart, for retrying), and
/// the destinations disabled.
pub async fn outbox(State(state): State<Arc<AppState>>) -> Result<Json<Value>, AppError> {
    let store = state.store.clone();
    let status = tokio::task::spawn_blocking(move || store.outbox_status(50))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?
        .map_err(|e| AppError::Internal(e.to_string()))?;
    let show = |(id, r): &(u64, OutboxRecord)| {
        json!({
            "id": id, "kind": r.kind, "rule": r.rule, "to": r.destination, "status": r.status, "attempts": r.attempts,
            "last_error": r.last_error, "created_unix": r.created_unix, "finished_unix": r.finished_unix,
        })
    };
    let disabled: serde_json::Map<String, Value> = (state.senders.iter())
        .flat_map(|(kind, sender)| {
            (sender.disabled().into_iter())
                .map(move |(to, why)| (format!("{kind} {to}"), json!(why)))
        })
        .collect();
    Ok(Json(json!({
        "disabled": disabled,
        "pending": status.pending,
        "finished": status.finished,
        "failed": status.failed,
        "failures": status.failures.iter().map(show).collect::<Vec<_>>(),
        "waiting": status.waiting.iter().map(show).collect::<Vec<_>>(),
        "recent": status.recent.iter().map(show).collect::<Vec<_>>(),
    })))
}

/// `POST /outbox/{id}/retry`: the operator asks for a delivery that failed for good to go back
/// into the queue under the same id (so with the same idempotency key or Message-ID), to be
/// tried again as a new one would be. A delivery queued or delivered is left alone.
pub async fn retry(
    State(state): State<Arc<AppState>>,
    Path(id): Path<u64>,
    headers: axum::http::HeaderMap,
) -> Result<Response, AppError> {
    // A browser sends `Origin` with a form posted from a page; an operator's curl or script
    // does not. Without sources this endpoint needs no token (loopback only), so a page the
    // operator visits must not be able to use it: only tripline's own status page may.
    if headers.contains_key(header::ORIGIN) && !same_origin(&headers) {
        return Err(AppError::FromWebPage);
    }
    let store = state.store.clone();
    let now = state.clock.unix();
    let retried = tokio::task::spawn_blocking(move || {
        let mut txn = store.begin()?;
        let retried = txn.retry(id, now)?;
        if retried == Retry::Queued {
            txn.commit()?;
        }
        Ok::<_, StoreError>(retried)
    })
    .await
    .map_err(|e| AppError::Internal(e.to_string()))?
    .map_err(|e| AppError::Internal(e.to_string()))?;
    let (status, message) = match retried {
        Retry::Queued => {
            state.deliveries_queued.notify_one();
            info!(delivery.id = id, "delivery queued again by the operator");
            (
                StatusCode::OK,
                "queued again: it is tried now, with the same idempotency key",
            )
        }
        Retry::NotFound => (
            StatusCode::NOT_FOUND,
            "there is no such delivery in the outbox or its history",
        ),
        Retry::Pending => (
            StatusCode::CONFLICT,
            "this delivery is still queued: it is tried on its own",
        ),
        Retry::Delivered => (
            StatusCode::CONFLICT,
            "this delivery was delivered: trying it again would send it twice",
        ),
        Retry::NeverMade => (
            StatusCode::CONFLICT,
            "this delivery was never made (see its last_error): trying it again would fail the same way; fix the rule instead",
        ),
    };
    // The status page's button: back to the page, which shows where the delivery stands.
    let form = headers.get(header::CONTENT_TYPE).is_some_and(|t| {
        t.as_bytes()
            .starts_with(b"application/x-www-form-urlencoded")
    });
    if form {
        return Ok(axum::response::Redirect::to("/status").into_response());
    }
    let key = if status == StatusCode::OK {
        "status"
    } else {
        "error"
    };
    Ok((status, Json(json!({ "id": id, key: message }))).into_response())
}

/// Whether the request's `Origin` is the server itself, as the `Host` header names it: a form
/// of tripline's own status page.
pub(super) fn same_origin(headers: &axum::http::HeaderMap) -> bool {
    let value = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(origin), Some(host)) = (value(header::ORIGIN), value(header::HOST)) else {
        return false;
    };
    url::Url::parse(origin).is_ok_and(|u| {
        let Some(name) = u.host_str() else {
            return false;
        };
        let authority = match u.port() {
            Some(port) => format!("{name}:{port}"),
            None => name.to_string(),
        };
        authority.eq_ignore_ascii_case(host)
    })
}

/// The running rules with their files, the running set's content hash and load time, and the
/// outcome of the last reload.
pub async fn rules(State(state): State<Arc<AppState>>) -> Json<Value> {
    let set = state.rules.snapshot();
    let unwritable = state.committer.unwritable();
    let store = state.store.clone();
    // The page still shows the rules when the store cannot be read (a full disk): the counts
    // are then unknown (null).
    let waiting: Option<std::collections::HashMap<String, u64>> =
        match tokio::task::spawn_blocking(move || store.waiting()).await {
            Ok(Ok(rows)) => Some(rows.into_iter().collect()),
            _ => None,
        };
    let late = state.committer.wait_lateness();
    let suppressed = state.committer.suppressed();
    let running: Vec<Value> = set
        .as_ref()
        .map(|set| {
            set.rules()
                .iter()
                .map(|r| {
                    let mut summary = r.summary.clone();
                    let files = r.actions.iter().filter_map(|a| a.file());
                    if let Some(why) = files.filter_map(|f| unwritable.get(f)).next() {
                        summary["failing"] = json!(format!(
                            "its output file cannot be written, so the rule does nothing: {why}"
                        ));
                    }
                    // Never silent: how often it was held back since start, and why.
                    let held: serde_json::Map<String, Value> = (suppressed.iter())
                        .filter(|((rule, _), _)| *rule == r.name)
                        .map(|((_, reason), n)| (reason.to_string(), json!(n)))
                        .collect();
                    summary["suppressed"] = Value::Object(held);
                    // Pending waits and held actions (`[send_window]`) alike.
                    if r.keeps_pending() {
                        summary["waits"] = json!({
                            "pending": waiting.as_ref().map(|w| w.get(&r.name).copied().unwrap_or(0)),
                            "last_late_seconds": late.get(&r.name),
                        });
                    }
                    summary
                })
                .collect()
        })
        .unwrap_or_default();
    // Waits of rules no longer loaded are dropped at the next reload; until then they show.
    let orphans: Vec<Value> = (waiting.iter().flatten())
        .filter(|(rule, _)| set.as_ref().is_none_or(|s| s.named(rule).is_none()))
        .map(|(rule, n)| json!({ "rule": rule, "pending": n }))
        .collect();
    Json(json!({
        "hash": set.as_ref().map(|s| s.hash.clone()),
        "loaded_at": set.as_ref().map(|s| s.loaded_at.to_rfc3339_opts(SecondsFormat::Millis, true)),
        "rules": running,
        "waits_of_other_rules": orphans,
        "last_reload": state.rules.status(),
    }))
}

/// Prometheus text format.
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let store = state.store.clone();
    if let Ok(Ok(pending)) = tokio::task::spawn_blocking(move || store.pending_count()).await {
        metrics::gauge!(telemetry::OUTBOX_PENDING.name).set(pending as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
