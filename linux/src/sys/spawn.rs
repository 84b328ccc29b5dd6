//! Starting a process that nothing done to its parent can interrupt, and taking the fd it
//! inherits: the fork/exec side of the injection helper (see [`crate::inject`]).
//!
//! Between fork and exec the child leaves the parent's session and process group (a
//! terminal's Ctrl-C, Ctrl-Z or hang-up reaches a foreground process group, never another
//! session), blocks the signals a terminal, a shell or a service manager send to stop or
//! end a process (a blocked signal mask survives execve), and finds the fd it is handed at
//! a fixed number. No parent-death signal is set: the child outlives its parent on purpose.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};

/// Signals blocked in the helper: interrupt, end, hang-up, quit and the job-control stops,
/// and SIGPIPE, so that a report written to a parent that died fails with EPIPE instead.
pub const HELPER_BLOCKED_SIGNALS: [i32; 8] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGPIPE,
];

/// Start `cmd` in a session and process group of its own, with
/// [`HELPER_BLOCKED_SIGNALS`] blocked, and with a copy of `pass` open at fd `at` (not
/// close-on-exec; every other fd of ours stays close-on-exec as Rust opens them).
pub fn spawn_isolated(cmd: &mut Command, pass: BorrowedFd<'_>, at: i32) -> io::Result<Child> {
    // A copy above the stdio numbers: std moves the child's pipes onto 0, 1 and 2 before
    // our pre_exec runs, which would close `pass` if it were one of them. The copy is
    // close-on-exec and never equal to `at`, so dup2 below always makes a fresh,
    // inheritable fd there.
    let min = at.max(2).saturating_add(1);
    let copy = rustix::io::fcntl_dupfd_cloexec(pass, min)?;
    let from = copy.as_raw_fd();
    let mut blocked = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: sigemptyset writes only into `blocked`, a zeroed, writable sigset_t on our
    // stack.
    unsafe { libc::sigemptyset(blocked.as_mut_ptr()) };
    for s in HELPER_BLOCKED_SIGNALS {
        // SAFETY: sigaddset writes only into `blocked`, which sigemptyset initialised above;
        // `s` is one of the valid signal numbers listed in HELPER_BLOCKED_SIGNALS.
        unsafe { libc::sigaddset(blocked.as_mut_ptr(), s) };
    }
    // SAFETY: a sigset_t is plain integers: zeroed at creation, then filled by sigemptyset
    // and sigaddset, so every byte is initialised.
    let blocked = unsafe { blocked.assume_init() };
    // Runs in the child between fork and exec: system calls only, no allocation, no lock.
    let in_child = move || {
        // SAFETY: setsid takes no argument and reads or writes no memory of ours; it is
        // async-signal-safe.
        if unsafe { libc::setsid() } == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sigprocmask reads `blocked`, an initialised sigset_t owned by this
        // closure, and writes no old mask (null); it is async-signal-safe.
        if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &blocked, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: dup2 takes two fd numbers and no memory; `from` is open in the child (see
        // below), and replacing whatever is at `at` is the point. It is async-signal-safe.
        if unsafe { libc::dup2(from, at) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: pre_exec runs `in_child` in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes the system calls setsid, sigprocmask
    // and dup2 and nothing else, allocates nothing and takes no lock. `from` stays open in
    // the parent until spawn returns (it is dropped below), so it is open in the child too.
    unsafe { cmd.pre_exec(in_child) };
    let child = cmd.spawn();
    drop(copy);
    child
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// Take ownership of fd `fd`, inherited across exec from [`spawn_isolated`]. Once per
/// process: a second call fails with EBUSY, so two owners can never close it twice.
pub fn take_inherited_fd(fd: i32) -> io::Result<OwnedFd> {
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(io::Error::from_raw_os_error(libc::EBUSY));
    }
    // SAFETY: F_GETFD takes no pointer; it only tells whether `fd` is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open (checked just above) and nothing else in this process owns it:
    // it was inherited across exec at a number Rust's start-up code never opens (only 0, 1
    // and 2 may be opened there), and TAKEN makes this the only place that claims it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(owned)
}
