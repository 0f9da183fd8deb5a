//! Calendar periods through the real server: `once_per_period` in each user's own time zone
//! (from a person property, with a fallback), across the days the clocks change in New York and
//! in Paris, and `[count] in = "day"`.

mod common;

use common::in_process::InProcess;
use common::new_uuid;
use serde_json::{Value, json};

const DAILY: &str = r#"
name = "daily"
[when]
event = "opened"
[limits]
once_per = ["distinct_id"]
once_per_period = "day"
timezone = "person.properties.$geoip_time_zone"
timezone_fallback = "Europe/Paris"
[jsonl]
file = "daily.jsonl"
fields = { who = "distinct_id", at = "timestamp" }
"#;

const SECOND_TODAY: &str = r#"
name = "second-today"
[when]
event = "searched"
[count]
per = ["distinct_id"]
at_least = 2
in = "day"
timezone = "America/New_York"
[jsonl]
file = "second.jsonl"
fields = { at = "timestamp" }
"#;

const CAPS: &str = r#"
[marketing]
at_most = 2
per_period = "week"
timezone = "Europe/Paris"
"#;

/// Two rules in the "marketing" cap group.
fn marketing(name: &str, event: &str) -> String {
    format!(
        "name = \"{name}\"\n[when]\nevent = \"{event}\"\n[limits]\ncap_group = \"marketing\"\n\
         [jsonl]\nfile = \"marketing.jsonl\"\nfields = {{ rule = \"event\", who = \"distinct_id\" }}\n"
    )
}

const OFFICE: &str = r#"
name = "office"
[when]
event = "payment_failed"
[send_window]
days = ["mon", "tue", "wed", "thu", "fri"]
hours = "09:00-18:00"
timezone = "Europe/Paris"
[jsonl]
file = "office.jsonl"
fields = { who = "distinct_id" }
"#;

fn server() -> InProcess {
    server_at("2026-12-01T00:00:00Z")
}

fn server_at(now: &str) -> InProcess {
    // The clock is after every event, so none is clamped as coming from the future.
    InProcess::start_with(&[], now.parse().unwrap(), |root| {
        std::fs::write(root.join("rules/office.toml"), OFFICE).unwrap();
        std::fs::write(root.join("rules/daily.toml"), DAILY).unwrap();
        std::fs::write(root.join("rules/second.toml"), SECOND_TODAY).unwrap();
        std::fs::write(root.join("rules/_caps.toml"), CAPS).unwrap();
        std::fs::write(root.join("rules/promo_a.toml"), marketing("promo-a", "a")).unwrap();
        std::fs::write(root.join("rules/promo_b.toml"), marketing("promo-b", "b")).unwrap();
    })
}

fn send(s: &InProcess, name: &str, who: &str, zone: Option<&str>, at: &str) -> Value {
    let person = zone.map_or(json!({}), |z| json!({ "$geoip_time_zone": z }));
    let (status, reply) = s.post_json(&json!({
        "event": name, "uuid": new_uuid(), "distinct_id": who, "timestamp": at,
        "person": { "properties": person },
    }));
    assert_eq!(status, 200, "{reply}");
    reply["fired"].clone()
}

#[test]
fn once_a_day_is_once_in_each_users_own_day_across_the_clock_changes() {
    let s = server();
    let ny = Some("America/New_York");
    // New York leaves daylight saving on 2026-11-01 at 06:00 UTC: that day has 25 hours.
    assert_eq!(
        send(&s, "opened", "ann", ny, "2026-11-01T03:30:00Z"),
        json!(["daily"])
    ); // Oct 31, 23:30
    assert_eq!(
        send(&s, "opened", "ann", ny, "2026-11-01T04:30:00Z"),
        json!(["daily"])
    ); // Nov 1, 00:30
    assert_eq!(
        send(&s, "opened", "ann", ny, "2026-11-02T04:30:00Z"),
        json!([])
    ); // Nov 1, 23:30
    assert_eq!(
        send(&s, "opened", "ann", ny, "2026-11-02T05:30:00Z"),
        json!(["daily"])
    ); // Nov 2, 00:30
    // No zone on the person: the fallback, Paris, which starts daylight saving on 2026-03-29.
    assert_eq!(
        send(&s, "opened", "bo", None, "2026-03-28T22:30:00Z"),
        json!(["daily"])
    ); // Mar 28, 23:30
    assert_eq!(
        send(&s, "opened", "bo", None, "2026-03-28T23:30:00Z"),
        json!(["daily"])
    ); // Mar 29, 00:30
    assert_eq!(
        send(&s, "opened", "bo", None, "2026-03-29T21:30:00Z"),
        json!([])
    ); // Mar 29, 23:30 (23 h day)
    // A zone that is not one: the fallback too.
    assert_eq!(
        send(
            &s,
            "opened",
            "cy",
            Some("Mars/Base"),
            "2026-03-29T21:30:00Z"
        ),
        json!(["daily"])
    );
    assert_eq!(
        send(
            &s,
            "opened",
            "cy",
            Some("Mars/Base"),
            "2026-03-29T22:30:00Z"
        ),
        json!(["daily"])
    ); // Mar 30 in Paris
    assert_eq!(s.jsonl("daily.jsonl").len(), 7);
}

#[test]
fn a_count_in_a_day_starts_again_at_midnight_where_the_rule_says() {
    let s = server();
    // 23:00 and 23:50 on Nov 1 in New York (UTC-5): the second fires.
    assert_eq!(
        send(&s, "searched", "di", None, "2026-11-02T04:00:00Z"),
        json!([])
    );
    assert_eq!(
        send(&s, "searched", "di", None, "2026-11-02T04:50:00Z"),
        json!(["second-today"])
    );
    // 00:10 on Nov 2: a new day, the first again.
    assert_eq!(
        send(&s, "searched", "di", None, "2026-11-02T05:10:00Z"),
        json!([])
    );
    assert_eq!(
        s.jsonl("second.jsonl"),
        [json!({"at": "2026-11-02T04:50:00Z"})]
    );
}

#[test]
fn a_held_back_action_is_never_silent() {
    let s = server();
    let at = "2026-06-01T10:00:00Z";
    send(&s, "opened", "eve", None, at);
    let (_, reply) = s.post_json(&json!({
        "event": "opened", "uuid": new_uuid(), "distinct_id": "eve", "timestamp": at,
    }));
    assert_eq!(reply["fired"], json!([]), "{reply}");
    assert_eq!(reply["suppressed"], json!(["daily"]), "{reply}");
    let rules = s.get_json("/rules");
    let daily = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "daily");
    assert_eq!(
        daily.unwrap()["suppressed"],
        json!({ "limits": 1 }),
        "{rules}"
    );
}

#[test]
fn a_cap_shared_by_two_rules_holds_both_back_for_the_rest_of_the_week() {
    let s = server();
    // Wednesday and Thursday of the week of 2026-06-01 (a Monday), Paris time.
    assert_eq!(
        send(&s, "a", "fay", None, "2026-06-03T10:00:00Z"),
        json!(["promo-a"])
    );
    assert_eq!(
        send(&s, "b", "fay", None, "2026-06-03T11:00:00Z"),
        json!(["promo-b"])
    );
    assert_eq!(
        send(&s, "a", "fay", None, "2026-06-04T10:00:00Z"),
        json!([])
    );
    let (_, reply) = s.post_json(&json!({
        "event": "b", "uuid": new_uuid(), "distinct_id": "fay", "timestamp": "2026-06-07T21:30:00Z",
    }));
    assert_eq!(
        reply["suppressed"],
        json!(["promo-b"]),
        "Sunday 23:30 in Paris: {reply}"
    );
    // Another user is not held back; the next week (Monday 00:30 in Paris) neither.
    assert_eq!(
        send(&s, "b", "gus", None, "2026-06-04T10:00:00Z"),
        json!(["promo-b"])
    );
    assert_eq!(
        send(&s, "b", "fay", None, "2026-06-07T22:30:00Z"),
        json!(["promo-b"])
    );
    assert_eq!(s.jsonl("marketing.jsonl").len(), 4);
    let rules = s.get_json("/rules");
    let held = |name: &str| {
        let rule = rules["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name);
        rule.unwrap()["suppressed"].clone()
    };
    assert_eq!(
        (held("promo-a"), held("promo-b")),
        (json!({"cap": 1}), json!({"cap": 1}))
    );
}

const HELD_BACK: &str = r#"
name = "held-back"
[when]
event = "$tripline_suppressed"
[jsonl]
file = "held_back.jsonl"
fields = { rule = "properties.rule", reason = "properties.reason", group = "properties.cap_group", event = "properties.event", who = "distinct_id", at = "timestamp" }
"#;

#[test]
fn a_rule_about_held_back_rules_sees_each_time_once_and_only_tripline_makes_those_events() {
    let s = InProcess::start_with(&[], "2026-12-01T00:00:00Z".parse().unwrap(), |root| {
        std::fs::write(root.join("rules/_caps.toml"), CAPS).unwrap();
        std::fs::write(root.join("rules/promo_a.toml"), marketing("promo-a", "a")).unwrap();
        std::fs::write(root.join("rules/daily.toml"), DAILY).unwrap();
        std::fs::write(root.join("rules/held_back.toml"), HELD_BACK).unwrap();
    });
    let at = "2026-06-03T10:00:00Z";
    send(&s, "a", "ivy", None, at);
    send(&s, "a", "ivy", None, at);
    send(&s, "opened", "ivy", None, at);
    // The third "a" of the week is capped, the second "opened" of the day held back by [limits]:
    // each makes one event for the rule about them, in the same reply.
    let capped = json!({"event": "a", "uuid": new_uuid(), "distinct_id": "ivy", "timestamp": at});
    let (_, reply) = s.post_json(&capped);
    assert_eq!(reply["suppressed"], json!(["promo-a"]), "{reply}");
    assert_eq!(reply["fired"], json!(["held-back"]), "{reply}");
    let (_, reply) = s.post_json(&json!([
        {"event": "opened", "uuid": new_uuid(), "distinct_id": "ivy", "timestamp": at},
    ]));
    assert_eq!(reply["fired"], json!(["held-back"]), "{reply}");
    // A retried delivery is not held back a second time, so it makes no second event.
    let (_, reply) = s.post_json(&capped);
    assert_eq!(reply["fired"], json!([]), "{reply}");
    // One a sender posts under that name is not tripline's: the rule does not act on it.
    let (status, reply) = s.post_json(&json!({
        "event": "$tripline_suppressed", "uuid": new_uuid(), "distinct_id": "ivy",
        "properties": {"rule": "promo-a", "reason": "cap"},
    }));
    assert_eq!((status, &reply["fired"]), (200, &json!([])), "{reply}");
    assert_eq!(
        s.jsonl("held_back.jsonl"),
        [
            json!({"rule": "promo-a", "reason": "cap", "group": "marketing", "event": "a", "who": "ivy", "at": at}),
            json!({"rule": "daily", "reason": "limits", "group": null, "event": "opened", "who": "ivy", "at": at}),
        ]
    );
}

#[test]
fn an_action_outside_its_send_window_is_held_and_runs_once_when_it_opens() {
    // Saturday 2026-03-07, 11:00 in Paris.
    let mut s = server_at("2026-03-07T10:00:00Z");
    let (_, reply) = s.post_json(&json!({
        "event": "payment_failed", "uuid": new_uuid(), "distinct_id": "hal",
        "timestamp": "2026-03-07T10:00:00Z",
    }));
    assert_eq!(reply["held"], json!(["office"]), "{reply}");
    assert_eq!(reply["fired"], json!([]), "{reply}");
    // Kept across a restart; Sunday evening, still held.
    s.restart();
    s.clock.advance(std::time::Duration::from_secs(30 * 3600));
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(s.jsonl("office.jsonl").is_empty());
    // Monday 09:00 in Paris (08:00 UTC) and the grace period: sent, once.
    s.clock.advance_to("2026-03-09T08:00:11Z".parse().unwrap());
    s.wait_for("the held action to run", |s| {
        let rules = s.get_json("/rules");
        let office = rules["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "office");
        office.unwrap()["waits"]["pending"] == 0
    });
    assert_eq!(s.jsonl("office.jsonl"), [json!({"who": "hal"})]);
    s.restart();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(s.jsonl("office.jsonl").len(), 1);
}
