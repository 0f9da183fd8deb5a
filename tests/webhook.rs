//! POST /webhook end to end, against the real binary and the shipped rules.

mod common;

use common::{Server, fixture, fixture_json, header};
use serde_json::{Value, json};

/// A `feature_used` webhook body for this user, address and feature.
fn feature_used(distinct_id: &str, email: &str, feature: &str) -> Value {
    let mut body = fixture_json("feature_used.json");
    body["event"]["distinct_id"] = json!(distinct_id);
    body["event"]["properties"]["feature_name"] = json!(feature);
    body["person"]["properties"]["email"] = json!(email);
    body
}

#[test]
fn fifth_use_of_a_feature_sends_one_email_per_user_and_feature() {
    let server = Server::start();
    let dana = feature_used("user_4471", "dana@example.com", "demo_feature");
    for _ in 0..4 {
        assert_eq!(server.post_fresh(&dana).0, 200);
    }
    assert!(server.emails().is_empty(), "no email before the 5th use");

    let (status, reply) = server.post_fresh(&dana);
    assert_eq!(status, 200);
    assert_eq!(reply["fired"], json!(["power-user-discount"]));
    let emails = server.emails();
    assert_eq!(emails.len(), 1);
    let email = &emails[0];
    assert_eq!(header(email, "To"), Some("dana@example.com"));
    assert_eq!(header(email, "From"), Some("tripline <tripline@localhost>"));
    assert_eq!(
        header(email, "Subject"),
        Some("You're a demo_feature power user: here is 20% off")
    );
    assert!(header(email, "Date").is_some());
    assert!(header(email, "Message-ID").is_some_and(|id| id.starts_with('<') && id.ends_with('>')));
    assert!(email.contains("Hi Dana Example,"), "{email}");
    assert!(
        email.contains("You have used demo_feature 5 times"),
        "{email}"
    );

    for _ in 6..=10 {
        let (status, reply) = server.post_fresh(&dana);
        assert_eq!(status, 200);
        assert_eq!(reply["fired"], json!([]));
    }
    assert_eq!(
        server.emails().len(),
        1,
        "the 6th to 10th uses send nothing more"
    );

    // Another user, and another feature of the same user, count on their own.
    let mut sam = feature_used("user_9", "sam@example.com", "demo_feature");
    sam["person"]["properties"] = json!({"email": "sam@example.com"});
    let dana_export = feature_used("user_4471", "dana@example.com", "export");
    for _ in 0..4 {
        server.post_fresh(&sam);
        server.post_fresh(&dana_export);
    }
    assert_eq!(server.emails().len(), 1);
    server.post_fresh(&sam);
    server.post_fresh(&dana_export);
    let emails = server.emails();
    assert_eq!(emails.len(), 3);
    let to_sam = emails
        .iter()
        .find(|e| header(e, "To") == Some("sam@example.com"))
        .unwrap();
    assert!(
        to_sam.contains("Hi there,"),
        "a person without a name: {to_sam}"
    );
    let mut subjects: Vec<(&str, &str)> = emails
        .iter()
        .map(|e| (header(e, "To").unwrap(), header(e, "Subject").unwrap()))
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        vec![
            (
                "dana@example.com",
                "You're a demo_feature power user: here is 20% off"
            ),
            (
                "dana@example.com",
                "You're a export power user: here is 20% off"
            ),
            (
                "sam@example.com",
                "You're a demo_feature power user: here is 20% off"
            ),
        ]
    );
}

#[test]
fn an_email_that_cannot_be_filled_in_is_not_sent_and_a_later_event_retries() {
    let server = Server::start();
    let mut no_address = feature_used("user_1", "x", "demo_feature");
    no_address["person"] = Value::Null;
    for _ in 0..4 {
        server.post_fresh(&no_address);
    }
    let (status, reply) = server.post_fresh(&no_address);
    assert_eq!(
        status, 200,
        "the event itself is fine; only the email cannot be made"
    );
    assert_eq!(reply["fired"], json!([]));
    assert!(
        reply["failed"][0]
            .as_str()
            .unwrap()
            .contains("the event has no `person.properties.email`"),
        "{reply}"
    );
    assert!(server.emails().is_empty());
    // Once the person has an address, the next use sends the email.
    server.post_fresh(&feature_used("user_1", "u1@example.com", "demo_feature"));
    let emails = server.emails();
    assert_eq!(emails.len(), 1);
    assert_eq!(header(&emails[0], "To"), Some("u1@example.com"));
}

#[test]
fn generation_failed_becomes_exactly_one_sanitized_line() {
    let server = Server::start();
    assert_eq!(server.post(fixture("generation_failed.json")).0, 200);
    assert_eq!(server.jsonl("training_data.jsonl").len(), 1);
    let text = std::fs::read_to_string(server.data.join("training_data.jsonl")).unwrap();
    assert_eq!(
        text,
        "{\"distinctId\":\"user_4471\",\"failureReason\":\"timeout\",\
         \"inputPrompt\":\"generate a floorplan for a 2-bedroom apartment\",\
         \"timestamp\":\"2025-06-14T09:24:05.117Z\"}\n"
    );
}

#[test]
fn long_unicode_prompt_is_cut_to_exactly_1000_characters() {
    let server = Server::start();
    assert_eq!(
        server
            .post(fixture("generation_failed_long_unicode.json"))
            .0,
        200
    );
    let original = fixture_json("generation_failed_long_unicode.json");
    let prompt = original["event"]["properties"]["input_prompt"]
        .as_str()
        .unwrap();
    assert_eq!(prompt.chars().count(), 5000);
    let lines = server.jsonl("training_data.jsonl");
    assert_eq!(lines.len(), 1);
    let written = lines[0]["inputPrompt"].as_str().unwrap();
    assert_eq!(written.chars().count(), 1000);
    let expected: String = prompt.trim().chars().take(1000).collect();
    assert_eq!(written, expected);
    let keys: Vec<&String> = lines[0].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["distinctId", "failureReason", "inputPrompt", "timestamp"]
    );
}

#[test]
fn reasons_are_trimmed_and_cut_and_a_missing_timestamp_is_the_processing_time() {
    let server = Server::start();
    let before = chrono::Utc::now();
    let reason = format!("  {}  ", "r".repeat(150));
    let body = json!({"event": "generation_failed", "distinct_id": "u", "properties": {
        "failure_reason": reason, "input_prompt": "\n p \t", "email": "secret@example.com"}});
    assert_eq!(server.post_json(&body).0, 200);
    let after = chrono::Utc::now();
    let line = &server.jsonl("training_data.jsonl")[0];
    assert_eq!(line["failureReason"], json!("r".repeat(100)));
    assert_eq!(line["inputPrompt"], json!("p"));
    let at: chrono::DateTime<chrono::Utc> = line["timestamp"].as_str().unwrap().parse().unwrap();
    assert!(
        before - chrono::Duration::seconds(1) <= at && at <= after,
        "{at}"
    );
    assert!(
        !line.to_string().contains("secret"),
        "nothing else leaks: {line}"
    );
}

#[test]
fn concurrent_posts_write_only_whole_lines() {
    let server = Server::start();
    let body = fixture_json("generation_failed_long_unicode.json");
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..40 {
                    assert_eq!(server.post_fresh(&body).0, 200);
                }
            });
        }
    });
    let lines = server.jsonl("training_data.jsonl");
    assert_eq!(lines.len(), 320);
    for line in lines {
        assert_eq!(line["inputPrompt"].as_str().unwrap().chars().count(), 1000);
        assert_eq!(line.as_object().unwrap().len(), 4);
    }
}

/// Every fixture that carries events, with how many it carries.
const WELL_FORMED: [(&str, usize); 13] = [
    ("feature_used.json", 1),
    ("generation_failed.json", 1),
    ("generation_failed_long_unicode.json", 1),
    ("pageview.json", 1),
    ("autocapture.json", 1),
    ("webhook_person_null.json", 1),
    ("webhook_custom_flat_body.json", 1),
    ("legacy_globals_2024_event_name.json", 1),
    ("capture_single.json", 1),
    ("capture_batch.json", 3),
    ("capture_array_posthog_js.json", 1),
    ("http_batch_export.json", 2),
    ("legacy_zapier_rest_hook.json", 1),
];

#[test]
fn every_well_formed_fixture_is_accepted_pretty_and_minified() {
    let server = Server::start();
    for (name, events) in WELL_FORMED {
        let pretty = fixture(name);
        let minified = serde_json::from_slice::<Value>(&pretty)
            .unwrap()
            .to_string();
        for body in [pretty, minified.into_bytes()] {
            let (status, reply) = server.post(body);
            assert_eq!(status, 200, "{name}: {reply}");
            assert_eq!(reply["accepted"], json!(events), "{name}");
        }
    }
    // The minified copy of each body is a retried delivery of the same events: no second line.
    // Lines: generation_failed.json, the long-unicode one, and the batch's generation_failed
    // twice (it has no uuid, so it cannot be recognised as a retry). The Zapier hook carries the
    // same eventUuid as generation_failed.json, so it is a duplicate too.
    assert_eq!(server.jsonl("training_data.jsonl").len(), 4);
}

#[test]
fn legacy_text_bodies_are_refused_with_a_clear_reason() {
    let server = Server::start();
    for name in [
        "legacy_action_webhook_text.json",
        "legacy_action_webhook_slack.json",
    ] {
        let (status, reply) = server.post(fixture(name));
        assert_eq!(status, 422, "{name}");
        assert!(
            reply["error"]
                .as_str()
                .unwrap()
                .contains("legacy PostHog action webhook"),
            "{reply}"
        );
    }
}

#[test]
fn malformed_bodies_get_a_specific_4xx_and_change_nothing() {
    let server = Server::start();
    let dana = feature_used("user_4471", "dana@example.com", "demo_feature");
    for _ in 0..4 {
        server.post_fresh(&dana);
    }
    let cases = [
        ("not_json.txt", 400, "not valid JSON"),
        ("truncated.json", 400, "not valid JSON: EOF while parsing"),
        (
            "wrong_types.json",
            422,
            "the event name (`event`) must be text, got a number",
        ),
        ("missing_event.json", 422, "no `event` key"),
        ("huge_nesting.json", 400, "nested too deeply"),
        ("huge_nesting_in_properties.json", 400, "nested too deeply"),
        ("empty.json", 400, "the body is empty"),
    ];
    for (name, status, message) in cases {
        let (got, reply) = server.post(fixture(&format!("malformed/{name}")));
        assert_eq!(got, status, "{name}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{name}: {error}");
    }
    // A body with one bad event is refused whole.
    let mixed = json!([fixture_json("generation_failed.json"), {"event": {"event": 42}}]);
    let (status, reply) = server.post_json(&mixed);
    assert_eq!(status, 422);
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .starts_with("event 2 of the body"),
        "{reply}"
    );
    // So is one whose bad event is one no rule is tried on: it is checked, only not built.
    let unwanted = json!({"event": "$pageview", "timestamp": "yesterday", "properties": {}});
    let (status, reply) =
        server.post_json(&json!([fixture_json("generation_failed.json"), unwanted]));
    assert_eq!(status, 422);
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .starts_with("event 2 of the body: `timestamp` \"yesterday\""),
        "{reply}"
    );

    assert_eq!(server.get("/healthz").0, 200, "still running");
    assert!(
        server.jsonl("training_data.jsonl").is_empty(),
        "no line was written"
    );
    assert!(server.emails().is_empty());
    // None of the refused feature_used bodies counted: the next good one is the 5th.
    server.post_fresh(&dana);
    assert_eq!(server.emails().len(), 1);
}

#[test]
fn bodies_over_the_limit_get_413() {
    let server = Server::start_with(&["--max-body-bytes", "1000"], |_| {});
    let body = fixture("generation_failed.json");
    assert!(body.len() > 1000);
    let (status, reply) = server.post(body);
    assert_eq!(status, 413);
    assert!(
        reply["error"].as_str().unwrap().contains("larger than"),
        "{reply}"
    );
    let small = json!({"event": "generation_failed", "distinct_id": "u"});
    assert_eq!(server.post_json(&small).0, 200);
    assert_eq!(server.jsonl("training_data.jsonl").len(), 1);
}

#[test]
fn health_and_rules_endpoints() {
    let server = Server::start();
    assert_eq!(server.get("/healthz"), (200, "ok\n".to_string()));
    let status = server.rules_status();
    assert_eq!(status["last_reload"]["ok"], json!(true));
    assert_eq!(status["last_reload"]["errors"], json!([]));
    let rules = status["rules"].as_array().unwrap();
    let email = rules
        .iter()
        .find(|r| r["name"] == "power-user-discount")
        .unwrap();
    assert!(
        email["file"]
            .as_str()
            .unwrap()
            .ends_with("power_user_email.toml")
    );
    assert_eq!(email["when"]["event"], json!("feature_used"));
    assert_eq!(
        email["count"],
        json!({"per": ["distinct_id", "properties.feature_name"], "at_least": 5})
    );
    assert_eq!(email["actions"][0]["kind"], json!("email"));
    let sink = rules.iter().find(|r| r["name"] == "training-data").unwrap();
    assert_eq!(sink["actions"][0]["file"], json!("training_data.jsonl"));
}

/// An email whose recipient is missing is held as failed: visible at /outbox with the reason,
/// counted in /metrics, and never sent half filled.
#[test]
fn an_email_missing_a_field_is_held_as_failed_visible_and_counted() {
    let server = Server::start();
    let anonymous = json!({"event": "feature_used", "distinct_id": "anon-1",
        "properties": {"feature_name": "export"}});
    for _ in 0..4 {
        assert_eq!(server.post_fresh(&anonymous).0, 200);
    }
    let (status, reply) = server.post_fresh(&anonymous);
    assert_eq!(status, 200);
    assert_eq!(reply["fired"], json!([]));
    let reason = reply["failed"][0].as_str().unwrap();
    assert!(
        reason.contains("the event has no `person.properties.email`"),
        "{reason}"
    );
    let outbox = server.outbox();
    assert_eq!(outbox["pending"], json!(0));
    assert_eq!(outbox["recent"][0]["status"], json!("failed"));
    assert_eq!(outbox["recent"][0]["rule"], json!("power-user-discount"));
    assert!(
        outbox["recent"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("person.properties.email"),
        "{outbox}"
    );
    let (_, metrics) = server.get("/metrics");
    assert!(
        metrics.contains(
            "tripline_actions_failed_total{kind=\"email\",rule=\"power-user-discount\"} 1"
        ),
        "{metrics}"
    );
    assert!(server.emails().is_empty(), "nothing was sent");
}

#[test]
fn a_failed_email_does_not_keep_the_same_rules_line_from_being_written() {
    // One rule, two actions, once per user: the email cannot be made for an anonymous user.
    let server = Server::start_with(&[], |root| {
        std::fs::write(
            root.join("rules/signup.toml"),
            "name = \"signup\"\n[when]\nevent = \"signed_up\"\n[limits]\nonce_per = [\"distinct_id\"]\n\
             [email]\nto = \"{{person.properties.email}}\"\nsubject = \"Welcome\"\ntemplate = \"welcome\"\n\
             [jsonl]\nfile = \"signups.jsonl\"\nfields = { who = \"distinct_id\" }\n",
        )
        .unwrap();
    });
    let anonymous = json!({"event": "signed_up", "distinct_id": "anon-1"});
    let (status, reply) = server.post_fresh(&anonymous);
    assert_eq!(status, 200);
    assert_eq!(
        reply["fired"],
        json!(["signup"]),
        "the line was written: {reply}"
    );
    let failed = reply["failed"][0].as_str().unwrap();
    assert!(failed.contains("person.properties.email"), "{reply}");
    assert_eq!(server.jsonl("signups.jsonl"), [json!({"who": "anon-1"})]);
    let outbox = server.outbox();
    assert_eq!(outbox["recent"][0]["status"], json!("failed"));
    assert_eq!(outbox["recent"][0]["kind"], json!("email"));
    // The rule acted for anon-1: a later event for the same user is held back by [limits].
    let with_address = json!({"event": "signed_up", "distinct_id": "anon-1",
        "person": {"properties": {"email": "anon@example.com"}}});
    let (_, reply) = server.post_fresh(&with_address);
    assert_eq!(reply["fired"], json!([]), "{reply}");
    assert_eq!(server.jsonl("signups.jsonl").len(), 1);
    let (_, metrics) = server.get("/metrics");
    for series in [
        "tripline_actions_failed_total{kind=\"email\",rule=\"signup\"} 1",
        "tripline_actions_succeeded_total{kind=\"jsonl\",rule=\"signup\"} 1",
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }
}

#[test]
fn settings_can_come_from_the_environment() {
    let server = Server::start_with_env(&[
        ("TRIPLINE_EMAIL_FROM", "Growth <growth@example.com>"),
        ("TRIPLINE_MAX_BODY_BYTES", "1000"),
    ]);
    assert_eq!(server.post(fixture("generation_failed.json")).0, 413);
    let small = json!({"event": "feature_used", "distinct_id": "u", "properties": {"feature_name": "f"},
        "person": {"properties": {"email": "u@example.com"}}});
    for _ in 0..5 {
        assert_eq!(server.post_fresh(&small).0, 200);
    }
    assert_eq!(
        header(&server.emails()[0], "From"),
        Some("Growth <growth@example.com>")
    );
}

#[test]
fn sigterm_stops_the_service_cleanly() {
    let mut server = Server::start();
    assert_eq!(server.post(fixture("generation_failed.json")).0, 200);
    assert_eq!(server.terminate(), Some(0));
    assert!(server.log().contains("stopped"), "{}", server.log());
    assert_eq!(server.jsonl("training_data.jsonl").len(), 1);
}
