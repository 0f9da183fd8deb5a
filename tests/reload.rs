//! Hot reload against the real binary: rules and templates change while it runs.

mod common;

use common::{Server, fixture, fixture_json};
use serde_json::json;
use std::path::Path;

const PAGEVIEWS: &str = r#"
name = "newsletter-pageviews"
[when]
event = "$pageview"
"properties.utm_source" = "newsletter"
[jsonl]
file = "pageviews.jsonl"
fields = { url = "properties.$current_url" }
"#;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn has_rule(name: &str) -> impl FnMut(&Server) -> bool + '_ {
    move |s| s.rule_names().iter().any(|n| n == name)
}

#[test]
fn a_rule_added_edited_and_deleted_while_running_takes_effect() {
    let server = Server::start();
    let file = server.rules.join("pageviews.toml");
    write(&file, PAGEVIEWS);
    server.wait_for("the new rule", has_rule("newsletter-pageviews"));
    let pageview = fixture_json("pageview.json");
    assert_eq!(server.post_fresh(&pageview).0, 200);
    assert_eq!(server.jsonl("pageviews.jsonl").len(), 1);

    write(
        &file,
        &PAGEVIEWS.replace("url = ", "path = \"properties.$pathname\", url = "),
    );
    server.wait_for("the edited rule", |s| {
        s.rules_status()["rules"].to_string().contains("\"path\"")
    });
    server.post_fresh(&pageview);
    let lines = server.jsonl("pageviews.jsonl");
    assert_eq!(
        lines[1],
        json!({"path": "/projects/42/editor", "url": "https://app.example.com/projects/42/editor?tab=layers&utm_source=newsletter"})
    );

    std::fs::remove_file(&file).unwrap();
    server.wait_for("the rule to go", |s| !has_rule("newsletter-pageviews")(s));
    server.post(fixture("pageview.json"));
    assert_eq!(
        server.jsonl("pageviews.jsonl").len(),
        2,
        "a deleted rule does nothing"
    );
}

#[test]
fn a_broken_file_keeps_the_old_rules_running_and_shows_where_it_is_wrong() {
    let server = Server::start();
    let file = server.rules.join("training_data.toml");
    let good = std::fs::read_to_string(&file).unwrap();
    write(
        &file,
        &good.replace("max_chars = 100 }", "max_chars = \"100\" }"),
    );
    server.wait_for("the reload to fail", |s| {
        s.rules_status()["last_reload"]["ok"] == json!(false)
    });
    let status = server.rules_status();
    let errors = status["last_reload"]["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let error = errors[0].as_str().unwrap();
    assert!(
        error.starts_with(&format!("{}:16:80: ", file.display())),
        "file:line:col first: {error}"
    );
    assert!(
        error.contains("got text \"100\", expected a whole number"),
        "{error}"
    );
    assert!(server.log().contains(error), "the error is logged too");

    // The previous training-data rule still runs.
    assert_eq!(server.post(fixture("generation_failed.json")).0, 200);
    assert_eq!(server.jsonl("training_data.jsonl").len(), 1);
    assert_eq!(status["rules"].as_array().unwrap().len(), 2);

    write(&file, &good);
    server.wait_for("the fixed file", |s| {
        s.rules_status()["last_reload"]["ok"] == json!(true)
    });
}

/// The running set's hash is the one `tripline check` prints for the same files, and the reload
/// gauge follows each reload's outcome.
#[test]
fn rules_endpoint_hash_matches_check_and_metrics_gauge_follows_reloads() {
    let server = Server::start();
    let check = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tripline"))
            .arg("check")
            .arg("--rules")
            .arg(&server.rules)
            .arg("--templates")
            .arg(&server.templates)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.trim_end().rsplit(' ').next().unwrap().to_string()
    };
    let gauge = |s: &Server| {
        let (status, text) = s.get("/metrics");
        assert_eq!(status, 200);
        text.lines()
            .find_map(|l| l.strip_prefix("tripline_rules_reload_success "))
            .map(str::to_string)
    };
    let hash = server.rules_status()["hash"].as_str().unwrap().to_string();
    assert_eq!(hash.len(), 16);
    assert_eq!(check(), hash);
    assert_eq!(gauge(&server).as_deref(), Some("1"));

    let file = server.rules.join("training_data.toml");
    let good = std::fs::read_to_string(&file).unwrap();
    write(&file, &good.replace("[jsonl]", "[jsnol]"));
    server.wait_for("the gauge to drop", |s| gauge(s).as_deref() == Some("0"));
    assert_eq!(
        server.rules_status()["hash"].as_str(),
        Some(hash.as_str()),
        "the old set keeps running"
    );

    write(&file, &good.replace("max_chars = 100", "max_chars = 120"));
    server.wait_for("the gauge to rise", |s| gauge(s).as_deref() == Some("1"));
    let new_hash = server.rules_status()["hash"].as_str().unwrap().to_string();
    assert_ne!(new_hash, hash);
    assert_eq!(check(), new_hash);
}

#[test]
fn an_editor_save_by_rename_is_picked_up() {
    let server = Server::start();
    let tmp = server.rules.join(".pageviews.toml.swp");
    write(&tmp, PAGEVIEWS);
    std::fs::rename(&tmp, server.rules.join("pageviews.toml")).unwrap();
    server.wait_for("the renamed-in rule", has_rule("newsletter-pageviews"));
    server.post(fixture("pageview.json"));
    assert_eq!(server.jsonl("pageviews.jsonl").len(), 1);
}

#[test]
fn an_edited_template_is_used_for_the_next_email() {
    let server = Server::start();
    let body = fixture_json("feature_used.json");
    for _ in 0..4 {
        server.post_fresh(&body);
    }
    let template = server.templates.join("power_user.text.hbs");
    write(&template, "New copy for {{properties.feature_name}}.\n");
    std::fs::remove_file(server.templates.join("power_user.html.hbs")).unwrap();
    server.wait_for("the new template", |s| {
        s.log().matches("rules loaded").count() >= 2
    });
    server.post_fresh(&body);
    let emails = server.emails();
    assert_eq!(emails.len(), 1);
    assert!(
        emails[0].contains("New copy for demo_feature."),
        "{}",
        emails[0]
    );
    assert!(
        !emails[0].contains("multipart"),
        "the removed HTML body is gone: {}",
        emails[0]
    );
}

#[test]
fn counters_survive_a_reload_and_edits_of_other_rules() {
    let server = Server::start();
    let body = fixture_json("feature_used.json");
    for _ in 0..3 {
        server.post_fresh(&body);
    }
    write(&server.rules.join("pageviews.toml"), PAGEVIEWS);
    server.wait_for("the new rule", has_rule("newsletter-pageviews"));
    server.post_fresh(&body);
    assert!(server.emails().is_empty());
    server.post_fresh(&body);
    assert_eq!(
        server.emails().len(),
        1,
        "3 + 2 uses across a reload make 5"
    );
}

#[test]
fn starting_with_broken_rules_answers_503_until_they_are_fixed() {
    let server = Server::start_with(&[], |root| {
        std::fs::write(
            root.join("rules/typo.toml"),
            "name = \"typo\"\n[when]\nevent = \"x\"\n[jsnol]\n",
        )
        .unwrap();
    });
    let status = server.rules_status();
    assert_eq!(status["last_reload"]["ok"], json!(false));
    assert!(
        status["last_reload"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("did you mean `jsonl`?")
    );
    assert_eq!(server.get("/healthz").0, 200);
    let (code, reply) = server.post(fixture("generation_failed.json"));
    assert_eq!(
        code, 503,
        "PostHog retries a 503; a 200 would drop the event's effects"
    );
    assert!(reply["error"].as_str().unwrap().contains("GET /rules"));

    std::fs::remove_file(server.rules.join("typo.toml")).unwrap();
    server.wait_for("the fixed rules", |s| {
        s.rules_status()["last_reload"]["ok"] == json!(true)
    });
    assert_eq!(server.post(fixture("generation_failed.json")).0, 200);
    assert_eq!(server.jsonl("training_data.jsonl").len(), 1);
}

#[test]
fn requests_during_a_burst_of_reloads_all_succeed() {
    let server = Server::start();
    let body = fixture_json("generation_failed.json");
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..30 {
                let text = PAGEVIEWS.replace("pageviews.jsonl", &format!("pv{}.jsonl", i % 3));
                write(&server.rules.join("pageviews.toml"), &text);
                std::thread::sleep(std::time::Duration::from_millis(40));
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let mut sent = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            assert_eq!(server.post_fresh(&body).0, 200);
            sent += 1;
        }
        server.wait_for("every line", |s| {
            s.jsonl("training_data.jsonl").len() == sent
        });
    });
}

#[test]
fn a_rule_rewritten_without_pause_still_reloads_while_the_writes_go_on() {
    let server = Server::start();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            // Ten writes a second, never a quiet moment, until the rule is seen running (at most 40 s,
            // past wait_for's limit, so a failure ends the test).
            for i in 0..400 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let text = PAGEVIEWS.replace("pageviews.jsonl", &format!("pv{}.jsonl", i % 3));
                write(&server.rules.join("pageviews.toml"), &text);
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        server.wait_for(
            "the rule to load while it is still being rewritten",
            has_rule("newsletter-pageviews"),
        );
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    assert!(server.metric("tripline_rules_reloads_total{result=\"ok\"}") >= 1.0);
}
