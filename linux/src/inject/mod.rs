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
//! All `unsafe` and raw syscalls are in [`crate::sys::ptrace`] and [`crate::sys::spawn`];
//! this folder is safe code: `client` starts the helper and reads its report, `helper`
//! is the helper's side, `wire` their protocol, `engine` the steps above, `session`
//! stops and lets go of the threads, `verify` checks each fd while they are stopped,
//! `pick` chooses the injecting thread (with `rseq`), `site` finds a `syscall`
//! instruction to borrow, `regs` runs the calls and restores the registers, `seam` holds
//! the test seams, `settle` waits for the target's threads to run after a helper died.
//! Only x86_64 is implemented; elsewhere [`InjectError::Unsupported`] is
//! returned.

mod batch;
mod entry;
mod reasons;
mod settle;
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

pub use batch::{HELPER_PIDFD, Helper, InjectReport, PTRACE_ATTACH_HINT, UNSUPPORTED_ARCH, Victim};
#[cfg(all(feature = "testing", target_arch = "x86_64"))]
pub use entry::close_in_target_with_env;
pub use entry::{close_in_target, helper_main};
pub use reasons::{InjectError, Refusal, SkipReason};
pub use settle::await_threads_ran;
