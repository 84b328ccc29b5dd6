//! The policy file on disk, and the usage errors of the whole program.
//!
//! When cwreap runs privileged, a policy file that someone other than root could change is
//! refused (sshd's StrictModes): it decides which sockets of which processes get shut down.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{Config, ConfigError};

/// An error the user can fix by changing how cwreap is invoked, configured or privileged:
/// exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Load a policy for running or checking: ownership/mode first (when privileged), then
/// content.
pub fn load_config(path: &Path) -> Result<Config, ConfigError> {
    check_file_permissions(path)?;
    super::load(path)
}

/// When running privileged, refuse a policy file that someone other than root could
/// change (sshd's StrictModes): it decides which sockets of which processes get shut down.
/// Privileged means euid 0, or any effective capability (the shipped unit runs as a
/// transient user with ambient CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH and CAP_NET_ADMIN).
pub fn check_file_permissions(path: &Path) -> Result<(), ConfigError> {
    if !cwreap_linux::sys::runs_privileged() {
        return Ok(());
    }
    let file = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    match permission_problem(meta.mode(), meta.uid()) {
        None => Ok(()),
        Some(problem) => {
            let f = shell_quote(&file);
            Err(ConfigError::Unsafe {
                problem: format!("{problem}; fix: chown root:root {f} && chmod 600 {f}"),
                file,
            })
        }
    }
}

pub(super) fn permission_problem(mode: u32, owner_uid: u32) -> Option<String> {
    let mut problems = Vec::new();
    if owner_uid != 0 {
        problems.push(format!("is owned by uid {owner_uid}, not root"));
    }
    let writable: Vec<&str> = [(0o020, "group"), (0o002, "others")]
        .into_iter()
        .filter(|(bit, _)| mode & bit != 0)
        .map(|(_, who)| who)
        .collect();
    if !writable.is_empty() {
        problems.push(format!(
            "is writable by {} (mode {:04o})",
            writable.join(" and "),
            mode & 0o7777
        ));
    }
    (!problems.is_empty()).then(|| {
        format!(
            "refusing the policy: it {}, so a non-root user could choose what cwreap shuts down",
            problems.join(" and ")
        )
    })
}

pub(super) fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:@%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
