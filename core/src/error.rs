//! Error types shared by every crate.

use std::path::PathBuf;

/// A configuration that could not be loaded or failed validation.
///
/// The message always names where the problem is (file, field) and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// (The reason is no `source`: said once, in the message, also where a chain of
    /// causes is printed.)
    #[error("cannot read config file `{path}`: {reason}")]
    Read {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: field `{field}`: expected {expected}")]
    Invalid {
        origin: String,
        field: String,
        expected: String,
    },
    /// More than one error of one file, in the file's order: said one per line, each
    /// after the first as `error: ...`, as a command prints its error.
    #[error("{}", several(.0))]
    Several(Vec<ConfigError>),
}

fn several(errors: &[ConfigError]) -> String {
    let mut said = errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\nerror: ");
    let note = errors
        .first()
        .and_then(|first| crate::toml_errors::more_errors_note(&first.file(), errors.len()));
    if let Some(note) = note {
        said.push_str(&format!("\nnote: {note}"));
    }
    said
}

impl ConfigError {
    /// One error as it is, several as [`ConfigError::Several`].
    pub fn all(mut errors: Vec<ConfigError>) -> Option<Self> {
        match errors.len() {
            0 => None,
            1 => errors.pop(),
            _ => Some(ConfigError::Several(errors)),
        }
    }

    /// The error in one line: the first of several, and how many more there are.
    pub fn first_of(&self) -> String {
        match self {
            ConfigError::Several(errors) if errors.len() > 1 => {
                let more = errors.len() - 1;
                let noun = if more == 1 { "error" } else { "errors" };
                format!("{} (and {more} more {noun})", errors[0])
            }
            other => other.to_string(),
        }
    }

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
            ConfigError::Several(errors) => match errors.first() {
                Some(first) => first.place(),
                None => (String::new(), None),
            },
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
