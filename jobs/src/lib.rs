//! Job runs (exports and archival; imports and the scheduler join here) with their history
//! in MongoDB.

pub mod configs;
pub mod export;
pub mod history;
pub mod import;
mod retry;
pub mod schedule;
mod spool;
pub use spool::remove_held as remove_work_in_progress;
mod tally;
pub mod tokens;
