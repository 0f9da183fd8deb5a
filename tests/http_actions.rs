//! HTTP deliveries for real: tripline sends `[http]` actions to a real HTTP server that this test
//! starts on 127.0.0.1 (axum), whose routes answer 200, 500 then 200, 429 with `Retry-After`,
//! 400, 410, or never. Signatures are checked with the Standard Webhooks reference library
//! (`standardwebhooks`, from PyPI; `scripts/test.sh` installs it).

mod common;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::Server;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: String,
    at: Instant,
}

#[derive(Default)]
struct Log {
    received: Vec<Received>,
    /// Requests so far, by route (the path's first segment).
    by_route: HashMap<String, usize>,
}

/// A real HTTP server on 127.0.0.1, in a runtime of its own.
struct Receiver {
    base: String,
    log: Arc<Mutex<Log>>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Answers by route: the first segment of the path says how.
async fn answer(
    State(log): State<Arc<Mutex<Log>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let route = uri.path().split('/').nth(1).unwrap_or_default().to_string();
    let n = {
        let mut log = log.lock().unwrap();
        log.received.push(Received {
            method: method.to_string(),
            path: uri.path().to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
                .collect(),
            body: String::from_utf8_lossy(&body).into_owned(),
            at: Instant::now(),
        });
        let n = log.by_route.entry(route.clone()).or_default();
        *n += 1;
        *n
    };
    match (route.as_str(), n) {
        // Twice, so that the waiting delivery is seen between tries (2 s, then 4 s).
        ("flaky", 1 | 2) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        ("busy", 1) => (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "3")]).into_response(),
        ("bad", _) => (
            StatusCode::BAD_REQUEST,
            r#"{"message": "'to' parameter is not a valid address: dana@example"}"#,
        )
            .into_response(),
        ("gone", _) => StatusCode::GONE.into_response(),
        ("hang", _) | ("hold", 1) => std::future::pending().await,
        _ => (StatusCode::OK, "ok").into_response(),
    }
}

impl Receiver {
    fn start() -> Receiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let app = axum::Router::new().fallback(answer).with_state(log.clone());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        runtime.spawn(async move { axum::serve(listener, app).await });
        Receiver {
            base,
            log,
            runtime: Some(runtime),
        }
    }

    fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap().received.clone()
    }

    /// The requests to `route`, once there are at least `n` (within 30 s).
    fn wait_for(&self, route: &str, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got: Vec<Received> = (self.received().into_iter())
                .filter(|r| r.path.split('/').nth(1) == Some(route))
                .collect();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{n} request(s) to /{route} expected, got {got:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A rule acting on every `order_completed` with this `[http]` table.
fn http_rule(name: &str, http: &str) -> String {
    format!("name = \"{name}\"\n[when]\nevent = \"order_completed\"\n[http]\n{http}\n")
}

/// Starts tripline with `endpoints` (the `[endpoints.*]` of its tripline.toml, where `BASE` is
/// the receiver's address) and these rule files, beside the shipped ones. The folder of the
/// configuration file is returned with it, to keep it for a restart.
fn start(
    receiver: &Receiver,
    endpoints: &str,
    rules: &[(&str, String)],
) -> (Server, tempfile::TempDir) {
    let config = endpoints.replace("BASE", &receiver.base);
    let rules: Vec<(String, String)> = rules
        .iter()
        .map(|(f, t)| (f.to_string(), t.clone()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("tripline.toml");
    std::fs::write(&config_file, config).unwrap();
    let server = Server::launch(
        &["--config", config_file.to_str().unwrap()],
        &[("TEST_HOOK_SECRET", SECRET)],
        |root: &Path| {
            for (file, text) in &rules {
                std::fs::write(root.join("rules").join(file), text).unwrap();
            }
        },
    );
    (server, dir)
}

/// An order of 1,200 EUR by dana, with text that needs escaping in JSON and in a form.
fn order(uuid: &str) -> Value {
    json!({
        "event": "order_completed",
        "uuid": uuid,
        "distinct_id": "dana/1",
        "properties": {"amount": 1200, "paid": true, "currency": "EUR", "note": "say \"hi\"\n& <b>bye</b>"},
        "person": {"properties": {"email": "dana@example.com"}},
    })
}

/// The delivery of `rule` in `GET /outbox` (waiting or recent).
fn delivery(server: &Server, rule: &str) -> Option<Value> {
    let outbox = server.outbox();
    ["waiting", "recent"]
        .iter()
        .flat_map(|list| outbox[list].as_array().cloned().unwrap_or_default())
        .find(|d| d["rule"] == rule)
}

/// Waits until the delivery of `rule` has this status.
fn wait_status(server: &Server, rule: &str, status: &str) -> Value {
    wait_delivery(server, rule, status, |d| d["status"] == status)
}

/// Waits until the delivery of `rule` is as `done` says (`what` it is, for the failure).
fn wait_delivery(server: &Server, rule: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(d) = delivery(server, rule).filter(&done) {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "the delivery of {rule} is not {what}: {}\n{}",
            server.outbox(),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn post_admin(server: &Server, path: &str) -> (u16, Value) {
    post_admin_with(server, path, &[])
}

fn post_admin_with(server: &Server, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = common::client().post(format!("{}{path}", server.base));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().unwrap();
    (response.status().as_u16(), response.json().unwrap())
}

/// Checks a request's signature with the Standard Webhooks reference library; returns what it
/// said (`ok` or its error).
fn verify_with_reference_library(request: &Received) -> String {
    let python = std::env::var("TRIPLINE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
headers, body = json.loads(sys.argv[2]), sys.argv[3]
try:
    Webhook(sys.argv[1]).verify(body, headers, json_parse=False)
    print("ok")
except Exception as e:
    print("refused:", e)
"#;
    let headers = json!({
        "webhook-id": request.headers["webhook-id"],
        "webhook-timestamp": request.headers["webhook-timestamp"],
        "webhook-signature": request.headers["webhook-signature"],
    });
    let out = Command::new(python)
        .args(["-c", script, SECRET, &headers.to_string(), &request.body])
        .output()
        .expect("python3 with standardwebhooks is needed: run scripts/test.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn json_and_form_bodies_arrive_exactly_as_rendered_signed_and_with_an_idempotency_key() {
    let receiver = Receiver::start();
    let endpoints = r#"
[endpoints.chat]
url = "BASE/ok/services"
headers = { X-Team = "growth" }
[endpoints.mail]
url = "BASE/ok"
signing_secret_env = "TEST_HOOK_SECRET"
"#;
    let json_rule = http_rule(
        "chat-alert",
        r#"endpoint = "chat"
path = "/orders/{{distinct_id}}"
json = { text = "Big order from {{person.properties.email}}: {{properties.amount}} {{properties.currency}}", note = "{{properties.note}}", amount = "{{properties.amount}}", paid = "{{properties.paid}}", source = "tripline", priority = 2, tags = ["{{properties.currency}}", true] }"#,
    );
    let form_rule = http_rule(
        "mail-order",
        r#"endpoint = "mail"
method = "PUT"
form = { from = "Shop <shop@example.com>", to = ["{{person.properties.email}}", "sales@example.com"], subject = "Order: {{properties.note}}" }"#,
    );
    let (server, _config) = start(
        &receiver,
        endpoints,
        &[("chat.toml", json_rule), ("mail.toml", form_rule)],
    );
    let (status, reply) = server.post_json(&order("o-1"));
    assert_eq!(status, 200, "{reply}");
    let got = receiver.wait_for("ok", 2);
    let chat = got
        .iter()
        .find(|r| r.path.starts_with("/ok/services"))
        .unwrap();
    let mail = got.iter().find(|r| r.path == "/ok").unwrap();

    assert_eq!(chat.method, "POST");
    // The path's field is one segment, percent-encoded.
    assert_eq!(chat.path, "/ok/services/orders/dana%2F1");
    assert_eq!(chat.headers["content-type"], "application/json");
    assert_eq!(chat.headers["x-team"], "growth");
    assert_eq!(
        chat.body,
        r#"{"text":"Big order from dana@example.com: 1200 EUR","note":"say \"hi\"\n& <b>bye</b>","amount":1200,"paid":true,"source":"tripline","priority":2,"tags":["EUR",true]}"#
    );
    assert!(!chat.headers.contains_key("webhook-signature"));

    assert_eq!(mail.method, "PUT");
    assert_eq!(
        mail.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert_eq!(
        mail.body,
        "from=Shop+%3Cshop%40example.com%3E&to=dana%40example.com&to=sales%40example.com&subject=Order%3A+say+%22hi%22%0A%26+%3Cb%3Ebye%3C%2Fb%3E"
    );
    assert_eq!(mail.headers["webhook-id"], mail.headers["idempotency-key"]);
    assert_eq!(verify_with_reference_library(mail), "ok");
    // A changed body no longer verifies: the check is not one that passes anything.
    let mut forged = mail.clone();
    forged.body.push('x');
    assert!(verify_with_reference_library(&forged).starts_with("refused"));

    // Each rule has its own key for the event; a retried delivery of the event sends nothing.
    assert_ne!(
        chat.headers["idempotency-key"],
        mail.headers["idempotency-key"]
    );
    let (_, reply) = server.post_json(&order("o-1"));
    assert_eq!(reply["duplicates"], 1);
    wait_status(&server, "chat-alert", "sent");
    wait_status(&server, "mail-order", "sent");
    assert_eq!(receiver.received().len(), 2);
}

#[test]
fn a_500_is_retried_with_the_same_key_and_delivered_once() {
    let receiver = Receiver::start();
    let rule = http_rule(
        "flaky",
        "endpoint = \"flaky\"\njson = { id = \"{{uuid}}\" }",
    );
    let (server, _config) = start(
        &receiver,
        "[endpoints.flaky]\nurl = \"BASE/flaky\"\n",
        &[("flaky.toml", rule)],
    );
    server.post_json(&order("o-2"));
    let first = receiver.wait_for("flaky", 1);
    // Retried after the backoff (2 s), with the reason shown meanwhile.
    wait_delivery(&server, "flaky", "waiting after a 500", |d| {
        d["status"] == "pending"
            && (d["last_error"].as_str()).is_some_and(|e| e.contains("500 Internal Server Error"))
    });
    let sent = wait_status(&server, "flaky", "sent");
    let got = receiver.wait_for("flaky", 3);
    assert_eq!(sent["attempts"], 3, "{sent}");
    let key = &got[0].headers["idempotency-key"];
    assert!(got.iter().all(|r| &r.headers["idempotency-key"] == key));
    assert!(got.iter().all(|r| r.body == got[0].body));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(receiver.wait_for("flaky", 3).len(), 3, "delivered once");
    assert_eq!(first[0].body, r#"{"id":"o-2"}"#);
}

#[test]
fn a_429_waits_as_long_as_retry_after_says() {
    let receiver = Receiver::start();
    let rule = http_rule("busy", "endpoint = \"busy\"\njson = { id = \"{{uuid}}\" }");
    let (server, _config) = start(
        &receiver,
        "[endpoints.busy]\nurl = \"BASE/busy\"\n",
        &[("busy.toml", rule)],
    );
    server.post_json(&order("o-3"));
    let waiting = receiver.wait_for("busy", 1);
    wait_delivery(&server, "busy", "waiting after a 429", |d| {
        d["status"] == "pending" && d["last_error"].as_str().is_some_and(|e| e.contains("429"))
    });
    wait_status(&server, "busy", "sent");
    let got = receiver.wait_for("busy", 2);
    let gap = got[1].at - waiting[0].at;
    assert!(gap >= Duration::from_secs(3), "retried after {gap:?}");
}

#[test]
fn a_400_fails_for_good_visibly_and_the_operator_can_retry_it_once() {
    let receiver = Receiver::start();
    let rule = http_rule("bad", "endpoint = \"bad\"\njson = { id = \"{{uuid}}\" }");
    let (server, _config) = start(
        &receiver,
        "[endpoints.bad]\nurl = \"BASE/bad\"\n",
        &[("bad.toml", rule)],
    );
    server.post_json(&order("o-4"));
    let failed = wait_status(&server, "bad", "failed");
    let error = failed["last_error"].as_str().unwrap();
    assert!(error.contains("400 Bad Request"), "{error}");
    // The answer's first bytes, with the address masked.
    assert!(
        error.contains("not a valid address: d***@example"),
        "{error}"
    );
    assert_eq!(failed["attempts"], 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        receiver.wait_for("bad", 1).len(),
        1,
        "not retried on its own"
    );

    let id = failed["id"].as_u64().unwrap();
    // Listed with the failures, kept apart from what was delivered.
    let outbox = server.outbox();
    assert_eq!(outbox["failed"], 1);
    assert_eq!(outbox["failures"][0]["id"], id);
    // Not from a web page the operator happens to visit.
    let (status, reply) = post_admin_with(
        &server,
        &format!("/outbox/{id}/retry"),
        &[("origin", "https://evil.example")],
    );
    assert_eq!(status, 403, "{reply}");
    let (status, reply) = post_admin(&server, &format!("/outbox/{id}/retry"));
    assert_eq!(status, 200, "{reply}");
    let got = receiver.wait_for("bad", 2);
    assert_eq!(
        got[0].headers["idempotency-key"],
        got[1].headers["idempotency-key"]
    );
    let again = wait_status(&server, "bad", "failed");
    assert_eq!(
        (again["id"].as_u64(), &again["attempts"]),
        (Some(id), &json!(2))
    );

    let (status, reply) = post_admin(&server, "/outbox/999/retry");
    assert_eq!(status, 404, "{reply}");
}

#[test]
fn a_delivered_request_cannot_be_retried() {
    let receiver = Receiver::start();
    let rule = http_rule("fine", "endpoint = \"fine\"\njson = { id = \"{{uuid}}\" }");
    // An address ending in `/` is called as written when the rule adds no path.
    let (server, _config) = start(
        &receiver,
        "[endpoints.fine]\nurl = \"BASE/ok/\"\n",
        &[("fine.toml", rule)],
    );
    server.post_json(&order("o-5"));
    let sent = wait_status(&server, "fine", "sent");
    assert_eq!(receiver.received()[0].path, "/ok/");
    let (status, reply) = post_admin(&server, &format!("/outbox/{}/retry", sent["id"]));
    assert_eq!(status, 409, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("delivered"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(receiver.received().len(), 1);
}

#[test]
fn a_410_disables_the_endpoint_and_says_so() {
    let receiver = Receiver::start();
    let rule = http_rule("gone", "endpoint = \"old\"\njson = { id = \"{{uuid}}\" }");
    let (server, _config) = start(
        &receiver,
        "[endpoints.old]\nurl = \"BASE/gone\"\n",
        &[("gone.toml", rule)],
    );
    server.post_json(&order("o-6"));
    wait_status(&server, "gone", "failed");
    server.post_json(&order("o-7"));
    server.wait_for("both deliveries to fail", |s| {
        s.outbox()["recent"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["status"] == "failed")
            .count()
            == 2
    });
    assert_eq!(receiver.received().len(), 1, "no request after the 410");
    let outbox = server.outbox();
    let why = outbox["disabled"]["http old"].as_str().unwrap();
    assert!(
        why.contains("410 Gone") && why.contains("disabled"),
        "{why}"
    );
    assert_eq!(outbox["recent"][0]["last_error"], why);
}

#[test]
fn an_endpoint_that_never_answers_does_not_delay_email_and_sigterm_stops_in_time() {
    let receiver = Receiver::start();
    let http = http_rule("hung", "endpoint = \"hung\"\njson = { id = \"{{uuid}}\" }");
    let email = "name = \"order-email\"\n[when]\nevent = \"order_completed\"\n[email]\nto = \"{{person.properties.email}}\"\nsubject = \"Thanks\"\ntemplate = \"welcome\"\n".to_string();
    let (mut server, _config) = start(
        &receiver,
        "[endpoints.hung]\nurl = \"BASE/hang\"\ntimeout = \"60s\"\nmax_in_flight = 2\n",
        &[("hung.toml", http), ("email.toml", email)],
    );
    for n in 0..5 {
        server.post_json(&order(&format!("o-h{n}")));
    }
    // Two requests hang (the endpoint's bound); every email is delivered meanwhile.
    receiver.wait_for("hang", 2);
    server.wait_for("five emails", |s| {
        s.outbox()["recent"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["kind"] == "email" && d["status"] == "sent")
            .count()
            == 5
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        receiver.received().len(),
        2,
        "at most max_in_flight at once"
    );
    assert_eq!(server.outbox()["pending"], 5, "the requests still wait");
    let stopping = Instant::now();
    assert_eq!(server.terminate_within(Duration::from_secs(10)), Some(0));
    assert!(stopping.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_kill_between_the_receivers_answer_and_our_record_sends_again_with_the_same_key() {
    let receiver = Receiver::start();
    let rule = http_rule("held", "endpoint = \"held\"\njson = { id = \"{{uuid}}\" }");
    let (mut server, _config) = start(
        &receiver,
        "[endpoints.held]\nurl = \"BASE/hold\"\n",
        &[("held.toml", rule)],
    );
    server.post_json(&order("o-8"));
    // The receiver has the request (and holds its answer): tripline dies before it records
    // anything, as it would if it died between a 2xx and the commit of that outcome.
    receiver.wait_for("hold", 1);
    server.kill();
    server.relaunch();
    let got = receiver.wait_for("hold", 2);
    assert_eq!(
        got[0].headers["idempotency-key"],
        got[1].headers["idempotency-key"]
    );
    assert_eq!(got[0].body, got[1].body);
    let sent = wait_status(&server, "held", "sent");
    assert_eq!(sent["attempts"], 1, "the killed attempt was never recorded");
}

#[test]
fn an_endpoint_whose_secret_is_missing_stops_the_start_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tripline.toml");
    std::fs::write(
        &config,
        "[endpoints.slack]\nurl_env = \"TRIPLINE_TEST_UNSET_SLACK_URL\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tripline"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .args(["--data", dir.path().join("data").to_str().unwrap()])
        .env_remove("TRIPLINE_TEST_UNSET_SLACK_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("tripline.toml:1:1"), "{stderr}");
    assert!(
        stderr.contains(
            "[endpoints.slack]: the environment variable TRIPLINE_TEST_UNSET_SLACK_URL is not set"
        ),
        "{stderr}"
    );
}

#[test]
fn a_field_in_the_path_cannot_climb_out_of_the_endpoint() {
    let receiver = Receiver::start();
    let rule = http_rule(
        "climb",
        "endpoint = \"api\"\npath = \"/users/{{distinct_id}}\"\njson = { id = \"{{uuid}}\" }",
    );
    let (server, _config) = start(
        &receiver,
        "[endpoints.api]\nurl = \"BASE/ok/hooks\"\n",
        &[("climb.toml", rule)],
    );
    // A URL parser drops the tab, which would leave `..`; a `/` is encoded.
    for (n, who) in ["..\t", ".\n.", ".."].iter().enumerate() {
        let mut event = order(&format!("o-c{n}"));
        event["distinct_id"] = json!(who);
        let (status, reply) = server.post_json(&event);
        assert_eq!(status, 200, "{reply}");
        let failed = reply["failed"][0].as_str().unwrap_or_default();
        assert!(failed.contains("rule \"climb\""), "{reply}");
    }
    let mut event = order("o-c9");
    event["distinct_id"] = json!("../admin");
    server.post_json(&event);
    let got = receiver.wait_for("ok", 1);
    assert_eq!(got[0].path, "/ok/hooks/users/..%2Fadmin");
    assert_eq!(receiver.received().len(), 1);
    let outbox = server.outbox();
    assert_eq!(outbox["failed"], 3);
    for failure in outbox["failures"].as_array().unwrap() {
        let reason = failure["last_error"].as_str().unwrap();
        assert!(reason.contains("control character"), "{reason}");
        assert!(
            !reason.contains(['\t', '\n']),
            "event data is not repeated: {reason:?}"
        );
    }
}

#[test]
fn an_unreachable_endpoint_is_retried_without_showing_its_secret_address() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let rule = http_rule("down", "endpoint = \"down\"\njson = { id = \"{{uuid}}\" }");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tripline.toml");
    std::fs::write(&config, "[endpoints.down]\nurl_env = \"TEST_DOWN_URL\"\n").unwrap();
    let secret_url = format!("http://127.0.0.1:{port}/services/T000/B000/SeCrEtToKeN");
    let server = Server::launch(
        &["--config", config.to_str().unwrap()],
        &[("TEST_DOWN_URL", &secret_url)],
        |root: &Path| std::fs::write(root.join("rules/down.toml"), &rule).unwrap(),
    );
    server.post_json(&order("o-d"));
    let waiting = wait_delivery(&server, "down", "waiting after a refused connection", |d| {
        d["status"] == "pending" && d["last_error"].is_string()
    });
    let reason = waiting["last_error"].as_str().unwrap();
    assert!(reason.contains("cannot connect"), "{reason}");
    for shown in [
        reason.to_string(),
        server.outbox().to_string(),
        server.log(),
    ] {
        assert!(!shown.contains("SeCrEtToKeN"), "{shown}");
    }
}
