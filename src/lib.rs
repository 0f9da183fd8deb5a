//! tripline turns product-analytics events (PostHog webhooks) into actions described by TOML
//! rule files: emails rendered from templates, and sanitized lines in JSONL files.
//!
//! # Layout
//! - [`server`]: the HTTP edge — routes, status codes, limits, start and graceful stop.
//! - [`connections`]: accepting connections; their number, header and shutdown time limits.
//! - [`admission`]: who sent a `/webhook` request, settled before it takes a place or (for a
//!   bearer token) before its body is read; the per-source rate limit.
//! - [`auth`]: named sources and their secrets; bearer tokens and Standard Webhooks signatures.
//! - [`event`]: decoding every body shape PostHog sends into one normalized [`event::Event`].
//! - [`rules`]: rule files → compiled, indexed [`rules::RuleSet`]; diagnostics with file:line:col.
//! - [`templates`]: email templates (Handlebars, strict).
//! - [`engine`]: decides what events do under a rule set: dedupe → match → count (or window) →
//!   limits → effects (lines to append, emails to queue). No I/O.
//! - [`committer`]: group commit — one thread makes the effects of many requests durable at once.
//! - [`actions`]: one module per action kind (`email` rendering, `jsonl` projection and files).
//! - [`outbox`]: the durable email queue and the task that delivers it (file or SMTP).
//! - [`store`]: counters, time windows, last actions and handled event ids behind one trait;
//!   [`db`]: its redb form.
//! - [`reload`]: the running rule set and the file watcher that replaces it.
//! - [`testcase`]: rule test cases (`*.test.toml`) run in memory on a virtual clock.
//! - [`commands`]: `check`, `test` and `replay`, for rule authors.
//! - [`config`]: settings from `tripline.toml`, environment and flags (in that rising order).
//! - [`user_file`]: reading the files a user gives us (only regular files, within a size bound)
//!   and listing their folders.

pub mod actions;
pub mod admission;
pub mod auth;
pub mod commands;
pub mod committer;
pub mod config;
pub mod connections;
pub mod db;
pub mod engine;
pub mod event;
pub mod outbox;
pub mod reload;
pub mod rules;
pub mod server;
pub mod store;
pub mod templates;
pub mod testcase;
pub mod user_file;
