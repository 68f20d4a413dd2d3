//! Error types shared by every crate.

use std::path::PathBuf;

/// A configuration that could not be loaded or failed validation.
///
/// The message always names where the problem is (file, field) and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: field `{field}`: expected {expected}")]
    Invalid {
        origin: String,
        field: String,
        expected: String,
    },
}

impl ConfigError {
    /// The line of its file the error names, if any.
    pub fn line(&self) -> Option<usize> {
        self.place().1
    }

    /// The file (or other origin) the error is in, without a line number.
    pub fn file(&self) -> String {
        self.place().0
    }

    /// The file and the line (`path:12`) the error names.
    fn place(&self) -> (String, Option<usize>) {
        match self {
            ConfigError::Read { path, .. } => (path.display().to_string(), None),
            ConfigError::Parse { origin, .. } | ConfigError::Invalid { origin, .. } => {
                match origin.rsplit_once(':') {
                    Some((file, line))
                        if !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit()) =>
                    {
                        (file.to_string(), line.parse().ok())
                    }
                    _ => (origin.clone(), None),
                }
            }
        }
    }
}

/// One input record (an event, an import record) that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct ValidationError {
    pub field: String,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
