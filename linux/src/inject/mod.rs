//! Escalation that frees the fd: close(2) injected into the process that leaks a socket.
//!
//! shutdown(2) on a duplicate ends a CLOSE_WAIT connection, but the owner keeps its fd, and
//! an application that never reacts leaks fd slots until EMFILE. Ops then run
//! `gdb -p PID -batch -ex 'call (int)close(FD)'`. [`close_in_target`] is the safe version.
//!
//! **A helper process does the ptrace work**, so that nothing done to cwreap can interrupt
//! an injection half-way. [`close_in_target`] starts it (normally cwreap itself again,
//! `cwreap inject-helper`, see [`Helper`]) in a session and process group of its own, with
//! SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGTSTP, SIGTTIN, SIGTTOU (and SIGPIPE) blocked, the
//! target's pidfd at fd 3, the request on its stdin and the report on its stdout (format in
//! `wire`). Ctrl-C, a hung-up terminal, Ctrl-Z or a SIGKILL of cwreap leave the helper
//! running: it finishes, restores and detaches, its report write fails with EPIPE, and it
//! exits. Every wait in it has a deadline, so it never outlives its work for long.
//!
//! In the helper ([`helper_main`]):
//!
//! 1. **Stop the whole process.** Every thread of `/proc/PID/task` is seized
//!    (PTRACE_SEIZE with PTRACE_O_TRACESYSGOOD) and interrupted (PTRACE_INTERRUPT); the list
//!    is read again until no new thread appears, and each stop is awaited within 1 s
//!    (threads that exit meanwhile are dropped).
//! 2. **Verify while nothing runs.** Each fd is duplicated with pidfd_getfd and must still
//!    have the inode and SO_COOKIE it was attributed with, and TCP state CLOSE_WAIT or
//!    CLOSE, and no SO_LINGER timeout (so close cannot block). Nothing in the target can
//!    change an fd between this check and the close: no thread of it runs. Any fd that fails
//!    is left alone and listed in [`InjectReport::skipped`] with the reason.
//! 3. **Pick one thread.** One stopped inside a system call is preferred (it cannot be in
//!    an rseq critical section), and one without a seccomp filter. A thread in seccomp
//!    strict mode is never used. If the chosen thread has a filter, it is suspended for the
//!    injection (PTRACE_O_SUSPEND_SECCOMP) or the injection is refused. If it stopped inside
//!    an rseq critical section, its saved instruction pointer is moved to the section's
//!    abort handler first, as the kernel does on preemption; where that cannot be done as
//!    the kernel would (a bad descriptor or signature, a system call inside the section),
//!    the injection is refused (see `rseq`).
//! 4. **Run the calls without single-stepping.** From the thread's interrupt stop, its
//!    registers point at an existing `syscall` instruction (nothing is written to the
//!    target's memory) with rax = the call, its arguments and orig_rax = -1; PTRACE_SYSCALL
//!    runs it to the syscall-enter-stop and again to the syscall-exit-stop, where rax is
//!    the result, and the saved registers are put back at once, in that stop; the next call
//!    starts from there. A run of consecutive fds goes in one close_range(first, last)
//!    (checked against the fd table afterwards). Each call has a deadline of a few seconds;
//!    past it the thread is interrupted, restored and released, the fd table says what was
//!    closed, and the batch ends with [`InjectError::Timeout`] if nothing was.
//! 5. **Let go.** After the last call (before anything else, even a /proc read) the
//!    registers are read back and checked, and the thread is taken from its
//!    syscall-exit-stop to a plain interrupt stop (PTRACE_INTERRUPT, PTRACE_CONT): the
//!    kernel handles a system call's -ERESTART* code after the signal check, with the
//!    registers of that moment, so only a thread that goes through that check again with
//!    its own registers restarts an interrupted blocking call correctly (a sleep sleeps its
//!    full time, a read still returns data, no EINTR reaches the app). Every thread is
//!    detached, signals that arrived meanwhile are handed back.
//!
//! What a dying tracer leaves: the kernel detaches every tracee and wakes it to check for
//! signals. A thread that holds its own registers then simply runs on (nothing is armed in
//! it, unlike after a single-step), and an interrupted call of its own restarts. The one
//! remaining window is the helper itself being SIGKILLed while the injecting thread holds
//! the *injected* registers: during each call, from setting them to restoring them at its
//! syscall-exit-stop, a few tens of microseconds. The thread would then run the borrowed
//! `syscall` instruction and go on from there with the wrong registers (measured with a
//! thread that stopped in nanosleep and lent its own instruction: the sleep returned 0 at
//! once, cut short). Nothing that happens to cwreap can cause that; only a SIGKILL aimed at
//! the helper (or the OOM killer choosing it) can.
//!
//! Failure keeps the target as it was: on any error the registers are restored and every
//! stopped thread is detached (a guard does it even on unwinding).
//!
//! What the application may see: a pause (measured in [`InjectReport::pause_us`]; a few ms
//! for a hundred fds), and, exactly as after SIGSTOP/SIGCONT or a debugger attaching, EINTR
//! from the few system calls the kernel never restarts (epoll_wait, for one), which
//! event loops retry. Closing an fd behind an application's back is only safe for one that
//! never uses that fd number again (it would get EBADF, or a newer file that reused the
//! number): this is an opt-in escalation for servers that leak, not a default.
//!
//! All `unsafe` and raw syscalls are in [`crate::sys::ptrace`] and [`crate::sys::helper`];
//! this folder is safe code: `client` starts the helper and reads its report, `helper`
//! is the helper's side, `wire` their protocol, `engine` the steps above, `session`
//! stops and lets go of the threads, `verify` checks each fd while they are stopped,
//! `pick` chooses the injecting thread (with `rseq`), `site` finds a `syscall`
//! instruction to borrow, `regs` runs the calls and restores the registers, `seam` holds
//! the test seams. Only x86_64 is implemented; elsewhere [`InjectError::Unsupported`] is
//! returned.

use std::ffi::OsString;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;

mod reasons;
mod wire;

#[cfg(target_arch = "x86_64")]
mod client;
#[cfg(target_arch = "x86_64")]
mod engine;
#[cfg(target_arch = "x86_64")]
mod helper;
#[cfg(target_arch = "x86_64")]
mod pick;
#[cfg(target_arch = "x86_64")]
mod regs;
#[cfg(target_arch = "x86_64")]
mod rseq;
#[cfg(target_arch = "x86_64")]
mod seam;
#[cfg(target_arch = "x86_64")]
mod session;
#[cfg(target_arch = "x86_64")]
mod site;
#[cfg(target_arch = "x86_64")]
mod verify;

pub use reasons::{InjectError, Refusal, SkipReason};

/// One fd to close in the target, with the identity attribution saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Victim {
    pub fd: i32,
    /// Inode of the socket (fstat of a duplicate must match).
    pub inode: u64,
    /// SO_COOKIE of the socket (must match).
    pub cookie: u64,
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

/// The hint given with a denied ptrace.
pub const PTRACE_ATTACH_HINT: &str = "injecting close() needs ptrace over the target: run as root or grant CAP_SYS_PTRACE, keep Yama ptrace_scope at 2 or less, and allow ptrace and process_vm_readv in any seccomp filter";

/// The reason given on platforms without an implementation.
pub const UNSUPPORTED_ARCH: &str = "injecting close() is implemented for x86_64 only";

/// The fd number at which the helper finds the target's pidfd.
pub const HELPER_PIDFD: i32 = 3;

/// How to start the injection helper: an executable and the arguments that make it run
/// [`helper_main`].
#[derive(Debug, Clone)]
pub struct Helper {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Helper {
    /// This program again (/proc/self/exe) with `args`, e.g. `["inject-helper"]`.
    pub fn this_program(args: &[&str]) -> Helper {
        Helper {
            exe: PathBuf::from("/proc/self/exe"),
            args: args.iter().map(OsString::from).collect(),
        }
    }
}

/// Close `victims` inside process `pid` (pinned by `pidfd`), each only after verifying it
/// is still the attributed socket and in CLOSE_WAIT or CLOSE. The work is done by a helper
/// process started with `helper`; see the module docs for how.
///
/// `Err` means nothing was closed (and the target is running as before), except for
/// [`InjectError::Gone`], when the process died during the stop, and
/// [`InjectError::Helper`] when the helper ended without a report. If a step fails after
/// some fds were closed, the report lists the closed ones and gives the error as the
/// reason for the others.
pub fn close_in_target(
    helper: &Helper,
    pid: i32,
    pidfd: BorrowedFd<'_>,
    victims: &[Victim],
) -> Result<InjectReport, InjectError> {
    #[cfg(target_arch = "x86_64")]
    {
        client::close_in_target(helper, pid, pidfd, victims, &[])
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (helper, pid, pidfd, victims);
        Err(InjectError::Unsupported(UNSUPPORTED_ARCH))
    }
}

/// [`close_in_target`] with extra environment variables for the helper: the test seams
/// it honours when built with the `testing` feature (see `seam`), e.g.
/// `CWREAP_INJECT_TEST_PAUSE=stopped` with `CWREAP_INJECT_TEST_DIR=DIR`.
#[cfg(all(feature = "testing", target_arch = "x86_64"))]
pub fn close_in_target_with_env(
    helper: &Helper,
    pid: i32,
    pidfd: BorrowedFd<'_>,
    victims: &[Victim],
    env: &[(&str, &str)],
) -> Result<InjectReport, InjectError> {
    client::close_in_target(helper, pid, pidfd, victims, env)
}

/// The helper's side: read the request from stdin and the pidfd from fd 3, inject, write
/// the report to stdout. Returns the process exit code (0 when a report was written, 2 for
/// a request cut short or malformed, in which case nothing was done).
pub fn helper_main() -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        helper::main()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let report = wire::encode_report(&Err(InjectError::Unsupported(UNSUPPORTED_ARCH)));
        let _ = std::io::Write::write_all(&mut std::io::stdout(), report.as_bytes());
        0
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

/// A failed /proc read: the process is gone, or something unexpected.
#[cfg(target_arch = "x86_64")]
fn proc_error(pid: i32, leaf: &str, e: &std::io::Error) -> InjectError {
    if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH)) {
        InjectError::Gone
    } else {
        InjectError::Ptrace(format!("reading /proc/{pid}/{leaf}: {e}"))
    }
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
    fn this_program_runs_proc_self_exe() {
        let h = Helper::this_program(&["inject-helper"]);
        assert_eq!(h.exe, PathBuf::from("/proc/self/exe"));
        assert_eq!(h.args, vec![OsString::from("inject-helper")]);
    }
}
