//! Several instances on one PostgreSQL database (the throw-away server `scripts/postgres.sh`
//! starts): a retry sent to another instance has no second effect, an instance killed under load
//! leaves its deliveries and waits to the others, a wait started on one ends once on another,
//! one instance at a time writes an output file, and the schema is made on an empty database
//! and refused when newer. Each test makes its own database; without a server they say they are
//! skipped.

mod common;

use axum::http::{HeaderMap, Uri};
use common::postgres::{database, psql};
use common::{Server, fixture_json, fresh, new_uuid};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `n` instances sharing `url`, each with its own folders, the shipped rules and `rules`.
fn instances(n: usize, url: &str, args: &[&str], rules: &[(&str, String)]) -> Vec<Server> {
    (0..n)
        .map(|_| {
            let mut all = vec!["--store", url];
            all.extend_from_slice(args);
            Server::launch(&all, &[], |root: &Path| {
                for (file, text) in rules {
                    std::fs::write(root.join("rules").join(file), text).unwrap();
                }
            })
        })
        .collect()
}

/// Every `.eml` file the instances delivered, by name (the delivery id).
fn emails(servers: &[&Server]) -> Vec<String> {
    let mut names = Vec::new();
    for s in servers {
        if let Ok(dir) = std::fs::read_dir(s.data.join("outbox")) {
            for entry in dir.flatten() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    names.sort();
    names
}

/// The lines of `file` in every instance's data folder, with the folder each came from.
fn lines(servers: &[&Server], file: &str) -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for s in servers {
        let path = s.data.join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for line in text.lines() {
            out.push((s.data.clone(), serde_json::from_str(line).unwrap()));
        }
    }
    out
}

/// Waits (up to 30 s) until `done`.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_schema_is_made_on_an_empty_database_and_a_newer_one_is_refused() {
    let Some(url) = database() else { return };
    let mut server = Server::launch(&["--store", &url], &[], |_| {});
    let versions = "SELECT string_agg(version::text, ',' ORDER BY version) FROM tripline_schema";
    assert_eq!(psql(&url, versions), "1,2");
    let event = fresh(fixture_json("generation_failed.json"));
    let (status, reply) = server.post_json(&event);
    assert_eq!(
        (status, reply["fired"].clone()),
        (200, json!(["training-data"]))
    );
    // Started again on the same database: nothing to migrate, and the event is known.
    assert_eq!(server.terminate(), Some(0));
    server.relaunch();
    assert_eq!(psql(&url, versions), "1,2");
    assert_eq!(server.post_json(&event).1["duplicates"], 1);
    assert_eq!(server.terminate(), Some(0));

    // A newer tripline migrated the database: this one refuses to start, and says why.
    psql(&url, "INSERT INTO tripline_schema (version) VALUES (99)");
    refused(
        &url,
        &server,
        "at version 99, made by a newer tripline (this one knows up to version 2)",
    );
}

/// Starts another tripline on `url` with `server`'s folders, and checks that it refuses to
/// start, saying `why`.
fn refused(url: &str, server: &Server, why: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tripline"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store", url, "--data"])
        .arg(&server.data)
        .arg("--rules")
        .arg(&server.rules)
        .arg("--templates")
        .arg(&server.templates)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(why), "{stderr}");
}

#[test]
fn retries_sent_to_other_instances_at_the_same_time_have_no_second_effect() {
    let Some(url) = database() else { return };
    let servers = instances(3, &url, &[], &[]);
    // Eight people use a feature six times each (the fifth use emails them), and twenty
    // generations fail (a line each). Every event goes to one instance and, at the same moment,
    // its retry to another.
    let mut bodies = Vec::new();
    for _ in 0..6 {
        for who in 0..8 {
            let mut body = fresh(fixture_json("feature_used.json"));
            body["event"]["distinct_id"] = json!(format!("user-{who}"));
            bodies.push(body);
        }
    }
    for _ in 0..20 {
        bodies.push(fresh(fixture_json("generation_failed.json")));
    }
    let mut fired = 0;
    for (i, body) in bodies.iter().enumerate() {
        let (a, b) = (&servers[i % 3], &servers[(i + 1) % 3]);
        let (first, second) = std::thread::scope(|scope| {
            let first = scope.spawn(|| a.post_json(body));
            let second = scope.spawn(|| b.post_json(body));
            (first.join().unwrap(), second.join().unwrap())
        });
        assert_eq!((first.0, second.0), (200, 200), "{} {}", first.1, second.1);
        let duplicates =
            first.1["duplicates"].as_u64().unwrap() + second.1["duplicates"].as_u64().unwrap();
        assert_eq!(
            duplicates, 1,
            "one of the two is the retry: {} {}",
            first.1, second.1
        );
        for reply in [&first.1, &second.1] {
            fired += reply["fired"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| *r == "power-user-discount")
                .count();
        }
    }
    assert_eq!(fired, 8, "the fifth use of each person, once");
    let all: Vec<&Server> = servers.iter().collect();
    eventually("eight emails", || emails(&all).len() >= 8);
    eventually("twenty lines", || {
        lines(&all, "training_data.jsonl").len() >= 20
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(emails(&all).len(), 8, "{:?}", emails(&all));
    let written = lines(&all, "training_data.jsonl");
    assert_eq!(written.len(), 20);
    let folders: std::collections::HashSet<&PathBuf> = written.iter().map(|(f, _)| f).collect();
    assert_eq!(folders.len(), 1, "one instance writes the file");
}

/// A real HTTP receiver that answers each request after `delay`, logging its Idempotency-Key.
struct Receiver {
    base: String,
    keys: Arc<Mutex<Vec<(String, String)>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Receiver {
    fn start(delay: Duration) -> Receiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let keys: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let log = keys.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
            let log = log.clone();
            async move {
                let key = headers["idempotency-key"].to_str().unwrap().to_string();
                log.lock().unwrap().push((key, uri.path().to_string()));
                tokio::time::sleep(delay).await;
                "ok"
            }
        });
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        runtime.spawn(async move { axum::serve(listener, app).await });
        Receiver {
            base,
            keys,
            runtime: Some(runtime),
        }
    }

    /// How many requests came with each key.
    fn by_key(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for (key, _) in self.keys.lock().unwrap().iter() {
            *counts.entry(key.clone()).or_default() += 1;
        }
        counts
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Posts `body` to the live instances in turn, starting at `first`, until one acknowledges it
/// (as PostHog retries): the index of the one that did.
fn deliver(servers: &[Server], alive: &[bool], first: usize, body: &Value) -> usize {
    for attempt in 0..30 {
        let i = (first + attempt) % servers.len();
        if !alive[i] {
            continue;
        }
        let reply =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| servers[i].post_json(body)));
        if let Ok((200, _)) = reply {
            return i;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no instance acknowledged {body}");
}

#[test]
fn an_instance_killed_under_load_leaves_its_deliveries_and_waits_to_the_others() {
    let Some(url) = database() else { return };
    let receiver = Receiver::start(Duration::from_millis(1500));
    let config = tempfile::tempdir().unwrap();
    let config_file = config.path().join("tripline.toml");
    std::fs::write(
        &config_file,
        format!("[endpoints.slow]\nurl = \"{}/orders\"\n", receiver.base),
    )
    .unwrap();
    let rules = [
        (
            "orders.toml",
            "name = \"orders\"\n[when]\nevent = \"order_completed\"\n\
             [http]\nendpoint = \"slow\"\njson = { id = \"{{uuid}}\" }\n"
                .to_string(),
        ),
        // Long enough that no wait ends before the kill.
        ("quick.toml", quick(5)),
    ];
    let args = [
        "--config",
        config_file.to_str().unwrap(),
        "--wait-grace",
        "100ms",
    ];
    let mut servers = instances(3, &url, &args, &rules);
    let mut alive = [true; 3];
    // Orders (a slow request each) and checkouts (a 5-second wait each) to every instance.
    let orders: Vec<Value> = (0..60)
        .map(|i| json!({"event": "order_completed", "uuid": new_uuid(), "distinct_id": format!("o-{i}")}))
        .collect();
    let carts: Vec<Value> = (0..60).map(|i| checkout(&format!("cart-{i}"))).collect();
    for (i, (order, cart)) in orders.iter().zip(&carts).enumerate() {
        deliver(&servers, &alive, i, order);
        deliver(&servers, &alive, i, cart);
    }
    // Instance 0 holds deliveries in flight (the receiver answers after 1.5 s) and waits not
    // yet due: it is killed, and the rest of the load goes to the others.
    let before = receiver.by_key().len();
    for i in 90..95 {
        let order = json!({"event": "order_completed", "uuid": new_uuid(), "distinct_id": format!("o-{i}")});
        assert_eq!(servers[0].post_json(&order).0, 200);
    }
    eventually("its requests in flight", || {
        receiver.by_key().len() >= before + 5
    });
    servers[0].kill();
    alive[0] = false;
    for i in 60..90 {
        deliver(
            &servers,
            &alive,
            i,
            &json!({"event": "order_completed", "uuid": new_uuid(), "distinct_id": format!("o-{i}")}),
        );
        deliver(&servers, &alive, i, &checkout(&format!("cart-{i}")));
    }
    let live: Vec<&Server> = servers[1..].iter().collect();
    // Every order is delivered (those the killed instance held, once its lease ran out), and
    // every wait ended once, by the instances left.
    eventually("every order delivered", || receiver.by_key().len() == 95);
    eventually("every wait ended", || {
        lines(&live, "quick.jsonl").len() >= 90
    });
    eventually("every delivery recorded", || {
        servers[1].outbox()["pending"] == 0
    });
    std::thread::sleep(Duration::from_millis(500));
    let by_key = receiver.by_key();
    let again: Vec<_> = by_key.iter().filter(|(_, n)| **n > 1).collect();
    // What the killed instance had in flight is sent again by another, with the same key; and
    // only that. (Of the five sent to it last, it claims those its endpoint's bound on requests
    // at once leaves room for; the others may claim the rest first.)
    assert!(again.iter().all(|(_, n)| **n == 2), "{again:?}");
    assert!(
        (1..=64).contains(&again.len()),
        "some at least, at most its attempts at once: {again:?}"
    );
    let mut carts_ended: Vec<String> = lines(&live, "quick.jsonl")
        .into_iter()
        .map(|(_, l)| l["cart"].as_str().unwrap().to_string())
        .collect();
    carts_ended.sort();
    let count = carts_ended.len();
    carts_ended.dedup();
    assert_eq!((count, carts_ended.len()), (90, 90), "each wait ended once");
    assert_eq!(emails(&live).len(), 90, "each wait's email once");
    eprintln!(
        "{} of 95 requests were sent again after the kill",
        again.len()
    );
}

/// A wait of `seconds` on each checkout, then a line and an email.
fn quick(seconds: u32) -> String {
    QUICK.replace("2 seconds", &format!("{seconds} seconds"))
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

/// A checkout of `cart`, stamped now.
fn checkout(cart: &str) -> Value {
    json!({
        "event": "checkout_started",
        "uuid": new_uuid(),
        "distinct_id": format!("buyer-{cart}"),
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "properties": {"cart_id": cart},
        "person": {"properties": {"email": format!("{cart}@example.com")}},
    })
}

#[test]
fn a_wait_started_on_one_instance_ends_once_on_another() {
    let Some(url) = database() else { return };
    let rules = [("quick.toml", QUICK.to_string())];
    let mut servers = instances(3, &url, &["--wait-grace", "100ms"], &rules);
    let carts: Vec<Value> = (0..200).map(|i| checkout(&format!("c{i}"))).collect();
    let (status, reply) = servers[0].post_json(&Value::Array(carts));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["waiting"].as_array().unwrap().len(), 200);
    // The instance that started them stops before they are due: the two others race for them.
    servers[0].kill();
    let live: Vec<&Server> = servers[1..].iter().collect();
    eventually("every wait to end", || {
        lines(&live, "quick.jsonl").len() >= 200
    });
    std::thread::sleep(Duration::from_millis(1500));
    let written = lines(&live, "quick.jsonl");
    let mut carts: Vec<&str> = written
        .iter()
        .map(|(_, l)| l["cart"].as_str().unwrap())
        .collect();
    carts.sort();
    carts.dedup();
    assert_eq!(
        (written.len(), carts.len()),
        (200, 200),
        "each wait ended once"
    );
    eventually("two hundred emails", || emails(&live).len() >= 200);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(emails(&live).len(), 200);
    let fired: f64 = live
        .iter()
        .map(|s| s.metric("tripline_waits_fired_total{rule=\"quick-abandoned\"}"))
        .sum();
    assert_eq!(fired, 200.0, "ended once in all");
}

#[test]
fn two_instances_racing_for_one_file_one_writes_it_and_every_line_is_there_once() {
    let Some(url) = database() else { return };
    let mut servers = instances(2, &url, &[], &[]);
    // Both start at once: each tries to take the file; one does.
    let bodies: Vec<Value> = (0..100)
        .map(|_| fresh(fixture_json("generation_failed.json")))
        .collect();
    std::thread::scope(|scope| {
        for (half, server) in servers.iter().enumerate() {
            let bodies = &bodies;
            scope.spawn(move || {
                for body in bodies.iter().skip(half).step_by(2) {
                    assert_eq!(server.post_json(body).0, 200);
                }
            });
        }
    });
    let both: Vec<&Server> = servers.iter().collect();
    eventually("a hundred lines", || {
        lines(&both, "training_data.jsonl").len() >= 100
    });
    std::thread::sleep(Duration::from_millis(500));
    let written = lines(&both, "training_data.jsonl");
    assert_eq!(written.len(), 100, "every line once");
    let writer = written[0].0.clone();
    assert!(
        written.iter().all(|(f, _)| *f == writer),
        "one instance writes it"
    );
    // The writer stops: the other takes the file over and goes on in its own folder.
    let (stopped, other) = match servers[0].data == writer {
        true => (0, 1),
        false => (1, 0),
    };
    assert_eq!(servers[stopped].terminate(), Some(0));
    for _ in 0..10 {
        let body = fresh(fixture_json("generation_failed.json"));
        assert_eq!(servers[other].post_json(&body).0, 200);
    }
    eventually("ten more lines", || {
        servers[other].jsonl("training_data.jsonl").len() >= 10
    });
    std::thread::sleep(Duration::from_millis(300));
    let both: Vec<&Server> = servers.iter().collect();
    assert_eq!(lines(&both, "training_data.jsonl").len(), 110);
    assert_eq!(servers[other].jsonl("training_data.jsonl").len(), 10);
    // The first writer comes back and takes the file again when the second stops: its copy
    // keeps its hundred lines (it is not cut to the length the other recorded) and goes on.
    servers[stopped].relaunch();
    assert_eq!(servers[other].terminate(), Some(0));
    for _ in 0..5 {
        let body = fresh(fixture_json("generation_failed.json"));
        assert_eq!(servers[stopped].post_json(&body).0, 200);
    }
    eventually("five more lines", || {
        servers[stopped].jsonl("training_data.jsonl").len() >= 105
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(servers[stopped].jsonl("training_data.jsonl").len(), 105);
    assert_eq!(servers[other].jsonl("training_data.jsonl").len(), 10);
}

#[test]
fn an_instance_without_a_rule_leaves_its_waits_to_the_instance_that_has_it() {
    let Some(url) = database() else { return };
    // A deploy under way: the first instance has a new rule with a wait, the second not yet.
    let with = instances(
        1,
        &url,
        &["--wait-grace", "100ms"],
        &[("quick.toml", quick(2))],
    );
    let without = instances(1, &url, &["--wait-grace", "100ms"], &[]);
    let carts: Vec<Value> = (0..50).map(|i| checkout(&format!("d{i}"))).collect();
    let (status, reply) = without[0].post_json(&Value::Array(carts));
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["waiting"].as_array().unwrap().is_empty(),
        "not its rule"
    );
    let carts: Vec<Value> = (50..100).map(|i| checkout(&format!("d{i}"))).collect();
    assert_eq!(with[0].post_json(&Value::Array(carts)).0, 200);
    // Both timers look every second; only the instance with the rule ends the waits.
    let both = [&with[0], &without[0]];
    eventually("fifty lines", || lines(&both, "quick.jsonl").len() >= 50);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(lines(&both, "quick.jsonl").len(), 50);
    let dropped = "tripline_waits_dropped_total{reason=\"rule_gone\",rule=\"quick-abandoned\"}";
    assert_eq!(without[0].metric(dropped), 0.0, "{}", without[0].log());
}

#[test]
fn a_second_process_with_the_same_data_folder_is_refused() {
    let Some(url) = database() else { return };
    let server = Server::launch(&["--store", &url], &[], |_| {});
    refused(
        &url,
        &server,
        "another tripline is already running with this data folder",
    );
}
