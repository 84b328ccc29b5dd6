//! The error that means "fix how cwreap is invoked, configured or privileged": every
//! command maps it to exit code 2, with its one-line message.

/// An error the user can fix by changing how cwreap is invoked, configured or privileged:
/// exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);
