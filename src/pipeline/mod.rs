//! What runs beside the requests: the committer that makes their effects durable in batches, the
//! appender that writes their committed lines into the output files, the journal that keeps
//! batches committed without a sync (`--durability interval`), the sender that delivers queued
//! emails, the reload of the rules when files change, and the timer that ends pending
//! waits when they are due.

pub mod activity;
pub mod appender;
pub mod committer;
pub mod journal;
pub mod outbox;
pub mod reload;
pub mod timers;
