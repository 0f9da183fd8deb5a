//! Email delivered for real: tripline's SMTP transport against a real SMTP server (aiosmtpd, from
//! PyPI; `scripts/test.sh` installs it in a virtual environment). The server stores what it receives in a Maildir.

mod common;

use common::{Server, fixture_json, header, root};
use serde_json::{Value, json};
use std::io::ErrorKind;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A real SMTP server on 127.0.0.1.
struct SmtpServer {
    child: Child,
    port: u16,
    maildir: PathBuf,
}

impl SmtpServer {
    /// Starts aiosmtpd with `handler` ("Mailbox" stores messages; "RejectAll" refuses them).
    fn start(port: u16, maildir: &Path, handler: &str) -> SmtpServer {
        let class = match handler {
            "Mailbox" => "aiosmtpd.handlers.Mailbox",
            _ => "smtp_reject.RejectAll",
        };
        // scripts/test.sh points this at a virtual environment that has aiosmtpd.
        let python = std::env::var("TRIPLINE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut command = Command::new(python);
        command
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{port}"),
                "-c",
                class,
            ])
            .env("PYTHONPATH", root().join("tests/fixtures/smtp"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if handler == "Mailbox" {
            command.arg(maildir);
        }
        let child = command.spawn().expect(
            "python3 with aiosmtpd is needed: run scripts/test.sh, or pip install aiosmtpd",
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "aiosmtpd did not start (pip install aiosmtpd)"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        SmtpServer {
            child,
            port,
            maildir: maildir.to_path_buf(),
        }
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Every message received, as raw text.
    fn received(&self) -> Vec<String> {
        ["new", "cur"]
            .iter()
            .filter_map(|d| std::fs::read_dir(self.maildir.join(d)).ok())
            .flatten()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP server on 127.0.0.1 that stands in front of a mail server, or of none: it holds the
/// first `silent` connections open without a word (a hung mail server), and forwards each later
/// one, byte for byte, to `forward_to`.
struct Relay {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// A mail server that accepts every connection and never answers.
    fn silent() -> Relay {
        Relay::start(usize::MAX, None)
    }

    /// A proxy to `forward_to` that holds the first connection silent.
    fn holding_first(forward_to: u16) -> Relay {
        Relay::start(1, Some(forward_to))
    }

    fn start(silent: usize, forward_to: Option<u16>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                let stream = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(e) => panic!("accept: {e}"),
                };
                stream.set_nonblocking(false).unwrap();
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                match forward_to {
                    Some(upstream) if n > silent => forward(stream, upstream),
                    _ => held.push(stream),
                }
            }
            // The held connections close here, with the listener.
        });
        Relay {
            port,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes the listener and every held connection, freeing the port.
    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Copies bytes both ways between `client` and a new connection to `upstream`.
fn forward(client: TcpStream, upstream: u16) {
    let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        });
    };
    pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
    pipe(server, client);
}

/// Queues one email each to `n` people (the rule emails on the fifth use).
fn queue_emails_to(server: &Server, n: usize) {
    for i in 0..n {
        let person = feature_used(&format!("user_{i}"), &format!("person{i}@example.com"));
        for _ in 0..5 {
            assert_eq!(server.post_fresh(&person).0, 200);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn smtp_args(port: u16) -> Vec<String> {
    [
        "--email-transport",
        "smtp",
        "--smtp-host",
        "127.0.0.1",
        "--smtp-port",
        &port.to_string(),
        "--smtp-tls",
        "none",
        "--email-from",
        "Growth <growth@example.com>",
    ]
    .map(String::from)
    .to_vec()
}

fn feature_used(distinct_id: &str, email: &str) -> Value {
    let mut body = fixture_json("feature_used.json");
    body["event"]["distinct_id"] = json!(distinct_id);
    body["person"]["properties"]["email"] = json!(email);
    body
}

#[test]
fn emails_reach_a_real_smtp_server_and_wait_while_it_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let smtp = SmtpServer::start(port, &dir.path().join("maildir"), "Mailbox");
    let args = smtp_args(smtp.port);
    let server = Server::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>(), |_| {});

    let dana = feature_used("user_4471", "dana@example.com");
    for _ in 0..5 {
        assert_eq!(server.post_fresh(&dana).0, 200);
    }
    server.wait_for("the email to be sent", |s| s.outbox()["finished"] == 1);
    let received = smtp.received();
    assert_eq!(received.len(), 1);
    let mail = &received[0];
    assert_eq!(
        header(mail, "X-RcptTo"),
        Some("dana@example.com"),
        "the envelope recipient"
    );
    assert_eq!(header(mail, "To"), Some("dana@example.com"));
    assert_eq!(header(mail, "From"), Some("Growth <growth@example.com>"));
    assert_eq!(
        header(mail, "Subject"),
        Some("You're a demo_feature power user: here is 20% off")
    );
    assert!(header(mail, "Message-ID").is_some() && header(mail, "Date").is_some());
    assert!(
        mail.contains("You have used demo_feature 5 times"),
        "{mail}"
    );

    // The mail server goes down: the next email waits, with the reason visible.
    let maildir = smtp.maildir.clone();
    smtp.stop();
    let sam = feature_used("user_9", "sam@example.com");
    for _ in 0..5 {
        assert_eq!(
            server.post_fresh(&sam).0,
            200,
            "acknowledged: the email is safe in the outbox"
        );
    }
    server.wait_for("a failed attempt", |s| {
        s.outbox()["waiting"][0]["attempts"].as_u64() >= Some(1)
    });
    let outbox = server.outbox();
    assert_eq!(outbox["pending"], json!(1));
    assert!(
        outbox["waiting"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("not reachable"),
        "{outbox}"
    );
    assert_eq!(
        outbox["waiting"][0]["to"],
        json!("s***@example.com"),
        "addresses are masked"
    );

    // It comes back: the email arrives, once.
    let smtp = SmtpServer::start(port, &maildir, "Mailbox");
    server.wait_for("the waiting email to be sent", |s| {
        s.outbox()["finished"] == 2
    });
    let received = smtp.received();
    assert_eq!(received.len(), 2);
    let to_sam: Vec<&String> = received
        .iter()
        .filter(|m| header(m, "To") == Some("sam@example.com"))
        .collect();
    assert_eq!(to_sam.len(), 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(smtp.received().len(), 2, "nothing is sent twice");
}

#[test]
fn a_permanent_refusal_is_recorded_and_visible() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start(free_port(), &dir.path().join("maildir"), "RejectAll");
    let args = smtp_args(smtp.port);
    let server = Server::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>(), |_| {});
    let dana = feature_used("user_4471", "dana@example.com");
    for _ in 0..5 {
        server.post_fresh(&dana);
    }
    server.wait_for("the refusal", |s| s.outbox()["finished"] == 1);
    let outbox = server.outbox();
    assert_eq!(
        outbox["pending"],
        json!(0),
        "not retried: the refusal is permanent"
    );
    let failed = &outbox["recent"][0];
    assert_eq!(failed["status"], json!("failed"));
    assert_eq!(failed["rule"], json!("power-user-discount"));
    assert!(
        failed["last_error"].as_str().unwrap().contains("550"),
        "{failed}"
    );
    assert!(server.log().contains("email failed for good"));
    assert!(
        !server.log().contains("dana@example.com"),
        "no whole address in the logs"
    );
}

#[test]
fn the_outbox_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = smtp_args(port);
    let mut server =
        Server::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>(), |_| {});
    let dana = feature_used("user_4471", "dana@example.com");
    for _ in 0..5 {
        server.post_fresh(&dana);
    }
    server.wait_for("a failed attempt", |s| {
        s.outbox()["waiting"][0]["attempts"].as_u64() >= Some(1)
    });
    server.restart(); // SIGTERM: exits 0
    assert_eq!(
        server.outbox()["pending"],
        json!(1),
        "still waiting after the restart"
    );
    let smtp = SmtpServer::start(port, &dir.path().join("maildir"), "Mailbox");
    server.wait_for("the email to be sent", |s| s.outbox()["finished"] == 1);
    assert_eq!(smtp.received().len(), 1);
}

#[test]
fn a_hung_mail_server_does_not_hold_up_shutdown_and_its_emails_wait() {
    let dir = tempfile::tempdir().unwrap();
    let silent = Relay::silent();
    let port = silent.port;
    let args = smtp_args(port);
    let mut server =
        Server::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>(), |_| {});
    queue_emails_to(&server, 6);
    server.wait_for("six attempts at once, all unanswered", |_| {
        silent.accepted() >= 6
    });
    assert_eq!(server.outbox()["pending"], json!(6));

    assert_eq!(
        server.terminate_within(Duration::from_secs(10)),
        Some(0),
        "a clean stop, without waiting for the mail server"
    );
    silent.stop();

    // At the next start the emails are still there, and go out once the server answers.
    let smtp = SmtpServer::start(port, &dir.path().join("maildir"), "Mailbox");
    server.relaunch();
    server.wait_for("the six emails to be sent", |s| s.outbox()["finished"] == 6);
    assert_eq!(recipients(&smtp), people(6), "each once");
}

#[test]
fn a_hung_attempt_does_not_hold_up_the_other_emails() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start(free_port(), &dir.path().join("maildir"), "Mailbox");
    let proxy = Relay::holding_first(smtp.port);
    let args = smtp_args(proxy.port);
    let mut server =
        Server::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>(), |_| {});
    queue_emails_to(&server, 4);
    server.wait_for("the three others to be sent", |s| {
        s.outbox()["finished"] == 3
    });
    let outbox = server.outbox();
    assert_eq!(outbox["pending"], json!(1));
    assert_eq!(
        outbox["waiting"][0]["attempts"],
        json!(0),
        "its first attempt still hangs: {outbox}"
    );
    assert_eq!(smtp.received().len(), 3);

    // The hung attempt is dropped at shutdown and made again at the next start.
    assert_eq!(server.terminate_within(Duration::from_secs(10)), Some(0));
    server.relaunch();
    server.wait_for("the held email to be sent", |s| s.outbox()["finished"] == 4);
    assert_eq!(recipients(&smtp), people(4), "each once");
}

/// The `To` of every email the server received, sorted.
fn recipients(smtp: &SmtpServer) -> Vec<String> {
    let mut to: Vec<String> = smtp
        .received()
        .iter()
        .map(|m| header(m, "To").unwrap().to_string())
        .collect();
    to.sort();
    to
}

/// The addresses `queue_emails_to` sends to.
fn people(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("person{i}@example.com")).collect()
}
