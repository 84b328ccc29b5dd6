//! Acting on one socket: duplicate, verify, shut down (or, in dry-run, stop just before);
//! or destroy it through netlink after looking it up again; and the per-fd outcomes of an
//! injected close() batch.
//!
//! This is the only place a socket is shut down, and the only place dry-run branches. Every
//! outcome other than a clean one carries a typed [`Reason`]: the JSON gets its `code()`
//! and its text, and tests match on the variant.

use std::fmt;
use std::io;

use serde::Serialize;

use cwreap_linux::inject::{InjectError, InjectReport, Refusal, SkipReason, Victim};
use cwreap_linux::kernel::{Destroy, Effects};
use cwreap_linux::netlink::DiagSocket;
use cwreap_linux::sys::Capability;
use cwreap_linux::tcp;

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
    /// The daemon's `log` action: reported, not touched.
    Logged,
    /// This action cannot reach the socket (e.g. shutdown of an unaccepted connection).
    Skipped,
}

impl Outcome {
    /// The outcomes of a shutdown (what `reap` summarises).
    pub const ALL: [Outcome; 6] = [
        Outcome::Reaped,
        Outcome::DryRun,
        Outcome::Gone,
        Outcome::Changed,
        Outcome::Skipped,
        Outcome::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Reaped => "reaped",
            Outcome::DryRun => "dry_run",
            Outcome::Gone => "gone",
            Outcome::Changed => "changed",
            Outcome::Error => "error",
            Outcome::Logged => "logged",
            Outcome::Skipped => "skipped",
        }
    }
}

/// Which way an unaccepted connection could still be reached, for the hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `reap` shutting down: use `--destroy`.
    ReapShutdown,
    /// `reap --close`: use `--destroy`.
    ReapClose,
    /// The daemon's `action: shutdown`: use `action: destroy`.
    Policy,
}

/// Why an action ended the way it did, for anything but a clean reap or dry run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The owner exited.
    ProcessExited,
    /// The owner closed the fd.
    FdClosed,
    /// The fd is no longer a socket.
    NotSocket { fd: i32 },
    /// The fd is a socket, but not a TCP one.
    NotTcp { fd: i32 },
    /// The fd now refers to another file.
    InodeChanged { fd: i32, found: u64, expected: u64 },
    /// Same inode number, another socket. `found` is None when netlink only said "differs".
    CookieChanged { found: Option<u64>, expected: u64 },
    /// The socket left CLOSE_WAIT.
    StateChanged { state: u8 },
    /// shutdown() raced with the peer or the owner: ENOTCONN.
    AlreadyDisconnected,
    /// The exact socket is not in the kernel's tables any more.
    SocketGone,
    /// SOCK_DESTROY answered ENOENT.
    VanishedBeforeDestroy,
    /// A system call failed for another reason.
    Failed { call: &'static str, error: String },
    /// A system call was refused for lack of `missing`.
    PermissionDenied {
        call: &'static str,
        error: String,
        missing: Capability,
    },
    /// This kernel has no SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY is off).
    DestroyUnsupported { error: Option<String> },
    /// Still in the accept queue: no fd exists to shut down or close.
    Unaccepted(Via),
    /// Nobody cwreap could read holds the socket.
    NoOwner,
    /// The socket was in the snapshot the decision was made on, but not any more.
    LeftSnapshot,
    /// No pidfd is held for the owner.
    NotPinned,
    /// Planned for an injected close(), but no batch covered it.
    NotInBatch,
    /// Closed inside the target; the target was stopped this long.
    Closed { pause_us: u64 },
    /// The fd was left alone by the injected close() after checking it while stopped.
    Inject(SkipReason),
    /// The injected close() batch failed as a whole.
    InjectFailed(InjectError),
    /// The batch failed as a whole (`failure`), and the fd table re-read afterwards no
    /// longer has this fd: it was closed. `reused` is what the number holds now when the
    /// target already reused it (never acted on).
    ClosedPerTable {
        failure: InjectError,
        reused: Option<String>,
    },
    /// The batch failed as a whole, and the fd table re-read afterwards still has the same
    /// socket at this fd.
    StillHeld { failure: InjectError },
    /// The batch failed as a whole, and the fd table could not be re-read (`why`): whether
    /// this fd was closed cannot be known.
    Unknowable {
        failure: InjectError,
        exited: bool,
        why: String,
    },
}

pub const PTRACE_HINT: &str = "pidfd_getfd needs ptrace access to the target: run as root or grant CAP_SYS_PTRACE (e.g. `setcap cap_sys_ptrace,cap_dac_read_search+ep $(command -v cwreap)`, or AmbientCapabilities=CAP_SYS_PTRACE in the unit)";
pub const NET_ADMIN_HINT: &str = "SOCK_DESTROY needs CAP_NET_ADMIN: run as root or grant it (AmbientCapabilities=CAP_NET_ADMIN in the unit)";
pub const NO_DESTROY_HINT: &str =
    "this kernel has no SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY is off); use shutdown instead";

impl Reason {
    /// A stable snake_case code for JSON, the audit log and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::ProcessExited => "process_exited",
            Reason::FdClosed => "fd_closed",
            Reason::NotSocket { .. } => "not_socket",
            Reason::NotTcp { .. } => "not_tcp",
            Reason::InodeChanged { .. } => "inode_changed",
            Reason::CookieChanged { .. } => "cookie_changed",
            Reason::StateChanged { .. } => "state_changed",
            Reason::AlreadyDisconnected => "already_disconnected",
            Reason::SocketGone => "socket_gone",
            Reason::VanishedBeforeDestroy => "vanished_before_destroy",
            Reason::Failed { .. } => "syscall_failed",
            Reason::PermissionDenied { .. } => "permission_denied",
            Reason::DestroyUnsupported { .. } => "destroy_unsupported",
            Reason::Unaccepted(_) => "unaccepted",
            Reason::NoOwner => "no_owner",
            Reason::LeftSnapshot => "left_snapshot",
            Reason::NotPinned => "not_pinned",
            Reason::NotInBatch => "not_in_batch",
            Reason::Closed { .. } => "closed_in_target",
            Reason::Inject(s) => match s {
                SkipReason::InvalidFd => "invalid_fd",
                SkipReason::Duplicate => "duplicate",
                SkipReason::NotOpen => "fd_closed",
                SkipReason::InodeChanged { .. } => "inode_changed",
                SkipReason::NotSocket => "not_socket",
                SkipReason::CookieChanged { .. } => "cookie_changed",
                SkipReason::NotTcp => "not_tcp",
                SkipReason::State(_) => "state_changed",
                SkipReason::Linger(_) => "linger",
                SkipReason::Syscall { .. } => "syscall_failed",
                SkipReason::CloseFailed(_) => "close_failed",
                SkipReason::StillOpen => "still_open",
                SkipReason::NotClosed(_) => "not_closed",
            },
            Reason::ClosedPerTable { reused: None, .. } => "closed_per_fd_table",
            Reason::ClosedPerTable {
                reused: Some(_), ..
            } => "closed_number_reused",
            Reason::Unknowable { exited: true, .. } => "process_exited",
            Reason::StillHeld { failure } | Reason::Unknowable { failure, .. } => {
                Reason::InjectFailed(failure.clone()).code()
            }
            Reason::InjectFailed(e) => match e {
                InjectError::Unsupported(_) => "unsupported",
                InjectError::Gone => "process_exited",
                InjectError::Permission(_) => "permission_denied",
                InjectError::Refused(r) => match r {
                    Refusal::OwnProcess => "refused_own_process",
                    Refusal::InvalidPid(_) | Refusal::NotPidfd | Refusal::PidfdOfOther { .. } => {
                        "refused_bad_target"
                    }
                    Refusal::JobControlStopped { .. } => "refused_stopped",
                    Refusal::SeccompStrict { .. } | Refusal::SeccompFilter { .. } => {
                        "refused_seccomp"
                    }
                    Refusal::Rseq { .. } => "refused_rseq",
                    Refusal::NoUsableThread => "refused_no_usable_thread",
                    Refusal::NoSyscallInsn => "refused_no_syscall_insn",
                },
                InjectError::Timeout(_) => "timeout",
                InjectError::Ptrace(_) => "ptrace_failed",
                InjectError::Helper(_) => "helper_failed",
            },
        }
    }

    /// The capability whose lack caused this, if that is what happened.
    pub fn missing_capability(&self) -> Option<Capability> {
        match self {
            Reason::PermissionDenied { missing, .. } => Some(*missing),
            Reason::InjectFailed(InjectError::Permission(_)) => Some(Capability::SysPtrace),
            _ => None,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::ProcessExited => write!(f, "process exited"),
            Reason::FdClosed => write!(f, "fd was closed by its owner"),
            Reason::NotSocket { fd } => write!(f, "fd {fd} is no longer a socket"),
            Reason::NotTcp { fd } => write!(f, "fd {fd} is no longer a TCP socket"),
            Reason::InodeChanged {
                fd,
                found,
                expected,
            } => write!(f, "fd {fd} now holds inode {found} (expected {expected})"),
            Reason::CookieChanged {
                found: Some(found),
                expected,
            } => write!(f, "socket cookie {found} differs from {expected}"),
            Reason::CookieChanged { found: None, .. } => write!(f, "socket cookie differs"),
            Reason::StateChanged { state } => write!(
                f,
                "socket is in TCP state {} now, not CLOSE_WAIT",
                tcp::state_name(*state)
            ),
            Reason::AlreadyDisconnected => write!(f, "socket was already disconnected"),
            Reason::SocketGone => write!(f, "socket no longer exists"),
            Reason::VanishedBeforeDestroy => write!(f, "socket vanished before SOCK_DESTROY"),
            Reason::Failed { call, error } => write!(f, "{call}: {error}"),
            Reason::PermissionDenied {
                call,
                error,
                missing,
            } => {
                let hint = match missing {
                    Capability::NetAdmin => NET_ADMIN_HINT,
                    _ => PTRACE_HINT,
                };
                write!(f, "{call}: {error}; {hint}")
            }
            Reason::DestroyUnsupported { error: Some(e) } => {
                write!(f, "SOCK_DESTROY: {e}; {NO_DESTROY_HINT}")
            }
            Reason::DestroyUnsupported { error: None } => write!(f, "{NO_DESTROY_HINT}"),
            Reason::Unaccepted(Via::ReapClose) => {
                write!(f, "unaccepted: no fd exists to close; use --destroy")
            }
            Reason::Unaccepted(via) => write!(
                f,
                "unaccepted: the app never accept()ed it, so no fd exists to shut down; use {}",
                if *via == Via::Policy {
                    "action: destroy"
                } else {
                    "--destroy"
                }
            ),
            Reason::NoOwner => write!(f, "no owner fd"),
            Reason::LeftSnapshot => write!(f, "socket left the snapshot"),
            Reason::NotPinned => write!(f, "owner no longer pinned"),
            Reason::NotInBatch => write!(f, "not part of any batch"),
            Reason::Closed { pause_us } => {
                write!(f, "closed inside the target; paused {pause_us} µs")
            }
            Reason::Inject(s) => write!(f, "{s}"),
            Reason::InjectFailed(e) => write!(f, "{e}"),
            Reason::ClosedPerTable { failure, reused } => {
                write!(f, "closed inside the target")?;
                if let Some(now) = reused {
                    write!(
                        f,
                        "; the target already reused the number, which now holds {now} (left alone)"
                    )?;
                }
                write!(
                    f,
                    ": gone from the fd table re-read after {}",
                    failed_batch(failure)
                )
            }
            Reason::StillHeld { failure } => write!(
                f,
                "still held: the fd table re-read after {} shows the same socket ({failure})",
                failed_batch(failure)
            ),
            Reason::Unknowable { failure, why, .. } => write!(
                f,
                "{failure}; {why}: whether this fd was closed cannot be known"
            ),
        }
    }
}

/// What failed, as the reasons of a re-read fd table say it.
fn failed_batch(failure: &InjectError) -> String {
    match failure {
        InjectError::Helper(_) => "the helper failed".into(),
        e => format!(
            "the injection failed ({})",
            Reason::InjectFailed(e.clone()).code()
        ),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActResult {
    pub outcome: Outcome,
    /// Why, for anything but a clean reap/dry-run.
    pub reason: Option<Reason>,
}

impl ActResult {
    pub fn ok(outcome: Outcome) -> Self {
        Self {
            outcome,
            reason: None,
        }
    }

    pub fn with(outcome: Outcome, reason: Reason) -> Self {
        Self {
            outcome,
            reason: Some(reason),
        }
    }

    /// The failure was a permission denial.
    pub fn permission_denied(&self) -> bool {
        self.missing_capability().is_some()
    }

    /// The capability whose lack made this fail, if any.
    pub fn missing_capability(&self) -> Option<Capability> {
        self.reason.as_ref().and_then(Reason::missing_capability)
    }

    /// The reason as text (the JSON `error` field and the table's DETAIL column).
    pub fn detail(&self) -> Option<String> {
        self.reason.as_ref().map(Reason::to_string)
    }
}

fn failed(call: &'static str, e: &io::Error) -> Reason {
    Reason::Failed {
        call,
        error: e.to_string(),
    }
}

/// Duplicate `exp.fd` out of `process`, check that it is still the socket we attributed
/// (inode, SO_COOKIE, TCP state CLOSE_WAIT), and shut it down unless `dry_run`.
/// The duplicate is closed before returning, whatever happens.
pub fn shutdown_verified<O: Effects>(
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
            return ActResult::with(Outcome::Changed, Reason::NotSocket { fd: exp.fd });
        }
        Err(e)
            if e.raw_os_error() == Some(libc::ENOPROTOOPT)
                || e.raw_os_error() == Some(libc::EOPNOTSUPP) =>
        {
            return ActResult::with(Outcome::Changed, Reason::NotTcp { fd: exp.fd });
        }
        Err(e) => return ActResult::with(Outcome::Error, failed("inspecting duplicate", &e)),
    };
    if id.inode != exp.inode {
        return ActResult::with(
            Outcome::Changed,
            Reason::InodeChanged {
                fd: exp.fd,
                found: id.inode,
                expected: exp.inode,
            },
        );
    }
    if id.cookie != exp.cookie {
        return ActResult::with(
            Outcome::Changed,
            Reason::CookieChanged {
                found: Some(id.cookie),
                expected: exp.cookie,
            },
        );
    }
    if id.tcp_state != tcp::CLOSE_WAIT {
        return ActResult::with(
            Outcome::Changed,
            Reason::StateChanged {
                state: id.tcp_state,
            },
        );
    }
    if dry_run {
        return ActResult::ok(Outcome::DryRun);
    }
    match os.shutdown(&dup) {
        Ok(()) => ActResult::ok(Outcome::Reaped),
        // Raced with the peer or the owner: the socket is already disconnected.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            ActResult::with(Outcome::Gone, Reason::AlreadyDisconnected)
        }
        Err(e) => ActResult::with(Outcome::Error, failed("shutdown", &e)),
    }
}

/// Reset a CLOSE_WAIT socket through SOCK_DESTROY, after checking that the very socket
/// (same 4-tuple and cookie) still exists and is still in CLOSE_WAIT. The owner is not
/// touched; it sees ECONNABORTED, the peer gets an RST.
pub fn destroy_verified<K: Destroy>(k: &mut K, s: &DiagSocket, dry_run: bool) -> ActResult {
    let current = match k.lookup(s) {
        Ok(Some(c)) => c,
        Ok(None) => return ActResult::with(Outcome::Gone, Reason::SocketGone),
        Err(e) => return ActResult::with(Outcome::Error, failed("sock_diag lookup", &e)),
    };
    if current.cookie != s.cookie {
        return ActResult::with(
            Outcome::Changed,
            Reason::CookieChanged {
                found: None,
                expected: s.cookie,
            },
        );
    }
    if current.state != tcp::CLOSE_WAIT {
        return ActResult::with(
            Outcome::Changed,
            Reason::StateChanged {
                state: current.state,
            },
        );
    }
    if dry_run {
        return ActResult::ok(Outcome::DryRun);
    }
    match k.destroy(s) {
        Ok(()) => ActResult::ok(Outcome::Reaped),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            ActResult::with(Outcome::Gone, Reason::VanishedBeforeDestroy)
        }
        Err(e) => destroy_error(&e),
    }
}

/// What a failed SOCK_DESTROY (or the proof that it would work) means.
pub fn destroy_error(e: &io::Error) -> ActResult {
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => ActResult::with(
            Outcome::Error,
            Reason::DestroyUnsupported {
                error: Some(e.to_string()),
            },
        ),
        Some(libc::EPERM) | Some(libc::EACCES) => ActResult::with(
            Outcome::Error,
            Reason::PermissionDenied {
                call: "SOCK_DESTROY",
                error: e.to_string(),
                missing: Capability::NetAdmin,
            },
        ),
        _ => ActResult::with(Outcome::Error, failed("SOCK_DESTROY", e)),
    }
}

/// Per-fd results of one injected close() batch: the target was stopped once for all of
/// `victims`. Closed fds are `reaped`. An fd the stopped-process check found to be another
/// socket or file is `changed`, one no longer open `gone`; one it declined (SO_LINGER) is
/// `skipped`; a failed close() is an `error`. A batch that failed as a whole gives every fd
/// the same outcome: `gone` if the process exited, `skipped` if the injection refused (the
/// reason says why: rseq, seccomp, a job-control stop...), else `error`; except where
/// the helper may have closed some fds unreported, which `reap --close` counts from the fd
/// table instead (see [`super::recount`]).
pub fn close_results(
    victims: &[Victim],
    batch: &Result<InjectReport, InjectError>,
) -> Vec<(i32, ActResult)> {
    match batch {
        Ok(r) => r
            .closed
            .iter()
            .map(|fd| {
                let done = Reason::Closed {
                    pause_us: r.pause_us,
                };
                (*fd, ActResult::with(Outcome::Reaped, done))
            })
            .chain(r.skipped.iter().map(|(fd, why)| {
                let outcome = match why {
                    SkipReason::NotOpen => Outcome::Gone,
                    w if w.is_change() => Outcome::Changed,
                    SkipReason::InvalidFd | SkipReason::Duplicate | SkipReason::Linger(_) => {
                        Outcome::Skipped
                    }
                    _ => Outcome::Error,
                };
                (*fd, ActResult::with(outcome, Reason::Inject(why.clone())))
            }))
            .collect(),
        Err(InjectError::Gone) => victims
            .iter()
            .map(|v| (v.fd, ActResult::with(Outcome::Gone, Reason::ProcessExited)))
            .collect(),
        Err(e) => {
            let outcome = match e {
                InjectError::Refused(_) => Outcome::Skipped,
                _ => Outcome::Error,
            };
            victims
                .iter()
                .map(|v| {
                    (
                        v.fd,
                        ActResult::with(outcome, Reason::InjectFailed(e.clone())),
                    )
                })
                .collect()
        }
    }
}

fn classify_dup_error(e: &io::Error) -> ActResult {
    match e.raw_os_error() {
        Some(libc::ESRCH) => ActResult::with(Outcome::Gone, Reason::ProcessExited),
        Some(libc::EBADF) => ActResult::with(Outcome::Gone, Reason::FdClosed),
        Some(libc::EPERM) | Some(libc::EACCES) => ActResult::with(
            Outcome::Error,
            Reason::PermissionDenied {
                call: "pidfd_getfd",
                error: e.to_string(),
                missing: Capability::SysPtrace,
            },
        ),
        _ => ActResult::with(Outcome::Error, failed("pidfd_getfd", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cwreap_linux::kernel::Identity;
    use cwreap_linux::tcp::CLOSE_WAIT as TCP_CLOSE_WAIT;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// A recording fake: fds of one process, each either an errno or an identity.
    #[derive(Default)]
    struct FakeOs {
        fds: HashMap<i32, Result<Identity, i32>>,
        shutdown_errno: Option<i32>,
        shut: RefCell<Vec<i32>>,
    }

    impl Effects for FakeOs {
        type Process = i32;
        type Dup = (i32, Identity);

        fn open_process(&self, pid: i32) -> io::Result<i32> {
            Ok(pid)
        }
        fn alive(&self, _: &i32) -> bool {
            true
        }
        fn duplicate(&self, _: &i32, fd: i32) -> io::Result<(i32, Identity)> {
            match self.fds.get(&fd) {
                Some(Ok(id)) => Ok((fd, *id)),
                Some(Err(errno)) => Err(io::Error::from_raw_os_error(*errno)),
                None => Err(io::Error::from_raw_os_error(libc::EBADF)),
            }
        }
        fn identify(&self, dup: &(i32, Identity)) -> io::Result<Identity> {
            if dup.1.inode == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOTSOCK));
            }
            Ok(dup.1)
        }
        fn shutdown(&self, dup: &(i32, Identity)) -> io::Result<()> {
            if let Some(errno) = self.shutdown_errno {
                return Err(io::Error::from_raw_os_error(errno));
            }
            self.shut.borrow_mut().push(dup.0);
            Ok(())
        }
    }

    const EXP: Expected = Expected {
        pid: 100,
        fd: 7,
        inode: 5000,
        cookie: 42,
    };

    fn os_with(id: Result<Identity, i32>) -> FakeOs {
        let mut os = FakeOs::default();
        os.fds.insert(7, id);
        os
    }

    fn ident(inode: u64, cookie: u64, tcp_state: u8) -> Identity {
        Identity {
            inode,
            cookie,
            tcp_state,
        }
    }

    #[test]
    fn verified_socket_is_shut_down_once() {
        let os = os_with(Ok(ident(5000, 42, TCP_CLOSE_WAIT)));
        let r = shutdown_verified(&os, &100, &EXP, false);
        assert_eq!(r.outcome, Outcome::Reaped);
        assert_eq!(*os.shut.borrow(), vec![7]);
    }

    #[test]
    fn dry_run_verifies_but_never_shuts_down() {
        let os = os_with(Ok(ident(5000, 42, TCP_CLOSE_WAIT)));
        assert_eq!(
            shutdown_verified(&os, &100, &EXP, true).outcome,
            Outcome::DryRun
        );
        assert!(os.shut.borrow().is_empty());
        // Dry-run still fails where the real run would.
        let os = os_with(Err(libc::EPERM));
        let r = shutdown_verified(&os, &100, &EXP, true);
        assert_eq!(r.outcome, Outcome::Error);
        assert!(r.permission_denied());
    }

    #[test]
    fn any_mismatch_is_changed_and_untouched() {
        for id in [
            ident(5001, 42, TCP_CLOSE_WAIT), // fd reused for another socket
            ident(5000, 43, TCP_CLOSE_WAIT), // inode number recycled, different socket
            ident(5000, 42, 1),              // ESTABLISHED
            ident(5000, 42, 7),              // CLOSE: already shut down
            ident(0, 0, 0),                  // not a socket any more
        ] {
            let os = os_with(Ok(id));
            let r = shutdown_verified(&os, &100, &EXP, false);
            assert_eq!(r.outcome, Outcome::Changed, "{id:?}");
            assert!(r.reason.is_some());
            assert!(os.shut.borrow().is_empty(), "{id:?} was shut down");
        }
    }

    #[test]
    fn errnos_are_classified() {
        let cases = [
            (libc::ESRCH, Outcome::Gone, false),
            (libc::EBADF, Outcome::Gone, false),
            (libc::EPERM, Outcome::Error, true),
            (libc::EMFILE, Outcome::Error, false),
        ];
        for (errno, outcome, perm) in cases {
            let os = os_with(Err(errno));
            let r = shutdown_verified(&os, &100, &EXP, false);
            assert_eq!(
                (r.outcome, r.permission_denied()),
                (outcome, perm),
                "errno {errno}"
            );
            if perm {
                assert!(
                    r.reason
                        .as_ref()
                        .is_some_and(|d| d.to_string().contains("CAP_SYS_PTRACE"))
                );
            }
        }
    }

    #[test]
    fn shutdown_failures_are_reported() {
        let mut os = os_with(Ok(ident(5000, 42, TCP_CLOSE_WAIT)));
        os.shutdown_errno = Some(libc::ENOTCONN);
        assert_eq!(
            shutdown_verified(&os, &100, &EXP, false).outcome,
            Outcome::Gone
        );
        os.shutdown_errno = Some(libc::ENOMEM);
        assert_eq!(
            shutdown_verified(&os, &100, &EXP, false).outcome,
            Outcome::Error
        );
    }

    #[test]
    fn close_batches_map_to_outcomes() {
        let victims = [
            Victim {
                fd: 4,
                inode: 40,
                cookie: 400,
            },
            Victim {
                fd: 5,
                inode: 50,
                cookie: 500,
            },
        ];
        let report = InjectReport {
            closed: vec![4],
            skipped: vec![(
                5,
                SkipReason::InodeChanged {
                    found: 51,
                    expected: 50,
                },
            )],
            pause_us: 120,
            threads: 3,
            fds_before: 10,
            fds_after: 9,
        };
        let got = close_results(&victims, &Ok(report));
        assert_eq!(got[0].0, 4);
        assert_eq!(got[0].1.outcome, Outcome::Reaped);
        assert_eq!(got[0].1.reason, Some(Reason::Closed { pause_us: 120 }));
        assert!(
            got[0]
                .1
                .reason
                .as_ref()
                .is_some_and(|d| d.to_string().contains("120 µs"))
        );
        assert_eq!((got[1].0, got[1].1.outcome), (5, Outcome::Changed));
        let more = InjectReport {
            closed: vec![],
            skipped: vec![
                (4, SkipReason::NotOpen),
                (5, SkipReason::CloseFailed(libc::EIO)),
            ],
            ..InjectReport::default()
        };
        let got = close_results(&victims, &Ok(more));
        assert_eq!(got[0].1.outcome, Outcome::Gone);
        assert_eq!(got[1].1.outcome, Outcome::Error);
        assert_eq!(
            got[1].1.reason.as_ref().map(Reason::code),
            Some("close_failed")
        );
        let gone = close_results(&victims, &Err(InjectError::Gone));
        assert!(gone.iter().all(|(_, r)| r.outcome == Outcome::Gone));
        let denied = close_results(&victims, &Err(InjectError::Permission("ptrace".into())));
        assert!(
            denied
                .iter()
                .all(|(_, r)| r.outcome == Outcome::Error && r.permission_denied())
        );
    }

    #[test]
    fn reasons_have_codes_and_the_old_texts() {
        let cases = [
            (Reason::ProcessExited, "process_exited", "process exited"),
            (Reason::FdClosed, "fd_closed", "fd was closed by its owner"),
            (
                Reason::NotSocket { fd: 5 },
                "not_socket",
                "fd 5 is no longer a socket",
            ),
            (
                Reason::StateChanged { state: 1 },
                "state_changed",
                "socket is in TCP state ESTABLISHED now, not CLOSE_WAIT",
            ),
        ];
        for (reason, code, text) in cases {
            assert_eq!(reason.code(), code);
            assert_eq!(reason.to_string(), text);
        }
        // The injected close: a failed close(), a changed fd, a gone process and each
        // kind of refusal are reasons of their own.
        let refused = |r| Reason::InjectFailed(InjectError::Refused(r));
        let inject = [
            (
                Reason::Inject(SkipReason::CloseFailed(libc::EIO)),
                "close_failed",
            ),
            (
                Reason::Inject(SkipReason::InodeChanged {
                    found: 9,
                    expected: 8,
                }),
                "inode_changed",
            ),
            (Reason::InjectFailed(InjectError::Gone), "process_exited"),
            (
                refused(Refusal::Rseq {
                    tid: 1,
                    why: "x".into(),
                }),
                "refused_rseq",
            ),
            (
                refused(Refusal::SeccompStrict { tid: 1 }),
                "refused_seccomp",
            ),
            (
                refused(Refusal::SeccompFilter {
                    tid: 1,
                    why: "x".into(),
                }),
                "refused_seccomp",
            ),
            (
                refused(Refusal::JobControlStopped { tid: 1 }),
                "refused_stopped",
            ),
            (refused(Refusal::OwnProcess), "refused_own_process"),
        ];
        let mut codes = std::collections::BTreeSet::new();
        for (reason, code) in inject {
            assert_eq!(reason.code(), code, "{reason}");
            codes.insert(code);
        }
        assert_eq!(
            codes.len(),
            7,
            "seccomp's two modes share a code, the rest differ"
        );
    }
}
