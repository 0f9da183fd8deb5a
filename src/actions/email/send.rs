//! Delivering queued emails through the configured transport:
//! - `file`: each email becomes `<data>/outbox/<id>.eml`, written to a temporary file, synced and
//!   renamed, so a re-delivery after a crash rewrites the same file: exactly once.
//! - `smtp`: lettre's async SMTP client, one connection per attempt, each attempt bounded by
//!   [`ATTEMPT_DEADLINE`]. A temporary failure (connection refused, 4xx, a server that does not
//!   answer in time) is retried by the outbox with backoff, across restarts; a permanent one (5xx)
//!   is recorded as failed, visible at `GET /outbox`. A crash after the server accepted an email
//!   but before we recorded it sends it again on restart (at least once), with the same
//!   Message-ID.

use lettre::AsyncTransport as _;
use lettre::Tokio1Executor;
use lettre::address::Envelope;
use lettre::transport::smtp::AsyncSmtpTransport;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use super::{Queued, mask_addresses};
use crate::actions::{Attempt, Bound, Sender, write_file_durably};
use crate::config::{EmailTransport, ServeConfig, SmtpTls};
use crate::store::queue::OutboxRecord;

/// Attempts at once. A mail server that never answers holds one of them per email it leaves
/// hanging, until [`ATTEMPT_DEADLINE`].
pub const MAX_IN_FLIGHT: usize = 8;

/// The longest one SMTP attempt may take, connecting and the whole dialogue together. Past it
/// the attempt is a temporary failure, retried with the usual backoff.
pub const ATTEMPT_DEADLINE: Duration = Duration::from_secs(30);

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
            EmailTransport::File => Ok(Transport::files_in(&config.declared.folders.data)?),
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

    /// One attempt at one email.
    async fn deliver(&self, id: u64, record: &OutboxRecord) -> Attempt {
        let email = match Queued::from_payload(&record.payload) {
            Ok(email) => email,
            Err(e) => return Attempt::Permanent(format!("the stored email cannot be read: {e}")),
        };
        match self {
            Transport::File(dir) => {
                let (dir, message) = (dir.clone(), email.message);
                match tokio::task::spawn_blocking(move || write_file_durably(&dir, &format!("{id}.eml"), message.as_bytes())).await {
                    Ok(Ok(())) => Attempt::Delivered,
                    Ok(Err(e)) => Attempt::Temporary(format!("cannot write the .eml file: {e}")),
                    Err(e) => Attempt::Temporary(format!("the .eml file writer stopped: {e}")),
                }
            }
            Transport::Smtp(smtp) => {
                let envelope = match envelope(&email) {
                    Ok(e) => e,
                    Err(e) => return Attempt::Permanent(e),
                };
                let attempt = smtp.send_raw(&envelope, email.message.as_bytes());
                match tokio::time::timeout(ATTEMPT_DEADLINE, attempt).await {
                    Ok(Ok(_)) => Attempt::Delivered,
                    Ok(Err(e)) if e.is_permanent() => Attempt::Permanent(format!(
                        "the mail server refused it: {}",
                        mask_addresses(&e.to_string())
                    )),
                    Ok(Err(e)) => Attempt::Temporary(format!(
                        "the mail server is not reachable or busy: {}",
                        mask_addresses(&e.to_string())
                    )),
                    Err(_) => Attempt::Temporary(format!(
                        "the mail server did not finish within {} s",
                        ATTEMPT_DEADLINE.as_secs()
                    )),
                }
            }
        }
    }
}

fn envelope(email: &Queued) -> Result<Envelope, String> {
    let from = email
        .from
        .parse()
        .map_err(|e| format!("bad sender address: {e}"))?;
    let to = email
        .to
        .iter()
        .map(|a| a.parse())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad recipient address: {e}"))?;
    Envelope::new(Some(from), to).map_err(|e| e.to_string())
}

impl Sender for Transport {
    fn attempt<'a>(
        &'a self,
        id: u64,
        record: &'a OutboxRecord,
    ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>> {
        Box::pin(self.deliver(id, record))
    }

    fn max_in_flight(&self) -> Bound {
        Bound::Kind(MAX_IN_FLIGHT)
    }
}
