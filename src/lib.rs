//! tripline turns product-analytics events (PostHog webhooks) into actions described by TOML
//! rule files: emails rendered from templates, and sanitized lines in JSONL files.
//!
//! # Layout
//! - [`server`]: the HTTP edge — routes, status codes, start and graceful stop.
//! - [`event`]: decoding every body shape PostHog sends into one normalized [`event::Event`].
//! - [`rules`]: rule files → compiled, indexed [`rules::RuleSet`]; diagnostics with file:line:col.
//! - [`templates`]: email templates (Handlebars, strict).
//! - [`engine`]: runs events through a rule set: match → count → once-limit → actions.
//! - [`actions`]: one module per action kind (`email`, `jsonl`).
//! - [`store`]: counters and once-keys behind one trait.
//! - [`reload`]: the running rule set and the file watcher that replaces it.
//! - [`config`]: server settings from flags and environment.

pub mod actions;
pub mod config;
pub mod engine;
pub mod event;
pub mod reload;
pub mod rules;
pub mod server;
pub mod store;
pub mod templates;
