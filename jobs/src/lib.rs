//! Job runs (exports and archival; imports and the scheduler join here) with their history
//! in MongoDB.

pub mod export;
pub mod history;
