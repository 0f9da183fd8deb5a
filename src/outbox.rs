//! The durable outbox: emails decided by rules wait here until they are delivered.
//!
//! The committer queues an email in the same transaction as the state change that decided it, so
//! an acknowledged email is never lost. A background task delivers pending emails through the
//! configured transport, oldest first:
//! - `file`: each email becomes `<data>/outbox/<id>.eml`, written to a temporary file, synced and
//!   renamed, so a re-delivery after a crash rewrites the same file: exactly once.
//! - `smtp`: lettre's SMTP client. A temporary failure (connection refused, 4xx) waits and is
//!   retried with exponential backoff, across restarts; a permanent one (5xx) is recorded as
//!   failed, visible at `GET /outbox`. A crash after the server accepted an email but before we
//!   recorded it sends it again on restart (at least once), with the same Message-ID.

use lettre::Transport as _;
use lettre::address::Envelope;
use lettre::transport::smtp::SmtpTransport;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::actions::email::mask_addresses;
use crate::config::{EmailTransport, ServeConfig, SmtpTls};
use crate::db::Db;
use crate::engine::QueuedEmail;

/// Longest wait between two attempts at one email.
const MAX_BACKOFF_SECS: u64 = 300;

/// Where an email stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Sent,
    Failed,
}

/// One email in the outbox, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxRecord {
    pub rule: String,
    pub from: String,
    pub to: Vec<String>,
    pub to_masked: String,
    /// The whole RFC 5322 message.
    pub message: String,
    pub status: Status,
    pub created_unix: u64,
    pub attempts: u32,
    pub next_attempt_unix: u64,
    pub last_error: Option<String>,
    pub finished_unix: Option<u64>,
}

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

    /// The record of an email a rule could not make (a field its template uses was missing):
    /// failed from the start, with the reason, so that it is seen at `GET /outbox`.
    pub fn not_made(rule: String, reason: String, now_unix: u64) -> OutboxRecord {
        OutboxRecord {
            rule,
            from: String::new(),
            to: Vec::new(),
            to_masked: String::new(),
            message: String::new(),
            status: Status::Failed,
            created_unix: now_unix,
            attempts: 0,
            next_attempt_unix: now_unix,
            last_error: Some(reason),
            finished_unix: Some(now_unix),
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
    Smtp(Box<SmtpTransport>),
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
                let mut builder = SmtpTransport::builder_dangerous(host)
                    .port(port)
                    .tls(tls)
                    .timeout(Some(Duration::from_secs(20)));
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

    fn deliver(&self, id: u64, record: &OutboxRecord) -> Outcome {
        match self {
            Transport::File(dir) => match write_eml(dir, id, &record.message) {
                Ok(()) => Outcome::Delivered,
                Err(e) => Outcome::Temporary(format!("cannot write the .eml file: {e}")),
            },
            Transport::Smtp(smtp) => {
                let envelope = match envelope(record) {
                    Ok(e) => e,
                    Err(e) => return Outcome::Permanent(e),
                };
                match smtp.send_raw(&envelope, record.message.as_bytes()) {
                    Ok(_) => Outcome::Delivered,
                    Err(e) if e.is_permanent() => Outcome::Permanent(format!(
                        "the mail server refused it: {}",
                        mask_addresses(&e.to_string())
                    )),
                    Err(e) => Outcome::Temporary(format!(
                        "the mail server is not reachable or busy: {}",
                        mask_addresses(&e.to_string())
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

/// Delivers pending emails until `shutdown` turns true. `wake` is notified when emails are queued.
pub async fn run_sender(
    db: Arc<Db>,
    transport: Arc<Transport>,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let next_due = {
            let (db, transport) = (db.clone(), transport.clone());
            match tokio::task::spawn_blocking(move || deliver_due(&db, &transport)).await {
                Ok(Ok(next)) => next,
                Ok(Err(e)) => {
                    error!("outbox: {e}");
                    Some(now_unix() + 1)
                }
                Err(e) => {
                    error!("outbox task failed: {e}");
                    Some(now_unix() + 1)
                }
            }
        };
        let wait = next_due.map_or(Duration::from_secs(3600), |t| {
            Duration::from_secs(t.saturating_sub(now_unix()))
        });
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// Attempts every email that is due; returns when the next one not yet due will be.
pub fn deliver_due(
    db: &Db,
    transport: &Transport,
) -> Result<Option<u64>, crate::store::StoreError> {
    let mut next_due: Option<u64> = None;
    for (id, mut record) in db.pending_emails()? {
        let now = now_unix();
        if record.next_attempt_unix > now {
            next_due = Some(next_due.map_or(record.next_attempt_unix, |n| {
                n.min(record.next_attempt_unix)
            }));
            continue;
        }
        record.attempts += 1;
        let outcome = transport.deliver(id, &record);
        let mut txn = db.write()?;
        match outcome {
            Outcome::Delivered => {
                info!(email.id = id, rule.id = %record.rule, to = %record.to_masked, "email delivered");
                metrics::counter!("tripline_actions_succeeded_total", "kind" => "email", "rule" => record.rule.clone())
                    .increment(1);
                record.status = Status::Sent;
                record.last_error = None;
                record.finished_unix = Some(now_unix());
                txn.finish_email(id, &record)?;
            }
            Outcome::Temporary(reason) => {
                let backoff = (1u64 << record.attempts.min(16)).min(MAX_BACKOFF_SECS);
                warn!(email.id = id, attempts = record.attempts, retry_in_secs = backoff, %reason, "email not delivered yet");
                record.next_attempt_unix = now_unix() + backoff;
                record.last_error = Some(reason);
                next_due = Some(next_due.map_or(record.next_attempt_unix, |n| {
                    n.min(record.next_attempt_unix)
                }));
                txn.update_pending(id, &record)?;
            }
            Outcome::Permanent(reason) => {
                error!(email.id = id, rule.id = %record.rule, to = %record.to_masked, %reason, "email failed for good");
                metrics::counter!("tripline_actions_failed_total", "kind" => "email", "rule" => record.rule.clone())
                    .increment(1);
                record.status = Status::Failed;
                record.last_error = Some(reason);
                record.finished_unix = Some(now_unix());
                txn.finish_email(id, &record)?;
            }
        }
        txn.commit()?;
    }
    Ok(next_due)
}

/// Seconds since 1970.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
