//! What runs beside the requests: the committer that makes their effects durable in batches,
//! the sender that delivers queued emails, and the reload of the rules when files change.

pub mod committer;
pub mod outbox;
pub mod reload;
