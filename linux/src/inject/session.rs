//! The attached threads of one target: seize and interrupt every thread until none is
//! left running, follow each thread's stops and exits, and detach them all, handing back
//! the signals they were stopped for. Dropping a [`Session`] restores changed registers and
//! detaches every stopped thread; threads still running are detached by the kernel when
//! the helper exits.

use std::io;
use std::time::{Duration, Instant};

use super::batch::{PTRACE_ATTACH_HINT, proc_error};
use super::reasons::InjectError;
use crate::procfs::ProcFs;
use crate::sys::ptrace::{self as pt, Regs, Wait};

/// How long all threads get to reach their stop. A thread in uninterruptible sleep
/// (a hung NFS server...) may never: then nothing is done.
pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
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
    pub(super) fn stopped(self) -> bool {
        !matches!(self, State::Running | State::Done)
    }
}

pub(super) struct Tracee {
    pub(super) tid: i32,
    pub(super) state: State,
    /// Signals that arrived while this thread ran injected calls (handed back at detach).
    pub(super) resend: Vec<i32>,
}

/// Where the injecting thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// A plain PTRACE_EVENT_STOP (where it started): detaching from there restarts an
    /// interrupted system call of its own exactly as after any stop.
    Event,
    /// The syscall-enter-stop of an injected call.
    Enter,
    /// The syscall-exit-stop of an injected call.
    Exit,
    /// Another stop (signal-delivery, group-stop).
    Other,
    /// Resumed by us and not reported stopped again yet.
    Running,
}

/// The thread running the injected calls, and what must be undone in it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Injector {
    pub(super) idx: usize,
    pub(super) tid: i32,
    /// The registers to put back: the thread's own, with the instruction pointer moved to
    /// an rseq abort handler if it stopped inside a critical section.
    pub(super) saved: Regs,
    /// The thread holds registers other than `saved`.
    pub(super) changed: bool,
    /// Registers were ever set (then the final ones are read back and checked).
    pub(super) touched: bool,
    pub(super) stop: Stop,
    /// Resumed with PTRACE_SYSCALL towards a syscall-enter-stop (else -exit-stop).
    pub(super) to_enter: bool,
    /// PTRACE_O_SUSPEND_SECCOMP is set on it.
    pub(super) seccomp_suspended: bool,
}

/// The attached threads of one target.
pub(super) struct Session {
    pub(super) pid: i32,
    pub(super) proc: ProcFs,
    pub(super) tracees: Vec<Tracee>,
    /// The injecting thread, once chosen, until it is back in a plain stop with its own
    /// registers.
    pub(super) inj: Option<Injector>,
}

impl Session {
    pub(super) fn new(pid: i32) -> Session {
        Session {
            pid,
            proc: ProcFs::default(),
            tracees: Vec::new(),
            inj: None,
        }
    }

    /// How many threads are in a stop.
    pub(super) fn stopped_threads(&self) -> usize {
        self.tracees.iter().filter(|t| t.state.stopped()).count()
    }

    /// The first thread in `state`, if any.
    pub(super) fn first_in(&self, state: State) -> Option<i32> {
        self.tracees
            .iter()
            .find(|t| t.state == state)
            .map(|t| t.tid)
    }

    /// Whether a thread still holds registers we changed.
    pub(super) fn regs_changed(&self) -> bool {
        self.inj.is_some_and(|i| i.changed)
    }

    /// Seize and interrupt every thread, listing them again until no new one appears,
    /// and wait until each is stopped or gone. Returns when the first interrupt was sent.
    pub(super) fn stop_all(&mut self) -> Result<Instant, InjectError> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut first_interrupt = None;
        loop {
            let fresh: Vec<i32> = self
                .proc
                .tasks(self.pid)
                .map_err(|e| proc_error(self.pid, "task", &e))?
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
                        if thread_is_dead(&self.proc, self.pid, tid) {
                            self.push(tid, State::Done);
                        } else {
                            return Err(seize_denied(&self.proc, self.pid, tid, &e));
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
            let _ = backoff(&mut rounds);
        }
    }

    /// One waitpid(WNOHANG) for every attached thread except `skip`, recording stops
    /// and exits.
    pub(super) fn poll(&mut self, skip: Option<usize>) -> Result<(), InjectError> {
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

    /// The error of a ptrace request on thread `idx`, which we hold in a stop. ESRCH then
    /// means it left the stop without us, which only SIGKILL does, and SIGKILL takes the
    /// whole process: it is gone.
    pub(super) fn step_error(&mut self, idx: usize, what: &str, e: &io::Error) -> InjectError {
        if errno_of(e) == libc::ESRCH {
            self.tracees[idx].state = State::Done;
            self.inj = self.inj.filter(|i| i.idx != idx);
            InjectError::Gone
        } else {
            InjectError::Ptrace(format!("{what} of thread {}: {e}", self.tracees[idx].tid))
        }
    }

    /// Wait until thread `idx` (resumed by us) reports its next stop, or exits. None past
    /// `deadline`. While it takes long, the other threads' exits are collected too, in case
    /// the process is being killed (see wait_running).
    pub(super) fn wait_stop(
        &mut self,
        idx: usize,
        deadline: Instant,
    ) -> Result<Option<(i32, i32)>, InjectError> {
        let tid = self.tracees[idx].tid;
        let mut rounds: u32 = 0;
        let mut quiet = false;
        let spin_until = Instant::now() + SPIN;
        let mut others_polled = Instant::now();
        loop {
            match pt::wait_nohang(tid) {
                Ok(Some(Wait::Stopped { signal, event })) => {
                    if let Some(inj) = self.inj.as_mut().filter(|i| i.idx == idx) {
                        inj.stop = match (signal, event) {
                            (pt::SYSCALL_STOP, 0) if inj.to_enter => Stop::Enter,
                            (pt::SYSCALL_STOP, 0) => Stop::Exit,
                            (libc::SIGTRAP, pt::PTRACE_EVENT_STOP) => Stop::Event,
                            _ => Stop::Other,
                        };
                    }
                    return Ok(Some((signal, event)));
                }
                Ok(Some(Wait::Exited)) => return Err(self.exited(idx)),
                Err(e) if errno_of(&e) == libc::ECHILD => return Err(self.exited(idx)),
                Err(e) => {
                    return Err(InjectError::Ptrace(format!("waitpid of thread {tid}: {e}")));
                }
                Ok(None) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(None);
                    }
                    if now < spin_until {
                        // A stop takes microseconds: stay on the CPU, but let the tracee
                        // have it if it shares ours.
                        std::thread::yield_now();
                        continue;
                    }
                    // A quiet millisecond, or a millisecond of events that were not ours:
                    // collect the others' exits (a main thread's exit is only reported once
                    // the other threads, our tracees, are reaped).
                    if quiet || now.duration_since(others_polled) >= Duration::from_millis(1) {
                        self.poll(Some(idx))?;
                        others_polled = now;
                    }
                    quiet = !backoff(&mut rounds);
                }
            }
        }
    }

    fn exited(&mut self, idx: usize) -> InjectError {
        self.tracees[idx].state = State::Done;
        self.inj = self.inj.filter(|i| i.idx != idx);
        InjectError::Gone
    }

    /// Detach every stopped thread, handing back any signal it was stopped for or that
    /// arrived while it ran injected calls. Only a signal-delivery-stop can take a signal
    /// with PTRACE_DETACH (the kernel ignores it from any other stop); the others are sent
    /// again with tgkill.
    pub(super) fn detach_all(&mut self) -> Result<(), InjectError> {
        let mut first_error = None;
        for t in &mut self.tracees {
            let first = match t.state {
                State::Running | State::Done => continue,
                State::Signal(s) => s,
                _ => 0,
            };
            let rest = std::mem::take(&mut t.resend);
            match pt::detach(t.tid, first) {
                Ok(()) => {}
                Err(e) if errno_of(&e) == libc::ESRCH => {}
                Err(e) => {
                    first_error.get_or_insert_with(|| {
                        InjectError::Ptrace(format!("PTRACE_DETACH of thread {}: {e}", t.tid))
                    });
                }
            }
            for s in rest {
                let _ = pt::tgkill(self.pid, t.tid, s);
            }
            t.state = State::Done;
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.finish_injection();
        let _ = self.detach_all();
    }
}

pub(super) fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// How long to wait for a stop on the CPU before sleeping until a SIGCHLD: a ptrace stop
/// and resume take some microseconds, and a sleeping tracer pays a wake-up per stop (two per
/// injected call), which costs much more on a busy machine.
const SPIN: Duration = Duration::from_micros(100);

/// Wait for the next tracee event: until a SIGCHLD (sent to the tracer at every stop and
/// exit of a tracee, and blocked by the engine so that it stays pending), at most 1 ms at a
/// time so a shared one costs little. Returns whether one came.
pub(super) fn backoff(rounds: &mut u32) -> bool {
    *rounds = rounds.saturating_add(1);
    pt::wait_sigchld(Duration::from_millis(1))
}

/// A zombie thread (a main thread that called pthread_exit, or one exiting) cannot be
/// seized (EPERM) and need not be: it runs no code.
fn thread_is_dead(proc: &ProcFs, pid: i32, tid: i32) -> bool {
    match proc.task_state(pid, tid) {
        Ok(state) => matches!(state, Some('Z' | 'X')),
        Err(_) => true,
    }
}

fn seize_denied(proc: &ProcFs, pid: i32, tid: i32, e: &io::Error) -> InjectError {
    let tracer = proc.tracer_pid(pid, tid).unwrap_or(0);
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
        (pt::PTRACE_EVENT_STOP, libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU) => {
            State::GroupStopped
        }
        (0, signal) => State::Signal(signal),
        _ => State::OtherStop,
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
