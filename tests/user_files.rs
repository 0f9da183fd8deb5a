//! Files a user gives tripline that are not what they seem or cost too much, against the real
//! binary: named pipes and folders named like rule files or templates (which once hung `check`,
//! the start of `serve` and its reload task), and a template whose loops would fill the
//! committer's time with one email.

mod common;

use common::{Server, fixture, fixture_json};
use serde_json::{Value, json};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "{path:?}");
}

/// Runs `tripline ARGS` in `dir`, failing the test if it has not finished within 30 s (it used
/// to wait forever on a named pipe).
fn tripline_within_30s(dir: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tripline"))
        .current_dir(dir)
        .args(args)
        .env_remove("TRIPLINE_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "tripline {args:?} hung:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

const RULE: &str = r#"name = "r"
[when]
event = "x"
[email]
to = "a@example.com"
subject = "s"
template = "hello"
"#;

/// A named pipe among the templates and rules, a folder named like a rule, and a test whose
/// events file and a configuration file that are named pipes: `check` finishes, warns about
/// what it skipped and says what each pipe it was asked to read is.
#[test]
fn check_finishes_and_says_what_is_not_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for folder in ["rules", "templates"] {
        std::fs::create_dir(root.join(folder)).unwrap();
    }
    std::fs::write(root.join("rules/r.toml"), RULE).unwrap();
    std::fs::write(root.join("templates/hello.text.hbs"), "Hi").unwrap();
    mkfifo(&root.join("templates/x.text.hbs"));
    mkfifo(&root.join("rules/pipe.toml"));
    std::fs::create_dir(root.join("rules/folder.toml")).unwrap();

    let out = tripline_within_30s(root, &["check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "warnings do not fail: {stderr}");
    assert_eq!(
        stderr,
        "warning: templates/x.text.hbs: skipped: this is a named pipe, not a file\n\
         warning: rules/folder.toml: skipped: this is a folder, not a file\n\
         warning: rules/pipe.toml: skipped: this is a named pipe, not a file\n"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("ok: 1 rules, 0 tests"),
        "{out:?}"
    );

    // A rule that uses the pipe as its template: the warning says why there is no such template.
    std::fs::write(
        root.join("rules/r.toml"),
        RULE.replace("\"hello\"", "\"x\""),
    )
    .unwrap();
    // A test whose events file is a pipe, and a configuration file that is one.
    mkfifo(&root.join("rules/events.json"));
    std::fs::write(
        root.join("rules/r.test.toml"),
        "[[test]]\nname = \"t\"\n[[test.events]]\nfile = \"events.json\"\n[test.expect]\nfired = []\n",
    )
    .unwrap();
    let out = tripline_within_30s(root, &["check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("warning: templates/x.text.hbs: skipped: this is a named pipe")
            && stderr.contains("there is no template \"x\"")
            && stderr.contains(
                "cannot read the events file rules/events.json: this is a named pipe, not a file"
            ),
        "{stderr}"
    );
    mkfifo(&root.join("tripline.toml"));
    let out = tripline_within_30s(root, &["check", "--config", "tripline.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "cannot read the configuration file tripline.toml: this is a named pipe, not a file"
        ),
        "{stderr}"
    );
}

const PAGEVIEWS: &str = r#"
name = "newsletter-pageviews"
[when]
event = "$pageview"
[jsonl]
file = "pageviews.jsonl"
fields = { url = "properties.$current_url" }
"#;

/// With named pipes among its files, the service starts, lists what it skipped at /rules, keeps
/// reloading edited rules, and stops cleanly on SIGTERM.
#[test]
fn serve_starts_reloads_and_stops_with_named_pipes_among_its_files() {
    let mut server = Server::start_with(&[], |root| {
        mkfifo(&root.join("templates/x.text.hbs"));
        mkfifo(&root.join("rules/pipe.toml"));
        std::fs::create_dir(root.join("rules/folder.toml")).unwrap();
    });
    assert_eq!(server.get("/healthz").0, 200);
    let status = server.rules_status();
    assert_eq!(status["last_reload"]["ok"], json!(true), "{status}");
    let warnings: Vec<String> = status["last_reload"]["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            w.as_str()
                .unwrap()
                .replace(server.dir.path().to_str().unwrap(), "DIR")
        })
        .collect();
    assert_eq!(
        warnings,
        [
            "DIR/templates/x.text.hbs: skipped: this is a named pipe, not a file",
            "DIR/rules/folder.toml: skipped: this is a folder, not a file",
            "DIR/rules/pipe.toml: skipped: this is a named pipe, not a file",
        ]
    );
    assert!(
        server
            .log()
            .contains("rules/pipe.toml: skipped: this is a named pipe"),
        "the reload logs its warnings:\n{}",
        server.log()
    );

    // An edit after start still takes effect: the reload task is not stuck on a pipe.
    std::fs::write(server.rules.join("pageviews.toml"), PAGEVIEWS).unwrap();
    server.wait_for("the new rule", |s| {
        s.rule_names().iter().any(|n| n == "newsletter-pageviews")
    });
    assert_eq!(server.post_fresh(&fixture_json("pageview.json")).0, 200);
    assert_eq!(server.jsonl("pageviews.jsonl").len(), 1);

    assert_eq!(server.terminate(), Some(0), "clean stop:\n{}", server.log());
}

/// Three nested loops over 300 properties would run 27 million times and write megabytes: that
/// one email fails with the reason, visibly, and the other rule on the same event still sends.
#[test]
fn an_email_whose_loops_would_run_too_often_fails_alone() {
    let server = Server::start_with(&[], |root| {
        for (name, template) in [
            (
                "bomb",
                "{{#each properties}}{{#each @root.properties}}{{#each @root.properties}}x{{/each}}{{/each}}{{/each}}",
            ),
            ("fine", "Hello {{distinct_id}}"),
        ] {
            std::fs::write(
                root.join(format!("rules/{name}.toml")),
                format!(
                    "name = \"{name}\"\n[when]\nevent = \"many_properties\"\n[email]\nto = \"ops@example.com\"\nsubject = \"{name}\"\ntemplate = \"{name}\"\n"
                ),
            )
            .unwrap();
            std::fs::write(root.join(format!("templates/{name}.text.hbs")), template).unwrap();
        }
    });
    let properties: serde_json::Map<String, Value> =
        (0..300).map(|i| (format!("p{i}"), json!(i))).collect();
    let body = json!({"event": "many_properties", "distinct_id": "u1", "properties": properties});
    let (status, reply) = server.post_fresh(&body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["fired"], json!(["fine"]), "{reply}");
    let failed = reply["failed"][0].as_str().unwrap();
    assert!(
        failed.contains("bomb")
            && failed.contains("loops would run more than 10000 times for this event"),
        "{failed}"
    );

    let emails = server.emails();
    assert_eq!(emails.len(), 1);
    assert!(emails[0].contains("Hello u1"), "{}", emails[0]);
    let outbox = server.outbox();
    let record = outbox["recent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "bomb")
        .unwrap_or_else(|| panic!("{outbox}"));
    assert_eq!(record["status"], json!("failed"));
    assert!(
        record["last_error"]
            .as_str()
            .unwrap()
            .contains("more than 10000 times"),
        "{record}"
    );
    assert_eq!(
        server.metric("tripline_actions_failed_total{kind=\"email\",rule=\"bomb\"}"),
        1.0
    );
    // The service goes on as before.
    assert_eq!(server.post(fixture("generation_failed.json")).0, 200);
}
