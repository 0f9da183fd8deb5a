//! Settings: read from a `tripline.toml` file, `TRIPLINE_*` environment variables and flags.
//!
//! Precedence, for every setting: a flag wins over its environment variable, which wins over the
//! configuration file, which wins over the default. The clap types (`*Args`) hold what was given
//! on the command line or in the environment (clap settles those two); [`ConfigFile`] mirrors the
//! TOML; [`ServeConfig`] is what runs, built once by [`ServeArgs::resolve`]. A bad file is
//! reported like a bad rule file, `file:line:col` with a caret, and stops start-up (exit code 2).
//!
//! Secrets never live in the configuration file: it names the environment variables or files
//! that hold them (see `ingest/auth.rs`).

use clap::{Args, ValueEnum};
use indexmap::IndexMap;
use lettre::message::Mailbox;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

use crate::actions::http::endpoint::{Endpoint, EndpointConfig, Endpoints};
use crate::diag::Diagnostic;
use crate::diag::toml_diagnostic;
use crate::ingest::auth::{SecretRef, Source, SourceConfig, Sources};
use crate::redact::{HASH_KEY_ENV, HashKey};
use crate::units::{self, DURATION_EXAMPLES, DurationError};
use std::sync::Arc;

/// Where the rules, templates and data are, and the configuration file that may say so: the
/// same flags for `serve`, `check`, `test` and `replay`.
#[derive(Debug, Clone, Default, Args)]
pub struct FolderArgs {
    /// Configuration file (see docs/CONFIGURATION.md); its folders and settings apply unless a
    /// flag or environment variable says otherwise.
    #[arg(long, env = "TRIPLINE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Folder of rule files (*.toml) [default: rules].
    #[arg(long, env = "TRIPLINE_RULES")]
    pub rules: Option<PathBuf>,
    /// Folder of email templates (NAME.text.hbs, NAME.html.hbs) [default: templates].
    #[arg(long, env = "TRIPLINE_TEMPLATES")]
    pub templates: Option<PathBuf>,
    /// Folder for the state database, output files and the email outbox (`serve` creates it);
    /// rules' output paths must stay inside it [default: data].
    #[arg(long, env = "TRIPLINE_DATA")]
    pub data: Option<PathBuf>,
    /// Sender of emails whose rule does not set `from` [default: tripline <tripline@localhost>].
    #[arg(long, env = "TRIPLINE_EMAIL_FROM")]
    pub email_from: Option<Mailbox>,
}

/// The folders in use.
#[derive(Debug, Clone, Default)]
pub struct Folders {
    pub rules: PathBuf,
    pub templates: PathBuf,
    pub data: PathBuf,
}

/// What rules compile against that the operator declares, not the rule author: the folders,
/// the names of the HTTP endpoints a rule may send to, and the key of `hash = true`.
#[derive(Debug, Clone, Default)]
pub struct Declared {
    pub folders: Folders,
    /// The endpoints of the configuration file's `[endpoints]`, by name.
    pub endpoints: BTreeSet<String>,
    /// The key of `hash = true` (`TRIPLINE_HASH_KEY`), if the operator set one.
    pub hash_key: Option<HashKey>,
    /// The most a `[remember]` rule may keep.
    pub remember: RememberCaps,
    /// The names of the sources (`[sources.NAME]`, and `default`): a folder of the rules
    /// folder named after one holds that source's rules.
    pub sources: BTreeSet<String>,
}

impl Declared {
    /// These folders, and no endpoint.
    pub fn folders(rules: &Path, templates: &Path, data: &Path) -> Declared {
        Declared {
            folders: Folders {
                rules: rules.to_path_buf(),
                templates: templates.to_path_buf(),
                data: data.to_path_buf(),
            },
            endpoints: BTreeSet::new(),
            hash_key: None,
            remember: RememberCaps::default(),
            sources: BTreeSet::from(["default".to_string()]),
        }
    }
}

/// What the authoring commands need: what rules compile against, and the default sender.
#[derive(Debug, Clone)]
pub struct Paths {
    pub declared: Declared,
    pub email_from: Mailbox,
}

/// Settings of `tripline serve` given as flags or environment variables.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub folders: FolderArgs,
    /// Address and port to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "TRIPLINE_LISTEN")]
    pub listen: Option<String>,
    /// Listen on a non-loopback address even though no source (no secret) is configured, so that
    /// anyone who can reach the port can send events. Only for a network you trust.
    #[arg(long)]
    pub dangerously_accept_unauthenticated_events: bool,
    /// Largest request body accepted, in bytes; larger ones get 413 [default: 1048576].
    #[arg(long, env = "TRIPLINE_MAX_BODY_BYTES", value_parser = |t: &str| ranged(t, BODY_BYTES))]
    pub max_body_bytes: Option<usize>,
    /// Most bytes of acknowledged JSONL lines that may wait for one output file that cannot be
    /// written (a full disk); past it, requests with more lines for that file get 503
    /// [default: 67108864].
    #[arg(long, env = "TRIPLINE_MAX_LINES_WAITING_BYTES", value_parser = |t: &str| ranged(t, LINES_WAITING_BYTES))]
    pub max_lines_waiting_bytes: Option<usize>,
    /// Deepest JSON nesting accepted in a body (at most 128) [default: 32].
    #[arg(long, env = "TRIPLINE_MAX_JSON_DEPTH", value_parser = |t: &str| ranged(t, JSON_DEPTH))]
    pub max_json_depth: Option<usize>,
    /// Most events accepted in one body [default: 1000].
    #[arg(long, env = "TRIPLINE_MAX_EVENTS_PER_BODY", value_parser = |t: &str| ranged(t, EVENTS_PER_BODY))]
    pub max_events_per_body: Option<usize>,
    /// Requests handled at once; more get 503 at once rather than waiting [default: 256].
    #[arg(long, env = "TRIPLINE_MAX_CONCURRENT_REQUESTS", value_parser = |t: &str| ranged(t, CONCURRENT_REQUESTS))]
    pub max_concurrent_requests: Option<usize>,
    /// Longest a request may take, body upload included ("10s"); slower ones get 408
    /// [default: 10s].
    #[arg(long, env = "TRIPLINE_REQUEST_TIMEOUT", value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,
    /// Requests per second accepted from each source; more get 429 with Retry-After. Set high by
    /// default so that only abuse meets it: PostHog drops an event after three 429s in a few
    /// seconds [default: 10000].
    #[arg(long, env = "TRIPLINE_RATE_LIMIT", value_parser = |t: &str| rate_per_second(t.trim().parse().map_err(|_| format!("`{t}` is not a number"))?))]
    pub rate_limit: Option<f64>,
    /// Requests a source may send at once above its rate before 429 [default: 10000].
    #[arg(long, env = "TRIPLINE_RATE_LIMIT_BURST", value_parser = |t: &str| ranged(t, RATE_LIMIT_BURST))]
    pub rate_limit_burst: Option<u32>,
    /// How far a signed request's `webhook-timestamp` may be from now ("5m") [default: 5m].
    #[arg(long, env = "TRIPLINE_SIGNATURE_TOLERANCE", value_parser = parse_duration)]
    pub signature_tolerance: Option<Duration>,
    /// Signed requests whose body is being read and checked at once (a signature needs the whole
    /// body); more get 503. Kept apart from --max-concurrent-requests, so that requests not yet
    /// proven to come from a source never take capacity from those that are [default: 64].
    #[arg(long, env = "TRIPLINE_MAX_UNVERIFIED_REQUESTS", value_parser = |t: &str| ranged(t, CONCURRENT_REQUESTS))]
    pub max_unverified_requests: Option<usize>,
    /// Open connections at most; further clients wait to be accepted [default: 4096, and never
    /// more than the open-files limit allows].
    #[arg(long, env = "TRIPLINE_MAX_CONNECTIONS", value_parser = |t: &str| ranged(t, CONNECTIONS))]
    pub max_connections: Option<usize>,
    /// How long a connection may take to send a request's headers, counted from when it is ready
    /// for one: a client that sends nothing (an idle keep-alive connection) or sends half a
    /// header is closed after this ("10s") [default: 10s].
    #[arg(long, env = "TRIPLINE_HEADER_TIMEOUT", value_parser = parse_duration)]
    pub header_timeout: Option<Duration>,
    /// On SIGTERM, how long requests in flight may take to finish before their connections are
    /// closed and the service stops ("30s") [default: 30s].
    #[arg(long, env = "TRIPLINE_SHUTDOWN_TIMEOUT", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// An event stamped later than the time it is received plus this is counted, for time windows
    /// and `again_after`, as if it happened at that limit: a sender's wrong clock cannot push a
    /// rule's windows into the future ("5m") [default: 5m].
    #[arg(long, env = "TRIPLINE_MAX_CLOCK_SKEW", value_parser = parse_clock_skew)]
    pub max_clock_skew: Option<Duration>,
    /// How long an event id is remembered, so a retried delivery has no second effect; 0 forgets
    /// ids at the next hourly pass [default: 7].
    #[arg(long, env = "TRIPLINE_DEDUPE_RETENTION_DAYS", value_parser = |t: &str| ranged(t, DEDUPE_DAYS))]
    pub dedupe_retention_days: Option<u64>,
    /// Counters, time windows and once-marks of a key (a user, say) that no event has touched
    /// for this many days are forgotten [default: 365].
    #[arg(long, env = "TRIPLINE_STATE_IDLE_DAYS", value_parser = |t: &str| ranged(t, STATE_IDLE_DAYS))]
    pub state_idle_days: Option<u64>,
    /// How long after a wait's deadline it ends, so that events stamped before the deadline
    /// still arriving (PostHog delivers within seconds, and retries) count for it ("10s")
    /// [default: 10s].
    #[arg(long, env = "TRIPLINE_WAIT_GRACE", value_parser = parse_duration)]
    pub wait_grace: Option<Duration>,
    /// The most waits one rule may have pending; a rule at it starts no more, and says so
    /// [default: 1000000].
    #[arg(long, env = "TRIPLINE_MAX_PENDING_WAITS_PER_RULE", value_parser = |t: &str| ranged(t, PENDING_WAITS))]
    pub max_pending_waits_per_rule: Option<u64>,
    /// How emails are delivered: `file` writes <data>/outbox/<id>.eml, `smtp` sends them
    /// [default: file].
    #[arg(long, env = "TRIPLINE_EMAIL_TRANSPORT", value_enum)]
    pub email_transport: Option<EmailTransport>,
    /// SMTP server host (with --email-transport smtp). Credentials, if any, come from the
    /// environment only: TRIPLINE_SMTP_USERNAME and TRIPLINE_SMTP_PASSWORD.
    #[arg(long, env = "TRIPLINE_SMTP_HOST")]
    pub smtp_host: Option<String>,
    /// SMTP server port [default: 25 with --smtp-tls none, 587 with starttls, 465 with tls].
    #[arg(long, env = "TRIPLINE_SMTP_PORT")]
    pub smtp_port: Option<u16>,
    /// How the SMTP connection is encrypted [default: starttls].
    #[arg(long, env = "TRIPLINE_SMTP_TLS", value_enum)]
    pub smtp_tls: Option<SmtpTls>,
    /// Log lines as readable text or as JSON objects [default: text].
    #[arg(long, env = "TRIPLINE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// What a 2xx promises. `sync`: the event's effects are synced to disk. `interval`: they are
    /// written to the operating system, which a killed process cannot lose, and synced at least
    /// every --sync-interval, which a machine crash (power loss) can lose [default: sync].
    #[arg(long, env = "TRIPLINE_DURABILITY", value_enum)]
    pub durability: Option<DurabilityMode>,
    /// With --durability interval, how often what was acknowledged is synced ("100ms", at most
    /// 10s) [default: 100ms].
    #[arg(long, env = "TRIPLINE_SYNC_INTERVAL", value_parser = parse_sync_interval)]
    pub sync_interval: Option<Duration>,
    /// Where the state is kept: `redb` (a database file in the data folder, nothing to install)
    /// or a PostgreSQL URL (`postgres://user@host/db`), which several instances can share
    /// [default: redb].
    #[arg(long, env = "TRIPLINE_STORE", value_parser = parse_store, hide_env_values = true)]
    pub store: Option<StoreChoice>,
}

/// Where the state is kept (see `store/`).
#[derive(Clone, PartialEq, Eq)]
pub enum StoreChoice {
    /// The embedded database in the data folder.
    Redb,
    /// A PostgreSQL database, by URL (it may hold a password: never shown).
    Postgres(String),
}

impl std::fmt::Debug for StoreChoice {
    /// Without the URL, which may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreChoice::Redb => f.write_str("Redb"),
            StoreChoice::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

/// `redb`, or a `postgres://` (or `postgresql://`) URL.
fn parse_store(text: &str) -> Result<StoreChoice, String> {
    let text = text.trim();
    if text == "redb" {
        return Ok(StoreChoice::Redb);
    }
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        return Ok(StoreChoice::Postgres(text.to_string()));
    }
    Err(
        "expected `redb` or a PostgreSQL URL such as postgres://tripline@db.internal/tripline"
            .into(),
    )
}

/// What a 2xx promises, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    Sync,
    Interval,
}

/// What a 2xx promises (see `docs/ARCHITECTURE.md`, "Durability modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Each batch is synced before its requests are answered.
    Sync,
    /// Each batch is written to the operating system before its requests are answered, and
    /// everything is synced at least this often.
    Interval(Duration),
}

/// Where emails go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmailTransport {
    File,
    Smtp,
}

/// SMTP encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain text (only for a server on the same machine or network).
    None,
    /// Upgrade the connection with STARTTLS (required).
    Starttls,
    /// TLS from the first byte (SMTPS).
    Tls,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `tripline.toml` as written. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Address and port to listen on.
    pub listen: Option<Spanned<String>>,
    /// What a 2xx promises: `sync` or `interval`.
    pub durability: Option<DurabilityMode>,
    /// With `durability = "interval"`, how often everything is synced.
    pub sync_interval: Option<Spanned<String>>,
    /// Where the state is kept: `redb` or a PostgreSQL URL.
    pub store: Option<Spanned<String>>,
    /// Folders, relative to the configuration file's folder.
    pub rules: Option<PathBuf>,
    pub templates: Option<PathBuf>,
    pub data: Option<PathBuf>,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub retention: RetentionFile,
    #[serde(default)]
    pub waits: WaitsFile,
    #[serde(default)]
    pub email: EmailFile,
    /// The most `[remember]` rules may keep.
    #[serde(default)]
    pub remember: RememberFile,
    /// Named senders and where their secrets are.
    #[serde(default)]
    pub sources: IndexMap<String, Spanned<SourceConfig>>,
    /// Where HTTP deliveries may go, by name (see `actions/http/endpoint.rs`).
    #[serde(default)]
    pub endpoints: IndexMap<String, Spanned<EndpointConfig>>,
    /// The token that unlocks /rules, /outbox and /metrics.
    pub admin: Option<AdminFile>,
    #[serde(default)]
    pub log: LogFile,
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_body_bytes: Option<Spanned<usize>>,
    pub max_lines_waiting_bytes: Option<Spanned<usize>>,
    pub max_json_depth: Option<Spanned<usize>>,
    pub max_events_per_body: Option<Spanned<usize>>,
    pub max_concurrent_requests: Option<Spanned<usize>>,
    pub request_timeout: Option<Spanned<String>>,
    pub rate_limit: Option<Spanned<f64>>,
    pub rate_limit_burst: Option<Spanned<u32>>,
    pub signature_tolerance: Option<Spanned<String>>,
    pub max_unverified_requests: Option<Spanned<usize>>,
    pub max_connections: Option<Spanned<usize>>,
    pub header_timeout: Option<Spanned<String>>,
    pub shutdown_timeout: Option<Spanned<String>>,
    pub max_clock_skew: Option<Spanned<String>>,
}

/// `[retention]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionFile {
    pub dedupe_days: Option<Spanned<u64>>,
    pub state_idle_days: Option<Spanned<u64>>,
}

/// `[waits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitsFile {
    pub grace: Option<Spanned<String>>,
    pub max_pending_per_rule: Option<Spanned<u64>>,
}

/// `[remember]` in `tripline.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RememberFile {
    pub max_keep_last: Option<Spanned<u64>>,
    pub max_keep_for: Option<Spanned<String>>,
}

/// The most a `[remember]` rule may keep: the operator's bound on what rule authors ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RememberCaps {
    /// Events per person and rule.
    pub keep_last: u64,
    /// How long each.
    pub keep_for: Duration,
}

impl Default for RememberCaps {
    fn default() -> Self {
        RememberCaps {
            keep_last: 1000,
            keep_for: Duration::from_secs(366 * 86_400),
        }
    }
}

/// What `max_keep_last` may be set to.
const KEEP_LAST: RangeInclusive<u64> = 1..=100_000;
/// The longest `max_keep_for` may be: ten years.
const MAX_KEEP_FOR: Duration = Duration::from_secs(3660 * 86_400);

/// How rules with `[wait]` wait.
#[derive(Debug, Clone, Copy)]
pub struct WaitSettings {
    /// How long after its deadline a wait ends.
    pub grace: Duration,
    /// The most waits one rule may have pending.
    pub max_pending_per_rule: u64,
}

impl Default for WaitSettings {
    fn default() -> Self {
        WaitSettings {
            grace: Duration::from_secs(10),
            max_pending_per_rule: 1_000_000,
        }
    }
}

/// `[email]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailFile {
    pub from: Option<Spanned<String>>,
    pub transport: Option<EmailTransport>,
    pub smtp_host: Option<String>,
    pub smtp_port: Option<u16>,
    pub smtp_tls: Option<SmtpTls>,
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// Environment variable holding the admin token.
    pub token_env: Option<Spanned<String>>,
    /// File holding the admin token.
    pub token_file: Option<Spanned<PathBuf>>,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    pub format: Option<LogFormat>,
}

/// The limits on what a sender controls.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Most bytes of lines waiting for one output file (see `pipeline/appender.rs`).
    pub max_lines_waiting_bytes: usize,
    pub max_json_depth: usize,
    pub max_events_per_body: usize,
    pub max_concurrent_requests: usize,
    pub request_timeout: Duration,
    pub rate_limit: f64,
    pub rate_limit_burst: u32,
    pub signature_tolerance: Duration,
    pub max_unverified_requests: usize,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub max_clock_skew: Duration,
}

/// The settings `tripline serve` runs with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: String,
    pub accept_unauthenticated: bool,
    pub declared: Declared,
    pub limits: Limits,
    pub dedupe_retention_days: u64,
    pub state_idle_days: u64,
    pub waits: WaitSettings,
    pub email_from: Mailbox,
    pub email_transport: EmailTransport,
    pub smtp_host: Option<String>,
    pub smtp_port: Option<u16>,
    pub smtp_tls: SmtpTls,
    pub log_format: LogFormat,
    pub durability: Durability,
    pub store: StoreChoice,
    /// The senders, with their secrets; empty when requests are not authenticated.
    pub sources: Arc<Sources>,
    /// The admin token (held as a source of its own), if any: it unlocks /rules, /outbox and
    /// /metrics once sources are configured.
    pub admin: Option<Arc<Source>>,
    /// The HTTP endpoints, with their secrets.
    pub endpoints: Arc<Endpoints>,
}

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Problems in the configuration file, each at its place.
    #[error("{} problem(s) in the configuration file", .0.len())]
    File(Vec<Diagnostic>),
    /// A problem with a flag, an environment variable or the file as a whole.
    #[error("{0}")]
    Other(String),
}

/// The deepest a body may nest: serde_json refuses anything deeper.
pub const JSON_DEPTH_CEILING: usize = 128;

/// A configuration file, read and parsed, with what is needed to point at its lines.
struct Loaded {
    path: PathBuf,
    text: String,
    file: ConfigFile,
}

impl Loaded {
    fn read(path: &Path) -> Result<Loaded, ConfigError> {
        let text =
            crate::user_file::read_text(path, crate::user_file::CONFIG_FILE).map_err(|e| {
                ConfigError::Other(format!(
                    "cannot read the configuration file {}: {e}",
                    path.display()
                ))
            })?;
        let file = toml::from_str(&text)
            .map_err(|e| ConfigError::File(vec![toml_diagnostic(path, &text, &e)]))?;
        Ok(Loaded {
            path: path.to_path_buf(),
            text,
            file,
        })
    }

    /// A path written in the file, taken relative to the file's folder.
    fn relative(&self, p: &Path) -> PathBuf {
        match self.path.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        }
    }

    fn problem(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        Diagnostic::at(&self.path, &self.text, span, message)
    }
}

impl FolderArgs {
    /// The folders and sender for the authoring commands (flags, environment, file, defaults).
    pub fn resolve(&self) -> Result<Paths, ConfigError> {
        let loaded = self.config.as_deref().map(Loaded::read).transpose()?;
        let mut problems = Vec::new();
        let paths = self.paths(loaded.as_ref(), &mut problems);
        finish(paths, problems)
    }

    fn paths(&self, loaded: Option<&Loaded>, problems: &mut Vec<Diagnostic>) -> Paths {
        let folder = |flag: &Option<PathBuf>, file: Option<&PathBuf>, default: &str| {
            flag.clone()
                .or_else(|| loaded.zip(file).map(|(l, p)| l.relative(p)))
                .unwrap_or_else(|| PathBuf::from(default))
        };
        let file = loaded.map(|l| &l.file);
        let from_file = loaded.and_then(|l| Some((l, l.file.email.from.as_ref()?)));
        let email_from = match (&self.email_from, from_file) {
            (Some(m), _) => m.clone(),
            (None, Some((l, from))) => from.get_ref().parse().unwrap_or_else(|e| {
                problems.push(l.problem(
                    from.span(),
                    format!("this is not an email address like \"Name <name@example.com>\": {e}"),
                ));
                default_sender()
            }),
            (None, None) => default_sender(),
        };
        Paths {
            declared: Declared {
                folders: Folders {
                    rules: folder(&self.rules, file.and_then(|f| f.rules.as_ref()), "rules"),
                    templates: folder(
                        &self.templates,
                        file.and_then(|f| f.templates.as_ref()),
                        "templates",
                    ),
                    data: folder(&self.data, file.and_then(|f| f.data.as_ref()), "data"),
                },
                endpoints: file
                    .map_or_else(BTreeSet::new, |f| f.endpoints.keys().cloned().collect()),
                hash_key: HashKey::from_env().unwrap_or_else(|e| {
                    problems.push(Diagnostic::whole_file(Path::new(HASH_KEY_ENV), e));
                    None
                }),
                remember: loaded.map_or_else(RememberCaps::default, |l| remember_caps(l, problems)),
                sources: (file.iter().flat_map(|f| f.sources.keys().cloned()))
                    .chain(["default".to_string()])
                    .collect(),
            },
            email_from,
        }
    }
}

/// The `[remember]` caps of the configuration file, each problem at its place.
fn remember_caps(loaded: &Loaded, problems: &mut Vec<Diagnostic>) -> RememberCaps {
    let mut caps = RememberCaps::default();
    let file = &loaded.file.remember;
    if let Some(n) = &file.max_keep_last {
        match KEEP_LAST.contains(n.get_ref()) {
            true => caps.keep_last = *n.get_ref(),
            false => problems.push(loaded.problem(
                n.span(),
                format!(
                    "`max_keep_last` must be from {} to {}",
                    KEEP_LAST.start(),
                    KEEP_LAST.end()
                ),
            )),
        }
    }
    if let Some(text) = &file.max_keep_for {
        match parse_duration(text.get_ref()) {
            Ok(d) if !d.is_zero() && d <= MAX_KEEP_FOR => caps.keep_for = d,
            Ok(_) => problems.push(loaded.problem(
                text.span(),
                "`max_keep_for` must be longer than 0 and at most ten years",
            )),
            Err(e) => problems.push(loaded.problem(text.span(), format!("`max_keep_for`: {e}"))),
        }
    }
    caps
}

fn default_sender() -> Mailbox {
    "tripline <tripline@localhost>"
        .parse()
        .expect("a valid address")
}

fn finish<T>(value: T, problems: Vec<Diagnostic>) -> Result<T, ConfigError> {
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(ConfigError::File(problems))
    }
}

impl ServeArgs {
    /// The settings to run with: each from its flag, else its environment variable, else the
    /// configuration file, else its default. Every problem of the file is reported at once.
    pub fn resolve(&self) -> Result<ServeConfig, ConfigError> {
        let loaded = self
            .folders
            .config
            .as_deref()
            .map(Loaded::read)
            .transpose()?;
        let mut problems = Vec::new();
        let paths = self.folders.paths(loaded.as_ref(), &mut problems);
        let empty = ConfigFile::default();
        let file = loaded.as_ref().map_or(&empty, |l| &l.file);
        let mut check = Checker {
            loaded: loaded.as_ref(),
            problems: &mut problems,
        };
        let limits = &file.limits;
        let max_body_bytes = check.number(
            self.max_body_bytes,
            limits.max_body_bytes.as_ref(),
            1024 * 1024,
            BODY_BYTES,
            "max_body_bytes",
        );
        let max_lines_waiting_bytes = check.number(
            self.max_lines_waiting_bytes,
            limits.max_lines_waiting_bytes.as_ref(),
            64 << 20,
            LINES_WAITING_BYTES,
            "max_lines_waiting_bytes",
        );
        let max_json_depth = check.number(
            self.max_json_depth,
            limits.max_json_depth.as_ref(),
            32,
            JSON_DEPTH,
            "max_json_depth",
        );
        let max_events_per_body = check.number(
            self.max_events_per_body,
            limits.max_events_per_body.as_ref(),
            1000,
            EVENTS_PER_BODY,
            "max_events_per_body",
        );
        let max_concurrent_requests = check.number(
            self.max_concurrent_requests,
            limits.max_concurrent_requests.as_ref(),
            256,
            CONCURRENT_REQUESTS,
            "max_concurrent_requests",
        );
        let rate_limit_burst = check.number(
            self.rate_limit_burst,
            limits.rate_limit_burst.as_ref(),
            10_000,
            RATE_LIMIT_BURST,
            "rate_limit_burst",
        );
        let rate_limit = self
            .rate_limit
            .or_else(|| {
                let r = limits.rate_limit.as_ref()?;
                rate_per_second(*r.get_ref())
                    .map_err(|e| check.report(r.span(), format!("`rate_limit` {e}")))
                    .ok()
            })
            .unwrap_or(10_000.0);
        let request_timeout = check.duration(
            self.request_timeout,
            limits.request_timeout.as_ref(),
            Duration::from_secs(10),
        );
        let signature_tolerance = check.duration(
            self.signature_tolerance,
            limits.signature_tolerance.as_ref(),
            Duration::from_secs(300),
        );
        let max_unverified_requests = check.number(
            self.max_unverified_requests,
            limits.max_unverified_requests.as_ref(),
            64,
            CONCURRENT_REQUESTS,
            "max_unverified_requests",
        );
        let max_connections = check.number(
            self.max_connections,
            limits.max_connections.as_ref(),
            4096,
            CONNECTIONS,
            "max_connections",
        );
        let header_timeout = check.duration(
            self.header_timeout,
            limits.header_timeout.as_ref(),
            Duration::from_secs(10),
        );
        let shutdown_timeout = check.duration(
            self.shutdown_timeout,
            limits.shutdown_timeout.as_ref(),
            Duration::from_secs(30),
        );
        let max_clock_skew =
            self.max_clock_skew
                .unwrap_or_else(|| match limits.max_clock_skew.as_ref() {
                    Some(text) => parse_clock_skew(text.get_ref()).unwrap_or_else(|e| {
                        check.report(text.span(), format!("`max_clock_skew`: {e}"));
                        crate::ingest::event::DEFAULT_CLOCK_SKEW
                    }),
                    None => crate::ingest::event::DEFAULT_CLOCK_SKEW,
                });
        let retention = &file.retention;
        let dedupe_retention_days = check.number(
            self.dedupe_retention_days,
            retention.dedupe_days.as_ref(),
            7,
            DEDUPE_DAYS,
            "dedupe_days",
        );
        let state_idle_days = check.number(
            self.state_idle_days,
            retention.state_idle_days.as_ref(),
            365,
            STATE_IDLE_DAYS,
            "state_idle_days",
        );
        let defaults = WaitSettings::default();
        let waits = WaitSettings {
            grace: check.duration(self.wait_grace, file.waits.grace.as_ref(), defaults.grace),
            max_pending_per_rule: check.number(
                self.max_pending_waits_per_rule,
                file.waits.max_pending_per_rule.as_ref(),
                defaults.max_pending_per_rule,
                PENDING_WAITS,
                "max_pending_per_rule",
            ),
        };
        let listen = self
            .listen
            .clone()
            .or_else(|| file.listen.as_ref().map(|l| l.get_ref().clone()))
            .unwrap_or_else(|| "127.0.0.1:8080".into());
        let sync_interval = self.sync_interval.unwrap_or_else(|| {
            let default = Duration::from_millis(100);
            let Some(text) = file.sync_interval.as_ref() else {
                return default;
            };
            parse_sync_interval(text.get_ref()).unwrap_or_else(|e| {
                check.report(text.span(), format!("`sync_interval`: {e}"));
                default
            })
        });
        let durability = match self.durability.or(file.durability) {
            Some(DurabilityMode::Interval) => Durability::Interval(sync_interval),
            Some(DurabilityMode::Sync) | None => Durability::Sync,
        };
        let store = self.store.clone().unwrap_or_else(|| {
            let Some(text) = file.store.as_ref() else {
                return StoreChoice::Redb;
            };
            parse_store(text.get_ref()).unwrap_or_else(|e| {
                check.report(text.span(), format!("`store`: {e}"));
                StoreChoice::Redb
            })
        });
        if let (StoreChoice::Postgres(_), Durability::Interval(_)) = (&store, durability) {
            return Err(ConfigError::Other(
                "--durability interval is for the embedded store (redb): with PostgreSQL every \
                 commit is the server's own, so use PostgreSQL's synchronous_commit setting instead"
                    .into(),
            ));
        }
        let sources = check.sources(file, signature_tolerance);
        let admin = check.admin(file.admin.as_ref());
        // One token, one use: a read token that is also a sending or admin token (or another
        // source's) would open more than its source's data.
        if let (Ok(sources), Ok(admin)) = (&sources, &admin) {
            let mut seen = std::collections::HashSet::new();
            let digests = (sources.all().flat_map(|s| s.token_digests()))
                .chain(admin.iter().flat_map(|a| a.token_digests()));
            for digest in digests {
                if !seen.insert(*digest) {
                    return Err(ConfigError::Other(
                        "the same token is given twice (as a source's sending or read token, or the admin token): give each its own".into(),
                    ));
                }
            }
        }
        let endpoints = check.endpoints(file);
        let config = ServeConfig {
            listen,
            accept_unauthenticated: self.dangerously_accept_unauthenticated_events,
            declared: paths.declared,
            limits: Limits {
                max_body_bytes,
                max_lines_waiting_bytes,
                max_json_depth,
                max_events_per_body,
                max_concurrent_requests,
                request_timeout,
                rate_limit,
                rate_limit_burst,
                signature_tolerance,
                max_unverified_requests,
                max_connections,
                header_timeout,
                shutdown_timeout,
                max_clock_skew,
            },
            dedupe_retention_days,
            state_idle_days,
            waits,
            email_from: paths.email_from,
            email_transport: self
                .email_transport
                .or(file.email.transport)
                .unwrap_or(EmailTransport::File),
            smtp_host: self.smtp_host.clone().or(file.email.smtp_host.clone()),
            smtp_port: self.smtp_port.or(file.email.smtp_port),
            smtp_tls: self
                .smtp_tls
                .or(file.email.smtp_tls)
                .unwrap_or(SmtpTls::Starttls),
            log_format: self
                .log_format
                .or(file.log.format)
                .unwrap_or(LogFormat::Text),
            durability,
            store,
            sources: Arc::new(sources?),
            admin: admin?.map(Arc::new),
            endpoints: Arc::new(endpoints),
        };
        if problems.is_empty() && config.sources.is_empty() && !config.accept_unauthenticated {
            loopback_only(&config.listen)?;
        }
        finish(config, problems)
    }
}

/// Refuses an address other than loopback: with no source configured, anyone who reaches the
/// port could send events.
fn loopback_only(listen: &str) -> Result<(), ConfigError> {
    use std::net::ToSocketAddrs;
    let addresses: Vec<_> = listen
        .to_socket_addrs()
        .map_err(|e| ConfigError::Other(format!("cannot listen on {listen}: {e}")))?
        .collect();
    if !addresses.is_empty() && addresses.iter().all(|a| a.ip().is_loopback()) {
        return Ok(());
    }
    Err(ConfigError::Other(format!(
        "no source is configured, so anyone who can reach {listen} could send events; \
         without a source tripline only listens on loopback (127.0.0.1 or [::1]). \
         Set TRIPLINE_TOKEN (a bearer token) or TRIPLINE_SIGNING_SECRET (a whsec_ secret), \
         or configure [sources] in tripline.toml (see docs/CONFIGURATION.md). \
         On a network you trust, --dangerously-accept-unauthenticated-events allows it anyway."
    )))
}

/// Settles one setting at a time, recording the file's problems.
struct Checker<'a> {
    loaded: Option<&'a Loaded>,
    problems: &'a mut Vec<Diagnostic>,
}

impl Checker<'_> {
    /// The sources of the file's `[sources.*]`, plus the default source of `TRIPLINE_TOKEN` and
    /// `TRIPLINE_SIGNING_SECRET` (added to `[sources.default]` if the file has one).
    fn sources(&mut self, file: &ConfigFile, tolerance: Duration) -> Result<Sources, ConfigError> {
        let mut list = Vec::new();
        for (name, written) in &file.sources {
            let mut config = written.get_ref().clone();
            config.relative_to(|p| self.relative(p));
            match Source::load(name, &config) {
                Ok(source) => list.push(source),
                Err(message) => self.report(written.span(), message),
            }
        }
        let mut default = match list.iter().position(|s| s.name == "default") {
            Some(at) => list.remove(at),
            None => Source::named("default"),
        };
        let token = SecretRef::Env("TRIPLINE_TOKEN".into());
        if let Ok(value) = token.read() {
            default
                .add_token(&value, &token)
                .map_err(ConfigError::Other)?;
        }
        let secret = SecretRef::Env("TRIPLINE_SIGNING_SECRET".into());
        if let Ok(value) = secret.read() {
            default
                .add_signing_secret(&value, &secret)
                .map_err(ConfigError::Other)?;
        }
        if default.has_secrets() {
            list.push(default);
        }
        Ok(Sources::new(list, tolerance))
    }

    /// The endpoints of the file's `[endpoints.*]`, with their secrets read.
    fn endpoints(&mut self, file: &ConfigFile) -> Endpoints {
        let mut endpoints = Endpoints::new();
        for (name, written) in &file.endpoints {
            let mut config = written.get_ref().clone();
            config.relative_to(|p| self.relative(p));
            match Endpoint::load(name, &config) {
                Ok(endpoint) => {
                    endpoints.insert(name.clone(), endpoint);
                }
                Err(message) => {
                    self.report(written.span(), format!("[endpoints.{name}]: {message}"))
                }
            }
        }
        endpoints
    }

    /// The admin token of `TRIPLINE_ADMIN_TOKEN`, else of the file's `[admin]`.
    fn admin(&mut self, file: Option<&AdminFile>) -> Result<Option<Source>, ConfigError> {
        let mut admin = Source::named("admin");
        let from_env = SecretRef::Env("TRIPLINE_ADMIN_TOKEN".into());
        if let Ok(token) = from_env.read() {
            admin
                .add_token(&token, &from_env)
                .map_err(ConfigError::Other)?;
        } else if let Some(file) = file {
            let place = file
                .token_env
                .as_ref()
                .map(|e| (SecretRef::Env(e.get_ref().clone()), e.span()))
                .or_else(|| {
                    file.token_file
                        .as_ref()
                        .map(|f| (SecretRef::File(self.relative(f.get_ref())), f.span()))
                });
            if let Some((secret, span)) = place
                && let Err(message) = secret.read().and_then(|t| admin.add_token(&t, &secret))
            {
                self.report(span, message);
            }
        }
        Ok(admin.has_secrets().then_some(admin))
    }

    fn report(&mut self, span: Range<usize>, message: impl Into<String>) {
        if let Some(l) = self.loaded {
            self.problems.push(l.problem(span, message));
        }
    }

    fn relative(&self, p: &Path) -> PathBuf {
        self.loaded
            .map_or_else(|| p.to_path_buf(), |l| l.relative(p))
    }

    /// A number from the flag, else the file (checked against `range`), else `default`.
    fn number<T: Copy + PartialOrd + std::fmt::Display>(
        &mut self,
        flag: Option<T>,
        file: Option<&Spanned<T>>,
        default: T,
        range: RangeInclusive<T>,
        key: &str,
    ) -> T {
        if let Some(v) = flag {
            return v;
        }
        match file {
            Some(v) => match in_range(*v.get_ref(), &range) {
                Ok(n) => n,
                Err(e) => {
                    self.report(v.span(), format!("`{key}` {e}"));
                    default
                }
            },
            None => default,
        }
    }

    /// A duration from the flag, else the file ("10s", "5 minutes"), else `default`.
    fn duration(
        &mut self,
        flag: Option<Duration>,
        file: Option<&Spanned<String>>,
        default: Duration,
    ) -> Duration {
        if let Some(d) = flag {
            return d;
        }
        match file {
            Some(text) => match parse_duration(text.get_ref()) {
                Ok(d) => d,
                Err(e) => {
                    self.report(text.span(), e);
                    default
                }
            },
            None => default,
        }
    }
}

/// The values each number setting may take: the same for its flag, variable and file key.
const BODY_BYTES: RangeInclusive<usize> = 1..=1 << 30;
const LINES_WAITING_BYTES: RangeInclusive<usize> = 1..=1 << 40;
const JSON_DEPTH: RangeInclusive<usize> = 1..=JSON_DEPTH_CEILING;
const EVENTS_PER_BODY: RangeInclusive<usize> = 1..=1_000_000;
const CONCURRENT_REQUESTS: RangeInclusive<usize> = 1..=1_000_000;
const CONNECTIONS: RangeInclusive<usize> = 1..=1_000_000;
/// Requests per second a rate limit may be set to: from one every 100 s (below, the time between
/// two requests no longer fits the limiter's arithmetic) to ten million.
const RATE: RangeInclusive<f64> = 0.01..=10_000_000.0;
const RATE_LIMIT_BURST: RangeInclusive<u32> = 1..=u32::MAX;
/// 0 forgets event ids at the next hourly pass.
const DEDUPE_DAYS: RangeInclusive<u64> = 0..=36_500;
const STATE_IDLE_DAYS: RangeInclusive<u64> = 1..=36_500;
const PENDING_WAITS: RangeInclusive<u64> = 1..=100_000_000;

/// `n`, if `range` holds it.
fn in_range<T: PartialOrd + std::fmt::Display>(
    n: T,
    range: &RangeInclusive<T>,
) -> Result<T, String> {
    if range.contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "must be between {} and {}",
            range.start(),
            range.end()
        ))
    }
}

/// A whole number written in a flag or variable, if `range` holds it.
fn ranged<T>(text: &str, range: RangeInclusive<T>) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    let n = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number"))?;
    in_range(n, &range)
}

/// Requests per second: a number in [`RATE`], fractions allowed.
fn rate_per_second(rate: f64) -> Result<f64, String> {
    if RATE.contains(&rate) {
        Ok(rate)
    } else {
        Err(format!(
            "must be a number of requests per second from {} to {}, like 200 or 0.5",
            RATE.start(),
            RATE.end()
        ))
    }
}

/// The most `max_clock_skew` may be: senders' clocks are minutes off, not days.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(86_400);

/// `max_clock_skew`: a length of time up to a day.
fn parse_clock_skew(text: &str) -> Result<Duration, String> {
    let skew = parse_duration(text)?;
    if skew > MAX_CLOCK_SKEW {
        return Err(
            "must be at most a day (\"24h\"): senders' clocks are minutes off, not days".into(),
        );
    }
    Ok(skew)
}

/// A sync interval: a duration of at most ten seconds.
fn parse_sync_interval(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d > Duration::from_secs(10) {
        return Err(format!(
            "`{text}` is longer than 10s: a machine crash would lose that much"
        ));
    }
    Ok(d)
}

/// A positive length of time written in a flag, a variable or the file ("10s", "5 minutes").
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    units::parse_duration(text).map_err(|e| match e {
        DurationError::Zero => "the duration must be longer than zero".to_string(),
        DurationError::Unreadable(why) => {
            format!("`{text}` is not a duration like {DURATION_EXAMPLES} ({why})")
        }
    })
}
