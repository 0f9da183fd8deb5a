//! Events in: who may send them, and what they become.

pub mod auth;
pub mod elements;
pub mod event;
pub mod path;
