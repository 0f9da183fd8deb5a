//! What a rule can do when it fires: one folder per kind of action.
//!
//! A kind is everything about one table of a rule file (`[email]`, `[jsonl]`), side by side in its
//! folder: the table as written (its serde `Config`), how it compiles into an [`Action`] (checking
//! what it can and reporting problems), what the action makes of an event ([`Output`], no I/O),
//! and, for kinds delivered after the commit, its [`Sender`]. The kinds are listed once, in the
//! `kinds!` list below: adding a kind is a folder and one line there.

use lettre::message::Mailbox;
use serde::de::MapAccess;
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use toml::Spanned;

use crate::config::{Declared, ServeConfig};
use crate::diag::Problems;
use crate::ingest::event::Event;
use crate::ingest::path::FieldPath;
use crate::store::aggregates::Counted;
pub use crate::store::queue::Delivery;
use crate::store::queue::OutboxRecord;
use crate::store::remembered::Remembered;
use email::template_check::Known;
use email::templates::Templates;
use jsonl::Unwritable;

/// The action list: each kind's table name in a rule file, its folder (declared here) and the
/// type there that implements [`Kind`]. Everything else about a kind is in its folder.
macro_rules! kinds {
    ($($(#[$attr:meta])* $table:literal => $module:ident::$kind:ident,)*) => {
        $($(#[$attr])* pub mod $module;)*

        /// The table names of every kind, as a rule file writes them.
        // Pushed one by one because a kind may be left out (`#[cfg(test)]`).
        #[allow(clippy::vec_init_then_push)]
        pub fn tables() -> Vec<&'static str> {
            let mut tables = Vec::new();
            $($(#[$attr])* tables.push($table);)*
            tables
        }

        /// Reads the value of `table` from a rule file if it is an action's table.
        pub(crate) fn parse_table<'de, A: MapAccess<'de>>(
            table: &str,
            map: &mut A,
        ) -> Result<Option<Table>, A::Error> {
            $($(#[$attr])*
            if table == $table {
                let config: Spanned<<$module::$kind as Kind>::Config> = map.next_value()?;
                return Ok(Some(Table {
                    name: $table,
                    span: config.span(),
                    compile: Box::new(move |cx| <$module::$kind as Kind>::compile(config, cx)),
                }));
            })*
            Ok(None)
        }

        /// The senders of the kinds delivered after the commit.
        pub fn senders(to: &Destinations) -> anyhow::Result<Senders> {
            let mut senders = Senders::default();
            $($(#[$attr])*
            if let Some(sender) = <$module::$kind as Kind>::sender(to)? {
                senders.0.insert($table, sender);
            })*
            Ok(senders)
        }
    };
}

pub mod fields;

kinds! {
    "aggregate" => aggregate::Aggregate,
    "email" => email::Email,
    "http" => http::Http,
    "jsonl" => jsonl::Jsonl,
    "remember" => remember::Remember,
    #[cfg(test)]
    "log" => log::Log,
}

/// One kind of action.
pub trait Kind {
    /// The rule file's table, as written.
    type Config: serde::de::DeserializeOwned;
    /// Compiles the table, adding what is wrong with it to `cx.problems`; `None` if anything is.
    fn compile(config: Spanned<Self::Config>, cx: &mut Compile) -> Option<Box<dyn Action>>;
    /// What delivers this kind's queued deliveries to `to`; none for a kind whose output the
    /// commit itself makes durable.
    fn sender(_to: &Destinations) -> anyhow::Result<Option<Arc<dyn Sender>>> {
        Ok(None)
    }
}

/// Where deliveries go.
pub enum Destinations<'a> {
    /// Where the service's settings say (an SMTP server...).
    Settings(&'a ServeConfig),
    /// Into files in this folder, one per delivery (`replay --execute-into`).
    Files(&'a Path),
}

/// An action's table as read from a rule file, ready to compile.
pub struct Table {
    pub name: &'static str,
    pub span: Range<usize>,
    pub compile: CompileTable,
}

/// Compiles one action's table (see [`Kind::compile`]).
pub type CompileTable = Box<dyn FnOnce(&mut Compile) -> Option<Box<dyn Action>>>;

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] at {:?}", self.name, self.span)
    }
}

/// What an action's table compiles against.
pub struct Compile<'a, 'f> {
    /// The rule's name.
    pub rule: &'a str,
    pub problems: &'a mut Problems<'f>,
    /// The templates, to which the action may add its own one-line ones.
    pub templates: &'a mut Templates,
    /// What the operator declared: the HTTP endpoints, the key of `hash = true`.
    pub declared: &'a Declared,
    /// The event names the rule's `[when]` selects; `None` for any name (`"*"`, an operator).
    pub events: Option<&'a [String]>,
}

impl Compile<'_, '_> {
    /// Checks what the one-line template registered under `key` uses against the fields the
    /// rule knows (see `email/template_check.rs`), pointing at `span` of the rule file.
    pub fn check_inline_template(&mut self, key: &str, span: &Range<usize>, known: &Known) {
        let place = email::template_check::Place::Rule {
            file: self.problems.file,
            source: self.problems.source,
            span: span.clone(),
        };
        email::template_check::check(
            &self.templates.references(key, false),
            known,
            &place,
            &mut self.problems.list,
        );
    }
}

/// A compiled action, as a rule runs it.
pub trait Action: Send + Sync + fmt::Debug {
    /// Its kind's table name (`email`).
    fn kind(&self) -> &'static str;
    /// What the action makes of the event: no I/O. An `Err` says why it cannot be made from this
    /// event (a field its email uses is missing...): retrying the same event would not help.
    fn run(&self, input: &Input) -> Result<Output, String>;
    /// What `GET /rules` shows of it.
    fn summary(&self) -> Value;
    /// The event fields it reads, so that other checks know the rule deals with them.
    fn fields(&self) -> Vec<&FieldPath> {
        Vec::new()
    }
    /// Checks that need the whole rule compiled first (an email's templates against the fields
    /// the rule knows).
    fn check(&self, _known: &Known, _cx: &mut Compile) {}
    /// The file in the data folder it appends to, if it does (see `jsonl`).
    fn file(&self) -> Option<&Path> {
        None
    }
    /// Whether its outputs are deliveries, so that a failed one is kept in the delivery history
    /// where people look for it.
    fn delivered(&self) -> bool {
        false
    }
}

/// What an action runs on.
pub struct Input<'a> {
    /// The rule's name.
    pub rule: &'a str,
    pub event: &'a Event,
    /// The rule's count when it acted, for `{{count}}`, if it counts.
    pub count: Option<u64>,
    /// How the rule's `[wait]` ended, if it has one.
    pub waited: Option<Waited<'a>>,
    /// The events of a `[digest]`, when one is sent.
    pub digest: Option<DigestInput<'a>>,
    pub templates: &'a Templates,
    pub env: &'a Env<'a>,
}

impl Input<'_> {
    /// What templates see: the event's fields, `count`, and for a digest `events` and
    /// `events_count`, for a wait `waited` and `until`.
    pub fn template_data(&self) -> Value {
        let mut data = self.event.template_context();
        data["count"] = self.count.map_or(Value::Null, Value::from);
        if let Some(digest) = &self.digest {
            let events = digest.events.iter();
            data["events"] = events.map(|e| e.template_context()).collect();
            data["events_count"] = digest.total.into();
        }
        if let Some(waited) = &self.waited {
            data["waited"] = crate::units::duration_in_words(waited.after).into();
            if let Some(until) = waited.until {
                data["until"] = until.template_context();
            }
        }
        data
    }
}

/// Writes `bytes` to `dir/name` through a temporary file, synced and renamed, so that a
/// delivery written again after a crash replaces the same file whole (`replay --execute-into`).
pub fn write_file_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The events of a digest being sent: the first ones kept, and how many there were.
#[derive(Debug, Clone, Copy)]
pub struct DigestInput<'a> {
    pub events: &'a [Event],
    pub total: u64,
}

/// How a wait ended when its rule acts (see `[wait]`).
#[derive(Debug, Clone, Copy)]
pub struct Waited<'a> {
    /// The event that completed it (`until`), if one did.
    pub until: Option<&'a Event>,
    /// How long after the triggering event it ended.
    pub after: std::time::Duration,
}

/// What actions need from the service when they run.
pub struct Env<'a> {
    /// The sender of emails whose rule does not say `from`.
    pub default_from: &'a Mailbox,
    /// Output files that cannot be written now, with why.
    pub unwritable: &'a Unwritable,
    /// The most waits one rule may have pending; a rule at it starts no more.
    pub max_pending_waits: u64,
    /// Pending waits whose deadline is at or before this (milliseconds since 1970) are due by
    /// the clock (less the grace period): a triggering event may end one (see `engine.rs`).
    pub waits_due_by_ms: i64,
}

impl<'a> Env<'a> {
    /// For running rules outside the service (`tripline test`, `replay`, benchmarks): every
    /// output file may be written, no cap on pending waits, and waits are ended by the caller
    /// as its clock passes them (so any wait a trigger comes after is due).
    pub fn offline(default_from: &'a Mailbox) -> Env<'a> {
        static NONE_UNWRITABLE: std::sync::LazyLock<Unwritable> =
            std::sync::LazyLock::new(Unwritable::new);
        Env {
            default_from,
            unwritable: &NONE_UNWRITABLE,
            max_pending_waits: u64::MAX,
            waits_due_by_ms: i64::MAX,
        }
    }
}

/// What an action made of an event, to be made durable by the committer.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A line (newline included) for a file in the data folder, appended in the same commit.
    Line { file: PathBuf, line: String },
    /// Something to deliver after the commit, queued in the outbox.
    Delivery(Delivery),
    /// An event to keep for its user (see `remember`), in the same commit.
    Remember(Box<Remembered>),
    /// An event to count (see `aggregate`), in the same commit.
    Aggregate(Box<Counted>),
}

/// How a delivery attempt ended.
#[derive(Debug)]
pub enum Attempt {
    Delivered,
    /// Try again later, after the usual backoff.
    Temporary(String),
    /// Try again after this long: the destination said when (`Retry-After`).
    RetryAfter(String, std::time::Duration),
    /// Give up: the destination refused it for good.
    Permanent(String),
}

/// Delivers one kind's queued deliveries.
pub trait Sender: Send + Sync {
    /// One attempt at one delivery. Cancelling it (at shutdown) must leave nothing half done
    /// that matters: the delivery is still pending in the store.
    fn attempt<'a>(
        &'a self,
        id: u64,
        record: &'a OutboxRecord,
    ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>>;
    /// How many attempts of this kind may run at once: its destinations' bounds.
    fn max_in_flight(&self) -> Bound;
    /// The destinations that take no deliveries now (an endpoint that answered 410 Gone), with
    /// why, for `GET /outbox`.
    fn disabled(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// How many attempts of one kind may run at once.
#[derive(Debug, Clone)]
pub enum Bound {
    /// This many, whatever the destination (one mail server).
    Kind(usize),
    /// So many to each destination (an HTTP endpoint), so that one that hangs holds only its own
    /// slots. A destination not listed has no bound of its own.
    PerDestination(Vec<(String, usize)>),
}

/// The senders of the delivered kinds, by kind.
#[derive(Default, Clone)]
pub struct Senders(HashMap<&'static str, Arc<dyn Sender>>);

impl FromIterator<(&'static str, Arc<dyn Sender>)> for Senders {
    fn from_iter<I: IntoIterator<Item = (&'static str, Arc<dyn Sender>)>>(iter: I) -> Self {
        Senders(iter.into_iter().collect())
    }
}

impl Senders {
    /// The sender of `kind`, if the service has one.
    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Sender>> {
        self.0.get(kind)
    }

    /// Every kind's sender.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Arc<dyn Sender>)> {
        self.0.iter().map(|(kind, sender)| (*kind, sender))
    }
}
