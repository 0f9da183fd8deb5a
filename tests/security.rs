//! Safe to expose: sources and their secrets, the loopback-only default, the limits on what a
//! sender controls, the admin endpoints, configuration precedence and the metrics, all against
//! the real binary.

mod common;

use common::{Server, fixture_json, fresh, root};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TOKEN: &str = "posthog-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";
/// Two Standard Webhooks secrets (24 random bytes each, base64): the old and the new one of a
/// rotation.
const WHSEC_OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const WHSEC_NEW: &str = "whsec_c2Vjb25kLXNlY3JldC0wMTIzNDU2Nzg5YWJj";
const WHSEC_OTHER: &str = "whsec_dGhpcmQtc2VjcmV0LTAxMjM0NTY3ODlhYmNk";

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The three Standard Webhooks headers for `body`, signed with `whsec` at `timestamp`.
/// Standard Webhooks headers for `body`, with a new `webhook-id` each time: a sender gives each
/// message its own id, and only a retry of the same message repeats it.
fn signed(whsec: &str, timestamp: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    signed_as(&format!("msg_2x7Q{n}"), whsec, timestamp, body)
}

/// Standard Webhooks headers for `body` with the given `webhook-id`.
fn signed_as(id: &str, whsec: &str, timestamp: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(whsec.trim_start_matches("whsec_")).unwrap();
    let mac = tripline::ingest::auth::sign(&key, id, &timestamp.to_string(), body);
    vec![
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", format!("v1,{}", b64.encode(mac))),
    ]
}

fn as_refs<'a>(headers: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    headers.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A fresh `generation_failed` body (a new uuid), as bytes.
fn generation_failed() -> Vec<u8> {
    fresh(fixture_json("generation_failed.json"))
        .to_string()
        .into_bytes()
}

#[test]
fn bearer_token_accepted_and_wrong_or_missing_ones_refused_alike() {
    let server = Server::launch(
        &[],
        &[("TRIPLINE_TOKEN", TOKEN), ("TRIPLINE_ADMIN_TOKEN", ADMIN)],
        |_| {},
    );
    let ok = server.post_with(
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        generation_failed(),
    );
    assert_eq!(ok.status, 200, "{}", ok.json);
    assert_eq!(ok.json["fired"], json!(["training-data"]));

    for headers in [
        vec![],
        vec![("Authorization", "Bearer posthog-token-0123456780")],
        vec![("Authorization", "Bearer posthog-token-012345678")],
        vec![("Authorization", TOKEN)],
        vec![("X-Webhook-Secret", TOKEN)],
    ] {
        let refused = server.post_with(&headers, generation_failed());
        assert_eq!(refused.status, 401, "{headers:?}");
        assert_eq!(
            refused.json,
            json!({"error": "unauthorized"}),
            "nothing says what was wrong"
        );
    }
    assert_eq!(
        server.jsonl("training_data.jsonl").len(),
        1,
        "refused: no line"
    );
    assert_eq!(
        server.metric(r#"tripline_requests_rejected_total{reason="unauthorized"}"#),
        5.0
    );
    assert!(!server.log().contains(TOKEN), "the token is never logged");
}

#[test]
fn signatures_verified_with_either_secret_of_a_rotation() {
    let server = launch_with_config(
        r#"
[sources.posthog]
signing_secret_env = ["PH_SECRET_OLD", "PH_SECRET_NEW"]
bearer_token_file = ["token.txt"]
"#,
        &[
            ("PH_SECRET_OLD", WHSEC_OLD),
            ("PH_SECRET_NEW", WHSEC_NEW),
            ("TRIPLINE_ADMIN_TOKEN", ADMIN),
        ],
        &[],
    );
    let now = now_unix();
    for secret in [WHSEC_OLD, WHSEC_NEW] {
        let body = generation_failed();
        let headers = signed(secret, now, &body);
        let reply = server.post_with(&as_refs(&headers), body);
        assert_eq!(reply.status, 200, "{secret}: {}", reply.json);
    }
    // The bearer token from the file works for the same source.
    let reply = server.post_with(
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        generation_failed(),
    );
    assert_eq!(reply.status, 200);

    // A secret the source does not have.
    let body = generation_failed();
    let reply = server.post_with(&as_refs(&signed(WHSEC_OTHER, now, &body)), body);
    assert_eq!(reply.status, 401);
    // The body changed after signing.
    let body = generation_failed();
    let headers = signed(WHSEC_NEW, now, &body);
    let mut tampered = body.clone();
    let at = tampered.iter().position(|&b| b == b'"').unwrap();
    tampered.insert(at, b' ');
    assert_eq!(server.post_with(&as_refs(&headers), tampered).status, 401);
    // A replay ten minutes later: the timestamp is outside the 5-minute tolerance.
    let body = generation_failed();
    let stale = signed(WHSEC_NEW, now - 600, &body);
    let reply = server.post_with(&as_refs(&stale), body);
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json, json!({"error": "unauthorized"}));
    // Only two headers of three.
    let body = generation_failed();
    let headers = signed(WHSEC_NEW, now, &body);
    assert_eq!(server.post_with(&as_refs(&headers[1..]), body).status, 401);

    assert_eq!(server.jsonl("training_data.jsonl").len(), 3);
    assert_eq!(
        server.metric(r#"tripline_events_received_total{source="posthog"}"#),
        3.0
    );
}

#[test]
fn a_rule_can_be_limited_to_a_source() {
    let server = launch_with_config(
        r#"
[sources.posthog]
bearer_token_env = ["PH_TOKEN"]
[sources.staging]
bearer_token_env = ["STAGING_TOKEN"]
"#,
        &[
            ("PH_TOKEN", TOKEN),
            ("STAGING_TOKEN", "staging-token-0123456789"),
        ],
        &[],
    );
    std::fs::write(
        server.rules.join("training_data.toml"),
        std::fs::read_to_string(root().join("rules/training_data.toml"))
            .unwrap()
            .replace("[when]\n", "[when]\nsource = \"posthog\"\n"),
    )
    .unwrap();
    server.wait_for("the edited rule", |s| {
        s.log().matches("rules loaded").count() >= 2
    });
    let staging = server.post_with(
        &[("Authorization", "Bearer staging-token-0123456789")],
        generation_failed(),
    );
    assert_eq!(staging.status, 200);
    assert_eq!(staging.json["fired"], json!([]), "not from posthog");
    let posthog = server.post_with(
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        generation_failed(),
    );
    assert_eq!(posthog.json["fired"], json!(["training-data"]));
}

#[test]
fn without_a_source_only_loopback_unless_the_risk_is_accepted_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tripline"))
        .args(["serve", "--listen", "0.0.0.0:0", "--rules"])
        .arg(root().join("rules"))
        .arg("--data")
        .arg(dir.path().join("data"))
        .env_remove("TRIPLINE_TOKEN")
        .env_remove("TRIPLINE_SIGNING_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("only listens on loopback")
            && stderr.contains("--dangerously-accept-unauthenticated-events"),
        "{stderr}"
    );
    assert!(!dir.path().join("data").exists(), "nothing started");

    // Said explicitly, it starts (and says so in its log).
    let mut child = Command::new(env!("CARGO_BIN_EXE_tripline"))
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--dangerously-accept-unauthenticated-events",
            "--rules",
        ])
        .arg(root().join("rules"))
        .arg("--templates")
        .arg(root().join("templates"))
        .arg("--data")
        .arg(dir.path().join("data"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut stderr = child.stderr.take().unwrap();
    let mut buf = [0u8; 4096];
    while !log.contains("listening on") {
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "the server stopped:\n{log}");
        log.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(log.contains("anyone who can reach this port"), "{log}");
    assert!(log.contains("listening on http://0.0.0.0:"), "{log}");
}

#[test]
fn the_read_only_endpoints_need_the_admin_token_once_sources_exist() {
    let closed = Server::launch(&[], &[("TRIPLINE_TOKEN", TOKEN)], |_| {});
    for path in [
        "/rules",
        "/outbox",
        "/metrics",
        "/users/dana",
        "/aggregates/ab",
    ] {
        let (status, body) = closed.get(path);
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("TRIPLINE_ADMIN_TOKEN"), "{body}");
    }
    assert_eq!(closed.get("/healthz").0, 200);
    assert_eq!(closed.get("/readyz").0, 200);

    let server = Server::launch(
        &[],
        &[("TRIPLINE_TOKEN", TOKEN), ("TRIPLINE_ADMIN_TOKEN", ADMIN)],
        |_| {},
    );
    assert_eq!(server.get("/metrics").0, 200, "with the admin token");
    let anonymous = common::client()
        .get(format!("{}/rules", server.base))
        .send()
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let with_sender_token = common::client()
        .get(format!("{}/outbox", server.base))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(
        with_sender_token.status(),
        401,
        "a sender's token is not the admin token"
    );
}

#[test]
fn rate_limit_answers_429_with_retry_after() {
    let server = Server::start_with(&["--rate-limit", "0.01", "--rate-limit-burst", "2"], |_| {});
    assert_eq!(server.post_with(&[], generation_failed()).status, 200);
    assert_eq!(server.post_with(&[], generation_failed()).status, 200);
    let limited = server.post_with(&[], generation_failed());
    assert_eq!(limited.status, 429, "{}", limited.json);
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=100).contains(&retry_after),
        "one request per 100 s: {retry_after}"
    );
    assert_eq!(
        server.jsonl("training_data.jsonl").len(),
        2,
        "the refused request changed nothing"
    );
}

#[test]
fn bodies_too_large_too_deep_or_with_too_many_events_are_refused() {
    let server = Server::start_with(
        &[
            "--max-body-bytes",
            "4000",
            "--max-json-depth",
            "8",
            "--max-events-per-body",
            "2",
        ],
        |_| {},
    );
    let mut big = fixture_json("generation_failed.json");
    big["event"]["properties"]["padding"] = json!("x".repeat(5000));
    let reply = server.post_with(&[], big.to_string());
    assert_eq!(reply.status, 413, "{}", reply.json);

    let mut deep = fixture_json("generation_failed.json");
    deep["event"]["properties"]["nested"] = json!([[[[[[["seven levels down"]]]]]]]);
    let reply = server.post_with(&[], deep.to_string());
    assert_eq!(reply.status, 400);
    assert!(
        reply.json["error"]
            .as_str()
            .unwrap()
            .contains("more than 8 levels"),
        "{}",
        reply.json
    );

    let event = fixture_json("generation_failed.json")["event"].clone();
    let three = json!([
        fresh(event.clone()),
        fresh(event.clone()),
        fresh(event.clone())
    ]);
    let reply = server.post_with(&[], three.to_string());
    assert_eq!(reply.status, 413);
    assert!(
        reply.json["error"]
            .as_str()
            .unwrap()
            .contains("3 events, more than the 2 accepted"),
        "{}",
        reply.json
    );
    let two = json!([fresh(event.clone()), fresh(event)]);
    assert_eq!(server.post_with(&[], two.to_string()).status, 200);
    assert_eq!(server.jsonl("training_data.jsonl").len(), 2);
}

/// Opens a request that sends its headers and half its body, then stalls.
fn stalled_request(base: &str) -> TcpStream {
    let address = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .write_all(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"event\":")
        .unwrap();
    stream
}

#[test]
fn when_full_requests_are_shed_with_503_and_a_stalled_upload_times_out_with_408() {
    let server = Server::start_with(
        &["--max-concurrent-requests", "1", "--request-timeout", "2s"],
        |_| {},
    );
    let mut stalled = stalled_request(&server.base);
    std::thread::sleep(Duration::from_millis(300));
    let shed = server.post_with(&[], generation_failed());
    assert_eq!(shed.status, 503, "{}", shed.json);
    assert_eq!(shed.headers["retry-after"], "1");
    assert!(
        server.get("/healthz").0 == 200,
        "health checks still answer"
    );

    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = [0u8; 64];
    let n = stalled.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    assert_eq!(
        server.post_with(&[], generation_failed()).status,
        200,
        "the slot is free again"
    );
    assert_eq!(
        server.metric(r#"tripline_requests_rejected_total{reason="overloaded"}"#),
        1.0
    );
    assert_eq!(
        server.metric(r#"tripline_requests_rejected_total{reason="timeout"}"#),
        1.0
    );
}

#[test]
fn metrics_after_a_known_sequence_of_events() {
    let server = Server::start();
    let mut dana = fixture_json("feature_used.json");
    dana["person"]["properties"]["email"] = json!("dana@example.com");
    let mut last = Value::Null;
    for _ in 0..6 {
        last = fresh(dana.clone());
        assert_eq!(server.post_json(&last).0, 200);
    }
    assert_eq!(server.post_json(&last).1["duplicates"], 1, "a retry");
    assert_eq!(server.post_with(&[], generation_failed()).status, 200);
    assert_eq!(server.post_with(&[], "{not json").status, 400);
    assert_eq!(server.emails().len(), 1);

    let expect = [
        (r#"tripline_events_received_total{source="local"}"#, 8.0),
        ("tripline_events_duplicate_total", 1.0),
        (
            r#"tripline_rule_matches_total{rule="power-user-discount"}"#,
            6.0,
        ),
        (
            r#"tripline_rule_fires_total{rule="power-user-discount"}"#,
            1.0,
        ),
        (
            r#"tripline_rule_suppressions_total{rule="power-user-discount",reason="limits"}"#,
            1.0,
        ),
        (r#"tripline_rule_fires_total{rule="training-data"}"#, 1.0),
        (
            r#"tripline_actions_succeeded_total{kind="jsonl",rule="training-data"}"#,
            1.0,
        ),
        (
            r#"tripline_actions_succeeded_total{kind="email",rule="power-user-discount"}"#,
            1.0,
        ),
        (
            r#"tripline_requests_rejected_total{reason="not_json"}"#,
            1.0,
        ),
        ("tripline_outbox_pending", 0.0),
        ("tripline_request_duration_seconds_count", 9.0),
        ("tripline_rules_reload_success", 1.0),
        ("tripline_rules_loaded", 2.0),
    ];
    for (series, value) in expect {
        assert_eq!(server.metric(series), value, "{series}");
    }
}

#[test]
fn readyz_says_what_is_not_ready() {
    let server = Server::start_with(&[], |dir| {
        std::fs::write(dir.join("rules/broken.toml"), "name = \"x\"\n[wehn]\n").unwrap();
    });
    let (status, body) = server.get("/readyz");
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["store"], "ok");
    assert_eq!(body["data_folder"], "ok");
    assert!(
        body["rules"]
            .as_str()
            .unwrap()
            .contains("no rules are loaded")
    );
    assert_eq!(server.get("/healthz").0, 200, "alive all the same");

    std::fs::remove_file(server.rules.join("broken.toml")).unwrap();
    server.wait_for("the rules to load", |s| s.get("/readyz").0 == 200);
}

/// Starts a server with `config` written to `tripline.toml` beside its folders (and a
/// `token.txt` holding [`TOKEN`]).
fn launch_with_config(config: &str, env: &[(&str, &str)], args: &[&str]) -> Server {
    let config = config.to_string();
    let holder = tempfile::tempdir().unwrap();
    let path = holder.path().join("tripline.toml");
    std::fs::write(&path, &config).unwrap();
    std::fs::write(holder.path().join("token.txt"), format!("{TOKEN}\n")).unwrap();
    let mut all = vec!["--config", path.to_str().unwrap()];
    all.extend_from_slice(args);
    let server = Server::launch(&all, env, |_| {});
    std::mem::forget(holder);
    server
}

/// Runs `tripline serve` with `config` and returns its exit code and error output (for
/// configurations that must stop it).
fn serve_refused(config: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tripline.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tripline"))
        .args(["serve", "--config"])
        .arg(&path)
        .current_dir(dir.path())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).replace(dir.path().to_str().unwrap(), "DIR");
    (out.status.code(), stderr)
}

#[test]
fn a_bad_configuration_is_reported_at_its_line_and_stops_with_exit_code_2() {
    let (code, stderr) = serve_refused(
        "listen = \"127.0.0.1:0\"\n[limits]\nmax_events_per_body = 0\nrequest_timeout = \"soon\"\n",
        &[],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("DIR/tripline.toml:3:23: `max_events_per_body` must be between 1 and"),
        "{stderr}"
    );
    assert!(
        stderr.contains("DIR/tripline.toml:4:19: `soon` is not a duration"),
        "{stderr}"
    );
    assert!(stderr.contains("2 problem(s) found"), "{stderr}");

    let (code, stderr) = serve_refused("[limts]\nmax_body_bytes = 10\n", &[]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("tripline.toml:1:2: unknown key `limts`")
            && stderr.contains("did you mean `limits`?"),
        "{stderr}"
    );

    let (code, stderr) = serve_refused(
        "[sources.posthog]\nbearer_token_env = [\"NOT_SET_ANYWHERE\"]\n",
        &[],
    );
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("tripline.toml:1:1: the environment variable NOT_SET_ANYWHERE is not set"),
        "{stderr}"
    );
}

#[test]
fn a_flag_beats_the_environment_which_beats_the_file() {
    let config = "[limits]\nmax_events_per_body = 2\n";
    let event = fixture_json("generation_failed.json")["event"].clone();
    let body = |n: usize| Value::Array((0..n).map(|_| fresh(event.clone())).collect()).to_string();
    let largest_accepted = |server: &Server| {
        (1..=5)
            .take_while(|n| server.post_with(&[], body(*n)).status == 200)
            .last()
            .unwrap_or(0)
    };
    let file = launch_with_config(config, &[], &[]);
    assert_eq!(largest_accepted(&file), 2, "the file");
    let env = launch_with_config(config, &[("TRIPLINE_MAX_EVENTS_PER_BODY", "3")], &[]);
    assert_eq!(largest_accepted(&env), 3, "the environment over the file");
    let flag = launch_with_config(
        config,
        &[("TRIPLINE_MAX_EVENTS_PER_BODY", "3")],
        &["--max-events-per-body", "4"],
    );
    assert_eq!(largest_accepted(&flag), 4, "the flag over both");
    let default = Server::start();
    assert_eq!(largest_accepted(&default), 5, "the default (1000)");
}

#[test]
fn json_logs_carry_the_request_and_rule_spans() {
    let server = Server::start_with(&["--log-format", "json"], |_| {});
    let body = generation_failed();
    let uuid = serde_json::from_slice::<Value>(&body).unwrap()["event"]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(server.post_with(&[], body).status, 200);
    server.wait_for("the rule's log line", |s| s.log().contains(&uuid));
    let line: Value = server
        .log()
        .lines()
        .find(|l| l.contains(&uuid))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap();
    let spans = line["spans"].to_string();
    assert!(
        spans.contains("\"name\":\"request\"") && spans.contains("\"source\":\"local\""),
        "{line}"
    );
    assert!(spans.contains("training-data"), "{line}");
    assert!(
        !server.log().contains("2-bedroom apartment"),
        "no event data in the logs"
    );
}

#[test]
fn every_serve_flag_is_documented_and_the_example_configuration_loads() {
    let help = Command::new(env!("CARGO_BIN_EXE_tripline"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let docs = std::fs::read_to_string(root().join("docs/CONFIGURATION.md")).unwrap();
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|w| *w != "--help")
        .collect();
    assert!(flags.len() > 20, "{flags:?}");
    for flag in flags {
        assert!(
            docs.contains(&format!("`{flag}`")),
            "{flag} is not in CONFIGURATION.md"
        );
    }
    for variable in help.split(|c: char| !(c.is_ascii_uppercase() || c == '_')) {
        if variable.starts_with("TRIPLINE_") {
            assert!(
                docs.contains(variable),
                "{variable} is not in CONFIGURATION.md"
            );
        }
    }

    // The example file holds every key with its default: it loads, and `check` uses its folders.
    let out = Command::new(env!("CARGO_BIN_EXE_tripline"))
        .args(["check", "--config"])
        .arg(root().join("tripline.example.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let server = launch_with_config(
        &std::fs::read_to_string(root().join("tripline.example.toml"))
            .unwrap()
            .replace("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:0\"")
            .replace(
                "rules = \"rules\"\ntemplates = \"templates\"\ndata = \"data\"\n",
                "",
            ),
        &[
            ("POSTHOG_WEBHOOK_TOKEN", TOKEN),
            ("TRIPLINE_ADMIN_TOKEN", ADMIN),
        ],
        &[],
    );
    let reply = server.post_with(
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        generation_failed(),
    );
    assert_eq!(reply.status, 200, "{}", reply.json);
}

/// Opens a request with these header lines that sends one chunk of its body, then stalls.
fn stalled_upload(address: &str, headers: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).unwrap();
    let head = format!(
        "POST /webhook HTTP/1.1\r\nHost: x\r\n{headers}Transfer-Encoding: chunked\r\n\r\n9\r\n{{\"event\":\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream
}

/// The status line a stalled request got, if any within `wait`.
fn answer(stream: &mut TcpStream, wait: Duration) -> String {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string(),
        Err(_) => String::new(),
    }
}

#[test]
fn unauthenticated_and_unverified_uploads_take_no_place_from_real_senders() {
    let server = launch_with_config(
        "[sources.posthog]\nbearer_token_env = [\"PH_TOKEN\"]\nsigning_secret_env = [\"PH_SECRET\"]\n",
        &[("PH_TOKEN", TOKEN), ("PH_SECRET", WHSEC_NEW)],
        &[
            "--max-concurrent-requests",
            "4",
            "--max-unverified-requests",
            "2",
            "--request-timeout",
            "30s",
        ],
    );
    // Uploads without credentials, or with a wrong token, are refused from their headers: the
    // body is never waited for.
    let mut anonymous: Vec<TcpStream> = (0..40)
        .map(|i| {
            let auth = if i % 2 == 0 {
                String::new()
            } else {
                "Authorization: Bearer not-the-token-0123456789\r\n".to_string()
            };
            stalled_upload(server.address(), &auth)
        })
        .collect();
    for stream in &mut anonymous {
        assert_eq!(
            answer(stream, Duration::from_secs(10)),
            "HTTP/1.1 401 Unauthorized"
        );
    }
    // Signed uploads must be read before they can be checked: they wait in a pool of their own
    // (2 places here), and the third is shed at once.
    let signature = "webhook-id: msg_1\r\nwebhook-timestamp: 1\r\nwebhook-signature: v1,AAAA\r\n";
    let mut unverified: Vec<TcpStream> = (0..2)
        .map(|_| stalled_upload(server.address(), signature))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut third = stalled_upload(server.address(), signature);
    assert_eq!(
        answer(&mut third, Duration::from_secs(10)),
        "HTTP/1.1 503 Service Unavailable"
    );
    // Meanwhile every real sender gets through, by token and by signature.
    for _ in 0..10 {
        let reply = server.post_with(
            &[("Authorization", &format!("Bearer {TOKEN}"))],
            generation_failed(),
        );
        assert_eq!(reply.status, 200, "{}", reply.json);
    }
    let body = generation_failed();
    let headers = signed(WHSEC_NEW, now_unix(), &body);
    drop(unverified.pop());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.post_with(&as_refs(&headers), body).status, 200);
    assert_eq!(server.jsonl("training_data.jsonl").len(), 11);
    drop(unverified);
}

#[test]
fn a_replayed_signed_request_has_no_second_effect() {
    let server = launch_with_config(
        "[sources.posthog]\nsigning_secret_env = [\"PH_SECRET\"]\n",
        &[("PH_SECRET", WHSEC_NEW), ("TRIPLINE_ADMIN_TOKEN", ADMIN)],
        &[],
    );
    // An event without a uuid: only the signed delivery's id tells a replay from a new event.
    let mut event = fixture_json("generation_failed.json");
    event["event"].as_object_mut().unwrap().remove("uuid");
    let body = event.to_string().into_bytes();
    let headers = signed_as("msg_captured", WHSEC_NEW, now_unix(), &body);
    let first = server.post_with(&as_refs(&headers), body.clone());
    assert_eq!(first.status, 200, "{}", first.json);
    for _ in 0..3 {
        let replay = server.post_with(&as_refs(&headers), body.clone());
        assert_eq!(
            replay.status, 200,
            "a retry of a delivered message is acknowledged"
        );
        assert_eq!(replay.json["duplicates"], 1, "{}", replay.json);
    }
    assert_eq!(
        server.jsonl("training_data.jsonl").len(),
        1,
        "one line, not four"
    );
    // Another message with the same body is another event.
    let again = signed_as("msg_next", WHSEC_NEW, now_unix(), &body);
    assert_eq!(server.post_with(&as_refs(&again), body).status, 200);
    assert_eq!(server.jsonl("training_data.jsonl").len(), 2);
}

#[test]
fn a_rate_limit_too_small_to_compute_is_refused_not_a_crash() {
    for rate in ["1e-300", "1e-19", "0", "-5", "NaN", "inf"] {
        let out = Command::new(env!("CARGO_BIN_EXE_tripline"))
            .args(["serve", &format!("--rate-limit={rate}")])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{rate}: {stderr}");
        assert!(stderr.contains("requests per second"), "{rate}: {stderr}");
    }
    let (code, stderr) = serve_refused("[limits]\nrate_limit = 1e-300\n", &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("tripline.toml:2:14"), "{stderr}");
}

#[test]
fn without_sources_the_admin_endpoints_answer_only_requests_to_an_address() {
    // A page's own name pointed at 127.0.0.1 (DNS rebinding) must not read people's data.
    let server = Server::start();
    let port = server.address().rsplit(':').next().unwrap().to_string();
    for (host, allowed) in [
        (format!("127.0.0.1:{port}"), true),
        (format!("localhost:{port}"), true),
        ("[::1]".to_string(), true),
        (format!("attacker.example:{port}"), false),
        ("127.0.0.1.attacker.example".to_string(), false),
    ] {
        // No rule counts anything here: answered, the aggregates are a 404.
        for (path, answer) in [
            ("/rules", 200),
            ("/outbox", 200),
            ("/users/dana", 200),
            ("/metrics", 200),
            ("/aggregates/ab", 404),
        ] {
            let reply = common::client()
                .get(format!("{}{path}", server.base))
                .header("host", &host)
                .send()
                .unwrap();
            let status = reply.status().as_u16();
            assert_eq!(status == answer, allowed, "{host} {path}: {status}");
            if !allowed {
                assert_eq!(status, 403);
                let body: serde_json::Value = reply.json().unwrap();
                assert!(
                    body["error"].as_str().unwrap().contains("not to a name"),
                    "{body}"
                );
            }
        }
    }
    // Events themselves are not concerned.
    let reply = common::client()
        .post(format!("{}/webhook", server.base))
        .header("host", "attacker.example")
        .body(r#"{"event":"x"}"#)
        .send()
        .unwrap();
    assert_eq!(reply.status().as_u16(), 200);
}
