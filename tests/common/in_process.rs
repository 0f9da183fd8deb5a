//! The service run inside the test process on a manual clock, over a real socket and real files:
//! for what depends on the date (ids remembered for days, keys forgotten when idle), which a test
//! moves forward instead of waiting for. Moving the clock wakes the timer of pending waits;
//! anything else the service does with the new time happens at its next look (a request, a
//! start, the committer's tick).

use clap::Parser;
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tripline::clock::Clock;
use tripline::config::ServeArgs;

use super::{copy_dir, jsonl_lines, lines_written, post_to, root};

/// `tripline serve`'s settings, read from flags as the binary reads them.
#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    serve: ServeArgs,
}

pub struct InProcess {
    pub clock: Clock,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    args: Vec<String>,
    running: Option<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
    http: reqwest::blocking::Client,
}

impl InProcess {
    /// Starts on copies of the shipped rules and templates, with these extra flags, on a manual
    /// clock that reads `start`.
    pub fn start(args: &[&str], start: chrono::DateTime<chrono::Utc>) -> InProcess {
        InProcess::start_with(args, start, |_| {})
    }

    /// [`InProcess::start`], after `setup` has changed the copied folders (it gets the
    /// temporary root, holding `rules/` and `templates/`).
    pub fn start_with(
        args: &[&str],
        start: chrono::DateTime<chrono::Utc>,
        setup: impl FnOnce(&std::path::Path),
    ) -> InProcess {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&root().join("rules"), &dir.path().join("rules"));
        copy_dir(&root().join("templates"), &dir.path().join("templates"));
        setup(dir.path());
        let data = dir.path().join("data");
        let mut all: Vec<String> = vec!["tripline".into()];
        for (flag, folder) in [
            ("--rules", "rules"),
            ("--templates", "templates"),
            ("--data", "data"),
        ] {
            all.push(flag.into());
            all.push(dir.path().join(folder).display().to_string());
        }
        all.extend(args.iter().map(|a| a.to_string()));
        // TRIPLINE_TEST_STORE=postgres runs the same test on PostgreSQL (a new database).
        if std::env::var("TRIPLINE_TEST_STORE").as_deref() == Ok("postgres")
            && !args.iter().any(|a| a.starts_with("--store"))
        {
            all.push("--store".into());
            all.push(super::postgres::database().expect("TRIPLINE_TEST_POSTGRES is set"));
        }
        let mut server = InProcess {
            clock: Clock::manual(start),
            base: String::new(),
            dir,
            data,
            args: all,
            running: None,
            http: super::client(),
        };
        server.launch();
        server
    }

    /// Starts the (stopped) service on the same folders, settings and clock.
    pub fn launch(&mut self) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut args = self.args.clone();
        args.extend(["--listen".into(), format!("127.0.0.1:{port}")]);
        let config = Flags::parse_from(args).serve.resolve().unwrap();
        let clock = self.clock.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let shutdown = async {
                let _ = stopped.await;
            };
            runtime
                .block_on(tripline::app::serve(config, clock, shutdown))
                .unwrap();
        });
        self.base = format!("http://127.0.0.1:{port}");
        self.running = Some((stop, thread));
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .http
            .get(format!("{}/readyz", self.base))
            .send()
            .is_err()
        {
            assert!(Instant::now() < deadline, "the service did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the service in order and starts it again on the same folders, settings and clock.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Stops the service in order.
    pub fn stop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.send(());
            thread.join().expect("the service stopped cleanly");
        }
    }

    pub fn post_json(&self, body: &Value) -> (u16, Value) {
        post_to(&self.http, &self.base, body.to_string().into())
    }

    /// The lines of a JSONL file in the data folder, once every line acknowledged is written.
    pub fn jsonl(&self, file: &str) -> Vec<Value> {
        lines_written(&self.http, &self.base);
        jsonl_lines(&self.data.join(file))
    }

    /// GET a path, parsed as JSON.
    pub fn get_json(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    /// Waits (up to 30 s) until `done` holds: what a moved clock makes due happens on the
    /// service's own tasks, a moment later.
    pub fn wait_for(&self, what: &str, mut done: impl FnMut(&InProcess) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
