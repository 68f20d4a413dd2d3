//! Sluice's shared vocabulary: the domain model of the platform's collections, the
//! configuration and its one-step validation, the pure session / user aggregate rules and
//! the error types. Nothing here does network or database I/O.

pub mod aggregate;
pub mod config;
pub mod cron;
pub mod error;
pub mod integration;
pub mod metrics;
pub mod model;
pub mod segment;
pub mod sessionize;
pub mod tracking;
pub mod transform;

pub use error::{ConfigError, ValidationError};
