//! Nothing lost, nothing twice: restarts, retried deliveries, crashes and full disks, against the
//! real binary.

mod common;

use common::in_process::InProcess;
use common::{Server, fixture_json, fresh};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[test]
fn a_restart_keeps_counts_and_once_marks() {
    let mut server = Server::start();
    let body = fixture_json("feature_used.json");
    for _ in 0..3 {
        assert_eq!(server.post_fresh(&body).0, 200);
    }
    server.restart();
    for _ in 0..2 {
        assert_eq!(server.post_fresh(&body).0, 200);
    }
    assert_eq!(
        server.emails().len(),
        1,
        "3 + 2 uses across a restart make the 5th"
    );
    server.restart();
    server.post_fresh(&body);
    assert_eq!(
        server.emails().len(),
        1,
        "the once mark survived the restart too"
    );
}

#[test]
fn a_clean_stop_leaves_every_line_in_its_file_and_recorded() {
    let mut server = Server::start();
    let sent: Vec<Value> = (0..20)
        .map(|_| fresh(fixture_json("generation_failed.json")))
        .collect();
    for event in &sent {
        assert_eq!(server.post_json(event).0, 200);
    }
    // Straight to SIGTERM, without waiting for the lines.
    assert_eq!(server.terminate(), Some(0), "{}", server.log());
    let text = std::fs::read_to_string(server.data.join("training_data.jsonl")).unwrap();
    assert_eq!(
        text.lines().count(),
        20,
        "written before the service stopped"
    );
    server.relaunch();
    assert_eq!(server.jsonl("training_data.jsonl").len(), 20);
    let log = server.log();
    assert!(
        !log.contains("not yet recorded") && !log.contains("removing the end of the file"),
        "the stop recorded how far the file is written: {log}"
    );
}

#[test]
fn the_same_uuid_ten_times_counts_once_and_writes_one_line() {
    let server = Server::start();
    let failed = fresh(fixture_json("generation_failed.json"));
    let used = fresh(fixture_json("feature_used.json"));
    for i in 0..10 {
        let (status, reply) = server.post_json(&failed);
        assert_eq!(status, 200, "a retried delivery is acknowledged");
        assert_eq!(reply["duplicates"], json!(if i == 0 { 0 } else { 1 }));
        server.post_json(&used);
    }
    assert_eq!(server.jsonl("training_data.jsonl").len(), 1);
    // Ten deliveries of one use are one use: four more make five.
    for _ in 0..3 {
        server.post_fresh(&used);
    }
    assert!(server.emails().is_empty());
    server.post_fresh(&used);
    assert_eq!(server.emails().len(), 1);
}

const CRASH_RULES: &str = r#"
name = "crash-sink"
[when]
event = "generation_failed"
[jsonl]
file = "crash.jsonl"
fields = { uuid = "uuid" }
"#;

/// Fires on every event from the TOTAL-th on: with exact counting, exactly one email.
fn milestone_rule(total: usize) -> String {
    format!(
        r#"
name = "crash-milestone"
[when]
event = "generation_failed"
[count]
per = ["event"]
at_least = {total}
[email]
to = "ops@example.com"
subject = "{{{{count}}}} failures"
template = "welcome"
"#
    )
}

/// One round: a concurrent load of distinct events, SIGKILL in the middle, a restart, and every
/// event the client did not see acknowledged sent again, as PostHog would; with `--durability`
/// `mode`.
fn crash_round(total: usize, mode: &str) {
    let mut server = Server::start_with(&["--durability", mode], |root| {
        std::fs::write(root.join("rules/crash_sink.toml"), CRASH_RULES).unwrap();
        std::fs::write(
            root.join("rules/crash_milestone.toml"),
            milestone_rule(total),
        )
        .unwrap();
    });
    let template = fixture_json("generation_failed.json");
    let events: Vec<Value> = (0..total).map(|_| fresh(template.clone())).collect();
    let acked: Vec<AtomicBool> = (0..total).map(|_| AtomicBool::new(false)).collect();
    let next = AtomicUsize::new(0);
    let acks = AtomicUsize::new(0);
    let killed = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let client = common::client();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= total || killed.load(Ordering::SeqCst) {
                        return;
                    }
                    let sent = client
                        .post(format!("{}/webhook", server.base))
                        .body(events[i].to_string())
                        .send();
                    if sent.is_ok_and(|r| r.status().is_success()) {
                        acked[i].store(true, Ordering::SeqCst);
                        acks.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
        while acks.load(Ordering::SeqCst) < total / 3 {
            std::thread::yield_now();
        }
        killed.store(true, Ordering::SeqCst);
    });
    let acked_before_kill = acks.load(Ordering::SeqCst);
    server.kill();
    assert!(
        acked_before_kill < total,
        "the kill must come in the middle of the load"
    );
    server.relaunch();
    for (i, event) in events.iter().enumerate() {
        if !acked[i].load(Ordering::SeqCst) {
            let (status, reply) = server.post_json(event);
            assert_eq!(status, 200, "{reply}");
        }
    }
    let lines = server.jsonl("crash.jsonl");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for line in &lines {
        *seen
            .entry(line["uuid"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for event in &events {
        let uuid = event["event"]["uuid"].as_str().unwrap();
        assert_eq!(
            seen.get(uuid),
            Some(&1),
            "event {uuid} must appear exactly once"
        );
    }
    assert_eq!(
        lines.len(),
        total,
        "acked before the kill: {acked_before_kill}"
    );
    let emails = server.emails();
    assert_eq!(
        emails.len(),
        1,
        "the counter equals the number of distinct events"
    );
    assert!(
        emails[0].contains(&format!("Subject: {total} failures")),
        "{}",
        emails[0]
    );
    if server.log().contains("not yet recorded are in the file") {
        eprintln!("this round found lines written before the kill and not recorded, and kept them");
    }
    if server.log().contains("run again from the journal") {
        eprintln!("this round ran batches acknowledged and not synced again from the journal");
    }
}

/// The rounds of `mode`: bench/crash_soak.sh runs many, the test suite one.
fn crash_rounds(mode: &str) {
    let rounds: usize = std::env::var("TRIPLINE_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    for round in 0..rounds {
        eprintln!("crash round {}/{rounds} ({mode})", round + 1);
        crash_round(400, mode);
    }
}

#[test]
fn sigkill_during_load_loses_nothing_and_doubles_nothing() {
    crash_rounds("sync");
}

#[test]
fn in_interval_mode_sigkill_during_load_loses_nothing_acknowledged_and_doubles_nothing() {
    if common::postgres::redb_only("--durability interval is the embedded store's") {
        return;
    }
    crash_rounds("interval");
}

/// A small filesystem for the output files, unmounted when dropped.
struct TinyFs(std::path::PathBuf);

impl TinyFs {
    fn mount(at: &std::path::Path, size: &str) -> TinyFs {
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI runs as root)"
        );
        TinyFs(at.to_path_buf())
    }
}

impl Drop for TinyFs {
    /// Detaches the filesystem even while a server still holds files on it (a failed test drops
    /// this before the server), so that no mount is left behind.
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_under_a_file_keeps_its_lines_waiting_and_writes_each_once_space_returns() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to mount a small filesystem (CI runs as root)");
        return;
    }
    let full_rule = CRASH_RULES
        .replace("crash.jsonl", "small/out.jsonl")
        .replace(
            "{ uuid = \"uuid\" }",
            "{ uuid = \"uuid\", prompt = \"properties.input_prompt\" }",
        );
    let server = Server::start_with(&[], |root| {
        std::fs::write(root.join("rules/crash_sink.toml"), &full_rule).unwrap();
    });
    let fs = TinyFs::mount(&server.data.join("small"), "64k");
    let mut body = fixture_json("generation_failed.json");
    body["event"]["properties"]["input_prompt"] = json!("x".repeat(3000));
    assert_eq!(server.post_fresh(&body).0, 200);
    assert_eq!(server.jsonl("small/out.jsonl").len(), 1);
    // Fill every free page: the next 3 KB line fits only in part, in the rest of the file's page.
    let filler = fs.0.join("filler");
    let _ = std::fs::write(&filler, vec![b'.'; 60 * 1024]);
    // The line is durable in the store: acknowledged, and waiting for its file.
    let second = fresh(body.clone());
    let (status, reply) = server.post_json(&second);
    assert_eq!(status, 200, "{reply}");
    server.wait_for("the full disk in /readyz", |s| {
        let ready: Value = serde_json::from_str(&s.get("/readyz").1).unwrap();
        ready["lines_waiting"]["small/out.jsonl"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device"))
    });
    assert!(server.metric("tripline_lines_write_errors_total{file=\"small/out.jsonl\"}") >= 1.0);
    let text = std::fs::read_to_string(fs.0.join("out.jsonl")).unwrap();
    assert!(
        text.ends_with('\n') && text.lines().count() == 1,
        "only the first, whole line: {} bytes",
        text.len()
    );
    // A retry of the same event is a duplicate, not a second line.
    assert_eq!(server.post_json(&second).1["duplicates"], json!(1));
    // Space again: the waiting line is written, once.
    std::fs::remove_file(&filler).unwrap();
    server.wait_for("the waiting line to be written", |s| {
        let ready: Value = serde_json::from_str(&s.get("/readyz").1).unwrap();
        ready["lines_waiting"] == json!({})
    });
    let lines = server.jsonl("small/out.jsonl");
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["uuid"], second["event"]["uuid"]);
    drop(server);
    drop(fs);
}

#[test]
fn event_ids_are_kept_for_the_retention_period() {
    // With a retention of 0 days, an id is forgotten at the next expiry pass (at start-up), once
    // older than the signature tolerance (ids are never forgotten while a signature is valid).
    // The service runs on a manual clock here: the test moves it instead of waiting.
    let mut server = InProcess::start(
        &[
            "--dedupe-retention-days",
            "0",
            "--signature-tolerance",
            "1s",
        ],
        "2026-06-01T00:00:00Z".parse().unwrap(),
    );
    let body = fresh(fixture_json("generation_failed.json"));
    server.post_json(&body);
    // Ids are dated in whole seconds: past a 1 s tolerance for sure after 2.
    server.clock.advance(std::time::Duration::from_secs(2));
    server.restart();
    server.post_json(&fresh(fixture_json("pageview.json")));
    assert_eq!(
        server.post_json(&body).1["duplicates"],
        json!(0),
        "forgotten after the period"
    );
    assert_eq!(server.jsonl("training_data.jsonl").len(), 2);

    let server = Server::start();
    let body = fresh(fixture_json("generation_failed.json"));
    server.post_json(&body);
    assert_eq!(
        server.post_json(&body).1["duplicates"],
        json!(1),
        "kept within the default 7 days"
    );
}

#[test]
fn an_event_no_rule_wants_is_acknowledged_and_leaves_nothing_behind() {
    let server = Server::start();
    let pageview = fresh(fixture_json("pageview.json"));
    for _ in 0..2 {
        let (status, reply) = server.post_json(&pageview);
        assert_eq!(status, 200);
        assert_eq!(reply["duplicates"], json!(0), "its id was never recorded");
        assert_eq!(reply["fired"], json!([]));
    }
    assert_eq!(server.metric("tripline_events_duplicate_total"), 0.0);
    assert_eq!(
        server.metric("tripline_events_received_total{source=\"local\"}"),
        2.0
    );
}

#[test]
fn a_full_disk_under_the_database_heals_once_space_returns() {
    if common::postgres::redb_only("the database's disk is the PostgreSQL server's") {
        return;
    }
    full_disk_under_the_database("sync");
}

#[test]
fn in_interval_mode_a_full_disk_under_the_database_heals_once_space_returns() {
    if common::postgres::redb_only("--durability interval is the embedded store's") {
        return;
    }
    full_disk_under_the_database("interval");
}

/// The data folder fills up with `--durability mode`: a request that cannot be made durable gets
/// 503, and once space is back the service heals by itself and the retry has one effect.
fn full_disk_under_the_database(mode: &str) {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to mount a small filesystem (CI runs as root)");
        return;
    }
    // The whole data folder, database included, on a 1 MiB filesystem.
    let mut small = None;
    let server = Server::start_with(&["--durability", mode], |root| {
        small = Some(TinyFs::mount(&root.join("data"), "1m"));
    });
    let fs = small.unwrap();
    let event = |user: usize| {
        let mut body = fresh(fixture_json("feature_used.json"));
        body["event"]["distinct_id"] = json!(format!("user-{user}-{}", "x".repeat(100)));
        body
    };
    assert_eq!(server.post_json(&event(0)).0, 200);
    let filler = fs.0.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    while std::io::Write::write_all(&mut file, &[b'.'; 4096]).is_ok() {}
    drop(file);
    // New users need new pages: sooner or later a commit finds no room.
    let mut refused = None;
    for user in 1..2000 {
        let body = event(user);
        let (status, reply) = server.post_json(&body);
        if status == 503 {
            refused = Some((body, reply));
            break;
        }
        assert_eq!(status, 200, "{reply}");
    }
    let (refused, reply) = refused.expect("a commit on a full disk fails");
    assert!(
        reply["error"].as_str().unwrap().contains("try again"),
        "{reply}"
    );
    let (status, ready) = server.get("/readyz");
    assert_eq!(status, 503, "{ready}");
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["ready"], false, "{ready}");
    // Space again: the database is reopened, /readyz says so, and PostHog's retry succeeds once.
    std::fs::remove_file(&filler).unwrap();
    server.wait_for("/readyz to recover", |s| s.get("/readyz").0 == 200);
    assert_eq!(server.post_json(&refused).0, 200);
    assert_eq!(server.post_json(&refused).1["duplicates"], json!(1));
    assert_eq!(server.post_json(&event(5000)).0, 200);
    drop(server);
    drop(fs);
}

#[test]
fn past_its_bound_of_lines_waiting_a_full_file_refuses_only_the_requests_writing_there() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to mount a small filesystem (CI runs as root)");
        return;
    }
    let views_rule = "name = \"views\"\n[when]\nevent = \"$pageview\"\n[jsonl]\nfile = \"full/views.jsonl\"\nfields = { uuid = \"uuid\" }\n";
    let server = Server::start_with(&["--max-lines-waiting-bytes", "400"], |root| {
        std::fs::write(root.join("rules/views.toml"), views_rule).unwrap();
    });
    let fs = TinyFs::mount(&server.data.join("full"), "64k");
    let filler = fs.0.join("filler");
    let _ = std::fs::write(&filler, vec![b'.'; 64 * 1024]);
    // Each line is about 50 bytes: some are acknowledged and wait, then the bound is reached.
    let sent: Vec<Value> = (0..20)
        .map(|_| fresh(fixture_json("pageview.json")))
        .collect();
    let statuses: Vec<u16> = sent.iter().map(|e| server.post_json(e).0).collect();
    let acked: Vec<&Value> = (sent.iter().zip(&statuses))
        .filter(|(_, s)| **s == 200)
        .map(|(e, _)| e)
        .collect();
    assert!(
        (1..20).contains(&acked.len()) && statuses.iter().all(|s| [200, 503].contains(s)),
        "{statuses:?}"
    );
    let (status, reply) = server.post_json(&sent[19]);
    assert_eq!(status, 503, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("try again"),
        "{reply}"
    );
    // Requests for another file are not refused.
    assert_eq!(
        server.post_fresh(&fixture_json("generation_failed.json")).0,
        200
    );
    // Space again: the waiting lines are written, and the refused events, sent again, too.
    std::fs::remove_file(&filler).unwrap();
    server.wait_for("the waiting lines to be written", |s| {
        let ready: Value = serde_json::from_str(&s.get("/readyz").1).unwrap();
        ready["lines_waiting"] == json!({})
    });
    for (event, status) in sent.iter().zip(&statuses) {
        if *status != 200 {
            assert_eq!(server.post_json(event).0, 200);
        }
    }
    let uuids: Vec<Value> = (server.jsonl("full/views.jsonl").into_iter())
        .map(|l| l["uuid"].clone())
        .collect();
    assert_eq!(uuids.len(), 20);
    for event in &sent {
        assert_eq!(
            uuids
                .iter()
                .filter(|u| **u == event["event"]["uuid"])
                .count(),
            1
        );
    }
    drop(server);
    drop(fs);
}

#[test]
fn sigkill_while_lines_wait_for_their_file_writes_each_once_after_restart() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to mount a small filesystem (CI runs as root)");
        return;
    }
    let views_rule = "name = \"views\"\n[when]\nevent = \"$pageview\"\n[jsonl]\nfile = \"full/views.jsonl\"\nfields = { uuid = \"uuid\" }\n";
    let mut server = Server::start_with(&[], |root| {
        std::fs::write(root.join("rules/views.toml"), views_rule).unwrap();
    });
    let fs = TinyFs::mount(&server.data.join("full"), "64k");
    let sent: Vec<Value> = (0..3)
        .map(|_| fresh(fixture_json("pageview.json")))
        .collect();
    let filler = fs.0.join("filler");
    let _ = std::fs::write(&filler, vec![b'.'; 64 * 1024]);
    for event in &sent {
        assert_eq!(server.post_json(event).0, 200);
    }
    server.wait_for("the lines to wait", |s| {
        let ready: Value = serde_json::from_str(&s.get("/readyz").1).unwrap();
        !ready["lines_waiting"]["full/views.jsonl"]["error"].is_null()
    });
    server.kill();
    std::fs::remove_file(&filler).unwrap();
    server.relaunch();
    let uuids: Vec<Value> = server
        .jsonl("full/views.jsonl")
        .into_iter()
        .map(|l| l["uuid"].clone())
        .collect();
    let expected: Vec<Value> = sent.iter().map(|e| e["event"]["uuid"].clone()).collect();
    assert_eq!(uuids, expected, "each acknowledged line once, in order");
    drop(server);
    drop(fs);
}

#[test]
fn a_full_disk_under_one_rules_file_holds_up_no_other_file() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to mount a small filesystem (CI runs as root)");
        return;
    }
    let views_rule = "name = \"views\"\n[when]\nevent = \"$pageview\"\n[jsonl]\nfile = \"full/views.jsonl\"\nfields = { who = \"distinct_id\" }\n";
    let server = Server::start_with(&[], |root| {
        std::fs::write(root.join("rules/views.toml"), views_rule).unwrap();
    });
    let fs = TinyFs::mount(&server.data.join("full"), "64k");
    let filler = fs.0.join("filler");
    let _ = std::fs::write(&filler, vec![b'.'; 64 * 1024]);
    // Requests for both rules at once, so that they share batches.
    let (views, failures): (Vec<_>, Vec<_>) = std::thread::scope(|s| {
        let view = |_| s.spawn(|| server.post_fresh(&fixture_json("pageview.json")).0);
        let failure = |_| s.spawn(|| server.post_fresh(&fixture_json("generation_failed.json")).0);
        let views: Vec<_> = (0..40).map(view).collect();
        let failures: Vec<_> = (0..40).map(failure).collect();
        (
            views.into_iter().map(|h| h.join().unwrap()).collect(),
            failures.into_iter().map(|h| h.join().unwrap()).collect(),
        )
    });
    assert!(views.iter().all(|&s| s == 200), "{views:?}");
    assert!(failures.iter().all(|&s| s == 200), "{failures:?}");
    // The other rule's file is written while the full one's lines wait.
    server.wait_for("the other file", |s| {
        let ready: Value = serde_json::from_str(&s.get("/readyz").1).unwrap();
        let waiting = ready["lines_waiting"].as_object().unwrap().clone();
        waiting.keys().collect::<Vec<_>>() == ["full/views.jsonl"]
    });
    assert_eq!(server.jsonl("training_data.jsonl").len(), 40);
    std::fs::remove_file(&filler).unwrap();
    server.wait_for("the waiting lines to be written", |s| {
        let ready: Value = serde_json::from_str(&s.get("/readyz").1).unwrap();
        ready["lines_waiting"] == json!({})
    });
    assert_eq!(server.jsonl("full/views.jsonl").len(), 40);
    drop(server);
    drop(fs);
}
