//! Server settings, read from flags or `TRIPLINE_*` environment variables.

use clap::{Args, ValueEnum};
use lettre::message::Mailbox;
use std::path::PathBuf;

/// Where the rules, templates and data are: the same flags for `serve`, `check`, `test` and
/// `replay`.
#[derive(Debug, Clone, Args)]
pub struct Folders {
    /// Folder of rule files (*.toml).
    #[arg(long, env = "TRIPLINE_RULES", default_value = "rules")]
    pub rules: PathBuf,
    /// Folder of email templates (NAME.text.hbs, NAME.html.hbs).
    #[arg(long, env = "TRIPLINE_TEMPLATES", default_value = "templates")]
    pub templates: PathBuf,
    /// Folder for the state database, output files and the email outbox (`serve` creates it);
    /// rules' output paths must stay inside it.
    #[arg(long, env = "TRIPLINE_DATA", default_value = "data")]
    pub data: PathBuf,
}

/// The sender of emails whose rule does not set `from`: for `serve`, and for the emails that
/// `test` and `replay` render.
#[derive(Debug, Clone, Args)]
pub struct Sender {
    /// Sender of emails whose rule does not set `from`.
    #[arg(
        long,
        env = "TRIPLINE_EMAIL_FROM",
        default_value = "tripline <tripline@localhost>"
    )]
    pub email_from: Mailbox,
}

/// Settings of `tripline serve`. A flag wins over its environment variable.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address and port to listen on.
    #[arg(long, env = "TRIPLINE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    #[command(flatten)]
    pub folders: Folders,
    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "TRIPLINE_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// How long an event id is remembered, so a retried delivery has no second effect.
    #[arg(long, env = "TRIPLINE_DEDUPE_RETENTION_DAYS", default_value_t = 7)]
    pub dedupe_retention_days: u64,
    #[command(flatten)]
    pub sender: Sender,
    /// How emails are delivered: `file` writes <data>/outbox/<id>.eml, `smtp` sends them.
    #[arg(long, env = "TRIPLINE_EMAIL_TRANSPORT", value_enum, default_value_t = EmailTransport::File)]
    pub email_transport: EmailTransport,
    /// SMTP server host (with --email-transport smtp). Credentials, if any, come from the
    /// environment only: TRIPLINE_SMTP_USERNAME and TRIPLINE_SMTP_PASSWORD.
    #[arg(long, env = "TRIPLINE_SMTP_HOST")]
    pub smtp_host: Option<String>,
    /// SMTP server port [default: 25 with --smtp-tls none, 587 with starttls, 465 with tls].
    #[arg(long, env = "TRIPLINE_SMTP_PORT")]
    pub smtp_port: Option<u16>,
    /// How the SMTP connection is encrypted.
    #[arg(long, env = "TRIPLINE_SMTP_TLS", value_enum, default_value_t = SmtpTls::Starttls)]
    pub smtp_tls: SmtpTls,
}

/// Where emails go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EmailTransport {
    File,
    Smtp,
}

/// SMTP encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SmtpTls {
    /// Plain text (only for a server on the same machine or network).
    None,
    /// Upgrade the connection with STARTTLS (required).
    Starttls,
    /// TLS from the first byte (SMTPS).
    Tls,
}
