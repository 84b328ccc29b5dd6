//! Acting on one socket: duplicate, verify, shut down (or, in dry-run, stop just before).
//!
//! This is the only place a socket is shut down, and the only place dry-run branches.

use std::io;

use serde::Serialize;

use crate::netlink::TCP_CLOSE_WAIT;
use crate::os::Os;

/// The socket we mean to act on, as attribution saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub pid: i32,
    pub fd: i32,
    pub inode: u64,
    pub cookie: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Verified and shut down.
    Reaped,
    /// Verified; shutdown skipped because of dry-run.
    DryRun,
    /// The process exited or the fd was closed: nothing left to act on.
    Gone,
    /// The fd now refers to something else, or the socket left CLOSE_WAIT: left alone.
    Changed,
    /// A syscall failed (for example EPERM).
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Reaped,
        Outcome::DryRun,
        Outcome::Gone,
        Outcome::Changed,
        Outcome::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Reaped => "reaped",
            Outcome::DryRun => "dry_run",
            Outcome::Gone => "gone",
            Outcome::Changed => "changed",
            Outcome::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActResult {
    pub outcome: Outcome,
    /// Why, for anything but a clean reap/dry-run.
    pub detail: Option<String>,
    /// The failure was a permission denial (pidfd_getfd EPERM).
    pub permission_denied: bool,
}

impl ActResult {
    fn ok(outcome: Outcome) -> Self {
        Self {
            outcome,
            detail: None,
            permission_denied: false,
        }
    }

    fn with(outcome: Outcome, detail: impl Into<String>) -> Self {
        Self {
            outcome,
            detail: Some(detail.into()),
            permission_denied: false,
        }
    }
}

pub const PTRACE_HINT: &str = "pidfd_getfd needs ptrace access to the target: run as root or grant CAP_SYS_PTRACE (e.g. `setcap cap_sys_ptrace,cap_dac_read_search+ep $(command -v cwreap)`, or AmbientCapabilities=CAP_SYS_PTRACE in the unit)";

/// Duplicate `exp.fd` out of `process`, check that it is still the socket we attributed
/// (inode, SO_COOKIE, TCP state CLOSE_WAIT), and shut it down unless `dry_run`.
/// The duplicate is closed before returning, whatever happens.
pub fn shutdown_verified<O: Os>(
    os: &O,
    process: &O::Process,
    exp: &Expected,
    dry_run: bool,
) -> ActResult {
    let dup = match os.duplicate(process, exp.fd) {
        Ok(dup) => dup,
        Err(e) => return classify_dup_error(&e),
    };
    let id = match os.identify(&dup) {
        Ok(id) => id,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
            return ActResult::with(
                Outcome::Changed,
                format!("fd {} is no longer a socket", exp.fd),
            );
        }
        Err(e)
            if e.raw_os_error() == Some(libc::ENOPROTOOPT)
                || e.raw_os_error() == Some(libc::EOPNOTSUPP) =>
        {
            return ActResult::with(
                Outcome::Changed,
                format!("fd {} is no longer a TCP socket", exp.fd),
            );
        }
        Err(e) => return ActResult::with(Outcome::Error, format!("inspecting duplicate: {e}")),
    };
    if id.inode != exp.inode {
        return ActResult::with(
            Outcome::Changed,
            format!(
                "fd {} now holds inode {} (expected {})",
                exp.fd, id.inode, exp.inode
            ),
        );
    }
    if id.cookie != exp.cookie {
        return ActResult::with(
            Outcome::Changed,
            format!("socket cookie {} differs from {}", id.cookie, exp.cookie),
        );
    }
    if id.tcp_state != TCP_CLOSE_WAIT {
        return ActResult::with(
            Outcome::Changed,
            format!(
                "socket is in TCP state {} now, not CLOSE_WAIT",
                tcp_state_name(id.tcp_state)
            ),
        );
    }
    if dry_run {
        return ActResult::ok(Outcome::DryRun);
    }
    match os.shutdown(&dup) {
        Ok(()) => ActResult::ok(Outcome::Reaped),
        // Raced with the peer or the owner: the socket is already disconnected.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            ActResult::with(Outcome::Gone, "socket was already disconnected")
        }
        Err(e) => ActResult::with(Outcome::Error, format!("shutdown: {e}")),
    }
}

fn classify_dup_error(e: &io::Error) -> ActResult {
    match e.raw_os_error() {
        Some(libc::ESRCH) => ActResult::with(Outcome::Gone, "process exited"),
        Some(libc::EBADF) => ActResult::with(Outcome::Gone, "fd was closed by its owner"),
        Some(libc::EPERM) | Some(libc::EACCES) => ActResult {
            outcome: Outcome::Error,
            detail: Some(format!("pidfd_getfd: {e}; {PTRACE_HINT}")),
            permission_denied: true,
        },
        _ => ActResult::with(Outcome::Error, format!("pidfd_getfd: {e}")),
    }
}

/// Names as in include/net/tcp_states.h, like ss prints them.
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}
