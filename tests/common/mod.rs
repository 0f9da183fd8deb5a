//! Test harness: runs the real `tripline` binary on 127.0.0.1:0 with its own rules, templates
//! and data folders, and talks to it over HTTP.

#![allow(dead_code)] // each test file uses a different part of the harness

pub mod in_process;
pub mod postgres;

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The project's root folder.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A PostHog fixture (copied from the shared folder into tests/fixtures/posthog).
pub fn fixture(name: &str) -> Vec<u8> {
    let path = root().join("tests/fixtures/posthog").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A fixture as JSON, to be changed before sending.
pub fn fixture_json(name: &str) -> Value {
    serde_json::from_slice(&fixture(name)).unwrap()
}

/// A new event id, unique within this test run.
pub fn new_uuid() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}-0000-7000-8000-{n:012x}", std::process::id())
}

/// `body` with a new uuid on each of its events: another event, not a retried delivery.
pub fn fresh(mut body: Value) -> Value {
    fn set(event: &mut Value) {
        if event["event"].is_object() {
            event["event"]["uuid"] = Value::String(new_uuid());
        } else {
            event["uuid"] = Value::String(new_uuid());
        }
    }
    match &mut body {
        Value::Array(items) => items.iter_mut().for_each(set),
        Value::Object(map) if map.contains_key("batch") => body["batch"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .for_each(set),
        _ => set(&mut body),
    }
    body
}

/// An HTTP client for the tests. reqwest is built with rustls and no crypto provider of its own
/// (tripline uses ring, as lettre does), so the provider is installed first.
pub fn client() -> reqwest::blocking::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::new()
}

pub struct Server {
    child: Child,
    command: Command,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub rules: PathBuf,
    pub templates: PathBuf,
    pub data: PathBuf,
    log: Arc<Mutex<String>>,
    http: reqwest::blocking::Client,
    /// Sent with every GET, when the server was started with TRIPLINE_ADMIN_TOKEN.
    admin_token: Option<String>,
}

/// A reply: status, headers and body (parsed as JSON when it is JSON).
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub json: Value,
}

impl Server {
    /// Starts on copies of the shipped rules and templates.
    pub fn start() -> Server {
        Server::start_with(&[], |_| {})
    }

    /// Starts with extra command-line `args`, after `setup` has changed the copied folders
    /// (it gets the temporary root, holding `rules/`, `templates/` and `data/`).
    pub fn start_with(args: &[&str], setup: impl FnOnce(&Path)) -> Server {
        Server::launch(args, &[], setup)
    }

    /// Starts with settings given as environment variables.
    pub fn start_with_env(env: &[(&str, &str)]) -> Server {
        Server::launch(&[], env, |_| {})
    }

    /// Starts with flags, environment variables and a setup of the copied folders.
    pub fn launch(args: &[&str], env: &[(&str, &str)], setup: impl FnOnce(&Path)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules");
        let templates = dir.path().join("templates");
        let data = dir.path().join("data");
        copy_dir(&root().join("rules"), &rules);
        copy_dir(&root().join("templates"), &templates);
        setup(dir.path());
        let mut command = Command::new(env!("CARGO_BIN_EXE_tripline"));
        // TRIPLINE_TEST_STORE=postgres runs the same test on PostgreSQL (a new database).
        let mut store = Vec::new();
        if std::env::var("TRIPLINE_TEST_STORE").as_deref() == Ok("postgres")
            && !args.iter().any(|a| a.starts_with("--store"))
            && !env.iter().any(|(k, _)| *k == "TRIPLINE_STORE")
        {
            let url = postgres::database().expect(
                "TRIPLINE_TEST_STORE=postgres needs TRIPLINE_TEST_POSTGRES (scripts/postgres.sh)",
            );
            store = vec!["--store".to_string(), url];
        }
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--rules")
            .arg(&rules)
            .arg("--templates")
            .arg(&templates)
            .arg("--data")
            .arg(&data)
            .args(args)
            .args(&store)
            .env("TRIPLINE_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let log = Arc::new(Mutex::new(String::new()));
        let (child, base) = spawn(&mut command, &log);
        Server {
            child,
            command,
            base,
            dir,
            rules,
            templates,
            data,
            log,
            http: client(),
            admin_token: env
                .iter()
                .find(|(k, _)| *k == "TRIPLINE_ADMIN_TOKEN")
                .map(|(_, v)| v.to_string()),
        }
    }

    /// Stops the server with SIGTERM (a clean stop) and starts it again on the same folders.
    pub fn restart(&mut self) {
        assert_eq!(self.terminate(), Some(0), "clean stop:\n{}", self.log());
        self.relaunch();
    }

    /// Kills the server with SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts the (stopped) server again on the same folders and settings.
    pub fn relaunch(&mut self) {
        let (child, base) = spawn(&mut self.command, &self.log);
        self.child = child;
        self.base = base;
    }

    /// POSTs raw bytes to /webhook (no Content-Type, as some PostHog setups send).
    pub fn post(&self, body: impl Into<Vec<u8>>) -> (u16, Value) {
        post_to(&self.http, &self.base, body.into())
    }

    /// POSTs raw bytes to /webhook with these headers.
    pub fn post_with(&self, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Reply {
        let mut request = self.http.post(format!("{}/webhook", self.base));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.body(body.into()).send().unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply {
            status,
            headers,
            json,
        }
    }

    pub fn post_json(&self, body: &Value) -> (u16, Value) {
        self.post(body.to_string())
    }

    /// POSTs `body` as a new event (a new uuid), not as a retry of an earlier one.
    pub fn post_fresh(&self, body: &Value) -> (u16, Value) {
        self.post_json(&fresh(body.clone()))
    }

    /// GET /outbox, parsed.
    pub fn outbox(&self) -> Value {
        serde_json::from_str(&self.get("/outbox").1).unwrap()
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(token) = &self.admin_token {
            request = request.bearer_auth(token);
        }
        let response = request.send().unwrap();
        (response.status().as_u16(), response.text().unwrap())
    }

    pub fn rules_status(&self) -> Value {
        serde_json::from_str(&self.get("/rules").1).unwrap()
    }

    pub fn rule_names(&self) -> Vec<String> {
        self.rules_status()["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// The emails delivered to the outbox folder, as raw RFC 5322 text, once every email that
    /// was acknowledged has been delivered.
    pub fn emails(&self) -> Vec<String> {
        self.wait_for("the outbox to drain", |s| s.outbox()["pending"] == 0);
        let outbox = self.data.join("outbox");
        let Ok(entries) = std::fs::read_dir(&outbox) else {
            return vec![];
        };
        entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }

    /// The lines of a JSONL output file, each parsed, once every line acknowledged is written
    /// into its file (or the file cannot be written: see `lines_written`).
    pub fn jsonl(&self, file: &str) -> Vec<Value> {
        lines_written(&self.http, &self.base);
        jsonl_lines(&self.data.join(file))
    }

    /// The value of a metric line (`name{labels}` exactly as Prometheus prints it), 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (status, text) = self.get("/metrics");
        assert_eq!(status, 200, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// Sends SIGTERM and waits for the process; returns its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait().unwrap().code()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's address, as `host:port`, for raw connections.
    pub fn address(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// Sends SIGTERM and waits at most `limit` for the process to end; returns its exit code.
    /// Fails the test (after a SIGKILL) when it is still running by then.
    pub fn terminate_within(&mut self, limit: Duration) -> Option<i32> {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "still running {} s after SIGTERM\nlog:\n{}",
                    limit.as_secs(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (up to 30 s) until `done` holds; the watcher needs a moment after a file changes.
    pub fn wait_for(&self, what: &str, mut done: impl FnMut(&Server) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `command` and waits until it listens; its standard error is appended to `log`.
fn spawn(command: &mut Command, log: &Arc<Mutex<String>>) -> (Child, String) {
    let mut child = command.spawn().unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("listening on http://").nth(1) {
                // Text logs end the line with the address; JSON logs close a string after it.
                let addr: String = addr
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
                    .collect();
                let _ = tx.send(addr);
            }
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => (child, format!("http://{addr}")),
        Err(_) => {
            let _ = child.kill();
            panic!("server did not start:\n{}", log.lock().unwrap());
        }
    }
}

/// POSTs `body` to `base`'s /webhook: the status, and the reply as JSON (as text if it is not).
fn post_to(http: &reqwest::blocking::Client, base: &str, body: Vec<u8>) -> (u16, Value) {
    let response = http
        .post(format!("{base}/webhook"))
        .body(body)
        .send()
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}

/// The lines of a JSONL file, parsed (none if it does not exist).
/// Waits (up to 10 s) until `/readyz` shows no acknowledged line waiting for its file, unless a
/// file cannot be written (its lines wait until it can) or the service is not running.
fn lines_written(http: &reqwest::blocking::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let Ok(response) = http.get(format!("{base}/readyz")).send() else {
            return;
        };
        let ready: Value = response.json().unwrap_or_default();
        let Some(waiting) = ready["lines_waiting"].as_object() else {
            return;
        };
        if waiting.is_empty() || waiting.values().any(|w| !w["error"].is_null()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn jsonl_lines(file: &Path) -> Vec<Value> {
    match std::fs::read_to_string(file) {
        Ok(text) => text
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}"))
            })
            .collect(),
        Err(_) => vec![],
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// A header's value in a raw email.
pub fn header<'a>(email: &'a str, name: &str) -> Option<&'a str> {
    email
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}
