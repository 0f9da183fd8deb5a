//! tripline turns product-analytics events (PostHog webhooks) into actions described by TOML
//! rule files: emails rendered from templates, and sanitized lines in JSONL files.
//!
//! # Layout, in the order an event travels
//! - [`app`]: the service put together, started and stopped in order.
//! - [`http`]: the HTTP edge — connections and their limits, admission (who sent a request,
//!   before it takes a place), routes, status codes, start and ordered stop.
//! - [`ingest`]: who may send ([`ingest::auth`]: sources, bearer tokens, Standard Webhooks
//!   signatures) and decoding every body shape PostHog sends into one [`ingest::event::Event`].
//! - [`rules`]: rule files and templates → compiled, indexed [`rules::RuleSet`].
//! - [`engine`]: decides what events do under a rule set: dedupe → match → count (or window) →
//!   limits → effects. No I/O.
//! - [`explain`]: why each rule did or did not act on an event, in words, kept for the newest
//!   events (`GET /explain/{uuid}`, `tripline explain`).
//! - [`pipeline`]: what runs in the background of the service: the committer (group commit: one
//!   thread makes the effects of many requests durable at once), the outbox sender (deliveries of
//!   every kind), the reload of the rules.
//! - [`actions`]: one folder per kind of action (`email/`, `jsonl/`), each with its rule-file
//!   table, compile, what it makes of an event and, if delivered later, its sender; the kinds are
//!   listed once, in `actions/mod.rs`.
//! - [`store`]: everything the service keeps (rule state, the delivery queue, handled ids) behind
//!   one seam, [`store::Backend`], loaded and saved a batch at a time; its redb form in
//!   [`store::redb`].
//! - [`authoring`]: `check`, `test` (rule test cases run in memory on a virtual clock) and
//!   `replay`, for rule authors.
//! - [`redact`]: personal data in text replaced by placeholders, and ids by a keyed hash.
//! - [`clock`]: the time of day, from the system or set by tests.
//! - [`config`]: settings from `tripline.toml`, environment and flags (in that rising order).
//! - [`telemetry`]: every metric, named and described once.
//! - [`units`]: lengths of time and dates as people write them, read in one place.
//! - [`diag`]: problems in a user's file as `file:line:col: message`, with the line and a caret.
//! - [`user_file`]: reading the files a user gives us (only regular files, within a size bound)
//!   and listing their folders.

pub mod actions;
pub mod app;
pub mod authoring;
pub mod clock;
pub mod config;
pub mod diag;
pub mod engine;
pub mod explain;
pub mod http;
pub mod ingest;
pub mod pipeline;
pub mod redact;
pub mod rules;
pub mod store;
pub mod telemetry;
pub mod units;
pub mod user_file;
