//! `[wait]` through the real server: waits end as the (manual) clock passes them, an `unless`
//! event cancels, an `until` event completes, `then` checks the latest event, every cart is
//! waited on by itself, reloads keep or drop waits, a future-dated event cannot push a deadline,
//! and a SIGKILL never loses a wait nor ends one twice.

mod common;

use chrono::{DateTime, TimeDelta, Utc};
use common::in_process::InProcess;
use common::{Server, new_uuid};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const ABANDONED: &str = r#"
name = "abandoned"
[when]
event = "checkout_started"
[wait]
for = "30 minutes"
same = ["distinct_id", "properties.cart_id"]
unless = { event = "order_completed" }
[jsonl]
file = "abandoned.jsonl"
fields = { cart = "properties.cart_id", who = "distinct_id" }
"#;

const INVITED: &str = r#"
name = "invited"
[when]
event = "signed_up"
[wait]
for = "1 day"
until = { event = "teammate_invited" }
[jsonl]
file = "invited.jsonl"
fields = { who = "distinct_id" }
"#;

const STILL_FREE: &str = r#"
name = "still-free"
[when]
event = "feature_used"
[wait]
for = "2 minutes"
then = { "person.properties.plan" = "free" }
[jsonl]
file = "free.jsonl"
fields = { who = "distinct_id" }
"#;

fn start_time() -> DateTime<Utc> {
    "2026-05-04T10:00:00Z".parse().unwrap()
}

/// The service on a manual clock with the three rules above beside the shipped ones.
fn server() -> InProcess {
    InProcess::start_with(&[], start_time(), |root| {
        for (name, rule) in [
            ("abandoned", ABANDONED),
            ("invited", INVITED),
            ("still_free", STILL_FREE),
        ] {
            std::fs::write(root.join(format!("rules/{name}.toml")), rule).unwrap();
        }
    })
}

/// An event stamped now by the server's clock.
fn event(s: &InProcess, name: &str, who: &str, properties: Value, person: Value) -> Value {
    json!({
        "event": name,
        "uuid": new_uuid(),
        "distinct_id": who,
        "timestamp": s.clock.now().to_rfc3339(),
        "properties": properties,
        "person": { "properties": person },
    })
}

fn post(s: &InProcess, body: Value) -> Value {
    let (status, reply) = s.post_json(&body);
    assert_eq!(status, 200, "{reply}");
    reply
}

fn minutes(n: i64) -> Duration {
    TimeDelta::minutes(n).to_std().unwrap()
}

/// A rule's `waits.pending` at GET /rules.
fn pending(s: &InProcess, rule: &str) -> Value {
    let rules = s.get_json("/rules");
    let found = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == rule);
    found.map_or(Value::Null, |r| r["waits"]["pending"].clone())
}

#[test]
fn absence_per_cart_fires_after_the_deadline_and_a_late_order_changes_nothing() {
    let s = server();
    let cart = |id: &str| json!({ "cart_id": id });
    let reply = post(
        &s,
        event(&s, "checkout_started", "ana", cart("c1"), json!({})),
    );
    assert_eq!(reply["waiting"], json!(["abandoned"]), "{reply}");
    post(
        &s,
        event(&s, "checkout_started", "ana", cart("c2"), json!({})),
    );
    assert_eq!(pending(&s, "abandoned"), 2, "two carts, two waits");

    s.clock.advance(minutes(5));
    let reply = post(
        &s,
        event(&s, "order_completed", "ana", cart("c1"), json!({})),
    );
    assert_eq!(reply["cancelled"], json!(["abandoned"]), "{reply}");
    assert_eq!(pending(&s, "abandoned"), 1);

    // 29 minutes in: nothing yet. Past 30 minutes and the grace period: the unpaid cart.
    s.clock.advance(minutes(24));
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.jsonl("abandoned.jsonl").is_empty());
    s.clock.advance(minutes(2));
    // Lines are synced just before their commit: wait for the commit.
    s.wait_for("the unpaid cart's wait to end", |s| {
        pending(s, "abandoned") == 0
    });
    assert_eq!(
        s.jsonl("abandoned.jsonl"),
        [json!({"cart": "c2", "who": "ana"})]
    );

    // An order for that cart after the reminder: ignored for the wait that ended.
    let reply = post(
        &s,
        event(&s, "order_completed", "ana", cart("c2"), json!({})),
    );
    assert_eq!(reply["cancelled"], json!([]), "{reply}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.jsonl("abandoned.jsonl").len(), 1);
}

#[test]
fn an_unless_event_stamped_before_the_deadline_counts_within_the_grace_period() {
    let s = server();
    let started = event(
        &s,
        "checkout_started",
        "bo",
        json!({"cart_id": "c9"}),
        json!({}),
    );
    post(&s, started);
    // The order happened at minute 29 but reaches tripline 4 seconds after the deadline.
    let mut order = event(
        &s,
        "order_completed",
        "bo",
        json!({"cart_id": "c9"}),
        json!({}),
    );
    order["timestamp"] = json!((s.clock.now() + TimeDelta::minutes(29)).to_rfc3339());
    s.clock.advance(minutes(30) + Duration::from_secs(4));
    let reply = post(&s, order);
    assert_eq!(reply["cancelled"], json!(["abandoned"]), "{reply}");
    s.clock.advance(minutes(10));
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.jsonl("abandoned.jsonl").is_empty());
}

#[test]
fn a_sequence_acts_when_its_event_comes_in_time_and_not_after() {
    let s = server();
    post(&s, event(&s, "signed_up", "u1", json!({}), json!({})));
    post(&s, event(&s, "signed_up", "u2", json!({}), json!({})));
    s.clock.advance(minutes(180));
    let reply = post(
        &s,
        event(&s, "teammate_invited", "u1", json!({}), json!({})),
    );
    assert_eq!(reply["fired"], json!(["invited"]), "{reply}");
    assert_eq!(s.jsonl("invited.jsonl"), [json!({"who": "u1"})]);

    // u2 never invites within the day: the wait ends without acting; a late invite does nothing.
    s.clock.advance(minutes(25 * 60));
    s.wait_for("u2's wait to end", |s| pending(s, "invited") == 0);
    let reply = post(
        &s,
        event(&s, "teammate_invited", "u2", json!({}), json!({})),
    );
    assert_eq!(reply["fired"], json!([]), "{reply}");
    assert_eq!(s.jsonl("invited.jsonl").len(), 1);
}

#[test]
fn a_check_looks_at_the_latest_event_seen_during_the_wait() {
    let s = server();
    let free = json!({"plan": "free"});
    post(
        &s,
        event(&s, "feature_used", "stays", json!({}), free.clone()),
    );
    post(&s, event(&s, "feature_used", "upgrades", json!({}), free));
    s.clock.advance(minutes(1));
    // Any event of the user carries the person as PostHog knows them now.
    post(
        &s,
        event(
            &s,
            "$pageview",
            "upgrades",
            json!({}),
            json!({"plan": "pro"}),
        ),
    );
    s.clock.advance(minutes(2));
    s.wait_for("both waits to end", |s| pending(s, "still-free") == 0);
    assert_eq!(s.jsonl("free.jsonl"), [json!({"who": "stays"})]);
    // An upgrade after the wait ended changes nothing.
    post(
        &s,
        event(&s, "$pageview", "stays", json!({}), json!({"plan": "pro"})),
    );
    assert_eq!(s.jsonl("free.jsonl").len(), 1);
}

#[test]
fn a_future_dated_trigger_cannot_push_its_deadline_past_the_clock_skew() {
    let s = server();
    let mut started = event(
        &s,
        "checkout_started",
        "cy",
        json!({"cart_id": "c1"}),
        json!({}),
    );
    // A client clock a day ahead: timed at now + 5 minutes (max_clock_skew).
    started["timestamp"] = json!((s.clock.now() + TimeDelta::days(1)).to_rfc3339());
    post(&s, started);
    s.clock.advance(minutes(36));
    s.wait_for("the wait to end 35 minutes in, not a day later", |s| {
        !s.jsonl("abandoned.jsonl").is_empty()
    });
}

#[test]
fn a_wait_due_while_the_service_is_stopped_ends_once_at_start() {
    let mut s = server();
    post(
        &s,
        event(
            &s,
            "checkout_started",
            "di",
            json!({"cart_id": "c1"}),
            json!({}),
        ),
    );
    s.restart();
    assert_eq!(pending(&s, "abandoned"), 1, "kept across a restart");
    s.stop();
    s.clock.advance(minutes(90));
    s.launch();
    s.wait_for("the late wait to end", |s| {
        !s.jsonl("abandoned.jsonl").is_empty()
    });
    let lateness = |s: &InProcess| {
        let rules = s.get_json("/rules");
        let rule = rules["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "abandoned");
        rule.unwrap()["waits"]["last_late_seconds"].as_f64()
    };
    s.wait_for("the lateness to show", |s| lateness(s).is_some());
    let late = lateness(&s).unwrap();
    assert!(
        late >= 59.0 * 60.0,
        "an hour late, less the grace period: {late}"
    );
    s.restart();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.jsonl("abandoned.jsonl").len(), 1, "once");
}

/// Replaces a rule file and waits until the service runs the new text.
fn edit(s: &InProcess, file: &str, text: Option<&str>) {
    let before = s.get_json("/rules")["hash"].clone();
    let path = s.dir.path().join("rules").join(file);
    match text {
        Some(text) => std::fs::write(&path, text).unwrap(),
        None => std::fs::remove_file(&path).unwrap(),
    }
    s.wait_for("the reload", |s| s.get_json("/rules")["hash"] != before);
}

#[test]
fn an_edited_rule_keeps_its_waits_and_a_deleted_one_drops_them() {
    let s = server();
    post(
        &s,
        event(
            &s,
            "checkout_started",
            "ed",
            json!({"cart_id": "c1"}),
            json!({}),
        ),
    );
    post(&s, event(&s, "signed_up", "ed", json!({}), json!({})));
    // Edited: the wait goes on and ends under the new text.
    edit(
        &s,
        "abandoned.toml",
        Some(&ABANDONED.replace("who = ", "person = ")),
    );
    assert_eq!(pending(&s, "abandoned"), 1);
    // Deleted: its wait is dropped (and shown as another rule's until then).
    edit(&s, "invited.toml", None);
    s.wait_for("the deleted rule's wait to be dropped", |s| {
        s.get_json("/rules")["waits_of_other_rules"] == json!([])
    });
    s.clock.advance(minutes(2 * 24 * 60));
    s.wait_for("the edited rule's wait to end", |s| {
        !s.jsonl("abandoned.jsonl").is_empty()
    });
    assert_eq!(
        s.jsonl("abandoned.jsonl"),
        [json!({"cart": "c1", "person": "ed"})]
    );
    assert!(s.jsonl("invited.jsonl").is_empty());
}

#[test]
fn the_waits_of_a_rule_deleted_while_the_service_was_stopped_are_dropped_at_start() {
    let mut s = server();
    post(&s, event(&s, "signed_up", "fe", json!({}), json!({})));
    assert_eq!(pending(&s, "invited"), 1);
    s.stop();
    std::fs::remove_file(s.dir.path().join("rules/invited.toml")).unwrap();
    s.launch();
    s.wait_for("the wait to be dropped", |s| {
        s.get_json("/rules")["waits_of_other_rules"] == json!([])
    });
}

/// One `checkout_started` for each cart, all for one buyer, in one body.
fn checkouts(carts: std::ops::Range<usize>) -> Value {
    let events: Vec<Value> = carts
        .map(|i| {
            json!({
                "event": "checkout_started",
                "uuid": new_uuid(),
                "distinct_id": "kim",
                "properties": { "cart_id": format!("c{i}") },
                "person": { "properties": { "email": "kim@example.com" } },
            })
        })
        .collect();
    Value::Array(events)
}

const QUICK: &str = r#"
name = "quick-abandoned"
[when]
event = "checkout_started"
[wait]
for = "2 seconds"
same = ["distinct_id", "properties.cart_id"]
unless = { event = "order_completed" }
[jsonl]
file = "quick.jsonl"
fields = { cart = "properties.cart_id" }
[email]
to = "{{person.properties.email}}"
subject = "cart {{properties.cart_id}}"
template = "welcome"
"#;

fn quick_server() -> Server {
    Server::start_with(&["--wait-grace", "100ms"], |root: &Path| {
        std::fs::write(root.join("rules/quick.toml"), QUICK).unwrap();
    })
}

/// Every cart's line and email exactly once.
fn assert_each_once(s: &Server, carts: usize) {
    // Lines are synced before their commit, emails queued in it: wait for the commit.
    s.wait_for("every wait to end", |s| {
        let rules = s.rules_status();
        let rules = rules["rules"].as_array().unwrap().clone();
        let rule = rules.iter().find(|r| r["name"] == "quick-abandoned");
        rule.unwrap()["waits"]["pending"] == 0
    });
    let lines = s.jsonl("quick.jsonl");
    let mut seen: Vec<&str> = lines.iter().map(|l| l["cart"].as_str().unwrap()).collect();
    seen.sort();
    seen.dedup();
    assert_eq!((lines.len(), seen.len()), (carts, carts), "no line twice");
    let emails = s.emails();
    let mut subjects: Vec<&str> = emails
        .iter()
        .filter_map(|e| common::header(e, "Subject"))
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(
        (emails.len(), subjects.len()),
        (carts, carts),
        "no email twice"
    );
}

#[test]
fn waits_pending_and_coming_due_during_a_sigkill_end_once_after_restart() {
    let mut s = quick_server();
    let (status, reply) = s.post_json(&checkouts(0..50));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["waiting"].as_array().unwrap().len(), 50);
    s.kill();
    std::thread::sleep(Duration::from_secs(3));
    s.relaunch();
    assert_each_once(&s, 50);
    assert_eq!(
        s.metric("tripline_waits_fired_total{rule=\"quick-abandoned\"}"),
        50.0
    );
    assert_eq!(
        s.metric("tripline_waits_pending{rule=\"quick-abandoned\"}"),
        0.0
    );
}

#[test]
fn a_sigkill_while_waits_are_ending_sends_nothing_twice() {
    let mut s = quick_server();
    for chunk in 0..8 {
        let (status, reply) = s.post_json(&checkouts(chunk * 250..(chunk + 1) * 250));
        assert_eq!(status, 200, "{reply}");
    }
    // The 2,000 waits end in transactions of 500 from about 2.1 s on: kill in the middle.
    s.wait_for("some waits to end", |s| !s.jsonl("quick.jsonl").is_empty());
    s.kill();
    let ended_before = s.jsonl("quick.jsonl").len();
    s.relaunch();
    assert_each_once(&s, 2000);
    eprintln!("{ended_before} of 2000 waits had ended at the SIGKILL");
}

#[test]
fn a_digest_collected_before_a_sigkill_is_sent_once_after_restart_with_every_event() {
    // Sent a few seconds from now (UTC), so the test waits for the real clock.
    let at = (chrono::Utc::now() + chrono::TimeDelta::seconds(4)).format("%H:%M:%S");
    let rule = format!(
        "name = \"digest\"\n[when]\nevent = \"order_completed\"\n\
         [digest]\nevery = \"1 day\"\nat = \"{at}\"\nkeep = 2\n\
         [jsonl]\nfile = \"digest.jsonl\"\nfields = {{ first = \"distinct_id\" }}\n"
    );
    let mut s = Server::start_with(&["--wait-grace", "100ms"], |root: &Path| {
        std::fs::write(root.join("rules/digest.toml"), &rule).unwrap();
    });
    for who in ["a", "b", "c"] {
        let (status, reply) = s.post_json(&json!({
            "event": "order_completed", "uuid": new_uuid(), "distinct_id": who,
        }));
        assert_eq!(
            (status, &reply["collected"]),
            (200, &json!(["digest"])),
            "{reply}"
        );
    }
    s.kill();
    std::thread::sleep(Duration::from_secs(5));
    s.relaunch();
    s.wait_for("the digest to be sent", |s| {
        let rules = s.rules_status();
        let rules = rules["rules"].as_array().unwrap().clone();
        let rule = rules.iter().find(|r| r["name"] == "digest");
        rule.unwrap()["waits"]["pending"] == 0
    });
    // The line is appended just after the commit that ended the digest: between the two, the
    // store says nothing is pending and the appender does not know of the line yet.
    s.wait_for("the digest's line", |s| !s.jsonl("digest.jsonl").is_empty());
    assert_eq!(
        s.jsonl("digest.jsonl"),
        [json!({"first": "a"})],
        "once, on the first event"
    );
    s.kill();
    s.relaunch();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.jsonl("digest.jsonl").len(), 1);
}
