//! Delivering queued requests to their endpoints (reqwest with rustls), and what each answer
//! means:
//! - 2xx: delivered.
//! - 408, 429, 5xx, no answer within the endpoint's `timeout`, a connection that fails: tried
//!   again with backoff (a `Retry-After` answer is honoured), until the delivery is older than
//!   the endpoint's `max_age`; then it fails for good with the last reason.
//! - 410 Gone: the receiver says the endpoint no longer exists. The endpoint is disabled until
//!   tripline restarts (after the operator fixed its address): its deliveries fail for good,
//!   visible at `GET /outbox`, without another request.
//! - any other answer (400, 401, 404, a redirect...): fails for good, with the status and the
//!   first bytes of the answer.
//!
//! Every attempt at one delivery sends the same bytes with the same `Idempotency-Key` (and, for
//! an endpoint with a signing secret, the same `webhook-id`), so a receiver can drop a repeat: a
//! crash between the receiver's 2xx and our record of it sends the request again (at least
//! once, like SMTP).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{StatusCode, redirect};
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Request;
use super::endpoint::{Endpoint, Endpoints};
use crate::actions::email::mask_addresses;
use crate::actions::{Attempt, Bound, Sender, write_file_durably};
use crate::clock::Clock;
use crate::ingest::auth::sign;
use crate::store::queue::OutboxRecord;
use crate::units::format_duration;

/// How much of a refusing answer's body is kept with the failure.
const ANSWER_BYTES_KEPT: usize = 200;

/// The longest `Retry-After` honoured: a receiver cannot park a delivery for longer.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Sends requests to the declared endpoints.
pub struct HttpSender {
    client: reqwest::Client,
    endpoints: Arc<Endpoints>,
    /// The endpoints that answered 410 Gone since start, with why.
    gone: Mutex<HashMap<String, String>>,
}

impl HttpSender {
    pub fn new(endpoints: Arc<Endpoints>) -> anyhow::Result<HttpSender> {
        // reqwest is built without a default crypto provider; rustls uses ring, as lettre's does.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            // A redirect is refused, not followed: the operator declared this address, and a
            // request must not go anywhere else.
            .redirect(redirect::Policy::none())
            .user_agent(concat!("tripline/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpSender {
            client,
            endpoints,
            gone: Mutex::new(HashMap::new()),
        })
    }

    fn gone(&self) -> HashMap<String, String> {
        self.gone.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn deliver(&self, record: &OutboxRecord) -> Attempt {
        let request = match Request::from_payload(&record.payload) {
            Ok(request) => request,
            Err(e) => return Attempt::Permanent(format!("the stored request cannot be read: {e}")),
        };
        let Some(endpoint) = self.endpoints.get(&request.endpoint) else {
            return Attempt::Permanent(format!(
                "no endpoint \"{}\" is declared in tripline.toml now; declare it again and retry this delivery",
                request.endpoint
            ));
        };
        if let Some(why) = self.gone().get(&endpoint.name) {
            return Attempt::Permanent(why.clone());
        }
        let attempt = self.send(endpoint, &request).await;
        let now = Clock::wall().unix();
        let age = Duration::from_secs(now.saturating_sub(record.age_from_unix()));
        match attempt {
            Attempt::Temporary(reason) | Attempt::RetryAfter(reason, _)
                if age >= endpoint.max_age =>
            {
                Attempt::Permanent(format!(
                    "gave up after {} attempts over {} (the endpoint's max_age): {reason}",
                    record.attempts + 1,
                    format_duration(age)
                ))
            }
            attempt => attempt,
        }
    }

    async fn send(&self, endpoint: &Endpoint, request: &Request) -> Attempt {
        let mut url = endpoint.url.clone();
        // The endpoint's address as the operator wrote it (a trailing `/` too) unless the rule
        // adds a path.
        if !request.path.is_empty()
            && let Ok(mut segments) = url.path_segments_mut()
        {
            segments.pop_if_empty().extend(&request.path);
        }
        let method = match request.method {
            super::Method::Post => reqwest::Method::POST,
            super::Method::Put => reqwest::Method::PUT,
        };
        let mut headers = endpoint.headers.clone();
        let mut add = |name: &'static str, value: &str| {
            if let Ok(value) = value.parse() {
                headers.insert(name, value);
            }
        };
        add(CONTENT_TYPE.as_str(), &request.content_type);
        add("idempotency-key", &request.idempotency_key);
        if let Some(key) = &endpoint.signing_key {
            let timestamp = Clock::wall().unix().to_string();
            let signature = sign(
                key,
                &request.idempotency_key,
                &timestamp,
                request.body.as_bytes(),
            );
            add("webhook-id", &request.idempotency_key);
            add("webhook-timestamp", &timestamp);
            add(
                "webhook-signature",
                &format!("v1,{}", BASE64.encode(signature)),
            );
        }
        let sent = self
            .client
            .request(method, url)
            .headers(headers)
            .timeout(endpoint.timeout)
            .body(request.body.clone())
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            // Without its URL: the address may be a secret (a Slack webhook's), and its path
            // holds event data.
            Err(e) if e.is_timeout() => {
                return Attempt::Temporary(format!(
                    "no answer within {} (the endpoint's timeout)",
                    format_duration(endpoint.timeout)
                ));
            }
            Err(e) if e.is_connect() => {
                return Attempt::Temporary(format!(
                    "cannot connect: {}",
                    error_chain(&e.without_url())
                ));
            }
            Err(e) => return Attempt::Temporary(error_chain(&e.without_url())),
        };
        let status = response.status();
        if status.is_success() {
            return Attempt::Delivered;
        }
        let retry_after = retry_after(response.headers());
        let answer = first_bytes(response).await;
        let said = format!("the endpoint answered {status}{answer}");
        match status {
            StatusCode::GONE => {
                let why = format!(
                    "{said}: the receiver says this endpoint no longer exists, so \"{}\" is disabled until tripline restarts (fix its address in tripline.toml, restart, and retry its failed deliveries)",
                    endpoint.name
                );
                let mut gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
                gone.insert(endpoint.name.clone(), why.clone());
                Attempt::Permanent(why)
            }
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => match retry_after {
                Some(after) => Attempt::RetryAfter(said, after),
                None => Attempt::Temporary(said),
            },
            s if s.is_server_error() => match retry_after {
                Some(after) => Attempt::RetryAfter(said, after),
                None => Attempt::Temporary(said),
            },
            _ => Attempt::Permanent(said),
        }
    }
}

/// An error with its causes: reqwest's own message rarely says what went wrong.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A `Retry-After` of seconds or an HTTP date, at most [`MAX_RETRY_AFTER`].
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let after = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(text).ok()?;
            (at.to_utc() - Clock::wall().now()).to_std().unwrap_or_default()
        }
    };
    Some(after.min(MAX_RETRY_AFTER))
}

/// `": <the first bytes of the answer>"`, with email addresses masked; empty without a body.
async fn first_bytes(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < ANSWER_BYTES_KEPT {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    let text: String = text.chars().take(ANSWER_BYTES_KEPT).collect();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        String::new()
    } else {
        format!(": {}", mask_addresses(&text))
    }
}

impl Sender for HttpSender {
    fn attempt<'a>(
        &'a self,
        _id: u64,
        record: &'a OutboxRecord,
    ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>> {
        Box::pin(self.deliver(record))
    }

    fn disabled(&self) -> Vec<(String, String)> {
        self.gone().into_iter().collect()
    }

    fn max_in_flight(&self) -> Bound {
        Bound::PerDestination(
            self.endpoints
                .values()
                .map(|e| (e.name.clone(), e.max_in_flight))
                .collect(),
        )
    }
}

/// Writes each request to `<dir>/http/<id>.json` instead of sending it (`replay
/// --execute-into`).
pub struct IntoFiles(PathBuf);

impl IntoFiles {
    pub fn new(dir: &Path) -> std::io::Result<IntoFiles> {
        let dir = dir.join("http");
        std::fs::create_dir_all(&dir)?;
        Ok(IntoFiles(dir))
    }
}

impl Sender for IntoFiles {
    fn attempt<'a>(
        &'a self,
        id: u64,
        record: &'a OutboxRecord,
    ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>> {
        Box::pin(async move {
            let text = match serde_json::to_vec_pretty(&record.payload) {
                Ok(text) => text,
                Err(e) => return Attempt::Permanent(e.to_string()),
            };
            let dir = self.0.clone();
            let written = tokio::task::spawn_blocking(move || {
                write_file_durably(&dir, &format!("{id}.json"), &text)
            })
            .await;
            match written {
                Ok(Ok(())) => Attempt::Delivered,
                Ok(Err(e)) => Attempt::Temporary(format!("cannot write the request's file: {e}")),
                Err(e) => Attempt::Temporary(format!("the request's file writer stopped: {e}")),
            }
        })
    }

    fn max_in_flight(&self) -> Bound {
        Bound::Kind(4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::http::endpoint::EndpointConfig;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_reads_seconds_and_dates_and_is_bounded() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(120)));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("999999"));
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
        let in_a_minute = (Clock::wall().now() + chrono::TimeDelta::seconds(60)).to_rfc2822();
        headers.insert(RETRY_AFTER, in_a_minute.parse().unwrap());
        let after = retry_after(&headers).unwrap();
        assert!((55..=60).contains(&after.as_secs()), "{after:?}");
        headers.insert(RETRY_AFTER, HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&headers), Some(Duration::ZERO), "a date gone by");
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    /// A request queued `age` ago to an endpoint at `url`, with `max_age = 1h`.
    fn queued(url: &str, age: Duration) -> (HttpSender, OutboxRecord) {
        let config: EndpointConfig =
            serde_json::from_value(serde_json::json!({"url": url, "max_age": "1h"})).unwrap();
        let mut endpoints = Endpoints::new();
        endpoints.insert("e".into(), Endpoint::load("e", &config).unwrap());
        let request = Request {
            endpoint: "e".into(),
            method: super::super::Method::Post,
            path: vec![],
            content_type: "application/json".into(),
            body: "{}".into(),
            idempotency_key: "k".into(),
        };
        let delivery = request.into_delivery();
        let now = Clock::wall().unix();
        let record = OutboxRecord::new("r".into(), delivery, now - age.as_secs());
        (HttpSender::new(Arc::new(endpoints)).unwrap(), record)
    }

    #[tokio::test]
    async fn a_temporary_failure_older_than_max_age_fails_for_good() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", closed.local_addr().unwrap());
        drop(closed);
        let (sender, young) = queued(&url, Duration::from_secs(60));
        assert!(matches!(sender.deliver(&young).await, Attempt::Temporary(_)));
        let (sender, mut old) = queued(&url, Duration::from_secs(7200));
        match sender.deliver(&old).await {
            Attempt::Permanent(why) => assert!(why.contains("gave up after 1 attempts over 2h"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Retried by the operator: its age counts from then.
        old.retried_unix = Some(Clock::wall().unix());
        assert!(matches!(sender.deliver(&old).await, Attempt::Temporary(_)));
    }
}
