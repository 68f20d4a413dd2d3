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
pub mod toml_errors;
pub mod tracking;
pub mod transform;

pub use error::{ConfigError, ValidationError};

/// `n` and `noun`, plural unless `n` is 1: `1 page`, `0 pages`, `3 retries`. For the
/// counts in summary lines; regular nouns only (`-y` after a consonant becomes `-ies`).
pub fn counted(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        return format!("1 {noun}");
    }
    match noun.strip_suffix('y') {
        Some(stem) if !stem.ends_with(['a', 'e', 'i', 'o', 'u']) => format!("{n} {stem}ies"),
        _ => format!("{n} {noun}s"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counted_is_plural_unless_one() {
        use super::counted;
        assert_eq!(counted(1u64, "page"), "1 page");
        assert_eq!(counted(0u64, "page"), "0 pages");
        assert_eq!(counted(2u64, "retry"), "2 retries");
        assert_eq!(counted(1u64, "retry"), "1 retry");
        assert_eq!(counted(5u64, "day"), "5 days");
    }
}
