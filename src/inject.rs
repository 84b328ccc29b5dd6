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
//! All `unsafe` and raw syscalls are in [`crate::sys::ptrace`]; this module is safe code.
//! Only x86_64 is implemented; elsewhere [`InjectError::Unsupported`] is returned.

use std::os::fd::BorrowedFd;

use thiserror::Error;

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
    /// Fds left alone, with the reason (changed, gone, not a CLOSE_WAIT/CLOSE TCP socket,
    /// close failed...).
    pub skipped: Vec<(i32, String)>,
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

#[derive(Debug, Error)]
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

/// Close `victims` inside process `pid` (pinned by `pidfd`), each only after verifying it
/// is still the attributed socket and in CLOSE_WAIT or CLOSE. See the module docs for how.
///
/// `Err` means nothing was closed (and the target is running as before), except for
/// [`InjectError::Gone`], when the process died during the stop. If a step fails after
/// some fds were closed, the report lists the closed ones and gives the error as the
/// reason for the others.
pub fn close_in_target(
    pid: i32,
    pidfd: BorrowedFd<'_>,
    victims: &[Victim],
) -> Result<InjectReport, InjectError> {
    close_in_target_hooked(pid, pidfd, victims, &|| {})
}

/// [`close_in_target`], calling `while_stopped` once every thread of the target is
/// stopped and before anything is verified. For tests (kill the target, or the caller,
/// at that point); not part of the supported API.
#[doc(hidden)]
pub fn close_in_target_hooked(
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
                .spawn_scoped(scope, || imp::run(pid, pidfd, victims, while_stopped));
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

/// TCP_CLOSE from include/net/tcp_states.h: what a CLOSE_WAIT socket becomes once shut down.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const TCP_CLOSE: u8 = 7;

/// The victims worth stopping the target for: no negative fds, each fd once.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn prefilter(victims: &[Victim], skipped: &mut Vec<(i32, String)>) -> Vec<Victim> {
    let mut seen = std::collections::HashSet::new();
    let mut keep = Vec::with_capacity(victims.len());
    for v in victims {
        if v.fd < 0 {
            skipped.push((v.fd, "not a valid fd number".into()));
        } else if !seen.insert(v.fd) {
            skipped.push((v.fd, "listed more than once".into()));
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

/// The pid a pidfd refers to, from `Pid:` in its fdinfo (-1 once the process is gone).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn parse_fdinfo_pid(fdinfo: &str) -> Option<i32> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The state letter of /proc/PID/task/TID/stat (after the parenthesised comm, which may
/// itself contain parentheses and spaces).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn parse_stat_state(stat: &str) -> Option<char> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// One line of /proc/PID/maps: start, end, whether it is readable and executable, and its
/// path (empty for anonymous memory).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn parse_maps_line(line: &str) -> Option<(u64, u64, bool, &str)> {
    let mut cols = line.splitn(6, ' ');
    let (start, end) = cols.next()?.split_once('-')?;
    let perms = cols.next()?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let rx = perms.starts_with('r') && perms.as_bytes().get(2) == Some(&b'x');
    let path = cols.nth(3).map(str::trim).unwrap_or("");
    (end > start).then_some((start, end, rx, path))
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::io;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
    use std::time::{Duration, Instant};

    use super::{
        InjectError, InjectReport, PTRACE_ATTACH_HINT, TCP_CLOSE, Victim, parse_fdinfo_pid,
        parse_maps_line, parse_stat_state, prefilter, runs,
    };
    use crate::act::tcp_state_name;
    use crate::netlink::TCP_CLOSE_WAIT;
    use crate::procfs::ProcFs;
    use crate::sys;
    use crate::sys::ptrace::{self as pt, Regs, Wait};

    /// How long all threads get to reach their stop. A thread in uninterruptible sleep
    /// (a hung NFS server...) may never: then nothing is done.
    const STOP_TIMEOUT: Duration = Duration::from_secs(1);
    /// Signals that may interrupt one single-step before we give up.
    const MAX_STEP_ATTEMPTS: usize = 16;
    /// How much mapped text to search for a `syscall` instruction, at most.
    const SCAN_BUDGET: u64 = 16 << 20;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum State {
        /// Seized and interrupted; the stop has not been reported yet.
        Running,
        /// In the PTRACE_EVENT_STOP our interrupt asked for.
        Interrupted,
        /// In a group-stop: the process is stopped by job control.
        GroupStopped,
        /// In a signal-delivery-stop: the signal is handed back at detach.
        Signal(i32),
        /// Stopped for another reason; detached without a signal, never injected into.
        OtherStop,
        /// Exited, or detached already.
        Done,
    }

    impl State {
        fn stopped(self) -> bool {
            !matches!(self, State::Running | State::Done)
        }
    }

    struct Tracee {
        tid: i32,
        state: State,
        /// Signals that arrived while this thread was single-stepped (handed back at detach).
        resend: Vec<i32>,
    }

    /// The attached threads of one target. Dropping it restores changed registers and
    /// detaches every stopped thread; threads still running are detached by the kernel
    /// when the tracing thread ends.
    struct Session {
        pid: i32,
        tracees: Vec<Tracee>,
        /// The injecting thread and its saved registers, while they are changed.
        changed: Option<(usize, Regs)>,
    }

    pub(super) fn run(
        pid: i32,
        pidfd: BorrowedFd<'_>,
        victims: &[Victim],
        while_stopped: &(dyn Fn() + Sync),
    ) -> Result<InjectReport, InjectError> {
        check_pidfd(pid, pidfd)?;
        let mut report = InjectReport::default();
        let victims = prefilter(victims, &mut report.skipped);
        if victims.is_empty() {
            report.fds_before = fd_count(pid)?;
            report.fds_after = report.fds_before;
            return Ok(report);
        }

        let mut session = Session {
            pid,
            tracees: Vec::new(),
            changed: None,
        };
        let started = session.stop_all()?;
        report.threads = session.tracees.iter().filter(|t| t.state.stopped()).count();
        while_stopped();

        // The pid could only have been reused if the pidfd's process is gone.
        if !sys::pidfd_alive(pidfd) {
            return Err(InjectError::Gone);
        }
        if let Some(t) = session
            .tracees
            .iter()
            .find(|t| t.state == State::GroupStopped)
        {
            return Err(InjectError::Refused(format!(
                "the process is stopped by job control (thread {}); not touching it",
                t.tid
            )));
        }
        if seccomp_mode(pid) == Some(1) {
            return Err(InjectError::Refused(
                "the process runs in seccomp strict mode, where close() would kill it".into(),
            ));
        }
        report.fds_before = fd_count(pid)?;
        let verified = verify(pidfd, &victims, &mut report.skipped)?;
        if !verified.is_empty()
            && let Err(e) = session.close_fds(&verified, &mut report)
        {
            // A thread left with changed registers, or a dead process, is an error
            // whatever was closed before.
            if matches!(e, InjectError::Gone)
                || session.changed.is_some()
                || report.closed.is_empty()
            {
                return Err(e);
            }
            for fd in verified {
                let handled = report.closed.contains(&fd)
                    || report.skipped.iter().any(|(skipped, _)| *skipped == fd);
                if !handled {
                    report.skipped.push((fd, format!("not closed: {e}")));
                }
            }
        }
        report.fds_after = fd_count(pid)?;
        session.detach_all()?;
        report.pause_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Ok(report)
    }

    /// The pidfd must pin the very process `pid` names, or we would verify one process's fds
    /// and close another's.
    fn check_pidfd(pid: i32, pidfd: BorrowedFd<'_>) -> Result<(), InjectError> {
        let path = format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd());
        let fdinfo = std::fs::read_to_string(&path)
            .map_err(|e| InjectError::Ptrace(format!("reading {path}: {e}")))?;
        match parse_fdinfo_pid(&fdinfo) {
            Some(p) if p == pid => Ok(()),
            Some(-1) => Err(InjectError::Gone),
            Some(other) => Err(InjectError::Refused(format!(
                "the pidfd belongs to pid {other}, not {pid}"
            ))),
            None => Err(InjectError::Refused("the fd given is not a pidfd".into())),
        }
    }

    fn fd_count(pid: i32) -> Result<usize, InjectError> {
        ProcFs::default()
            .fd_count_fast(pid)
            .map_err(|e| proc_error(pid, "fd", &e))
    }

    fn proc_error(pid: i32, leaf: &str, e: &io::Error) -> InjectError {
        if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH)) {
            InjectError::Gone
        } else {
            InjectError::Ptrace(format!("reading /proc/{pid}/{leaf}: {e}"))
        }
    }

    /// Duplicate each fd and keep those that are still the attributed socket, in
    /// CLOSE_WAIT or CLOSE, and that close() cannot block on. The duplicates are closed
    /// before returning, so the target's close drops the last reference.
    fn verify(
        pidfd: BorrowedFd<'_>,
        victims: &[Victim],
        skipped: &mut Vec<(i32, String)>,
    ) -> Result<Vec<i32>, InjectError> {
        let mut ok = Vec::with_capacity(victims.len());
        for v in victims {
            let dup = match sys::pidfd_getfd(pidfd, v.fd) {
                Ok(dup) => dup,
                Err(e) => match e.raw_os_error() {
                    Some(libc::ESRCH) => return Err(InjectError::Gone),
                    Some(libc::EBADF) => {
                        skipped.push((v.fd, "fd is not open any more".into()));
                        continue;
                    }
                    Some(libc::EPERM) | Some(libc::EACCES) => {
                        return Err(InjectError::Permission(format!(
                            "pidfd_getfd: {e}; {PTRACE_ATTACH_HINT}"
                        )));
                    }
                    _ => {
                        skipped.push((v.fd, format!("pidfd_getfd: {e}")));
                        continue;
                    }
                },
            };
            match check(dup.as_fd(), v) {
                Ok(()) => ok.push(v.fd),
                Err(why) => skipped.push((v.fd, why)),
            }
        }
        Ok(ok)
    }

    fn check(dup: BorrowedFd<'_>, v: &Victim) -> Result<(), String> {
        let inode = sys::inode(dup).map_err(|e| format!("fstat: {e}"))?;
        if inode != v.inode {
            return Err(format!(
                "changed: fd now holds inode {inode}, not {}",
                v.inode
            ));
        }
        let cookie = sys::socket_cookie(dup).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTSOCK) => "changed: not a socket".to_string(),
            _ => format!("SO_COOKIE: {e}"),
        })?;
        if cookie != v.cookie {
            return Err(format!("changed: socket cookie {cookie}, not {}", v.cookie));
        }
        let state = sys::tcp_state(dup).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOPROTOOPT) | Some(libc::EOPNOTSUPP) => {
                "changed: not a TCP socket".to_string()
            }
            _ => format!("TCP_INFO: {e}"),
        })?;
        if state != TCP_CLOSE_WAIT && state != TCP_CLOSE {
            return Err(format!(
                "TCP state is {}: only CLOSE_WAIT or CLOSE sockets are closed",
                tcp_state_name(state)
            ));
        }
        match pt::socket_linger(dup) {
            Ok(Some(linger)) if !linger.is_zero() => Err(format!(
                "SO_LINGER is {linger:?}: close() could block the stopped process"
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("SO_LINGER: {e}")),
        }
    }

    fn errno_text(rv: i64) -> String {
        let errno = i32::try_from(rv.unsigned_abs()).unwrap_or(0);
        io::Error::from_raw_os_error(errno).to_string()
    }

    /// `Seccomp:` of /proc/PID/status: 0 none, 1 strict, 2 filter; None if unknown.
    fn seccomp_mode(pid: i32) -> Option<u8> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
    }

    fn open_fds(pid: i32) -> Result<std::collections::HashSet<i32>, InjectError> {
        let dir =
            std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| proc_error(pid, "fd", &e))?;
        Ok(dir
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect())
    }

    fn errno_of(e: &io::Error) -> i32 {
        e.raw_os_error().unwrap_or(0)
    }

    /// Spin briefly (a stop usually takes microseconds), then sleep in short steps.
    fn backoff(rounds: &mut u32) {
        *rounds = rounds.saturating_add(1);
        if *rounds < 200 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn list_threads(pid: i32) -> Result<Vec<i32>, InjectError> {
        let dir = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map_err(|e| proc_error(pid, "task", &e))?;
        Ok(dir
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect())
    }

    /// A zombie thread (a main thread that called pthread_exit, or one exiting) cannot be
    /// seized (EPERM) and need not be: it runs no code.
    fn thread_is_dead(pid: i32, tid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) {
            Ok(stat) => matches!(parse_stat_state(&stat), Some('Z' | 'X')),
            Err(_) => true,
        }
    }

    fn seize_denied(pid: i32, tid: i32, e: &io::Error) -> InjectError {
        let tracer = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("TracerPid:"))
                    .and_then(|v| v.trim().parse::<i32>().ok())
            })
            .unwrap_or(0);
        if tracer != 0 {
            InjectError::Permission(format!(
                "thread {tid} is already traced by pid {tracer} (a debugger, or another cwreap)"
            ))
        } else {
            InjectError::Permission(format!(
                "PTRACE_SEIZE of thread {tid}: {e}; {PTRACE_ATTACH_HINT}"
            ))
        }
    }

    fn classify(signal: i32, event: i32) -> State {
        match (event, signal) {
            (pt::PTRACE_EVENT_STOP, libc::SIGTRAP) => State::Interrupted,
            (
                pt::PTRACE_EVENT_STOP,
                libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU,
            ) => State::GroupStopped,
            (0, signal) => State::Signal(signal),
            _ => State::OtherStop,
        }
    }

    impl Session {
        /// Seize and interrupt every thread, listing them again until no new one appears,
        /// and wait until each is stopped or gone. Returns when the first interrupt was sent.
        fn stop_all(&mut self) -> Result<Instant, InjectError> {
            let deadline = Instant::now() + STOP_TIMEOUT;
            let mut first_interrupt = None;
            loop {
                let fresh: Vec<i32> = list_threads(self.pid)?
                    .into_iter()
                    .filter(|tid| !self.tracees.iter().any(|t| t.tid == *tid))
                    .collect();
                if fresh.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(InjectError::Timeout(format!(
                        "threads kept appearing for {STOP_TIMEOUT:?}"
                    )));
                }
                // Seize them all first (they keep running), then interrupt: the pause
                // starts at the first interrupt.
                let mut seized = Vec::with_capacity(fresh.len());
                for tid in fresh {
                    match pt::seize(tid) {
                        Ok(()) => seized.push(tid),
                        Err(e) if errno_of(&e) == libc::ESRCH => self.push(tid, State::Done),
                        Err(e) if matches!(errno_of(&e), libc::EPERM | libc::EACCES) => {
                            if thread_is_dead(self.pid, tid) {
                                self.push(tid, State::Done);
                            } else {
                                return Err(seize_denied(self.pid, tid, &e));
                            }
                        }
                        Err(e) => {
                            return Err(InjectError::Ptrace(format!(
                                "PTRACE_SEIZE of thread {tid}: {e}"
                            )));
                        }
                    }
                }
                first_interrupt.get_or_insert_with(Instant::now);
                for tid in seized {
                    self.push(tid, State::Running);
                    match pt::interrupt(tid) {
                        // ESRCH: it is exiting; waitpid will say so.
                        Ok(()) => {}
                        Err(e) if errno_of(&e) == libc::ESRCH => {}
                        Err(e) => {
                            return Err(InjectError::Ptrace(format!(
                                "PTRACE_INTERRUPT of thread {tid}: {e}"
                            )));
                        }
                    }
                }
                self.wait_running(deadline)?;
            }
            if !self.tracees.iter().any(|t| t.state.stopped()) {
                return Err(InjectError::Gone);
            }
            Ok(first_interrupt.unwrap_or_else(Instant::now))
        }

        fn push(&mut self, tid: i32, state: State) {
            self.tracees.push(Tracee {
                tid,
                state,
                resend: Vec::new(),
            });
        }

        /// Wait until no thread is Running. Every attached thread is polled, stopped ones
        /// too: if the process is killed meanwhile, each exit must be collected, because
        /// the kernel reports a main thread's exit only after all its other threads have
        /// been reaped (and traced ones are reaped by us).
        fn wait_running(&mut self, deadline: Instant) -> Result<(), InjectError> {
            let mut rounds = 0;
            loop {
                self.poll(None)?;
                if !self.tracees.iter().any(|t| t.state == State::Running) {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    let late: Vec<String> = self
                        .tracees
                        .iter()
                        .filter(|t| t.state == State::Running)
                        .map(|t| t.tid.to_string())
                        .collect();
                    return Err(InjectError::Timeout(format!(
                        "thread(s) {} did not stop within {STOP_TIMEOUT:?} (uninterruptible sleep?); nothing was closed",
                        late.join(", ")
                    )));
                }
                backoff(&mut rounds);
            }
        }

        /// One waitpid(WNOHANG) for every attached thread except `skip`, recording stops
        /// and exits.
        fn poll(&mut self, skip: Option<usize>) -> Result<(), InjectError> {
            for (i, t) in self.tracees.iter_mut().enumerate() {
                if t.state == State::Done || Some(i) == skip {
                    continue;
                }
                match pt::wait_nohang(t.tid) {
                    Ok(None) => {}
                    Ok(Some(Wait::Exited)) => t.state = State::Done,
                    Ok(Some(Wait::Stopped { signal, event })) => t.state = classify(signal, event),
                    Err(e) if errno_of(&e) == libc::ECHILD => t.state = State::Done,
                    Err(e) => {
                        return Err(InjectError::Ptrace(format!(
                            "waitpid of thread {}: {e}",
                            t.tid
                        )));
                    }
                }
            }
            Ok(())
        }

        /// Close `fds` with one thread, then restore its registers (also on error).
        fn close_fds(&mut self, fds: &[i32], report: &mut InjectReport) -> Result<(), InjectError> {
            let (idx, saved) = self.pick_injector()?;
            let insn = self.find_syscall_insn(&saved)?;
            self.changed = Some((idx, saved));
            let result = self.close_each(idx, &saved, insn, fds, report);
            let restored = self.restore();
            result.and(restored)
        }

        /// One close per fd, except that a run of consecutive fds (all verified) is closed
        /// with one close_range when no seccomp filter could object to it: each injected
        /// system call costs a round trip through the scheduler, and leaked sockets tend to
        /// hold consecutive numbers.
        fn close_each(
            &mut self,
            idx: usize,
            saved: &Regs,
            insn: u64,
            fds: &[i32],
            report: &mut InjectReport,
        ) -> Result<(), InjectError> {
            let ranges_allowed = seccomp_mode(self.pid) == Some(0);
            let mut range_closed = Vec::new();
            for (first, last) in runs(fds, ranges_allowed) {
                if first != last {
                    let args = [first, last, 0].map(|a| u64::try_from(a).unwrap_or(u64::MAX));
                    let rv = self.syscall(idx, saved, insn, pt::NR_CLOSE_RANGE, args)?;
                    if rv == 0 {
                        range_closed.extend(first..=last);
                        continue;
                    }
                    // ENOSYS (before Linux 5.9) or anything else: one by one instead.
                }
                for fd in first..=last {
                    let args = [u64::try_from(fd).unwrap_or(u64::MAX), 0, 0];
                    let rv = self.syscall(idx, saved, insn, pt::NR_CLOSE, args)?;
                    if rv == 0 {
                        report.closed.push(fd);
                    } else {
                        report.skipped.push((
                            fd,
                            format!("close() in the target failed: {}", errno_text(rv)),
                        ));
                    }
                }
            }
            if !range_closed.is_empty() {
                // close_range reports no per-fd result: check the fd table (still frozen).
                let open = open_fds(self.pid)?;
                for fd in range_closed {
                    if open.contains(&fd) {
                        report
                            .skipped
                            .push((fd, "still open after close_range() in the target".into()));
                    } else {
                        report.closed.push(fd);
                    }
                }
                report.closed.sort_unstable();
            }
            Ok(())
        }

        /// The thread to inject into: the main thread if it is in a plain interrupt stop in
        /// 64-bit mode, else the first such thread. Returns it with its saved registers.
        fn pick_injector(&self) -> Result<(usize, Regs), InjectError> {
            let mut order: Vec<usize> = (0..self.tracees.len()).collect();
            order.sort_by_key(|&i| self.tracees[i].tid != self.pid);
            for i in order {
                let t = &self.tracees[i];
                if t.state != State::Interrupted {
                    continue;
                }
                match pt::get_regs(t.tid) {
                    Ok(regs) if regs.is_64bit() => return Ok((i, regs)),
                    Ok(_) => continue,
                    Err(e) if errno_of(&e) == libc::ESRCH => continue,
                    Err(e) => {
                        return Err(InjectError::Ptrace(format!(
                            "PTRACE_GETREGS of thread {}: {e}",
                            t.tid
                        )));
                    }
                }
            }
            Err(InjectError::Refused(
                "no thread is in a plain ptrace stop in 64-bit mode".into(),
            ))
        }

        /// The address of an existing `syscall` instruction in the target: the one the
        /// injecting thread (or another) stopped after, else one in the vDSO or a text
        /// mapping. Every candidate is read back from the target's memory.
        fn find_syscall_insn(&self, saved: &Regs) -> Result<u64, InjectError> {
            let is_syscall = |addr: u64| {
                let mut b = [0u8; 2];
                matches!(pt::read_memory(self.pid, addr, &mut b), Ok(2)) && b == pt::SYSCALL_INSN
            };
            let after_syscall = |regs: &Regs| {
                (regs.in_syscall() && regs.is_64bit())
                    .then(|| regs.ip().wrapping_sub(pt::SYSCALL_INSN_LEN))
                    .filter(|&a| is_syscall(a))
            };
            if let Some(a) = after_syscall(saved) {
                return Ok(a);
            }
            for t in self.tracees.iter().filter(|t| t.state.stopped()) {
                if let Ok(regs) = pt::get_regs(t.tid)
                    && let Some(a) = after_syscall(&regs)
                {
                    return Ok(a);
                }
            }
            let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid))
                .map_err(|e| proc_error(self.pid, "maps", &e))?;
            let mut texts: Vec<(u64, u64, &str)> = maps
                .lines()
                .filter_map(parse_maps_line)
                .filter(|(_, _, rx, _)| *rx)
                .map(|(start, end, _, path)| (start, end, path))
                .collect();
            // The vDSO first: small, always there, and it has syscall fallbacks.
            texts.sort_by_key(|(_, _, path)| *path != "[vdso]");
            let mut budget = SCAN_BUDGET;
            let mut buf = vec![0u8; 64 << 10];
            for (start, end, _) in texts {
                let mut at = start;
                while at < end && budget > 0 {
                    let want = (end - at).min(buf.len() as u64).min(budget);
                    let Ok(n) = pt::read_memory(self.pid, at, &mut buf[..want as usize]) else {
                        break;
                    };
                    if n < 2 {
                        break;
                    }
                    if let Some(off) = buf[..n].windows(2).position(|w| w == pt::SYSCALL_INSN) {
                        return Ok(at + off as u64);
                    }
                    budget = budget.saturating_sub(n as u64);
                    // Overlap one byte so an instruction across two reads is found.
                    at += n as u64 - 1;
                }
            }
            Err(InjectError::Refused(
                "no syscall instruction found in the target's code".into(),
            ))
        }

        /// Run one system call in thread `idx`: point it at `insn` with `nr` and `args`,
        /// single-step it, and return rax. Signals that arrive meanwhile are kept to be
        /// handed back at detach (our own step's SIGTRAP never is).
        fn syscall(
            &mut self,
            idx: usize,
            saved: &Regs,
            insn: u64,
            nr: u64,
            args: [u64; 3],
        ) -> Result<i64, InjectError> {
            let tid = self.tracees[idx].tid;
            let regs = saved.for_syscall(insn, nr, args);
            pt::set_regs(tid, &regs).map_err(|e| self.step_error(idx, "PTRACE_SETREGS", &e))?;
            for _ in 0..MAX_STEP_ATTEMPTS {
                pt::single_step(tid).map_err(|e| self.step_error(idx, "PTRACE_SINGLESTEP", &e))?;
                let signal = self.wait_step(idx)?;
                let now =
                    pt::get_regs(tid).map_err(|e| self.step_error(idx, "PTRACE_GETREGS", &e))?;
                if signal != libc::SIGTRAP && signal != 0 {
                    self.tracees[idx].resend.push(signal);
                }
                if now.ip() == insn.wrapping_add(pt::SYSCALL_INSN_LEN) {
                    return Ok(now.syscall_result());
                }
                if now.ip() != insn {
                    return Err(InjectError::Ptrace(format!(
                        "thread {tid} stopped at {:#x} instead of after the syscall at {insn:#x}",
                        now.ip()
                    )));
                }
                // Stopped for a signal before the instruction ran: step again.
            }
            Err(InjectError::Ptrace(format!(
                "thread {tid} kept stopping for signals instead of running close()"
            )))
        }

        fn step_error(&self, idx: usize, what: &str, e: &io::Error) -> InjectError {
            if errno_of(e) == libc::ESRCH && !self.pid_alive() {
                InjectError::Gone
            } else {
                InjectError::Ptrace(format!("{what} of thread {}: {e}", self.tracees[idx].tid))
            }
        }

        fn pid_alive(&self) -> bool {
            std::fs::metadata(format!("/proc/{}/task/{}", self.pid, self.pid)).is_ok()
        }

        /// Wait for the single-stepped thread to stop again. No deadline: it is running
        /// with our registers, and letting go of it before they are restored would break
        /// it; close() of a verified socket without SO_LINGER does not block, and if the
        /// process dies, waitpid says so.
        fn wait_step(&mut self, idx: usize) -> Result<i32, InjectError> {
            let tid = self.tracees[idx].tid;
            let mut rounds: u32 = 0;
            loop {
                match pt::wait_nohang(tid) {
                    Ok(Some(Wait::Stopped { signal, .. })) => return Ok(signal),
                    Ok(Some(Wait::Exited)) => {
                        self.tracees[idx].state = State::Done;
                        self.changed = None;
                        return Err(InjectError::Gone);
                    }
                    Ok(None) => {
                        // Not quick: collect the other threads' exits in case the process
                        // is being killed (see wait_running).
                        if rounds > 0 && rounds.is_multiple_of(64) {
                            self.poll(Some(idx))?;
                        }
                        backoff(&mut rounds);
                    }
                    Err(e) if errno_of(&e) == libc::ECHILD => {
                        self.tracees[idx].state = State::Done;
                        self.changed = None;
                        return Err(InjectError::Gone);
                    }
                    Err(e) => {
                        return Err(InjectError::Ptrace(format!("waitpid of thread {tid}: {e}")));
                    }
                }
            }
        }

        /// Put the injecting thread's saved registers back and check they took. Until
        /// they did, `changed` stays set (and the drop guard tries again).
        fn restore(&mut self) -> Result<(), InjectError> {
            let Some((idx, saved)) = self.changed else {
                return Ok(());
            };
            let tid = self.tracees[idx].tid;
            if let Err(e) = pt::set_regs(tid, &saved) {
                return Err(self.step_error(idx, "restoring registers (PTRACE_SETREGS)", &e));
            }
            match pt::get_regs(tid) {
                Ok(back) if back.same_as(&saved) => {
                    self.changed = None;
                    Ok(())
                }
                Ok(back) => Err(InjectError::Ptrace(format!(
                    "registers of thread {tid} read back as {back:?}, not {saved:?}"
                ))),
                Err(e) => Err(self.step_error(idx, "PTRACE_GETREGS", &e)),
            }
        }

        /// Detach every stopped thread, handing back any signal it was stopped for or
        /// that arrived while it was single-stepped.
        fn detach_all(&mut self) -> Result<(), InjectError> {
            let mut first_error = None;
            for t in &mut self.tracees {
                let mut signals = match t.state {
                    State::Running | State::Done => continue,
                    State::Signal(s) => vec![s],
                    _ => Vec::new(),
                };
                signals.append(&mut t.resend);
                let (first, rest) = signals.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
                match pt::detach(t.tid, first) {
                    Ok(()) => {}
                    Err(e) if errno_of(&e) == libc::ESRCH => {}
                    Err(e) => {
                        first_error.get_or_insert_with(|| {
                            InjectError::Ptrace(format!("PTRACE_DETACH of thread {}: {e}", t.tid))
                        });
                    }
                }
                for &s in rest {
                    let _ = pt::tgkill(self.pid, t.tid, s);
                }
                t.state = State::Done;
            }
            first_error.map_or(Ok(()), Err)
        }
    }

    impl Drop for Session {
        fn drop(&mut self) {
            let _ = self.restore();
            let _ = self.detach_all();
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn stops_are_classified() {
            assert_eq!(
                classify(libc::SIGTRAP, pt::PTRACE_EVENT_STOP),
                State::Interrupted
            );
            assert_eq!(
                classify(libc::SIGSTOP, pt::PTRACE_EVENT_STOP),
                State::GroupStopped
            );
            assert_eq!(classify(libc::SIGCHLD, 0), State::Signal(libc::SIGCHLD));
            assert_eq!(classify(libc::SIGTRAP, 4), State::OtherStop);
        }
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
        assert_eq!(skipped.len(), 2);
        assert_eq!(skipped[0].0, -1);
        assert_eq!(skipped[1].0, 5);
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
    fn fdinfo_pid() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nPid:\t4242\nNSpid:\t4242\n";
        assert_eq!(parse_fdinfo_pid(info), Some(4242));
        assert_eq!(parse_fdinfo_pid("Pid:\t-1\n"), Some(-1));
        assert_eq!(parse_fdinfo_pid("pos:\t0\n"), None);
        assert_eq!(parse_fdinfo_pid("Pid:\tx\n"), None);
    }

    #[test]
    fn stat_state_survives_odd_comm() {
        assert_eq!(parse_stat_state("42 (a) b) Z 1 2 3"), Some('Z'));
        assert_eq!(parse_stat_state("42 (node) S 1"), Some('S'));
        assert_eq!(parse_stat_state("42 (x"), None);
        assert_eq!(parse_stat_state(""), None);
    }

    #[test]
    fn maps_lines() {
        let vdso =
            "7ffd1e5f2000-7ffd1e5f4000 r-xp 00000000 00:00 0                          [vdso]";
        assert_eq!(
            parse_maps_line(vdso),
            Some((0x7ffd1e5f2000, 0x7ffd1e5f4000, true, "[vdso]"))
        );
        let libc = "7f0000028000-7f00001bd000 r-xp 00028000 08:01 1234 /usr/lib/x86_64-linux-gnu/libc.so.6";
        assert_eq!(
            parse_maps_line(libc).map(|m| (m.2, m.3)),
            Some((true, "/usr/lib/x86_64-linux-gnu/libc.so.6"))
        );
        let anon = "7f0000000000-7f0000001000 rw-p 00000000 00:00 0";
        assert_eq!(parse_maps_line(anon).map(|m| (m.2, m.3)), Some((false, "")));
        assert_eq!(parse_maps_line("garbage"), None);
        assert_eq!(parse_maps_line("2000-1000 r-xp 0 0:0 0"), None);
        assert_eq!(parse_maps_line(""), None);
    }
}
