//! What the commands share: the exit status, the capabilities reading fd tables needs and
//! the error naming the missing ones, discovery and attribution in one call, and whether
//! stdout takes colour.

use std::collections::BTreeSet;

use anyhow::{Context, Result};

use cwreap_linux::kernel::Effects;
use cwreap_linux::netns::Namespaces;
use cwreap_linux::procfs::ProcFs;
use cwreap_linux::sys::Capability;

use crate::cli::args::Selectors;
use crate::cli::render;
use crate::shared::attribute::{self, Attributor, Snapshot};
use crate::shared::usage::UsageError;

/// Exit status of a command that ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Some socket failed.
    Failed,
}

/// What reading another user's /proc/PID/fd needs: CAP_DAC_READ_SEARCH to open the
/// directory (mode 0500), CAP_SYS_PTRACE to read its links and to pidfd_getfd.
pub(crate) const FD_TABLE_CAPS: [Capability; 2] =
    [Capability::SysPtrace, Capability::DacReadSearch];

/// The capabilities of `needed` that this process does not hold.
pub(crate) fn lacking(needed: &[Capability]) -> BTreeSet<Capability> {
    needed.iter().copied().filter(|c| !c.held()).collect()
}

/// The exit-2 error for an action refused for lack of privilege: it names every capability
/// in `missing` and the setcap line that grants them. With nothing missing, something else
/// refused (Yama, an LSM, another user namespace), and it says that instead.
pub(crate) fn privilege_error(what: &str, missing: &BTreeSet<Capability>) -> UsageError {
    if missing.is_empty() {
        return UsageError(format!(
            "permission denied {what}, although cwreap holds the capabilities it needs: Yama \
(ptrace_scope 3), an LSM (AppArmor, SELinux) or another user namespace refuses it"
        ));
    }
    let names: Vec<&str> = missing.iter().map(|c| c.name()).collect();
    let setcap: Vec<String> = missing
        .iter()
        .map(|c| c.name().to_ascii_lowercase())
        .collect();
    UsageError(format!(
        "permission denied {what}: missing {}. Run as root, or grant {}: `sudo setcap {}+ep \
$(command -v cwreap)`",
        names.join(" and "),
        if names.len() > 1 { "them" } else { "it" },
        setcap.join(",")
    ))
}

/// Reading a process's fd table was refused: the capabilities that would allow it.
pub(crate) fn missing_ptrace(what: &str) -> UsageError {
    privilege_error(what, &lacking(&FD_TABLE_CAPS))
}

/// Turn the selected pids that could not be read into a usage error.
fn check_unreadable<H>(snap: &Snapshot<H>) -> Result<()> {
    if let Some((pid, e)) = snap.unreadable.first() {
        if attribute::is_permission(e) {
            return Err(missing_ptrace(&format!("reading the fds of pid {pid}")).into());
        }
        return Err(UsageError(format!("pid {pid}: no such process ({e})")).into());
    }
    Ok(())
}

/// Everything up to selection, shared by scan and reap: one sock_diag socket per network
/// namespace of the processes in scope, then attribution.
pub(crate) fn observe<O: Effects>(
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
        .dump_with_listeners()
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
    let missing = lacking(&FD_TABLE_CAPS);
    (denied > 0 && !missing.is_empty()).then(|| {
        let names: Vec<&str> = missing.iter().map(|c| c.name()).collect();
        format!(
            "note: {denied} process(es) could not be inspected (permission denied); their \
sockets show no owner. Run as root or with {} to see them.",
            names.join(" and ")
        )
    })
}

pub(crate) fn stdout_color() -> bool {
    render::use_color(
        std::io::IsTerminal::is_terminal(&std::io::stdout()),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}
