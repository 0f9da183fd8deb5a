//! What a rule can do when it fires: one file per kind of action.

pub mod email;
pub mod jsonl;
