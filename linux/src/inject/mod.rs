//! Escalation that frees the fd: close(2) injected into the process that leaks a socket.
//!
//! shutdown(2) on a duplicate ends a CLOSE_WAIT connection, but the owner keeps its fd, and
//! an application that never reacts leaks fd slots until EMFILE. Ops then run
//! `gdb -p PID -batch -ex 'call (int)close(FD)'`. [`close_in_target`] is the safe version:
//!
//! 1. **Stop the whole process.** Every thread of `/proc/PID/task` is seized
//!    (PTRACE_SEIZE) and interrupted (PTRACE_INTERRUPT); the list is read again until no
//!    new thread appears, and each stop is awaited (threads that exit meanwhile are dropped).
//! 2. **Verify while nothing runs.** Each fd is duplicated with pidfd_getfd and must still
//!    have the inode and SO_COOKIE it was attributed with, and TCP state CLOSE_WAIT or
//!    CLOSE, and no SO_LINGER timeout (so close cannot block). Nothing in the target can
//!    change an fd between this check and the close: no thread of it runs. Any fd that fails
//!    is left alone and listed in [`InjectReport::skipped`] with the reason.
//! 3. **Close in one stop, in one thread.** The injecting thread is the main thread when it
//!    can be (else the first suitable one). Its registers are saved; for each fd it is
//!    pointed at an existing `syscall` instruction (the one it stopped after, when it is in
//!    a system call, else another thread's, else one in the vDSO or a mapped text) with
//!    rax = __NR_close, rdi = fd and orig_rax = -1, single-stepped, and rax read back.
//!    A run of consecutive fds goes in one close_range(first, last) instead (checked
//!    against the fd table afterwards), unless the process has a seccomp filter that might
//!    not allow it. Nothing is written to the target's memory.
//! 4. **Restore and let go.** The saved registers are put back and read back to check them,
//!    and every thread is detached. A thread that was inside a blocking system call has it
//!    restarted by the kernel exactly as after any stop (orig_rax and the -ERESTART* code
//!    are part of what was saved): a sleep sleeps its full time, a read still returns data.
//!
//! Failure keeps the target as it was: on any error the registers are restored and every
//! stopped thread is detached (a guard does it even on unwinding). All tracing is done by a
//! dedicated short-lived thread; ptrace belongs to that thread, so if it ends or cwreap is
//! SIGKILLed the kernel detaches every tracee, and PTRACE_SEIZE queues no SIGSTOP, so the
//! target simply runs on. The one window this cannot cover: a SIGKILL of cwreap during
//! the microseconds a thread runs the injected instruction leaves that thread with the
//! changed registers.
//!
//! What the application may see: a pause (measured in [`InjectReport::pause_us`]; a few ms
//! for a hundred fds), and, exactly as after SIGSTOP/SIGCONT or a debugger attaching, EINTR
//! from the few system calls the kernel never restarts (epoll_wait, for one), which
//! event loops retry. Closing an fd behind an application's back is only safe for one that
//! never uses that fd number again (it would get EBADF, or a newer file that reused the
//! number): this is an opt-in escalation for servers that leak, not a default.
//!
//! All `unsafe` and raw syscalls are in [`crate::sys::ptrace`]; this folder is safe code:
//! [`session`] stops and lets go of the threads, [`verify`] checks each fd while they are
//! stopped, [`site`] finds a `syscall` instruction to borrow, [`regs`] saves, points and
//! restores the injecting thread's registers.
//! Only x86_64 is implemented; elsewhere [`InjectError::Unsupported`] is returned.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use thiserror::Error;

#[cfg(target_arch = "x86_64")]
mod regs;
#[cfg(target_arch = "x86_64")]
mod session;
#[cfg(target_arch = "x86_64")]
mod site;
#[cfg(target_arch = "x86_64")]
mod verify;

/// One fd to close in the target, with the identity attribution saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Victim {
    pub fd: i32,
    /// Inode of the socket (fstat of a duplicate must match).
    pub inode: u64,
    /// SO_COOKIE of the socket (must match).
    pub cookie: u64,
}

/// Why one fd was left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// A negative fd number.
    InvalidFd,
    /// The same fd was listed twice; it is handled once.
    Duplicate,
    /// The fd was not open when the process was stopped.
    NotOpen,
    /// The fd now refers to another file.
    InodeChanged { found: u64, expected: u64 },
    /// The fd is not a socket any more.
    NotSocket,
    /// The fd is a socket with another SO_COOKIE: another socket that got the same inode.
    CookieChanged { found: u64, expected: u64 },
    /// The socket is not a TCP socket.
    NotTcp,
    /// Only CLOSE_WAIT or CLOSE sockets are closed.
    State(u8),
    /// SO_LINGER with a timeout: close() could block the stopped process.
    Linger(Duration),
    /// A system call used to inspect the fd failed (`call`, errno).
    Syscall { call: &'static str, errno: i32 },
    /// close() inside the target returned this errno.
    CloseFailed(i32),
    /// close_range() returned 0 but the fd is still open.
    StillOpen,
    /// The batch stopped before this fd was closed.
    NotClosed(InjectError),
}

impl SkipReason {
    /// Whether the fd is simply not the socket it was (the "changed" outcome), rather than
    /// a failure.
    pub fn is_change(&self) -> bool {
        matches!(
            self,
            SkipReason::NotOpen
                | SkipReason::InodeChanged { .. }
                | SkipReason::NotSocket
                | SkipReason::CookieChanged { .. }
                | SkipReason::NotTcp
                | SkipReason::State(_)
        )
    }
}

fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::InvalidFd => write!(f, "not a valid fd number"),
            SkipReason::Duplicate => write!(f, "listed more than once"),
            SkipReason::NotOpen => write!(f, "fd is not open any more"),
            SkipReason::InodeChanged { found, expected } => {
                write!(f, "changed: fd now holds inode {found}, not {expected}")
            }
            SkipReason::NotSocket => write!(f, "changed: not a socket"),
            SkipReason::CookieChanged { found, expected } => {
                write!(f, "changed: socket cookie {found}, not {expected}")
            }
            SkipReason::NotTcp => write!(f, "changed: not a TCP socket"),
            SkipReason::State(s) => write!(
                f,
                "TCP state is {}: only CLOSE_WAIT or CLOSE sockets are closed",
                crate::tcp::state_name(*s)
            ),
            SkipReason::Linger(d) => write!(
                f,
                "SO_LINGER is {d:?}: close() could block the stopped process"
            ),
            SkipReason::Syscall { call, errno } => write!(f, "{call}: {}", errno_text(*errno)),
            SkipReason::CloseFailed(errno) => {
                write!(f, "close() in the target failed: {}", errno_text(*errno))
            }
            SkipReason::StillOpen => write!(f, "still open after close_range() in the target"),
            SkipReason::NotClosed(e) => write!(f, "not closed: {e}"),
        }
    }
}

/// What one injection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InjectReport {
    /// Fds closed in the target (close returned 0).
    pub closed: Vec<i32>,
    /// Fds left alone, with the reason.
    pub skipped: Vec<(i32, SkipReason)>,
    /// How long the target was stopped: from the first PTRACE_INTERRUPT to the last
    /// detach, in microseconds (0 when nothing had to be stopped).
    pub pause_us: u64,
    /// Threads of the target that were stopped.
    pub threads: usize,
    /// Open fds of the target (/proc/PID/fd) while stopped, before the closes.
    pub fds_before: usize,
    /// Open fds of the target while still stopped, after the closes.
    pub fds_after: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InjectError {
    /// Injection is not implemented for this platform.
    #[error("closing an fd inside another process is not supported here: {0}")]
    Unsupported(&'static str),
    /// The process exited (before or during the stop).
    #[error("the process exited")]
    Gone,
    /// ptrace or pidfd_getfd was denied; the text says what is missing.
    #[error("permission denied: {0}")]
    Permission(String),
    /// Declined on purpose (our own process, a job-control-stopped process, ...).
    #[error("refused: {0}")]
    Refused(String),
    /// A thread did not stop in time (e.g. in uninterruptible sleep); nothing was closed.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A ptrace or /proc step failed unexpectedly; the target was restored and detached.
    #[error("ptrace: {0}")]
    Ptrace(String),
}

/// The hint given with a denied ptrace.
pub const PTRACE_ATTACH_HINT: &str = "injecting close() needs ptrace over the target: run as root or grant CAP_SYS_PTRACE, keep Yama ptrace_scope at 2 or less, and allow ptrace and process_vm_readv in any seccomp filter";

/// How to start the injection helper: an executable and the arguments that make it run
/// the injection.
#[derive(Debug, Clone)]
pub struct Helper {
    pub exe: std::path::PathBuf,
    pub args: Vec<std::ffi::OsString>,
}

impl Helper {
    /// This program again (/proc/self/exe) with `args`, e.g. `["inject-helper"]`.
    pub fn this_program(args: &[&str]) -> Helper {
        Helper {
            exe: std::path::PathBuf::from("/proc/self/exe"),
            args: args.iter().map(std::ffi::OsString::from).collect(),
        }
    }
}

/// Close `victims` inside process `pid` (pinned by `pidfd`), each only after verifying it
/// is still the attributed socket and in CLOSE_WAIT or CLOSE. See the module docs for how.
///
/// `Err` means nothing was closed (and the target is running as before), except for
/// [`InjectError::Gone`], when the process died during the stop. If a step fails after
/// some fds were closed, the report lists the closed ones and gives the error as the
/// reason for the others.
pub fn close_in_target(
    helper: &Helper,
    pid: i32,
    pidfd: BorrowedFd<'_>,
    victims: &[Victim],
) -> Result<InjectReport, InjectError> {
    let _ = helper;
    traced(pid, pidfd, victims, &|| {})
}

/// [`close_in_target`], calling `while_stopped` once every thread of the target is
/// stopped and before anything is verified (tests kill the target, or the caller, there).
#[cfg(feature = "testing")]
pub fn close_in_target_hooked(
    pid: i32,
    pidfd: BorrowedFd<'_>,
    victims: &[Victim],
    while_stopped: &(dyn Fn() + Sync),
) -> Result<InjectReport, InjectError> {
    traced(pid, pidfd, victims, while_stopped)
}

fn traced(
    pid: i32,
    pidfd: BorrowedFd<'_>,
    victims: &[Victim],
    while_stopped: &(dyn Fn() + Sync),
) -> Result<InjectReport, InjectError> {
    #[cfg(target_arch = "x86_64")]
    {
        if u32::try_from(pid).ok() == Some(std::process::id()) {
            return Err(InjectError::Refused(
                "cwreap never acts on its own process".into(),
            ));
        }
        if pid <= 0 {
            return Err(InjectError::Refused(format!("invalid pid {pid}")));
        }
        // ptrace ties a tracee to the tracing *thread*: a thread of our own that ends
        // (normally, by unwinding, or with the process) takes every attachment with it.
        std::thread::scope(|scope| {
            let tracer = std::thread::Builder::new()
                .name("cwreap-inject".into())
                .spawn_scoped(scope, || run(pid, pidfd, victims, while_stopped));
            match tracer {
                Ok(handle) => handle.join().unwrap_or_else(|_| {
                    Err(InjectError::Ptrace(
                        "the tracing thread panicked (target restored and detached)".into(),
                    ))
                }),
                Err(e) => Err(InjectError::Ptrace(format!("cannot start a thread: {e}"))),
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (pid, pidfd, victims, while_stopped);
        Err(InjectError::Unsupported(
            "injecting close() is implemented for x86_64 only",
        ))
    }
}

/// Stop the target, verify, close, restore, let go.
#[cfg(target_arch = "x86_64")]
fn run(
    pid: i32,
    pidfd: BorrowedFd<'_>,
    victims: &[Victim],
    while_stopped: &(dyn Fn() + Sync),
) -> Result<InjectReport, InjectError> {
    use crate::procfs::ProcFs;
    use session::{Session, State};

    let proc = ProcFs::default();
    check_pidfd(&proc, pid, pidfd)?;
    let mut report = InjectReport::default();
    let victims = prefilter(victims, &mut report.skipped);
    if victims.is_empty() {
        report.fds_before = fd_count(&proc, pid)?;
        report.fds_after = report.fds_before;
        return Ok(report);
    }

    let mut session = Session::new(pid);
    let started = session.stop_all()?;
    report.threads = session.stopped_threads();
    while_stopped();

    // The pid could only have been reused if the pidfd's process is gone.
    if !crate::sys::pidfd_alive(pidfd) {
        return Err(InjectError::Gone);
    }
    if let Some(tid) = session.first_in(State::GroupStopped) {
        return Err(InjectError::Refused(format!(
            "the process is stopped by job control (thread {tid}); not touching it"
        )));
    }
    if proc.seccomp_mode(pid, None) == Some(1) {
        return Err(InjectError::Refused(
            "the process runs in seccomp strict mode, where close() would kill it".into(),
        ));
    }
    report.fds_before = fd_count(&proc, pid)?;
    let verified = verify::verify(pidfd, &victims, &mut report.skipped)?;
    if !verified.is_empty()
        && let Err(e) = session.close_fds(&verified, &mut report)
    {
        // A thread left with changed registers, or a dead process, is an error
        // whatever was closed before.
        if matches!(e, InjectError::Gone) || session.regs_changed() || report.closed.is_empty() {
            return Err(e);
        }
        for fd in verified {
            let handled = report.closed.contains(&fd)
                || report.skipped.iter().any(|(skipped, _)| *skipped == fd);
            if !handled {
                report.skipped.push((fd, SkipReason::NotClosed(e.clone())));
            }
        }
    }
    report.fds_after = fd_count(&proc, pid)?;
    session.detach_all()?;
    report.pause_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    Ok(report)
}

/// The pidfd must pin the very process `pid` names, or we would verify one process's fds
/// and close another's.
#[cfg(target_arch = "x86_64")]
fn check_pidfd(
    proc: &crate::procfs::ProcFs,
    pid: i32,
    pidfd: BorrowedFd<'_>,
) -> Result<(), InjectError> {
    use std::os::fd::AsRawFd;
    let raw = pidfd.as_raw_fd();
    match proc.pidfd_pid(raw) {
        Ok(Some(p)) if p == pid => Ok(()),
        Ok(Some(-1)) => Err(InjectError::Gone),
        Ok(Some(other)) => Err(InjectError::Refused(format!(
            "the pidfd belongs to pid {other}, not {pid}"
        ))),
        Ok(None) => Err(InjectError::Refused("the fd given is not a pidfd".into())),
        Err(e) => Err(InjectError::Ptrace(format!(
            "reading /proc/self/fdinfo/{raw}: {e}"
        ))),
    }
}

#[cfg(target_arch = "x86_64")]
fn fd_count(proc: &crate::procfs::ProcFs, pid: i32) -> Result<usize, InjectError> {
    proc.fd_count_fast(pid)
        .map_err(|e| proc_error(pid, "fd", &e))
}

/// A failed /proc read: the process is gone, or something unexpected.
#[cfg(target_arch = "x86_64")]
fn proc_error(pid: i32, leaf: &str, e: &std::io::Error) -> InjectError {
    if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH)) {
        InjectError::Gone
    } else {
        InjectError::Ptrace(format!("reading /proc/{pid}/{leaf}: {e}"))
    }
}

/// The victims worth stopping the target for: no negative fds, each fd once.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn prefilter(victims: &[Victim], skipped: &mut Vec<(i32, SkipReason)>) -> Vec<Victim> {
    let mut seen = std::collections::HashSet::new();
    let mut keep = Vec::with_capacity(victims.len());
    for v in victims {
        if v.fd < 0 {
            skipped.push((v.fd, SkipReason::InvalidFd));
        } else if !seen.insert(v.fd) {
            skipped.push((v.fd, SkipReason::Duplicate));
        } else {
            keep.push(*v);
        }
    }
    keep
}

/// `fds` as (first, last) runs of consecutive numbers, ascending; each fd alone unless
/// `join` (then a run may be closed with one close_range).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn runs(fds: &[i32], join: bool) -> Vec<(i32, i32)> {
    let mut sorted = fds.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<(i32, i32)> = Vec::new();
    for fd in sorted {
        match out.last_mut() {
            Some((_, last)) if join && last.checked_add(1) == Some(fd) => *last = fd,
            _ => out.push((fd, fd)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(fd: i32) -> Victim {
        Victim {
            fd,
            inode: 1,
            cookie: 2,
        }
    }

    #[test]
    fn prefilter_drops_bad_and_repeated_fds() {
        let mut skipped = Vec::new();
        let keep = prefilter(&[v(5), v(-1), v(5), v(6)], &mut skipped);
        assert_eq!(keep, vec![v(5), v(6)]);
        assert_eq!(
            skipped,
            vec![(-1, SkipReason::InvalidFd), (5, SkipReason::Duplicate)]
        );
    }

    #[test]
    fn consecutive_fds_make_runs() {
        assert_eq!(
            runs(&[9, 3, 4, 5, 7, 10, 4], true),
            vec![(3, 5), (7, 7), (9, 10)]
        );
        assert_eq!(runs(&[4, 3], false), vec![(3, 3), (4, 4)]);
        assert_eq!(
            runs(&[i32::MAX, i32::MAX - 1], true),
            vec![(i32::MAX - 1, i32::MAX)]
        );
        assert!(runs(&[], true).is_empty());
    }

    #[test]
    fn reasons_read_as_before() {
        assert_eq!(
            SkipReason::State(1).to_string(),
            "TCP state is ESTABLISHED: only CLOSE_WAIT or CLOSE sockets are closed"
        );
        assert_eq!(
            SkipReason::InodeChanged {
                found: 9,
                expected: 8
            }
            .to_string(),
            "changed: fd now holds inode 9, not 8"
        );
        assert!(SkipReason::NotOpen.is_change());
        assert!(!SkipReason::CloseFailed(libc::EBADF).is_change());
    }
}
