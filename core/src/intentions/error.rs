//! What is wrong with an entry, and where: [`IntentionError`] names the
//! entry (when several were read at once) and the field at fault
//! (`Sources[1].Permissions[0].HTTP.PathRegex`); [`Problem`] says what.
//!
//! Owns: the error types and their messages. Does not decide what is
//! wrong; the readers in `entry`, `permission` and `fields` do.

use std::fmt;

/// An entry that cannot be used, with the field at fault
/// (`Sources[1].Permissions[0].HTTP.PathRegex`).
#[derive(Debug)]
pub struct IntentionError {
    /// The entry's name, when several entries were read at once.
    entry: Option<Box<str>>,
    /// Where in the body: `Sources[1].Action`; empty for the entry itself.
    path: String,
    problem: Problem,
}

impl IntentionError {
    pub(super) fn new(path: impl Into<String>, problem: Problem) -> Self {
        Self {
            entry: None,
            path: path.into(),
            problem,
        }
    }

    pub(super) fn in_entry(mut self, name: &str) -> Self {
        self.entry = Some(name.into());
        self
    }

    /// The entry's name, when the error came from
    /// [`IntentionSet::compile`](super::IntentionSet::compile) or
    /// [`flatten`](super::flatten).
    pub fn entry(&self) -> Option<&str> {
        self.entry.as_deref()
    }

    /// The field at fault, e.g. `Sources[1].Permissions[0].HTTP.PathRegex`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }
}

impl fmt::Display for IntentionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(entry) = &self.entry {
            write!(f, "service-intentions entry {entry:?}: ")?;
        }
        if self.path.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{}: {}", self.path, self.problem)
        }
    }
}

impl std::error::Error for IntentionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.problem)
    }
}

/// What is wrong with a field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    #[error("unknown field {field:?} (known fields: {})", .known.join(", "))]
    UnknownField {
        field: String,
        known: &'static [&'static str],
    },
    #[error("given twice, as {first:?} and {second:?}")]
    DuplicateField { first: String, second: String },
    #[error("must be {0}")]
    WrongType(&'static str),
    #[error("is required")]
    Missing,
    /// A rule of Consul's broken; the text says which.
    #[error("{0}")]
    Invalid(String),
    #[error("not supported by Meshwork: {0}")]
    NotSupported(&'static str),
    #[error("invalid regex: {0}")]
    Regex(#[source] regex::Error),
    #[error("regex too large: its compiled form exceeds {limit} bytes")]
    RegexTooLarge { limit: usize },
    #[error("regex too large: {len} bytes, at most {max}")]
    RegexTooLong { len: usize, max: usize },
}

pub(super) fn invalid(path: impl Into<String>, why: impl Into<String>) -> IntentionError {
    IntentionError::new(path, Problem::Invalid(why.into()))
}
