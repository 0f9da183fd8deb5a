//! Bad input tried, not assumed: random and mutated payloads and rule files. Whatever comes in,
//! nothing panics; a body is either events or a specific refusal (and over HTTP a 4xx), a rule
//! file either a rule or diagnostics that point inside the file.

mod common;

use common::{Server, root};
use proptest::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tripline::actions::Env;
use tripline::actions::email::templates::Templates;
use tripline::engine;
use tripline::ingest::event::{self, BodyLimits};
use tripline::rules::RuleSet;
use tripline::rules::compile::compile;
use tripline::store::MemoryStore;

/// The fixtures every payload property starts from: PostHog's own bodies, malformed ones included.
fn payload_seeds() -> Vec<Vec<u8>> {
    let dir = root().join("tests/fixtures/posthog");
    let mut seeds: Vec<Vec<u8>> = files_in(&dir, "json")
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    seeds.extend(
        files_in(&dir.join("malformed"), "")
            .iter()
            .map(|p| std::fs::read(p).unwrap()),
    );
    assert!(seeds.len() > 10);
    seeds
}

/// Every shipped and example rule file (not their tests).
fn rule_seeds() -> Vec<(PathBuf, String)> {
    let mut files = files_in(&root().join("rules"), "toml");
    files.extend(files_in(&root().join("examples/rules"), "toml"));
    files
        .into_iter()
        .filter(|p| !p.to_string_lossy().ends_with(".test.toml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect()
}

fn files_in(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.to_string_lossy().ends_with(ext))
        .collect();
    files.sort();
    files
}

/// Byte-level mutations, as a fuzzer makes them.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    Duplicate(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (
            any::<usize>(),
            prop::sample::select(b"{}[]\",:0-.e\\ntu \x00\xff".to_vec())
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1..64usize).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match *m {
            Mutation::Flip(i, b) if !bytes.is_empty() => bytes[i % len] ^= b,
            Mutation::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
            Mutation::Delete(i) if !bytes.is_empty() => {
                bytes.remove(i % len);
            }
            Mutation::Truncate(i) => bytes.truncate(i % (bytes.len() + 1)),
            Mutation::Duplicate(i, n) if !bytes.is_empty() => {
                let start = i % len;
                let end = (start + n).min(bytes.len());
                let copy = bytes[start..end].to_vec();
                bytes.splice(start..start, copy);
            }
            _ => {}
        }
    }
    bytes
}

/// Any JSON value, nested a little.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,20}".prop_map(Value::from),
        prop::sample::select(vec![
            "event",
            "uuid",
            "properties",
            "person",
            "batch",
            "$set"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "event",
                        "uuid",
                        "distinct_id",
                        "timestamp",
                        "properties",
                        "person",
                        "batch",
                        "name",
                        "text",
                        "hook",
                        "data",
                        "x",
                    ]),
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

/// The shipped rules, loaded once.
fn shipped_rules() -> &'static RuleSet {
    static RULES: OnceLock<RuleSet> = OnceLock::new();
    RULES.get_or_init(|| {
        let data = tempfile::tempdir().unwrap();
        RuleSet::load(&tripline::config::Declared::folders(
            &root().join("rules"),
            &root().join("templates"),
            data.path(),
        ))
        .unwrap_or_else(|p| panic!("{p:?}"))
    })
}

/// Decodes `body` like the server does and, if it holds events, runs them through the shipped
/// rules in memory. Returns whether it was accepted.
fn handle(body: &[u8]) -> bool {
    let limits = BodyLimits {
        max_depth: 32,
        max_events: 1000,
        max_clock_skew: Some(event::DEFAULT_CLOCK_SKEW),
    };
    match event::decode(body, chrono::Utc::now(), &limits) {
        Ok(events) => {
            assert!(!events.is_empty(), "accepted bodies hold events");
            let mut store = MemoryStore::default();
            let from = "t <t@localhost>".parse().unwrap();
            let mut effects = Vec::new();
            let env = Env::offline(&from);
            engine::run(shipped_rules(), &events, &mut store, &env, 0, &mut effects).unwrap();
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        handle(&body);
    }

    #[test]
    fn mutated_fixtures_never_panic(
        seed in prop::sample::select(payload_seeds()),
        mutations in prop::collection::vec(mutation(), 1..8),
    ) {
        handle(&mutate(seed, &mutations));
    }

    #[test]
    fn random_json_in_every_shape_never_panics(value in json_value()) {
        handle(value.to_string().as_bytes());
        handle(serde_json::json!({"event": value.clone(), "person": value.clone()}).to_string().as_bytes());
        handle(serde_json::json!({"event": "x", "properties": value.clone()}).to_string().as_bytes());
        handle(serde_json::json!({"batch": [value]}).to_string().as_bytes());
    }

    #[test]
    fn nesting_beyond_the_limit_is_refused_not_crashed_on(depth in 1..400usize) {
        let body = format!(r#"{{"event":"x","properties":{{"a":{}1{}}}}}"#, "[".repeat(depth), "]".repeat(depth));
        let accepted = handle(body.as_bytes());
        prop_assert_eq!(accepted, depth + 3 <= 32, "depth {}", depth);
    }
}

/// Compiles `text` as a rule file and checks every diagnostic points inside it.
fn compile_checked(file: &Path, text: &str) {
    let (mut templates, _) = Templates::load(&root().join("templates"));
    if let Err(problems) = compile(
        file,
        text,
        &mut templates,
        &Default::default(),
        &Default::default(),
    ) {
        assert!(!problems.is_empty(), "an error has at least one diagnostic");
        let lines = text.lines().count().max(1);
        for p in &problems {
            assert!(
                p.line >= 1 && p.line <= lines + 1,
                "line {} of {lines}: {p:?}",
                p.line
            );
            assert!(p.column >= 1, "{p:?}");
            assert!(!p.message.is_empty());
            let _ = p.render();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn mutated_rule_files_give_a_rule_or_diagnostics_inside_the_file(
        seed in prop::sample::select(rule_seeds()),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let (file, text) = seed;
        let mutated = String::from_utf8_lossy(&mutate(text.into_bytes(), &mutations)).into_owned();
        compile_checked(&file, &mutated);
    }

    #[test]
    fn random_text_as_a_rule_file_never_panics(text in "\\PC{0,300}") {
        compile_checked(Path::new("rules/random.toml"), &text);
    }

    #[test]
    fn rule_files_from_random_lines_never_panic(
        lines in prop::collection::vec(prop::sample::select(vec![
            "name = \"r\"", "[when]", "event = \"x\"", "event = [\"a\", 1]", "[count]",
            "per = [\"distinct_id\"]", "per = [\"persn.x\"]", "at_least = 5", "at_least = -1",
            "at_least = \"five\"", "within = \"7 days\"", "within = \"soon\"", "[limits]",
            "once_per = [\"distinct_id\"]", "again_after = \"1h\"", "[email]",
            "to = \"{{person.properties.email}}\"", "subject = \"{{#if}}\"", "template = \"power_user\"",
            "template = \"../etc/passwd\"", "[jsonl]", "file = \"../x.jsonl\"", "file = \"out.jsonl\"",
            "fields = { a = \"properties.a\" }", "\"properties.x\" = { matches = \"(\" }",
            "\"properties.x\" = { matches = \"a{1000}{1000}\" }", "\"properties.y\" = { gt = 5, lt = \"z\" }",
            "any = [ { event = \"a\" } ]", "not = { x = 1 }", "= broken", "[[when]]",
        ]), 0..20),
    ) {
        compile_checked(Path::new("rules/lines.toml"), &lines.join("\n"));
    }
}

/// Over HTTP, a sample of mutated fixtures: every answer is 200 or a 4xx, and the server lives on.
#[test]
fn mutated_fixtures_over_http_get_200_or_a_4xx() {
    let server = Server::start();
    let seeds = payload_seeds();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    let strategy = (
        prop::sample::select(seeds),
        prop::collection::vec(mutation(), 1..6),
    );
    runner
        .run(&strategy, |(seed, mutations)| {
            let body = mutate(seed, &mutations);
            let (status, reply) = server.post(body);
            prop_assert!(
                status == 200 || (400..500).contains(&status),
                "{status}: {reply}"
            );
            Ok(())
        })
        .unwrap();
    assert_eq!(server.get("/healthz").0, 200);
}
