//! Job runs (exports and archival; imports and the scheduler join here) with their history
//! in MongoDB.

pub mod configs;
pub mod export;
pub mod history;
pub mod import;
mod retry;
pub mod schedule;
mod spool;
mod tally;
pub mod tokens;
