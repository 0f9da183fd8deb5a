//! Engine micro-benchmarks (criterion): what one event costs before any I/O.
//!
//!     cargo bench --bench engine            (or bench/engine.sh for the table of ratios)
//!
//! - `decode`: a PostHog webhook-destination body (the shared `generation_failed` fixture) to events.
//! - `decode_unwanted`: the same body when no rule is tried on its event: every field is checked,
//!   nothing is built.
//! - `match/N`: one event through `engine::run` over N rules for N different event names, one of
//!   which matches (a `[when]` property filter and a JSONL line). The index by event name keeps
//!   this flat in N.
//! - `same_event/N`: N rules on the *same* event name, each with a different property filter, one
//!   matching: every one of them is tried, so this grows with N (what the index cannot help).
//! - `counting/*`: one event counted by one rule (fresh state), below `at_least`: today's
//!   `[count]` with `[limits] once_per` (`count`), against the calendar issue's rule, a count per
//!   week in the user's zone with a cap (`count_in_week_capped`), and variants.
//! - `project`: the shipped `training-data` rule's JSONL line for that event.
//! - `render_email`: the shipped `power-user-discount` email (subject, text and HTML bodies,
//!   then the whole message as queued).
//! - `render_http`: the `big-order-slack` example's Slack request for an order (a JSON body of
//!   one templated text, and its idempotency key), as queued; `render_http_typed` a body of
//!   six values, four of them fields kept with their type, and a templated path.

use chrono::Utc;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lettre::message::Mailbox;
use serde_json::Value;
use std::hint::black_box;
use std::path::Path;
use tripline::actions::{Action, Env, Input};
use tripline::engine;
use tripline::ingest::event::{self, BodyLimits, Event};
use tripline::rules::RuleSet;
use tripline::store::MemoryStore;

const SIZES: [usize; 4] = [1, 100, 1_000, 10_000];

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/posthog")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn decode_one(body: &[u8]) -> Event {
    let mut events =
        event::decode(body, Utc::now(), &BodyLimits::LOCAL_FILES).expect("a valid body");
    events.remove(0)
}

/// The fixture's event without its uuid, so running it again and again is never a duplicate.
fn event_without_uuid(name: &str) -> Event {
    let mut body: Value = serde_json::from_slice(&fixture(name)).unwrap();
    body["event"].as_object_mut().unwrap().remove("uuid");
    decode_one(&serde_json::to_vec(&body).unwrap())
}

/// A rules folder with `n` rules; rule `i` selects `event_for(i)` and `properties.model = model_for(i)`.
fn rule_set(
    n: usize,
    event_for: impl Fn(usize) -> String,
    model_for: impl Fn(usize) -> String,
) -> RuleSet {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    let templates = dir.path().join("templates");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::create_dir_all(&templates).unwrap();
    for i in 0..n {
        let text = format!(
            "name = \"rule-{i}\"\n\
             [when]\nevent = \"{}\"\n\"properties.model\" = \"{}\"\n\
             [jsonl]\nfile = \"out-{i}.jsonl\"\n\
             [jsonl.fields]\nwho = \"distinct_id\"\nwhy = {{ from = \"properties.failure_reason\", max_chars = 100 }}\n",
            event_for(i),
            model_for(i)
        );
        std::fs::write(rules.join(format!("rule-{i:05}.toml")), text).unwrap();
    }
    RuleSet::load(&tripline::config::Declared::folders(
        &rules,
        &templates,
        &dir.path().join("data"),
    ))
    .unwrap_or_else(|p| panic!("{p:?}"))
}

/// A rule set of this one rule (and a "marketing" cap group it may name).
fn one_rule(text: &str) -> RuleSet {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(rules.join("r.toml"), text).unwrap();
    let caps = "[marketing]\nat_most = 2\nper_period = \"week\"\n\
                timezone = \"person.properties.$geoip_time_zone\"\ntimezone_fallback = \"UTC\"\n";
    std::fs::write(rules.join("_caps.toml"), caps).unwrap();
    RuleSet::load(&tripline::config::Declared::folders(
        &rules,
        &dir.path().join("templates"),
        &dir.path().join("data"),
    ))
    .unwrap_or_else(|p| panic!("{p:?}"))
}

/// A rule set of this one rule, with the endpoint `chat` declared.
fn http_rule(text: &str) -> RuleSet {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(rules.join("r.toml"), text).unwrap();
    let mut declared = tripline::config::Declared::folders(
        &rules,
        &dir.path().join("templates"),
        &dir.path().join("data"),
    );
    declared.endpoints.insert("chat".into());
    RuleSet::load(&declared).unwrap_or_else(|p| panic!("{p:?}"))
}

fn shipped_rules() -> RuleSet {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = tempfile::tempdir().unwrap();
    RuleSet::load(&tripline::config::Declared::folders(
        &root.join("rules"),
        &root.join("templates"),
        data.path(),
    ))
    .unwrap_or_else(|p| panic!("{p:?}"))
}

fn run_once(rules: &RuleSet, event: &Event, from: &Mailbox) -> usize {
    let mut store = MemoryStore::default();
    let mut effects = Vec::new();
    let env = Env::offline(from);
    let report = engine::run(
        rules,
        std::slice::from_ref(event),
        &mut store,
        &env,
        0,
        &mut effects,
    )
    .unwrap();
    assert_eq!(report.outcomes.len(), 1, "exactly one rule matches");
    effects.len()
}

fn benches(c: &mut Criterion) {
    let body = fixture("generation_failed.json");
    c.bench_function("decode", |b| {
        b.iter(|| event::decode(black_box(&body), Utc::now(), &BodyLimits::LOCAL_FILES).unwrap())
    });
    c.bench_function("decode_unwanted", |b| {
        b.iter(|| {
            let limits = &BodyLimits::LOCAL_FILES;
            event::decode_wanted(black_box(&body), Utc::now(), limits, |_| false).unwrap()
        })
    });

    let from: Mailbox = "tripline <tripline@localhost>".parse().unwrap();
    let event = event_without_uuid("generation_failed.json");
    let model = event.properties["model"].as_str().unwrap().to_string();
    let mut group = c.benchmark_group("match");
    for n in SIZES {
        // Rule n-1 is the one for generation_failed; the others are for other events.
        let rules = rule_set(
            n,
            |i| {
                if i == n - 1 {
                    "generation_failed".into()
                } else {
                    format!("event_{i}")
                }
            },
            |_| model.clone(),
        );
        group.bench_with_input(BenchmarkId::from_parameter(n), &rules, |b, rules| {
            b.iter(|| run_once(rules, black_box(&event), &from))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("same_event");
    for n in [1, 100, 1_000] {
        let rules = rule_set(
            n,
            |_| "generation_failed".into(),
            |i| {
                if i == n - 1 {
                    model.clone()
                } else {
                    format!("model-{i}")
                }
            },
        );
        group.bench_with_input(BenchmarkId::from_parameter(n), &rules, |b, rules| {
            b.iter(|| run_once(rules, black_box(&event), &from))
        });
    }
    group.finish();

    // The cost of counting one event (a fresh state each time): today's [count] with
    // [limits] once_per, then the same per calendar week in each user's zone with a cap instead
    // (the rule of the calendar issue's target), with both, with once a day, and distinct values.
    let used = event_without_uuid("feature_used.json");
    let mut group = c.benchmark_group("counting");
    let week = "in = \"week\"\ntimezone = \"person.properties.$geoip_time_zone\"\ntimezone_fallback = \"Europe/Paris\"\n";
    let once = "once_per = [\"distinct_id\"]\n";
    let cap = "cap_group = \"marketing\"\n";
    let daily = format!(
        "{once}once_per_period = \"day\"\ntimezone = \"person.properties.$geoip_time_zone\"\ntimezone_fallback = \"Europe/Paris\"\n"
    );
    for (name, count, limits) in [
        ("count", "", once.to_string()),
        ("count_in_week_capped", week, cap.to_string()),
        ("count_in_week_capped_once", week, format!("{once}{cap}")),
        ("count_in_week", week, daily),
        (
            "distinct_in_week",
            "distinct = \"properties.feature_name\"\nin = \"week\"\ntimezone = \"Europe/Paris\"\n",
            once.to_string(),
        ),
    ] {
        let rules = one_rule(&format!(
            "name = \"r\"\n[when]\nevent = \"feature_used\"\n\
             [count]\nper = [\"distinct_id\"]\nat_least = 5\n{count}\
             [limits]\n{limits}\
             [jsonl]\nfile = \"o.jsonl\"\nfields = {{ who = \"distinct_id\" }}\n"
        ));
        group.bench_with_input(BenchmarkId::from_parameter(name), &rules, |b, rules| {
            b.iter(|| run_once(rules, black_box(&used), &from))
        });
    }
    group.finish();

    let shipped = shipped_rules();
    let training = shipped
        .rules()
        .iter()
        .find(|r| r.name == "training-data")
        .unwrap();
    let env = Env::offline(&from);
    let input = |event| Input {
        waited: None,
        digest: None,
        rule: "bench",
        event,
        count: Some(5),
        templates: &shipped.templates,
        env: &env,
    };
    let run = |action: &dyn Action, input: &Input| action.run(black_box(input)).unwrap();
    let jsonl = &training.actions[0];
    let projecting = input(&event);
    c.bench_function("project", |b| b.iter(|| run(jsonl.as_ref(), &projecting)));

    let power = shipped
        .rules()
        .iter()
        .find(|r| r.name == "power-user-discount")
        .unwrap();
    let email = &power.actions[0];
    let used = decode_one(&fixture("feature_used.json"));
    let rendering = input(&used);
    c.bench_function("render_email", |b| {
        b.iter(|| run(email.as_ref(), &rendering))
    });

    let order = decode_one(
        br#"{"event":{"uuid":"0197a3f2-6c1e-7b4a-9d2e-3f5a8c7b1e42","event":"order_completed","distinct_id":"user_4471","properties":{"amount":1200,"currency":"EUR","plan":"enterprise","items":3,"paid":true}},"person":{"properties":{"email":"dana@example.com"}}}"#,
    );
    let slack = http_rule(
        "name = \"r\"\n[when]\nevent = \"order_completed\"\n[http]\nendpoint = \"chat\"\n\
         json = { text = \":tada: Big order: {{properties.amount}} {{properties.currency}} from {{distinct_id}} (plan: {{properties.plan}})\" }\n",
    );
    let ordered = input(&order);
    let slack_action = &slack.rules()[0].actions[0];
    let ordered = Input {
        templates: &slack.templates,
        ..ordered
    };
    c.bench_function("render_http", |b| {
        b.iter(|| run(slack_action.as_ref(), &ordered))
    });
    let typed = http_rule(
        "name = \"r\"\n[when]\nevent = \"order_completed\"\n[http]\nendpoint = \"chat\"\n\
         path = \"/orders/{{distinct_id}}\"\n\
         json = { amount = \"{{properties.amount}}\", items = \"{{properties.items}}\", paid = \"{{properties.paid}}\", \
         email = \"{{person.properties.email}}\", note = \"{{properties.plan}} order\", source = \"tripline\" }\n",
    );
    let typed_action = &typed.rules()[0].actions[0];
    let typed_input = Input {
        templates: &typed.templates,
        ..input(&order)
    };
    c.bench_function("render_http_typed", |b| {
        b.iter(|| run(typed_action.as_ref(), &typed_input))
    });
}

criterion_group!(engine_benches, benches);
criterion_main!(engine_benches);
