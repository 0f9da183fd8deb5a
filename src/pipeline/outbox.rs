//! The durable outbox: emails decided by rules wait here until they are delivered.
//!
//! The committer queues an email in the same transaction as the state change that decided it, so
//! an acknowledged email is never lost. A background task delivers pending emails through the
//! configured transport, soonest due first, up to [`MAX_IN_FLIGHT`] at once:
//! - `file`: each email becomes `<data>/outbox/<id>.eml`, written to a temporary file, synced and
//!   renamed, so a re-delivery after a crash rewrites the same file: exactly once.
//! - `smtp`: lettre's async SMTP client, one connection per attempt, each attempt bounded by
//!   [`ATTEMPT_DEADLINE`]. A temporary failure (connection refused, 4xx, a server that does not
//!   answer in time) waits and is retried with exponential backoff, across restarts; a permanent
//!   one (5xx) is recorded as failed, visible at `GET /outbox`. A crash after the server accepted
//!   an email but before we recorded it sends it again on restart (at least once), with the same
//!   Message-ID.
//!
//! A silent mail server holds the slot of the attempt it is silent to, never the others. The
//! sender reads only what it starts: the database's due index gives the next due emails, one per
//! free slot, and when the next one after them is due. An attempt lives only in memory until its
//! outcome is recorded, so shutdown drops the attempts in flight at once: those emails are still
//! pending and are tried again at the next start.

use lettre::AsyncTransport as _;
use lettre::Tokio1Executor;
use lettre::address::Envelope;
use lettre::transport::smtp::AsyncSmtpTransport;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::actions::email::mask_addresses;
use crate::clock::Clock;
use crate::config::{EmailTransport, ServeConfig, SmtpTls};
use crate::engine::QueuedEmail;
use crate::store::queue::{OutboxRecord, Status};
use crate::store::{Backend, StoreError};
use crate::telemetry;

/// Delivery attempts at once. A mail server that never answers holds one of them per email it
/// leaves hanging, until [`ATTEMPT_DEADLINE`].
pub const MAX_IN_FLIGHT: usize = 8;

/// The longest one SMTP attempt may take, connecting and the whole dialogue together. Past it
/// the attempt is a temporary failure, retried with the usual backoff.
pub const ATTEMPT_DEADLINE: Duration = Duration::from_secs(30);

/// How long the sender waits before it reads or writes the database again after that failed.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// Longest wait between two attempts at one email.
const MAX_BACKOFF_SECS: u64 = 300;

impl OutboxRecord {
    /// A new pending record for a rendered email.
    pub fn new(email: QueuedEmail, now_unix: u64) -> OutboxRecord {
        OutboxRecord {
            rule: email.rule,
            from: email.from,
            to: email.to,
            to_masked: email.to_masked,
            message: email.message,
            status: Status::Pending,
            created_unix: now_unix,
            attempts: 0,
            next_attempt_unix: now_unix,
            last_error: None,
            finished_unix: None,
        }
    }
}

/// How a delivery attempt ended.
#[derive(Debug)]
enum Outcome {
    Delivered,
    /// Try again later.
    Temporary(String),
    /// Give up: the server refused the email for good.
    Permanent(String),
}

/// The configured transport.
pub enum Transport {
    File(PathBuf),
    Smtp(Box<AsyncSmtpTransport<Tokio1Executor>>),
}

impl Transport {
    /// Writes emails as files in `<data_dir>/outbox`.
    pub fn files_in(data_dir: &Path) -> std::io::Result<Transport> {
        let dir = data_dir.join("outbox");
        std::fs::create_dir_all(&dir)?;
        Ok(Transport::File(dir))
    }

    /// Builds the transport from the server settings.
    pub fn from_config(config: &ServeConfig) -> anyhow::Result<Transport> {
        match config.email_transport {
            EmailTransport::File => Ok(Transport::files_in(&config.folders.data)?),
            EmailTransport::Smtp => {
                let host = config.smtp_host.as_deref().ok_or_else(|| {
                    anyhow::anyhow!(
                        "--email-transport smtp needs --smtp-host (or TRIPLINE_SMTP_HOST)"
                    )
                })?;
                let tls = match config.smtp_tls {
                    SmtpTls::None => Tls::None,
                    SmtpTls::Starttls => Tls::Required(TlsParameters::new(host.to_string())?),
                    SmtpTls::Tls => Tls::Wrapper(TlsParameters::new(host.to_string())?),
                };
                let port = config.smtp_port.unwrap_or(match config.smtp_tls {
                    SmtpTls::None => 25,
                    SmtpTls::Starttls => 587,
                    SmtpTls::Tls => 465,
                });
                let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                    .port(port)
                    .tls(tls);
                if let (Ok(user), Ok(password)) = (
                    std::env::var("TRIPLINE_SMTP_USERNAME"),
                    std::env::var("TRIPLINE_SMTP_PASSWORD"),
                ) {
                    builder = builder.credentials(Credentials::new(user, password));
                }
                Ok(Transport::Smtp(Box::new(builder.build())))
            }
        }
    }

    /// One attempt at one email. Cancelling it (at shutdown) leaves nothing half done that
    /// matters: the email is still pending in the database.
    async fn deliver(&self, id: u64, record: &OutboxRecord) -> Outcome {
        match self {
            Transport::File(dir) => {
                let (dir, message) = (dir.clone(), record.message.clone());
                match tokio::task::spawn_blocking(move || write_eml(&dir, id, &message)).await {
                    Ok(Ok(())) => Outcome::Delivered,
                    Ok(Err(e)) => Outcome::Temporary(format!("cannot write the .eml file: {e}")),
                    Err(e) => Outcome::Temporary(format!("the .eml file writer stopped: {e}")),
                }
            }
            Transport::Smtp(smtp) => {
                let envelope = match envelope(record) {
                    Ok(e) => e,
                    Err(e) => return Outcome::Permanent(e),
                };
                let attempt = smtp.send_raw(&envelope, record.message.as_bytes());
                match tokio::time::timeout(ATTEMPT_DEADLINE, attempt).await {
                    Ok(Ok(_)) => Outcome::Delivered,
                    Ok(Err(e)) if e.is_permanent() => Outcome::Permanent(format!(
                        "the mail server refused it: {}",
                        mask_addresses(&e.to_string())
                    )),
                    Ok(Err(e)) => Outcome::Temporary(format!(
                        "the mail server is not reachable or busy: {}",
                        mask_addresses(&e.to_string())
                    )),
                    Err(_) => Outcome::Temporary(format!(
                        "the mail server did not finish within {} s",
                        ATTEMPT_DEADLINE.as_secs()
                    )),
                }
            }
        }
    }
}

fn envelope(record: &OutboxRecord) -> Result<Envelope, String> {
    let from = record
        .from
        .parse()
        .map_err(|e| format!("bad sender address: {e}"))?;
    let to = record
        .to
        .iter()
        .map(|a| a.parse())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad recipient address: {e}"))?;
    Envelope::new(Some(from), to).map_err(|e| e.to_string())
}

/// Writes `<dir>/<id>.eml` atomically and durably.
fn write_eml(dir: &Path, id: u64, message: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{id}.eml.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(message.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(format!("{id}.eml")))?;
    std::fs::File::open(dir)?.sync_all()
}

/// One attempt that has ended, waiting to be recorded.
struct Attempt {
    id: u64,
    record: OutboxRecord,
    outcome: Outcome,
}

/// The attempts in flight, and how they are started and recorded.
struct Deliveries {
    db: Arc<dyn Backend>,
    transport: Arc<Transport>,
    clock: Clock,
    attempts: JoinSet<Attempt>,
    /// The email each running attempt is for, by task: a task that panics is known only by its id.
    in_flight: HashMap<tokio::task::Id, u64>,
}

impl Deliveries {
    fn new(db: Arc<dyn Backend>, transport: Arc<Transport>, clock: Clock) -> Deliveries {
        Deliveries {
            db,
            transport,
            clock,
            attempts: JoinSet::new(),
            in_flight: HashMap::new(),
        }
    }

    fn free_slots(&self) -> usize {
        MAX_IN_FLIGHT.saturating_sub(self.in_flight.len())
    }

    /// Starts an attempt at each due email not in flight, at most one per free slot; returns
    /// when the next email not started is due (perhaps already, when the slots are full).
    async fn start_due(&mut self) -> Result<Option<u64>, StoreError> {
        let free = self.free_slots();
        let busy: HashSet<u64> = self.in_flight.values().copied().collect();
        let db = self.db.clone();
        let now = self.clock.unix();
        let due = tokio::task::spawn_blocking(move || db.due(now, free, &busy))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))??;
        for (id, record) in due.deliveries {
            let transport = self.transport.clone();
            let task = self.attempts.spawn(async move {
                let outcome = transport.deliver(id, &record).await;
                Attempt {
                    id,
                    record,
                    outcome,
                }
            });
            self.in_flight.insert(task.id(), id);
        }
        Ok(due.next_due_unix)
    }

    /// Records how `first` and every other attempt already over ended, in one transaction.
    async fn record(
        &mut self,
        first: Result<(tokio::task::Id, Attempt), tokio::task::JoinError>,
    ) -> Result<(), StoreError> {
        let mut ended = Vec::new();
        let mut next = Some(first);
        while let Some(joined) = next {
            match joined {
                Ok((task, attempt)) => {
                    self.in_flight.remove(&task);
                    ended.push(attempt);
                }
                Err(e) => {
                    // The email stays pending, due as it was: it is tried again.
                    let id = self.in_flight.remove(&e.id());
                    error!(email.id = ?id, "an email delivery attempt failed: {e}");
                }
            }
            next = self.attempts.try_join_next_with_id();
        }
        if ended.is_empty() {
            return Ok(());
        }
        let db = self.db.clone();
        let now = self.clock.unix();
        tokio::task::spawn_blocking(move || record_outcomes(db.as_ref(), ended, now))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }
}

/// Writes what became of each attempt: sent or failed for good moves the email to the
/// finished history; a temporary failure reschedules it with backoff.
fn record_outcomes(db: &dyn Backend, ended: Vec<Attempt>, now: u64) -> Result<(), StoreError> {
    let mut txn = db.begin()?;
    let mut recorded = Vec::with_capacity(ended.len());
    for Attempt {
        id,
        mut record,
        outcome,
    } in ended
    {
        record.attempts += 1;
        match &outcome {
            Outcome::Delivered => {
                record.status = Status::Sent;
                record.last_error = None;
                record.finished_unix = Some(now);
                txn.finish(id, &record)?;
            }
            Outcome::Temporary(reason) => {
                record.next_attempt_unix = now + backoff_secs(record.attempts);
                record.last_error = Some(reason.clone());
                txn.update_pending(id, &record)?;
            }
            Outcome::Permanent(reason) => {
                record.status = Status::Failed;
                record.last_error = Some(reason.clone());
                record.finished_unix = Some(now);
                txn.finish(id, &record)?;
            }
        }
        recorded.push((id, record, outcome));
    }
    txn.commit()?;
    for (id, record, outcome) in recorded {
        match outcome {
            Outcome::Delivered => {
                info!(email.id = id, rule.id = %record.rule, to = %record.to_masked, "email delivered");
                metrics::counter!(telemetry::ACTIONS_SUCCEEDED.name, "kind" => "email", "rule" => record.rule)
                    .increment(1);
            }
            Outcome::Temporary(reason) => {
                warn!(email.id = id, attempts = record.attempts, retry_in_secs = backoff_secs(record.attempts), %reason, "email not delivered yet");
            }
            Outcome::Permanent(reason) => {
                error!(email.id = id, rule.id = %record.rule, to = %record.to_masked, %reason, "email failed for good");
                metrics::counter!(telemetry::ACTIONS_FAILED.name, "kind" => "email", "rule" => record.rule)
                    .increment(1);
            }
        }
    }
    Ok(())
}

/// The wait after the `attempts`-th failed attempt: 2 s doubling, at most [`MAX_BACKOFF_SECS`].
fn backoff_secs(attempts: u32) -> u64 {
    (1u64 << attempts.min(16)).min(MAX_BACKOFF_SECS)
}

/// Delivers pending emails until `shutdown` turns true (or its sender is gone). `wake` is
/// notified when emails are queued. Attempts still in flight then are dropped at once: their
/// emails stay pending for the next start.
pub async fn run_sender(
    db: Arc<dyn Backend>,
    transport: Arc<Transport>,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
    clock: Clock,
) {
    let mut deliveries = Deliveries::new(db, transport, clock.clone());
    // Set when the database failed, so that the sender waits a moment instead of spinning.
    let mut store_failed: Option<Instant> = None;
    while !*shutdown.borrow_and_update() {
        let mut wake_at = None;
        if let Some(failed) = store_failed.filter(|t| t.elapsed() < STORE_RETRY) {
            wake_at = Some(failed + STORE_RETRY);
        } else if deliveries.free_slots() > 0 {
            match deliveries.start_due().await {
                Ok(next_due) => wake_at = next_due.map(|t| Instant::now() + clock.until_unix(t)),
                Err(e) => {
                    error!("outbox: {e}");
                    store_failed = Some(Instant::now());
                    wake_at = Some(Instant::now() + STORE_RETRY);
                }
            }
        }
        tokio::select! {
            biased;
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            Some(ended) = deliveries.attempts.join_next_with_id() => {
                if let Err(e) = deliveries.record(ended).await {
                    error!("outbox: {e}");
                    store_failed = Some(Instant::now());
                }
            }
            () = wake.notified() => {}
            () = sleep_until(wake_at) => {}
        }
    }
    let interrupted = deliveries.in_flight.len();
    deliveries.attempts.shutdown().await;
    if interrupted > 0 {
        info!(
            emails = interrupted,
            "stopped the delivery attempts in flight; those emails stay pending for the next start"
        );
    }
}

/// Delivers every email due now, and returns once none is left in flight; returns when the
/// next pending one is due. For `replay --execute-into`, which writes files and then exits.
pub async fn deliver_due(
    db: Arc<dyn Backend>,
    transport: Arc<Transport>,
    clock: Clock,
) -> Result<Option<u64>, StoreError> {
    let mut deliveries = Deliveries::new(db, transport, clock);
    loop {
        let next_due = deliveries.start_due().await?;
        match deliveries.attempts.join_next_with_id().await {
            Some(ended) => deliveries.record(ended).await?,
            None => return Ok(next_due),
        }
    }
}

/// Sleeps until `at`, or for ever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redb::Db;

    /// A pending email to dana, due at `due_unix`.
    fn email(due_unix: u64) -> OutboxRecord {
        let mut record = OutboxRecord::new(
            QueuedEmail {
                rule: "r".into(),
                from: "growth@example.com".into(),
                to: vec!["dana@example.com".into()],
                to_masked: "d***@example.com".into(),
                subject: "Hi".into(),
                text: "Hello".into(),
                message: "Subject: Hi\r\n\r\nHello\r\n".into(),
            },
            due_unix,
        );
        record.next_attempt_unix = due_unix;
        record
    }

    fn queue(db: &Db, due: impl IntoIterator<Item = u64>) {
        let mut txn = db.begin().unwrap();
        for due in due {
            txn.queue(&email(due)).unwrap();
        }
        txn.commit().unwrap();
    }

    /// SMTP to 127.0.0.1:`port`, in plain text.
    fn smtp_to(port: u16) -> Arc<Transport> {
        let smtp = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(port)
            .tls(Tls::None)
            .build();
        Arc::new(Transport::Smtp(Box::new(smtp)))
    }

    #[tokio::test]
    async fn due_emails_are_written_and_later_ones_wait() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path()).unwrap());
        let now = Clock::wall().unix();
        // More than there are slots, and one not due for an hour.
        queue(&db, (0..MAX_IN_FLIGHT as u64 + 3).map(|_| now));
        queue(&db, [now + 3600]);
        let transport = Arc::new(Transport::files_in(dir.path()).unwrap());
        let next = deliver_due(db.clone(), transport, Clock::wall())
            .await
            .unwrap();
        assert_eq!(next, Some(now + 3600), "when the sender wakes next");
        let status = db.outbox_status(50).unwrap();
        assert_eq!(status.pending, 1);
        assert_eq!(status.finished, MAX_IN_FLIGHT as u64 + 3);
        assert!(status.recent.iter().all(|(_, r)| r.status == Status::Sent));
        let written = std::fs::read_dir(dir.path().join("outbox"))
            .unwrap()
            .count();
        assert_eq!(written, MAX_IN_FLIGHT + 3);
    }

    #[tokio::test]
    async fn an_unreachable_server_is_retried_later() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path()).unwrap());
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        queue(&db, [Clock::wall().unix()]);
        let before = Clock::wall().unix();
        let next = deliver_due(db.clone(), smtp_to(port), Clock::wall())
            .await
            .unwrap();
        let status = db.outbox_status(50).unwrap();
        let (_, record) = &status.waiting[0];
        assert_eq!(record.attempts, 1);
        assert!(record.next_attempt_unix >= before + 2, "{record:?}");
        assert_eq!(next, Some(record.next_attempt_unix));
        assert!(
            record
                .last_error
                .as_deref()
                .unwrap()
                .contains("not reachable"),
            "{record:?}"
        );
    }

    #[tokio::test]
    async fn a_silent_server_fills_the_slots_and_shutdown_leaves_the_emails_pending() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path()).unwrap());
        queue(
            &db,
            (0..MAX_IN_FLIGHT as u64 + 2).map(|_| Clock::wall().unix()),
        );
        // Accepts every connection and never says a word.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                held.push(stream);
                let _ = accepted_tx.send(held.len());
            }
        });

        let (stop, stopped) = watch::channel(false);
        let sender = tokio::spawn(run_sender(
            db.clone(),
            smtp_to(port),
            Arc::new(Notify::new()),
            stopped,
            Clock::wall(),
        ));
        for n in 1..=MAX_IN_FLIGHT {
            assert_eq!(accepted.recv().await, Some(n), "attempts run side by side");
        }
        // A bound on the sender, not on the silent server: one more connection would be a
        // ninth attempt at once.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(accepted.is_empty(), "at most {MAX_IN_FLIGHT} at once");

        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), sender)
            .await
            .expect("the sender stops without waiting for the silent server")
            .unwrap();
        let status = db.outbox_status(50).unwrap();
        assert_eq!(status.pending, MAX_IN_FLIGHT as u64 + 2);
        assert!(
            status.waiting.iter().all(|(_, r)| r.attempts == 0),
            "an interrupted attempt is not counted: {:?}",
            status.waiting
        );
        server.abort();
    }
}
