//! What can be wrong with a policy, and where in the file.

use std::fmt;

/// Line and column (1-based) of a key or value in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: u64,
    pub column: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("{file}: cannot read the policy: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// Not a valid policy; `position` is that of the offending key or value when known.
    #[error("{file}:{}", located(.position, .message))]
    Invalid {
        file: String,
        position: Option<Position>,
        message: String,
    },
    /// Running as root, the file could be changed by someone other than root.
    #[error("{file}: {problem}")]
    Unsafe { file: String, problem: String },
}

fn located(position: &Option<Position>, message: &str) -> String {
    match position {
        Some(p) => format!("{p}: {message}"),
        None => format!(" {message}"),
    }
}

impl ConfigError {
    pub fn position(&self) -> Option<Position> {
        match self {
            ConfigError::Invalid { position, .. } => *position,
            _ => None,
        }
    }
}
