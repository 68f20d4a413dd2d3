//! Sluice's connections to the outside: the MongoDB store (collections, indexes, the
//! event writer, session upkeep). HTTP sources and sinks and object storage join here.

pub mod http;
pub mod mongo;
pub mod objstore;
pub mod parquet;

pub use mongo::{Store, StoreError};
