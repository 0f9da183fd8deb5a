//! What a careless client, a rule author's odd path or a wrong clock cannot do to the service,
//! against the real binary: connections that never finish are closed, shutdown is bounded, a rule
//! whose file cannot be written fails alone, a future timestamp cannot silence a rule, and
//! JavaScript's broken strings are accepted.

mod common;

use common::{Server, fixture, fixture_json};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

/// Waits until the server closes `stream` (reads return nothing), at most `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => {}
        }
    }
    false
}

#[test]
fn idle_and_half_sent_connections_are_closed_after_the_header_timeout() {
    let server = Server::start_with(&["--header-timeout", "1s"], |_| {});
    let mut idle = TcpStream::connect(server.address()).unwrap();
    let mut half = TcpStream::connect(server.address()).unwrap();
    half.write_all(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Le")
        .unwrap();
    // A keep-alive connection, idle after one answered request.
    let mut kept = TcpStream::connect(server.address()).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 256];
    let n = kept.read(&mut answer).unwrap();
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
    for (what, stream) in [
        ("idle", &mut idle),
        ("half-sent", &mut half),
        ("kept", &mut kept),
    ] {
        assert!(
            closed_within(stream, Duration::from_secs(15)),
            "the {what} connection is still open"
        );
    }
    assert_eq!(server.get("/healthz").0, 200);
}

#[test]
fn the_open_files_limit_is_raised_to_its_hard_limit() {
    let server = Server::start();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers[0], numbers[1], "soft limit = hard limit: {line}");
}

#[test]
fn sigterm_finishes_within_the_shutdown_timeout_whatever_clients_do() {
    let mut server = Server::start_with(
        &[
            "--header-timeout",
            "60s",
            "--request-timeout",
            "60s",
            "--shutdown-timeout",
            "2s",
        ],
        |_| {},
    );
    // One client stops halfway through its headers, another halfway through its body.
    let mut half_header = TcpStream::connect(server.address()).unwrap();
    half_header
        .write_all(b"POST /webhook HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut half_body = TcpStream::connect(server.address()).unwrap();
    half_body
        .write_all(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"ev")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Bounded by the 2 s shutdown timeout (and a margin for a loaded machine), never by the
    // clients' 60 s.
    let code = server.terminate_within(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{}", server.log());
}

const BLOCKED_RULE: &str = r#"
name = "blocked-sink"
[when]
event = "generation_failed"
[jsonl]
file = "blocked/out.jsonl"
fields = { uuid = "uuid" }
"#;

#[test]
fn a_rule_whose_file_cannot_be_written_fails_alone() {
    let server = Server::start_with(&[], |root| {
        std::fs::write(root.join("rules/blocked_sink.toml"), BLOCKED_RULE).unwrap();
    });
    // Something puts a file where the rule's folder should be, after the rule loaded.
    std::fs::write(server.data.join("blocked"), "not a folder").unwrap();
    let body = fixture_json("generation_failed.json");
    let (status, reply) = server.post_fresh(&body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["fired"], json!(["training-data"]), "{reply}");
    let failed = reply["failed"][0].as_str().unwrap();
    assert!(
        failed.contains("blocked-sink") && failed.contains("blocked/out.jsonl"),
        "{failed}"
    );
    assert_eq!(
        server.jsonl("training_data.jsonl").len(),
        1,
        "the other rule wrote"
    );
    let rules = server.rules_status();
    let shown = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "blocked-sink")
        .unwrap();
    assert!(
        shown["failing"]
            .as_str()
            .unwrap()
            .contains("cannot be written")
    );
    assert_eq!(
        server.metric(r#"tripline_actions_failed_total{kind="jsonl",rule="blocked-sink"}"#),
        1.0
    );
    // Once the way is clear and the rules reload, the rule writes again.
    std::fs::remove_file(server.data.join("blocked")).unwrap();
    std::fs::write(
        server.rules.join("blocked_sink.toml"),
        format!("{BLOCKED_RULE}\n# touched\n"),
    )
    .unwrap();
    server.wait_for("the rule to write again", |s| {
        s.post_fresh(&body).0 == 200 && !s.jsonl("blocked/out.jsonl").is_empty()
    });
}

#[test]
fn check_refuses_every_path_the_service_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let (rules, data) = (dir.path().join("rules"), dir.path().join("data"));
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("training_data.jsonl"), "").unwrap();
    let rule = |name: &str, file: &str| {
        std::fs::write(
            rules.join(format!("{name}.toml")),
            format!(
                "name = \"{name}\"\n[when]\nevent = \"x\"\n[jsonl]\nfile = \"{file}\"\nfields = {{ e = \"event\" }}\n"
            ),
        )
        .unwrap();
    };
    let check = || {
        let out = Command::new(env!("CARGO_BIN_EXE_tripline"))
            .arg("check")
            .arg("--rules")
            .arg(&rules)
            .arg("--data")
            .arg(&data)
            .arg("--templates")
            .arg(dir.path().join("templates"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    // Paths no file system takes, or that tripline keeps for itself: errors in the rule file.
    rule("long", &"a".repeat(300));
    rule("nul", "a\\u0000b.jsonl");
    rule("probe", ".tripline-ready-check");
    let (code, text) = check();
    assert_eq!(code, Some(1), "{text}");
    for expected in ["at most 255", "NUL", "tripline's own"] {
        assert!(text.contains(expected), "{expected}: {text}");
    }
    // A path the data folder's contents block: the service would load the rule and it would do
    // nothing, so check says so and fails too.
    for name in ["long", "nul", "probe"] {
        std::fs::remove_file(rules.join(format!("{name}.toml"))).unwrap();
    }
    rule("under-a-file", "training_data.jsonl/x.jsonl");
    let (code, text) = check();
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("is a file"), "{text}");
    assert!(text.contains("1 rule(s) cannot write"), "{text}");
}

#[test]
fn readyz_never_touches_a_file_it_did_not_make() {
    let server = Server::start();
    std::fs::write(server.data.join(".tripline-ready-check"), "keep me").unwrap();
    assert_eq!(server.get("/readyz").0, 200);
    assert_eq!(
        std::fs::read_to_string(server.data.join(".tripline-ready-check")).unwrap(),
        "keep me"
    );
    let left: Vec<_> = std::fs::read_dir(&server.data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".tripline-ready-") && n != ".tripline-ready-check")
        .collect();
    assert!(left.is_empty(), "probe files left behind: {left:?}");
}

const WINDOW_RULE: &str = r#"
name = "two-in-an-hour"
[when]
event = "feature_used"
[count]
per = ["distinct_id"]
at_least = 2
within = "1 hour"
[jsonl]
file = "pairs.jsonl"
fields = { who = "distinct_id", at = "timestamp" }
"#;

#[test]
fn an_event_from_a_wrong_clock_cannot_silence_a_rule_for_its_user() {
    let server = Server::start_with(&[], |root| {
        std::fs::write(root.join("rules/two_in_an_hour.toml"), WINDOW_RULE).unwrap();
    });
    let now = chrono::Utc::now();
    let at = |t: chrono::DateTime<chrono::Utc>| {
        let mut body = fixture_json("feature_used.json");
        body["event"]["distinct_id"] = json!("u1");
        body["event"]["timestamp"] = json!(t.to_rfc3339());
        body
    };
    let future: chrono::DateTime<chrono::Utc> = "2099-01-01T00:00:00Z".parse().unwrap();
    assert_eq!(server.post_fresh(&at(future)).0, 200);
    assert_eq!(server.post_fresh(&at(now)).0, 200);
    let (status, reply) = server.post_fresh(&at(now + chrono::TimeDelta::seconds(1)));
    assert_eq!(status, 200);
    assert!(
        reply["fired"]
            .as_array()
            .unwrap()
            .contains(&json!("two-in-an-hour")),
        "the 2099 event was timed at now + 5 minutes, so the window still counts: {reply}"
    );
    assert_eq!(server.jsonl("pairs.jsonl").len(), 1);
    assert_eq!(
        server.metric(r#"tripline_events_clock_clamped_total{source="local"}"#),
        1.0
    );
}

#[test]
fn a_string_cut_in_the_middle_of_an_emoji_is_accepted() {
    let server = Server::start();
    // posthog-js sends a JavaScript string cut between the two halves of an emoji as a lone
    // surrogate escape: here once in a field the training rule writes, once in one no rule
    // reads. The body is edited as text: no JSON library can hold such a string.
    let text = String::from_utf8(fixture("generation_failed.json")).unwrap();
    let raw = text
        .replacen(
            "\"input_prompt\": \"",
            "\"input_prompt\": \"\\ud83d cut: ",
            1,
        )
        .replacen("\"model\": \"", "\"model\": \"\\udc00", 1)
        .replace("0197a3f5-0a9d-7f31-8c44-1e2d3c4b5a69", &common::new_uuid());
    assert!(raw.contains("\\ud83d cut") && raw.contains("\\udc00"));
    let (status, reply) = server.post(raw);
    assert_eq!(status, 200, "{reply}");
    let lines = server.jsonl("training_data.jsonl");
    assert_eq!(lines.len(), 1);
    let prompt = lines[0]["inputPrompt"].as_str().unwrap();
    assert!(prompt.starts_with("\u{fffd} cut: "), "{prompt}");
    let file = std::fs::read(server.data.join("training_data.jsonl")).unwrap();
    assert!(
        String::from_utf8(file).is_ok(),
        "only valid UTF-8 is written"
    );
}

/// Pipelines requests on a new connection and never reads an answer, until the server stops
/// taking more (or `for_at_most` passes).
fn pipeline_without_reading(address: &str, for_at_most: Duration) -> TcpStream {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let requests = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
    let deadline = Instant::now() + for_at_most;
    while Instant::now() < deadline && stream.write_all(&requests).is_ok() {}
    stream
}

#[test]
fn a_client_that_never_reads_its_answers_loses_its_connection() {
    let server = Server::start_with(
        &["--header-timeout", "1s", "--max-connections", "2"],
        |_| {},
    );
    let _a = pipeline_without_reading(server.address(), Duration::from_secs(10));
    let _b = pipeline_without_reading(server.address(), Duration::from_secs(10));
    // Both connections are taken; once their answers have made no progress for the header
    // timeout, they are closed and a new client is served.
    server.wait_for("a free connection", |s| {
        let reply = common::client()
            .get(format!("{}/healthz", s.base))
            .timeout(Duration::from_secs(2))
            .send();
        reply.is_ok_and(|r| r.status() == 200)
    });
}

#[test]
fn a_written_file_whose_path_is_blocked_while_stopped_does_not_stop_the_start() {
    let mut server = Server::start_with(&[], |root| {
        std::fs::write(root.join("rules/blocked_sink.toml"), BLOCKED_RULE).unwrap();
    });
    let body = fixture_json("generation_failed.json");
    assert_eq!(server.post_fresh(&body).0, 200);
    assert_eq!(server.jsonl("blocked/out.jsonl").len(), 1);
    assert_eq!(server.terminate(), Some(0));
    // While it is stopped, a file takes the place of the rule's folder.
    std::fs::remove_dir_all(server.data.join("blocked")).unwrap();
    std::fs::write(server.data.join("blocked"), "in the way").unwrap();
    server.relaunch();
    let (status, reply) = server.post_fresh(&body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["fired"], json!(["training-data"]), "{reply}");
    assert!(
        reply["failed"][0]
            .as_str()
            .unwrap()
            .contains("blocked-sink")
    );
}
