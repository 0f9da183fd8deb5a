//! `GET /aggregates/{rule}`: what `[aggregate]` rules count, read back over HTTP from the real
//! service: the campaign platform's summary shape, days in the rule's time zone, ranges, retried
//! deliveries, a kill, a removed rule, erasure, and bad queries.

mod common;

use common::Server;
use serde_json::{Value, json};
use std::path::Path;

/// The shipped rules and the A/B example (`checkout-experiment`, days in Europe/Paris).
fn start() -> Server {
    let recipe =
        std::fs::read_to_string(common::root().join("examples/rules/checkout_experiment.toml"))
            .unwrap();
    Server::launch(&[], &[], |root: &Path| {
        std::fs::write(root.join("rules/checkout_experiment.toml"), &recipe).unwrap();
    })
}

fn event(uuid: &str, name: &str, who: &str, at: &str, variant: Option<&str>) -> Value {
    let mut properties = json!({"$pathname": "/checkout"});
    if let Some(v) = variant {
        properties["$feature/new-checkout"] = v.into();
    }
    json!({"event": name, "uuid": uuid, "distinct_id": who, "timestamp": at, "properties": properties})
}

fn get(server: &Server, path: &str) -> (u16, Value) {
    let (status, body) = server.get(path);
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// Two days of a test: dana (test) views twice and buys; lee (control) views; kim (test) views;
/// sam (control) buys without having been seen before, the flag on the purchase.
fn send_the_test(server: &Server) {
    for body in [
        // 23:30 UTC on the 1st is 00:30 on the 2nd in Paris.
        event(
            "e1",
            "$pageview",
            "dana",
            "2026-11-01T23:30:00Z",
            Some("test"),
        ),
        event(
            "e2",
            "$pageview",
            "lee",
            "2026-11-01T10:00:00Z",
            Some("control"),
        ),
        event(
            "e3",
            "$pageview",
            "dana",
            "2026-11-02T08:00:00Z",
            Some("test"),
        ),
        event(
            "e4",
            "$pageview",
            "kim",
            "2026-11-02T09:00:00Z",
            Some("test"),
        ),
        // From the server, without the flag: dana's group.
        event("e5", "purchase", "dana", "2026-11-02T12:00:00Z", None),
        event(
            "e6",
            "purchase",
            "sam",
            "2026-11-02T13:00:00Z",
            Some("control"),
        ),
        // Someone outside the test: no flag, no group.
        event("e7", "$pageview", "ana", "2026-11-02T13:00:00Z", None),
    ] {
        let (status, reply) = server.post_json(&body);
        assert_eq!(status, 200, "{reply}");
    }
}

#[test]
fn an_ab_test_reads_as_the_campaign_platforms_summary_with_its_days() {
    let server = start();
    send_the_test(&server);
    // A retried delivery (PostHog sends again when unsure) counts nothing twice.
    let (_, reply) = server.post_json(&event(
        "e5",
        "purchase",
        "dana",
        "2026-11-02T12:00:00Z",
        None,
    ));
    assert_eq!(reply["duplicates"], 1, "{reply}");

    let (status, all) = get(&server, "/aggregates/checkout-experiment?days=true");
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["rule"], "checkout-experiment");
    assert_eq!(all["timezone"], "Europe/Paris");
    assert_eq!(
        (&all["from"], &all["to"]),
        (&json!("2026-11-01"), &json!("2026-11-02"))
    );
    assert_eq!(all["totalEvents"], 6);
    assert_eq!(all["uniqueUsers"], 4);
    assert_eq!(all["usersExact"], true);
    assert_eq!(
        all["variants"],
        json!({
            "test": {"events": 4, "users": 2, "conversions": 1, "conversionRate": 0.5},
            "control": {"events": 2, "users": 2, "conversions": 1, "conversionRate": 0.5},
        })
    );
    assert_eq!(
        all["days"],
        json!([
            {"date": "2026-11-01", "totalEvents": 1, "variants": {
                "control": {"events": 1, "users": 1, "conversions": 0, "conversionRate": 0.0}}},
            {"date": "2026-11-02", "totalEvents": 5, "variants": {
                "control": {"events": 1, "users": 1, "conversions": 1, "conversionRate": 1.0},
                "test": {"events": 4, "users": 2, "conversions": 1, "conversionRate": 0.5}}},
        ])
    );

    // One day: Paris's 2nd holds dana's late view of the 1st (UTC).
    let (_, second) = get(
        &server,
        "/aggregates/checkout-experiment?from=2026-11-02&to=2026-11-02",
    );
    assert_eq!(second["totalEvents"], 5);
    assert_eq!(second["variants"]["test"]["users"], 2);
    assert!(second.get("days").is_none(), "only on request");
    let (_, first) = get(&server, "/aggregates/checkout-experiment?to=2026-11-01");
    assert_eq!(
        first["variants"],
        json!({"control": {"events": 1, "users": 1, "conversions": 0, "conversionRate": 0.0}})
    );
    let (_, none) = get(&server, "/aggregates/checkout-experiment?from=2027-01-01");
    assert_eq!(
        (&none["totalEvents"], &none["variants"]),
        (&json!(0), &json!({}))
    );
    assert_eq!(
        (&none["from"], &none["to"]),
        (&json!("2027-01-01"), &Value::Null)
    );

    // Who is in which group shows with the person.
    let (_, dana) = get(&server, "/users/dana");
    assert_eq!(
        dana["groups"],
        json!([{"rule": "checkout-experiment", "group": "test", "converted": "2026-11-02"}])
    );
}

#[test]
fn counts_survive_a_kill_and_outlive_their_rule() {
    let mut server = start();
    send_the_test(&server);
    server.kill();
    server.relaunch();
    let (_, all) = get(&server, "/aggregates/checkout-experiment");
    assert_eq!(
        (&all["totalEvents"], &all["uniqueUsers"]),
        (&json!(6), &json!(4))
    );

    // The rule is removed: its counts can still be read (with no time zone any more).
    std::fs::remove_file(server.rules.join("checkout_experiment.toml")).unwrap();
    server.wait_for("the rule to go", |s| {
        !s.rule_names().contains(&"checkout-experiment".to_string())
    });
    let (status, all) = get(&server, "/aggregates/checkout-experiment");
    assert_eq!(status, 200, "{all}");
    assert_eq!(
        (&all["totalEvents"], &all["timezone"]),
        (&json!(6), &Value::Null)
    );
}

#[test]
fn erasing_a_person_forgets_their_group_and_takes_them_out_of_the_users() {
    let server = start();
    send_the_test(&server);
    let reply = common::client()
        .delete(format!("{}/users/dana", server.base))
        .send()
        .unwrap();
    assert_eq!(reply.status(), 200);
    let erased: Value = reply.json().unwrap();
    assert_eq!(erased["erased"]["groups"], 1, "{erased}");
    let (_, dana) = get(&server, "/users/dana");
    assert_eq!(dana["groups"], json!([]));
    // She is no longer among the users of any day; her events and conversion stay as numbers.
    let (_, all) = get(&server, "/aggregates/checkout-experiment?days=true");
    assert_eq!(
        (&all["totalEvents"], &all["uniqueUsers"]),
        (&json!(6), &json!(3))
    );
    assert_eq!(all["variants"]["test"]["users"], 1, "kim only");
    assert_eq!(all["variants"]["test"]["conversions"], 1);
    assert_eq!(all["days"][1]["variants"]["test"]["users"], 1);
    // Seen again, she is someone new: her group is the one her event says.
    server.post_json(&event(
        "e9",
        "purchase",
        "dana",
        "2026-11-03T12:00:00Z",
        Some("control"),
    ));
    let (_, third) = get(&server, "/aggregates/checkout-experiment?from=2026-11-03");
    assert_eq!(third["variants"]["control"]["conversions"], 1, "{third}");
}

#[test]
fn bad_queries_say_what_to_change_and_unknown_rules_are_not_found() {
    let server = start();
    for (query, says) in [
        ("?from=2026-13-01", "`from` must be a date such as"),
        ("?to=yesterday", "`to` must be a date such as"),
        ("?from=2026-11-03&to=2026-11-01", "is after `to`"),
        ("?start=2026-11-01", "unknown field `start`"),
        ("?days=yes", "days"),
    ] {
        let (status, body) = get(&server, &format!("/aggregates/checkout-experiment{query}"));
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(says),
            "{query}: {body}"
        );
    }
    // A rule that counts nothing (the shipped power-user email), and one that does not exist.
    for rule in ["power-user-discount", "nope"] {
        let (status, body) = get(&server, &format!("/aggregates/{rule}"));
        assert_eq!(status, 404, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("[aggregate]"),
            "{body}"
        );
    }
}
