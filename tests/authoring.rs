//! The rule author's commands, run as the real binary: `tripline check`, `tripline test` and
//! `tripline replay`, and the recipes of docs/RULES.md.

mod common;

use common::root;
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

/// Runs `tripline ARGS` in `dir`.
fn tripline(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tripline"))
        .current_dir(dir)
        .args(args)
        .env_remove("TRIPLINE_LOG")
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A folder with `rules/`, `templates/` and the given files in them.
fn project(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::create_dir(dir.path().join("templates")).unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

const GOOD_TEMPLATE: (&str, &str) = ("templates/hello.text.hbs", "Hi {{person.properties.name}}");

/// One broken file of every kind, and what `tripline check` says about each.
#[test]
fn check_reports_every_kind_of_broken_file() {
    let dir = project(&[
        GOOD_TEMPLATE,
        (
            "rules/a_syntax.toml",
            "name = \"a\"\n[when\nevent = \"x\"\n",
        ),
        (
            "rules/b_typo_key.toml",
            "name = \"b\"\n[when]\nevent = \"x\"\n[count]\nper = [\"distinct_id\"]\nat_lest = 5\n[jsonl]\nfile = \"b.jsonl\"\nfields = { who = \"distinct_id\" }\n",
        ),
        (
            "rules/c_semantics.toml",
            "name = \"c\"\n[when]\nevent = \"x\"\n\"propreties.plan\" = \"pro\"\n\"properties.v\" = { matches = \"v(\\\\d+\" }\n[count]\nper = [\"distinct_id\"]\nat_least = 0\nwithin = \"1 fortnight\"\n[jsonl]\nfile = \"../outside.jsonl\"\nfields = { who = \"distinct_id\" }\n",
        ),
        (
            "rules/c_typo_operator.toml",
            "name = \"c2\"\n[when]\nevent = \"x\"\n\"properties.n\" = { gtt = 5 }\n",
        ),
        (
            "rules/d_wrong_type.toml",
            "name = \"d\"\n[when]\nevent = \"x\"\n[count]\nper = [\"distinct_id\"]\nat_least = \"five\"\n",
        ),
        (
            "rules/e_email.toml",
            "name = \"e\"\n[when]\nevent = \"x\"\n[email]\nto = \"{{person.properties.emial}}\"\nsubject = \"{{count}} uses\"\ntemplate = \"helo\"\n",
        ),
        (
            "rules/f_template_fields.toml",
            "name = \"f\"\n[when]\nevent = \"x\"\n[limits]\nonce_per = [\"distinct_id\"]\nagain_after = \"a week\"\n[email]\nto = \"a@example.com\"\nsubject = \"s\"\ntemplate = \"fields\"\n",
        ),
        (
            "templates/fields.text.hbs",
            "Hi {{persn.properties.name}},\n{{log properties.x}} {{> footer}}\n",
        ),
        ("templates/broken.text.hbs", "Hi\n{{#if x}}never closed\n"),
        (
            "rules/g_no_event_no_action.toml",
            "name = \"g\"\n[when]\n\"properties.a\" = 1\n",
        ),
        (
            "rules/h_good.toml",
            "name = \"h\"\n[when]\nevent = \"y\"\n[jsonl]\nfile = \"h.jsonl\"\nfields = { who = \"distinct_id\" }\n",
        ),
        (
            "rules/h_same_name.toml",
            "name = \"h\"\n[when]\nevent = \"y\"\n[jsonl]\nfile = \"h.jsonl\"\nfields = { who = \"distinct_id\" }\n",
        ),
        (
            "rules/i.test.toml",
            "[[test]]\nname = \"t\"\n[[test.events]]\nevent = \"x\"\nrepeat = 2\n[test.expect]\nfierd = []\n",
        ),
        (
            "rules/j.test.toml",
            "[[test]]\nname = \"t\"\n[[test.events]]\nfile = \"missing.json\"\n[test.expect]\nfired = []\n",
        ),
    ]);
    let out = tripline(dir.path(), &["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    insta::assert_snapshot!(stderr(&out));
}

#[test]
fn check_exit_code_is_zero_for_good_files_and_prints_the_hash() {
    let dir = project(&[
        GOOD_TEMPLATE,
        (
            "rules/r.toml",
            "name = \"r\"\n[when]\nevent = \"x\"\n[email]\nto = \"a@example.com\"\nsubject = \"s\"\ntemplate = \"hello\"\n",
        ),
    ]);
    let out = tripline(dir.path(), &["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("ok: 1 rules, 0 tests; no HTTP endpoints declared; rule set hash "),
        "{text}"
    );
    // The hash changes with the files.
    std::fs::write(dir.path().join("templates/hello.text.hbs"), "Hello").unwrap();
    assert_ne!(stdout(&tripline(dir.path(), &["check"])), text);
}

const COUNTING_RULE: &str = r#"
name = "third-use"
[when]
event = "used"
[count]
per = ["distinct_id"]
at_least = 3
[limits]
once_per = ["distinct_id"]
[email]
to = "{{person.properties.email}}"
subject = "Third use of {{properties.what}}"
template = "hello"
"#;

#[test]
fn test_command_passes_and_fails_with_the_difference() {
    let passing = r#"
[[test]]
name = "the third use sends one email"
[[test.events]]
event = "used"
distinct_id = "u1"
properties = { what = "export" }
person = { properties = { email = "dana@example.com", name = "Dana" } }
repeat = 4
[test.expect]
fired = ["third-use"]
emails = [ { to = "dana@example.com", subject = "Third use of export", body_contains = ["Hi Dana"] } ]
"#;
    let failing = r#"
[[test]]
name = "wrongly expects the second use to send"
[[test.events]]
event = "used"
distinct_id = "u1"
properties = { what = "export" }
person = { properties = { email = "dana@example.com", name = "Dana" } }
repeat = 2
[test.expect]
fired = ["third-use"]
"#;
    let dir = project(&[
        GOOD_TEMPLATE,
        ("rules/third.toml", COUNTING_RULE),
        ("rules/third.test.toml", passing),
    ]);
    let out = tripline(dir.path(), &["test"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        stdout(&out),
        "rules/third.test.toml\n  ok    the third use sends one email\n1 passed, 0 failed\n"
    );

    std::fs::write(dir.path().join("rules/wrong.test.toml"), failing).unwrap();
    let out = tripline(dir.path(), &["test"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains(
            "  FAIL  wrongly expects the second use to send\n        expected these rules to act: third-use\n          but these did: (none)\n"
        ),
        "{text}"
    );
    assert!(text.ends_with("1 passed, 1 failed\n"), "{text}");

    // Only the files asked for, as JSON lines for programs.
    let out = tripline(
        dir.path(),
        &["test", "rules/wrong.test.toml", "--format", "json"],
    );
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(
        lines[0]["test"],
        json!("wrongly expects the second use to send")
    );
    assert_eq!(lines[0]["passed"], json!(false));

    // A directory with no test files is a failure, not a silent pass.
    let empty = project(&[GOOD_TEMPLATE, ("rules/third.toml", COUNTING_RULE)]);
    let out = tripline(empty.path(), &["test"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no test files found"),
        "{}",
        stderr(&out)
    );
}

/// Writes `n` events as JSON lines: user `i % users` uses feature `i % 2`, with an email; every
/// 10th event is a `generation_failed`; the last line repeats the first event's uuid.
fn generate_events(path: &Path, n: usize, users: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..n {
        let event = if i % 10 == 0 {
            json!({"event": "generation_failed", "uuid": format!("e{i}"), "distinct_id": format!("u{}", i % users),
                   "timestamp": "2026-01-01T00:00:00Z",
                   "properties": {"failure_reason": "timeout", "input_prompt": "draw a house"}})
        } else {
            json!({"event": {"event": "feature_used", "uuid": format!("e{i}"), "distinct_id": format!("u{}", i % users),
                   "properties": {"feature_name": format!("f{}", i % 2)}},
                   "person": {"properties": {"email": format!("u{}@example.com", i % users)}}})
        };
        writeln!(f, "{event}").unwrap();
    }
    writeln!(f, "{}", json!({"event": "generation_failed", "uuid": "e0"})).unwrap();
    writeln!(f, "{{not json").unwrap();
}

/// The replay table's row for `rule`: matched, fired, counting, held back, no key, failed.
fn row(text: &str, rule: &str) -> Vec<u64> {
    let line = text
        .lines()
        .find(|l| l.starts_with(rule))
        .unwrap_or_else(|| panic!("no row for {rule}:\n{text}"));
    line.split_whitespace()
        .skip(1)
        .map(|n| n.replace(',', "").parse().unwrap())
        .collect()
}

#[test]
fn replay_of_100000_events_gives_the_known_counts() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    generate_events(&events, 100_000, 1_000);
    let rules = root().join("rules");
    let templates = root().join("templates");
    let out = tripline(
        dir.path(),
        &[
            "replay",
            events.to_str().unwrap(),
            "--rules",
            rules.to_str().unwrap(),
            "--templates",
            templates.to_str().unwrap(),
        ],
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    // 100,000 + the repeated one; the broken line is reported with its number.
    assert!(text.starts_with("Replayed 100,001 events from"), "{text}");
    assert!(text.contains("1 repeated event ids skipped"), "{text}");
    assert!(text.contains("line 100002: "), "{text}");
    // Event i is user i % 1000's, so users whose number is a multiple of 10 only fail
    // generations, and each other user (900) uses one feature 100 times: 4 counted, the 5th
    // fires, 95 held back by once_per.
    assert_eq!(
        row(&text, "power-user-discount"),
        [90_000, 900, 900 * 4, 900 * 95, 0, 0]
    );
    assert_eq!(row(&text, "training-data"), [10_000, 10_000, 0, 0, 0, 0]);
    assert!(
        text.contains("Dry run: nothing was written or sent."),
        "{text}"
    );
    assert!(!dir.path().join("data").exists());
}

#[test]
fn replaying_history_longer_than_the_retention_again_adds_nothing() {
    // The replay's clock follows the events' times: ids of the file's early events must not be
    // forgotten by the time its late ones are replayed.
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let mut text = String::new();
    // Each dated event in a batch of its own: replay reads 1,024 lines at a time.
    let filler = format!("{}\n", json!({"event": "$pageview", "distinct_id": "u"})).repeat(1100);
    for (i, day) in ["2026-01-01", "2026-01-20", "2026-02-10", "2027-06-01"]
        .iter()
        .enumerate()
    {
        let event = json!({"event": "generation_failed", "uuid": format!("h{i}"), "distinct_id": "u",
                           "timestamp": format!("{day}T00:00:00Z"), "properties": {"failure_reason": "timeout"}});
        text.push_str(&format!("{event}\n"));
        text.push_str(&filler);
    }
    std::fs::write(&events, text).unwrap();
    let out_dir = dir.path().join("out");
    let run = || {
        let args = [
            "replay",
            events.to_str().unwrap(),
            "--execute-into",
            out_dir.to_str().unwrap(),
        ];
        let out = tripline(&root(), &args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}{}",
            stdout(&out),
            stderr(&out)
        );
        out
    };
    run();
    let lines = std::fs::read_to_string(out_dir.join("training_data.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4);
    assert_nothing_added(&run(), "4 repeated event ids skipped", &out_dir, &lines);
}

/// A second replay into `out_dir` said it skipped the ids (`skipped`) and wrote no line.
fn assert_nothing_added(again: &std::process::Output, skipped: &str, out_dir: &Path, lines: &str) {
    assert!(stdout(again).contains(skipped), "{}", stdout(again));
    assert_eq!(
        std::fs::read_to_string(out_dir.join("training_data.jsonl")).unwrap(),
        lines
    );
}

#[test]
fn replay_can_execute_into_a_separate_folder_once() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    generate_events(&events, 2_000, 100);
    let run = || {
        tripline(
            &root(),
            &[
                "replay",
                events.to_str().unwrap(),
                "--execute-into",
                dir.path().join("out").to_str().unwrap(),
            ],
        )
    };
    let out = run();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let out_dir = dir.path().join("out");
    let lines = std::fs::read_to_string(out_dir.join("training_data.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 200);
    // 90 of the 100 users use one feature 20 times each: 90 emails.
    let emails = std::fs::read_dir(out_dir.join("outbox")).unwrap().count();
    assert_eq!(emails, 90);
    // Running it again changes nothing: every event id was handled.
    assert_nothing_added(&run(), "2,001 repeated event ids skipped", &out_dir, &lines);
    assert_eq!(
        std::fs::read_dir(out_dir.join("outbox")).unwrap().count(),
        90
    );
}

#[test]
fn replay_ends_waits_as_history_passes_their_deadlines_and_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let checkout = |uuid: &str, who: &str, cart: &str, at: &str| {
        format!(
            r#"{{"event":"checkout_started","uuid":"{uuid}","distinct_id":"{who}","timestamp":"2026-01-01T{at}:00Z","properties":{{"cart_id":"{cart}","item_count":1,"total":5,"currency":"EUR"}},"person":{{"properties":{{"email":"{who}@example.com"}}}}}}"#
        )
    };
    let lines = [
        checkout("a1", "u1", "c1", "10:00"),
        checkout("a2", "u2", "c2", "10:01"),
        r#"{"event":"order_completed","uuid":"a3","distinct_id":"u2","timestamp":"2026-01-01T10:05:00Z","properties":{"cart_id":"c2"}}"#.to_string(),
        // History reaches 12:00: c1's wait (due 10:30) ends before this event; c3's is pending
        // at the end of the file.
        checkout("a4", "u3", "c3", "12:00"),
    ];
    std::fs::write(&events, lines.join("\n") + "\n").unwrap();
    let folders = [
        "--config",
        "examples/tripline.toml",
        "--rules",
        "examples/rules",
        "--templates",
        "examples/templates",
    ];
    let out = tripline(
        &root(),
        &[&["replay", events.to_str().unwrap()][..], &folders].concat(),
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    // matched, fired, counting, held back, no key, failed
    assert_eq!(
        row(&text, "checkout-abandoned"),
        [4, 1, 0, 0, 0, 0],
        "{text}"
    );
    // The waits table: started, cancelled, fired, ended, held, pending.
    let waits = &text[text.find("\nwaits ").expect("a table of waits")..];
    assert_eq!(
        row(waits, "checkout-abandoned"),
        [3, 1, 1, 0, 0, 1],
        "{text}"
    );
    let into = dir.path().join("out");
    let args = [
        "replay",
        events.to_str().unwrap(),
        "--execute-into",
        into.to_str().unwrap(),
    ];
    // Written files need the operator's key for the example that hashes ids; without it the
    // replay refuses to start (checked first).
    let out = tripline(&root(), &[&args[..], &folders].concat());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("TRIPLINE_HASH_KEY is not set"),
        "{}",
        stderr(&out)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tripline"))
        .current_dir(root())
        .args([&args[..], &folders].concat())
        .env_remove("TRIPLINE_LOG")
        .env("TRIPLINE_HASH_KEY", "a-key-for-this-replay-only")
        .output()
        .unwrap();
    let text = stdout(&out);
    let waits = &text[text.find("\nwaits ").expect("a table of waits")..];
    assert_eq!(
        row(waits, "checkout-abandoned"),
        [3, 1, 1, 0, 0, 1],
        "{text}"
    );
    let emails: Vec<_> = std::fs::read_dir(into.join("outbox")).unwrap().collect();
    assert_eq!(emails.len(), 1, "the one abandoned cart's reminder");
}

#[test]
fn replay_refuses_the_service_data_folder_and_reports_a_missing_file() {
    let out = tripline(&root(), &["replay", "nope.jsonl"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot open nope.jsonl"),
        "{}",
        stderr(&out)
    );
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("e.jsonl");
    generate_events(&events, 10, 1);
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let out = tripline(
        &root(),
        &[
            "replay",
            events.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--execute-into",
            data.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is the service's data folder"),
        "{}",
        stderr(&out)
    );
    assert!(!data.join("tripline.redb").exists());
}

#[test]
fn every_recipe_passes_check_and_its_tests_and_each_test_file_makes_its_rule_fire() {
    // The examples name HTTP endpoints, declared in their configuration file.
    for (rules, templates, config) in [
        ("rules", "templates", None),
        (
            "examples/rules",
            "examples/templates",
            Some("examples/tripline.toml"),
        ),
    ] {
        let mut args = vec!["--rules", rules, "--templates", templates];
        args.extend(config.iter().flat_map(|c| ["--config", c]));
        let out = tripline(&root(), &[&["check"][..], &args].concat());
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let out = tripline(&root(), &[&["test"][..], &args].concat());
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}{}",
            stdout(&out),
            stderr(&out)
        );

        let mut declared = tripline::config::FolderArgs {
            config: config.map(|c| root().join(c)),
            rules: Some(root().join(rules)),
            templates: Some(root().join(templates)),
            data: Some("data".into()),
            email_from: None,
        }
        .resolve()
        .unwrap()
        .declared;
        // As `tripline test` runs them: hashed with the test key.
        declared.hash_key = Some(tripline::redact::HashKey::for_tests());
        let set = tripline::rules::RuleSet::load(&declared).unwrap_or_else(|p| panic!("{p:#?}"));
        for rule in set.rules() {
            let test_file = rule.file.with_extension("test.toml");
            let tests = std::fs::read_to_string(&test_file)
                .unwrap_or_else(|e| panic!("{}: {e}", test_file.display()));
            // A rule acting with others (a welcome email at the same sign-up) is one entry of
            // the list.
            let quoted = format!("\"{}\"", rule.name);
            assert!(
                tests
                    .lines()
                    .any(|l| l.starts_with("fired = [") && l.contains(&quoted)),
                "{} has no test where {} fires",
                test_file.display(),
                rule.name
            );
        }
    }
}

#[test]
fn every_recipe_in_rules_md_is_the_file_it_names() {
    let doc = std::fs::read_to_string(root().join("docs/RULES.md")).unwrap();
    let mut recipes = 0;
    for block in doc.split("```toml\n").skip(1) {
        let block = &block[..block.find("```").unwrap()];
        let Some(name) = block
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# file: "))
        else {
            continue;
        };
        let body: String = block.split_inclusive('\n').skip(1).collect();
        let file = std::fs::read_to_string(root().join(name))
            .unwrap_or_else(|e| panic!("RULES.md names {name}: {e}"));
        assert_eq!(body, file, "the recipe in RULES.md differs from {name}");
        recipes += 1;
    }
    assert!(recipes >= 10, "RULES.md shows {recipes} recipe files");
}

#[test]
fn the_operator_bounds_what_remember_rules_keep() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("r.toml"),
        "name = \"r\"\n[when]\nevent = \"x\"\n[remember]\nkeep_last = 50\nkeep_for = \"30 days\"\n",
    )
    .unwrap();
    let config = dir.path().join("tripline.toml");
    let check = |text: &str| {
        std::fs::write(&config, text).unwrap();
        tripline(dir.path(), &["check", "--config", "tripline.toml"])
    };
    let out = check("[remember]\nmax_keep_last = 100\nmax_keep_for = \"90 days\"\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = check("[remember]\nmax_keep_last = 20\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("r.toml:5:13: `keep_last` must be from 1 to 20"),
        "{}",
        stderr(&out)
    );
    let out = check("[remember]\nmax_keep_last = 0\nmax_keep_for = \"forever\"\n");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("tripline.toml:2:17: `max_keep_last` must be from 1 to 100000"),
        "{err}"
    );
    assert!(err.contains("tripline.toml:3:16: `max_keep_for`"), "{err}");
}
