//! What the commands share: the exit status, the capabilities reading fd tables needs and
//! the error naming the missing ones, discovery and attribution in one call, and whether
//! stdout takes colour.

use std::collections::BTreeSet;

use anyhow::{Context, Result};

use cwreap_linux::kernel::{Kernel, Linux};
use cwreap_linux::sys::Capability;

use crate::cli::args::Selectors;
use crate::cli::render;
use crate::shared::age::{self, Clues};
use crate::shared::attribute::{self, Attributor, Scope, Snapshot};
use crate::shared::dead;
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
            "permission denied {what}, although cwreap holds the capabilities it needs: a \
seccomp filter (a container runtime's profile), Yama (ptrace_scope 3), an LSM (AppArmor, \
SELinux) or another user namespace refuses it"
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
        if e.kind() == std::io::ErrorKind::TimedOut {
            return Err(UsageError(format!(
                "pid {pid}: reading its command line did not return within {} ms (its memory \
map is locked), so --cmdline cannot be checked for it",
                cwreap_linux::procfs::slow::SLOW_READ_DEADLINE.as_millis()
            ))
            .into());
        }
        return Err(UsageError(format!("pid {pid}: no such process ({e})")).into());
    }
    Ok(())
}

/// Namespaces that could not be entered or dumped, with why: each is a warning.
pub type Failures = Vec<(u64, String)>;

/// Processes whose socket fds could not be duplicated to tell dead held sockets (EPERM):
/// their dead sockets are unknown, never "none".
pub type Unprobed = Vec<i32>;

/// Why the running daemon's ages (its first sight of each socket) were not used, when a
/// daemon seems to publish some: the ages shown are then tcp_info's lower bounds only.
pub(crate) fn published_note(k: &Linux, err: &mut impl std::io::Write) -> Result<()> {
    if let Some(why) = k.published_note() {
        writeln!(
            err,
            "note: the daemon's ages are not used ({why}); ages are tcp_info's bounds only"
        )?;
    }
    if let Some(why) = k.pinned_note() {
        writeln!(
            err,
            "note: the daemon's exact entry times are not used ({why}); ages are estimated (age_source first_seen or last_ack)"
        )?;
    }
    if let Some(why) = k.attribution_note() {
        writeln!(
            err,
            "note: the BPF socket iterator is not used ({why}); owners were found by reading /proc/PID/fd of each process"
        )?;
    }
    Ok(())
}

/// The system as the command line sees it: reading what the running daemon publishes and,
/// unless `--no-bpf`, its exact entry times.
pub(crate) fn cli_kernel(selectors: &Selectors) -> Linux {
    if selectors.no_bpf {
        Linux::for_cli_without_bpf()
    } else {
        Linux::for_cli()
    }
}

/// The warning for processes whose dead held sockets could not be looked for.
pub(crate) fn unprobed_note(pids: &[i32]) -> Option<String> {
    if pids.is_empty() {
        return None;
    }
    let shown: Vec<String> = pids.iter().take(5).map(i32::to_string).collect();
    Some(format!(
        "warning: dead held sockets (ended connections still held by an fd) of {} process(es) \
(pid {}{}) are unknown: telling them needs pidfd_getfd, which was refused; {}",
        pids.len(),
        shown.join(", "),
        if pids.len() > 5 { ", ..." } else { "" },
        missing_ptrace("duplicating their socket fds")
    ))
}

/// The warning for processes skipped because their command line, which a `--cmdline`
/// selector needs, could not be read in time.
pub(crate) fn stalled_note(pids: &[i32]) -> Option<String> {
    if pids.is_empty() {
        return None;
    }
    let shown: Vec<String> = pids.iter().take(5).map(i32::to_string).collect();
    Some(format!(
        "warning: {} process(es) (pid {}{}) were skipped: reading their command line did not \
return within {} ms (their memory map is locked, e.g. by a thread stuck reading a FUSE \
file that never answers), so whether --cmdline matches them is unknown",
        pids.len(),
        shown.join(", "),
        if pids.len() > 5 { ", ..." } else { "" },
        cwreap_linux::procfs::slow::SLOW_READ_DEADLINE.as_millis()
    ))
}

/// Everything up to selection, shared by scan, reap and explain: discovery in the network
/// namespaces of the processes in scope, then attribution. With `pin`, every process read
/// is pinned first (reap acts through the pin); without, nothing is duplicated.
pub(crate) fn observe<K: Kernel>(
    k: &mut K,
    pin: bool,
    selectors: &Selectors,
) -> Result<(Snapshot<K::Process>, Failures, Unprobed)> {
    selectors.check_regex_budget()?;
    selectors.check_pid_files()?;
    observe_in(k, pin, &selectors.scope())
}

/// [`observe`] over a scope given as such rather than by selectors: the commands always
/// look for dead held sockets ([`Scope::dead`]); the benchmark measures the scan with and
/// without that look through this one path.
pub fn observe_in<K: Kernel>(
    k: &mut K,
    pin: bool,
    scope: &Scope,
) -> Result<(Snapshot<K::Process>, Failures, Unprobed)> {
    match &scope.pids {
        Some(pids) => k.cover(pids, false),
        None => {
            let all = k.pids().context("listing /proc")?;
            k.cover(&all, true);
        }
    }
    let found = k
        .snapshot(true)
        .context("dumping CLOSE_WAIT sockets over sock_diag")?;
    // The instant of the dump's tcp_info: a first sight is aged to it too, or the time
    // attribution and probing take would lift the lower bound over tcp_info's upper one.
    let now = k.now();
    let failures = k.take_failures();
    // Host-wide, every process's socket fds in one pass (the BPF iterator) when it loads;
    // otherwise (or with --no-bpf) /proc/PID/fd of each process, and the kernel says why.
    // `--pid` reads only the named processes' tables: cheaper than loading the iterator.
    let host = match scope.pids {
        None => k.host_fds().ok(),
        Some(_) => None,
    };
    let attributor = Attributor {
        proc: &*k,
        os: pin.then_some(&*k),
        self_pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
        host: host.as_ref(),
    };
    let mut snap = attributor.attribute(found, scope);
    check_unreadable(&snap)?;
    let unknown = std::mem::take(&mut snap.unknown);
    let pins: std::collections::HashMap<i32, &K::Process> = snap
        .processes
        .iter()
        .filter_map(|(pid, p)| p.handle.as_ref().map(|h| (*pid, h)))
        .collect();
    // What the iterator saw each socket to be spares the dumps and the protocol names.
    let none = std::collections::HashMap::new();
    let kinds = host.as_ref().map_or(&none, |h| &h.kinds);
    let probed = dead::probe(k, &unknown, kinds, &|pid| pins.get(&pid).copied())
        .context("looking for dead held sockets")?;
    drop(pins);
    dead::add_to(&mut snap, &probed.dead, &*k);
    // One age function for all: what the kernel saw (events) and the running daemon's
    // first sight, where known, with what sock_diag says.
    for s in &mut snap.sockets {
        let key = (s.diag.netns, s.diag.cookie);
        let clues = Clues::of(&s.diag, k.entered_at(key), k.first_seen(key));
        s.age = age::age(&clues, now);
    }
    Ok((snap, failures, probed.denied))
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
