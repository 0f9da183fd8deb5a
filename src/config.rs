//! Server settings, read from flags or `TRIPLINE_*` environment variables.

use clap::Args;
use lettre::message::Mailbox;
use std::path::PathBuf;

/// Settings of `tripline serve`. A flag wins over its environment variable.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address and port to listen on.
    #[arg(long, env = "TRIPLINE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Folder of rule files (*.toml).
    #[arg(long, env = "TRIPLINE_RULES", default_value = "rules")]
    pub rules: PathBuf,
    /// Folder of email templates (NAME.text.hbs, NAME.html.hbs).
    #[arg(long, env = "TRIPLINE_TEMPLATES", default_value = "templates")]
    pub templates: PathBuf,
    /// Folder for output files and the email outbox; created if missing.
    #[arg(long, env = "TRIPLINE_DATA", default_value = "data")]
    pub data: PathBuf,
    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "TRIPLINE_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Sender of emails whose rule does not set `from`.
    #[arg(
        long,
        env = "TRIPLINE_EMAIL_FROM",
        default_value = "tripline <tripline@localhost>"
    )]
    pub email_from: Mailbox,
}
