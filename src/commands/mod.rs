//! The commands: `scan` and `reap` run discovery → attribution → selection → action →
//! report once; `check` validates a policy. This is the edge: errors carry context here,
//! and usage errors become exit code 2.

use std::io::Write;

use anyhow::{Context, Result};

use cwreap_linux::netns::Namespaces;
use cwreap_linux::os::Os;
use cwreap_linux::procfs::ProcFs;
use cwreap_linux::sys::Capability;

use crate::cli::Selectors;
use crate::config::UsageError;
use crate::output;
use crate::snapshot::{self, Attributor, Snapshot};

mod reap;
mod scan;

pub use reap::{reap, reap_row};
pub use scan::scan;

/// Exit status of a command that ran.
/// Exit status of a command that ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Some socket failed.
    Failed,
}

pub(crate) fn missing_ptrace(what: &str) -> UsageError {
    UsageError(format!(
        "permission denied {what}: reading another user's /proc/PID/fd and pidfd_getfd need \
CAP_SYS_PTRACE. Run as root, or grant it: `sudo setcap cap_sys_ptrace,cap_dac_read_search+ep \
$(command -v cwreap)`"
    ))
}

/// Turn the selected pids that could not be read into a usage error.
fn check_unreadable<H>(snap: &Snapshot<H>) -> Result<()> {
    if let Some((pid, e)) = snap.unreadable.first() {
        if snapshot::is_permission(e) {
            return Err(missing_ptrace(&format!("for pid {pid}")).into());
        }
        return Err(UsageError(format!("pid {pid}: no such process ({e})")).into());
    }
    Ok(())
}

/// Everything up to selection, shared by scan and reap: one sock_diag socket per network
/// namespace of the processes in scope, then attribution.
pub(crate) fn observe<O: Os>(
    os: Option<&O>,
    selectors: &Selectors,
) -> Result<(Snapshot<O::Process>, Namespaces)> {
    let proc = ProcFs::default();
    let scope = selectors.scope();
    let mut namespaces = Namespaces::default();
    match &scope.pids {
        Some(pids) => namespaces.cover(&proc, pids, false),
        None => {
            let all = proc.pids().context("listing /proc")?;
            namespaces.cover(&proc, &all, true);
        }
    }
    let found = namespaces
        .dump()
        .context("dumping CLOSE_WAIT sockets over sock_diag")?;
    let attributor = Attributor {
        proc: &proc,
        os,
        self_pid: std::process::id() as i32,
    };
    let snap = attributor.attribute(found, &scope);
    check_unreadable(&snap)?;
    Ok((snap, namespaces))
}

pub(crate) fn denied_note(denied: usize) -> Option<String> {
    (denied > 0 && !Capability::SysPtrace.held()).then(|| {
        format!(
            "note: {denied} process(es) could not be inspected (permission denied); their \
sockets show no owner. Run as root or with CAP_SYS_PTRACE to see them."
        )
    })
}

pub(crate) fn stdout_color() -> bool {
    output::use_color(
        std::io::IsTerminal::is_terminal(&std::io::stdout()),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// `cwreap check`: validate a policy (ownership and mode too, of the file and of every
/// directory on its path, when privileged) and print it. An `audit_log` that `cwreap run`
/// could not use (a symlink, a FIFO, a directory another user could change, no right to
/// create it) is an error too.
pub fn check(path: &std::path::Path, out: &mut impl Write) -> Result<Status> {
    let cfg = crate::config::load_config(path).map_err(|e| UsageError(e.to_string()))?;
    if let Some(problem) = cfg
        .audit_log
        .as_deref()
        .and_then(crate::daemon::audit_log_problem)
    {
        return Err(UsageError(format!("{}: {problem}", path.display())).into());
    }
    writeln!(out, "{}: OK", path.display())?;
    write!(out, "{}", cfg.describe())?;
    Ok(Status::Ok)
}
