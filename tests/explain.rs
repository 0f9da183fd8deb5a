//! `GET /explain/{uuid}` and `tripline explain UUID`: why each rule did or did not act on an
//! event, read back from the real service: "why didn't Dana get the discount?".

mod common;

use common::Server;
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;

fn used(uuid: &str, feature: Option<&str>, minute: u32) -> Value {
    let mut properties = json!({});
    if let Some(f) = feature {
        properties["feature_name"] = f.into();
    }
    json!({
        "event": "feature_used", "uuid": uuid, "distinct_id": "dana",
        "timestamp": format!("2026-12-04T10:{minute:02}:00Z"),
        "properties": properties,
        "person": {"properties": {"email": "dana@example.com"}},
    })
}

fn explain(server: &Server, uuid: &str) -> (u16, Value) {
    let (status, body) = server.get(&format!("/explain/{uuid}"));
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// The entries of the record, by rule.
fn entry<'a>(record: &'a Value, rule: &str) -> &'a Value {
    (record["rules"].as_array().unwrap().iter())
        .find(|e| e["rule"] == rule)
        .unwrap_or_else(|| panic!("no entry for {rule}: {record}"))
}

#[test]
fn why_dana_did_or_did_not_get_the_discount_is_told_for_each_event() {
    // The shipped rule: the 5th use of a feature, once per person and feature.
    let server = Server::start();
    for n in 1..=6 {
        server.post_json(&used(&format!("use-{n}"), Some("export"), n));
    }
    // An event from an old version of the app, without the feature's name.
    server.post_json(&used("use-old", None, 7));

    let (status, fourth) = explain(&server, "use-4");
    assert_eq!(status, 200, "{fourth}");
    assert_eq!(
        (&fourth["event"], &fourth["distinct_id"]),
        (&json!("feature_used"), &json!("dana"))
    );
    let e = entry(&fourth, "power-user-discount");
    assert_eq!(
        (&e["result"], &e["count"], &e["at_least"]),
        (&json!("counting"), &json!(4), &json!(5))
    );
    assert_eq!(
        e["says"],
        "Counted: this is number 4, and the rule acts from number 5 on."
    );

    let (_, fifth) = explain(&server, "use-5");
    let e = entry(&fifth, "power-user-discount");
    assert_eq!(e["result"], "fired");
    // What it sent, as the outbox has it now.
    let sent = &e["deliveries"][0];
    assert_eq!(
        (&sent["kind"], &sent["to"]),
        (&json!("email"), &json!("d***@example.com"))
    );
    server.wait_for("the email to go", |s| {
        explain(s, "use-5").1["rules"][0]["deliveries"][0]["status"] == "sent"
    });

    let (_, sixth) = explain(&server, "use-6");
    let e = entry(&sixth, "power-user-discount");
    assert_eq!(
        (&e["result"], &e["until"]),
        (&json!("suppressed"), &Value::Null)
    );
    let says = e["says"].as_str().unwrap();
    assert!(says.contains("already acted for the same `distinct_id` and `properties.feature_name` on 2026-12-04 10:05 UTC"), "{says}");
    assert!(says.contains("acts only once"), "{says}");

    let (_, old) = explain(&server, "use-old");
    let e = entry(&old, "power-user-discount");
    assert_eq!(e["result"], "not_matched");
    assert_eq!(
        e["says"],
        "Not for this rule: the event has no `properties.feature_name`; the rule wants it to be there."
    );

    // A retried delivery changes nothing, its record included.
    server.post_json(&used("use-4", Some("import"), 30));
    assert_eq!(explain(&server, "use-4").1, fourth);
    server.post_json(&used("use-old", None, 7));
    assert_eq!(explain(&server, "use-old").1, old, "told once");

    // As lines to read.
    let (status, text) = server.get("/explain/use-6?format=text");
    assert_eq!(status, 200);
    assert!(
        text.starts_with("Event use-6 \"feature_used\" of dana, at 2026-12-04T10:06:00.000Z"),
        "{text}"
    );
    assert!(
        text.contains("\n- power-user-discount: Held back by its [limits]"),
        "{text}"
    );
}

#[test]
fn unknown_events_and_bad_queries_say_why() {
    let server = Server::start();
    // An event no rule names is not kept.
    server.post_json(&json!({"event": "page_left", "uuid": "left-1", "distinct_id": "dana"}));
    for uuid in ["left-1", "never-sent"] {
        let (status, body) = explain(&server, uuid);
        assert_eq!(status, 404, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("no rule names its event"),
            "{body}"
        );
    }
    let (status, body) = explain(&server, "x?format=xml");
    assert_eq!(status, 400, "{body}");
    let (status, body) = explain(&server, "x?verbose=1");
    assert_eq!(status, 400, "{body}");
}

#[test]
fn tripline_explain_asks_the_running_service() {
    let server = Server::start();
    for n in 1..=5 {
        server.post_json(&used(&format!("cli-{n}"), Some("export"), n));
    }
    let run = |uuid: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tripline"))
            .args(["explain", uuid, "--url", &server.base])
            .args(extra)
            .env_remove("TRIPLINE_ADMIN_TOKEN")
            .output()
            .unwrap()
    };
    let out = run("cli-5", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("- power-user-discount: Acted: it ran its [email]."),
        "{text}"
    );
    assert!(text.contains("    email "), "{text}");
    let out = run("cli-3", &["--json"]);
    let record: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["rules"][0]["count"], 3);
    let out = run("nope", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no record of the event `nope`"));
    let out = Command::new(env!("CARGO_BIN_EXE_tripline"))
        .args(["explain", "x", "--url", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is it running?"));
}

const QUICK: &str = r#"
name = "quick-abandoned"
[when]
event = "checkout_started"
[wait]
for = "2 seconds"
same = ["distinct_id"]
unless = { event = "order_completed" }
[jsonl]
file = "quick.jsonl"
fields = { who = "distinct_id" }
"#;

#[test]
fn a_wait_tells_when_it_started_and_how_it_ended_on_the_event_that_started_it() {
    let server = Server::start_with(&["--wait-grace", "100ms"], |root: &Path| {
        std::fs::write(root.join("rules/quick.toml"), QUICK).unwrap();
    });
    let now = chrono::Utc::now().to_rfc3339();
    let started = |uuid: &str, who: &str| json!({"event": "checkout_started", "uuid": uuid, "distinct_id": who, "timestamp": now});
    server.post_json(&started("cart-kim", "kim"));
    server.post_json(&started("cart-lee", "lee"));
    server.post_json(&json!({"event": "order_completed", "uuid": "paid-lee", "distinct_id": "lee", "timestamp": now}));

    let (_, kim) = explain(&server, "cart-kim");
    let e = entry(&kim, "quick-abandoned");
    assert_eq!(e["result"], "waiting");
    assert!(e["pending"]["until"].is_string(), "still waiting: {kim}");
    let (_, paid) = explain(&server, "paid-lee");
    assert_eq!(entry(&paid, "quick-abandoned")["result"], "cancelled");
    // And the cart's own record says its wait was cancelled.
    let (_, lee) = explain(&server, "cart-lee");
    let ended = &lee["rules"][1];
    assert_eq!(ended["result"], "cancelled", "{lee}");
    assert!(
        ended["says"]
            .as_str()
            .unwrap()
            .starts_with("Its wait was cancelled on "),
        "{lee}"
    );
    assert!(
        lee["rules"][0].get("pending").is_none(),
        "no longer waiting: {lee}"
    );

    server.wait_for("kim's wait to end", |s| {
        explain(s, "cart-kim").1["rules"].as_array().unwrap().len() == 2
    });
    let (_, kim) = explain(&server, "cart-kim");
    let ended = &kim["rules"][1];
    assert_eq!(
        (&ended["rule"], &ended["result"]),
        (&json!("quick-abandoned"), &json!("fired"))
    );
    assert!(ended["at"].is_string(), "{kim}");
    assert!(
        kim["rules"][0].get("pending").is_none(),
        "no longer waiting: {kim}"
    );
}

#[test]
fn erasing_a_person_forgets_the_records_of_their_events() {
    let server = Server::start();
    server.post_json(&used("mine", Some("export"), 1));
    // One no rule acted on: its record is kept in memory, and forgotten too.
    server.post_json(&used("mine-old", None, 2));
    assert_eq!(explain(&server, "mine-old").0, 200);
    let erased: Value = common::client()
        .delete(format!("{}/users/dana", server.base))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(erased["erased"]["explanations"], 2, "{erased}");
    assert_eq!(explain(&server, "mine").0, 404);
    assert_eq!(explain(&server, "mine-old").0, 404);
}
