//! `cwreap check`: validate a policy and print the effective one, every default explicit.

use std::io::Write;

use anyhow::Result;

use super::common::Status;
use crate::shared::usage::UsageError;

/// `cwreap check`: validate a policy (ownership and mode too, of the file and of every
/// directory on its path, when privileged) and print it. An `audit_log` that `cwreap run`
/// could not use (a symlink, a FIFO, a directory another user could change, no right to
/// create it) is an error too, and so is a `metrics.listen` it could not bind (in use by
/// anything but a running cwreap, or a privileged port). Targets that can never act (an earlier one selects all
/// their sockets) are warned about on `err`, `file:line:col: warning: ...`; the policy is
/// still valid.
pub fn check(path: &std::path::Path, out: &mut impl Write, err: &mut impl Write) -> Result<Status> {
    let cfg = crate::shared::config::load_config(path).map_err(|e| UsageError(e.to_string()))?;
    if let Some(problem) = cfg
        .audit_log
        .as_deref()
        .and_then(crate::shared::audit_file::problem)
    {
        return Err(UsageError(format!("{}: {problem}", path.display())).into());
    }
    if let Some(problem) = cfg.metrics.listen.and_then(super::check_listen::problem) {
        return Err(UsageError(format!("{}: {problem}", path.display())).into());
    }
    for s in cfg.shadowed() {
        let at = cfg
            .targets
            .get(s.target)
            .and_then(|t| t.at)
            .map(|p| format!("{p}:"))
            .unwrap_or_default();
        writeln!(
            err,
            "{}:{at} warning: {}",
            path.display(),
            cfg.shadow_message(s)
        )?;
    }
    writeln!(out, "{}: OK", path.display())?;
    write!(out, "{}", cfg.describe())?;
    Ok(Status::Ok)
}
