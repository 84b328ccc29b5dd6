//! The injected calls, without single-stepping: from a ptrace stop, point the injecting
//! thread at a borrowed `syscall` instruction with the call's number and arguments, run it
//! with PTRACE_SYSCALL to its syscall-enter-stop and again to its syscall-exit-stop, read
//! the result, put the saved registers back at once, and chain the next call from there.
//! After the last one, check the registers, then take the thread to a plain interrupt stop
//! so that an interrupted system call of its own restarts as after any stop. While the
//! thread holds injected registers, `Injector::changed` is set and the session's drop guard
//! restores them.

use std::time::{Duration, Instant};

use super::batch::{InjectReport, proc_error, runs};
use super::reasons::{InjectError, SkipReason};
use super::seam;
use super::session::{STOP_TIMEOUT, Session, Stop, errno_of};
use crate::sys::ptrace::{self as pt};

/// How long one injected call may take, from resuming the thread to its syscall-exit-stop.
/// close() of a verified socket without SO_LINGER does not block: this only bounds a case
/// nobody foresaw.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long all the calls of one batch may take; the rest is left open.
const BATCH_BUDGET: Duration = Duration::from_secs(10);
/// How long a thread interrupted after a deadline gets to stop.
const RECOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// What one injected call did.
enum Done {
    /// close(fd) returned this.
    One(i32, i64),
    /// close_range(first, last) returned 0: to be checked against the fd table.
    Range(i32, i32),
}

impl Session {
    /// Close `fds` through one thread, then restore it (also on error). The fd table is read
    /// only once the thread holds its own registers again.
    pub(super) fn close_fds(
        &mut self,
        fds: &[i32],
        report: &mut InjectReport,
    ) -> Result<(), InjectError> {
        let (inj, insn) = self.prepare_injector()?;
        self.inj = Some(inj);
        let mut done = Vec::new();
        let result = self.run_calls(insn, fds, &mut done);
        let finished = self.finish_injection();
        let mut range_closed = Vec::new();
        let mut answered = std::collections::HashSet::new();
        for d in done {
            match d {
                Done::One(fd, 0) => report.closed.push(fd),
                Done::One(fd, rv) => {
                    let errno = i32::try_from(rv.unsigned_abs()).unwrap_or(0);
                    report.skipped.push((fd, SkipReason::CloseFailed(errno)));
                }
                Done::Range(first, last) => range_closed.extend(first..=last),
            }
        }
        answered.extend(report.closed.iter().copied());
        answered.extend(report.skipped.iter().map(|(fd, _)| *fd));
        answered.extend(range_closed.iter().copied());
        // After a failed call, the fds it and the later ones were for may or may not be
        // closed: the fd table says, since nothing but our calls ran in the target.
        let in_doubt: Vec<i32> = if result.is_err() || finished.is_err() {
            fds.iter()
                .copied()
                .filter(|fd| !answered.contains(fd))
                .collect()
        } else {
            Vec::new()
        };
        if !range_closed.is_empty() || !in_doubt.is_empty() {
            // close_range reports no per-fd result: check the fd table (still frozen).
            let open = self
                .proc
                .open_fds(self.pid)
                .map_err(|e| proc_error(self.pid, "fd", &e))?;
            for fd in range_closed {
                if open.contains(&fd) {
                    report.skipped.push((fd, SkipReason::StillOpen));
                } else {
                    report.closed.push(fd);
                }
            }
            report
                .closed
                .extend(in_doubt.into_iter().filter(|fd| !open.contains(fd)));
            report.closed.sort_unstable();
        }
        result.and(finished)
    }

    /// One close_range per run of consecutive fds (leaked sockets tend to hold consecutive
    /// numbers, and each injected call costs two round trips through the scheduler), one
    /// close per fd otherwise or where close_range fails (ENOSYS before Linux 5.9).
    fn run_calls(
        &mut self,
        insn: u64,
        fds: &[i32],
        done: &mut Vec<Done>,
    ) -> Result<(), InjectError> {
        let budget = Instant::now() + BATCH_BUDGET;
        for (first, last) in runs(fds, true) {
            if Instant::now() >= budget {
                return Err(InjectError::Timeout(format!(
                    "the injected calls took longer than {BATCH_BUDGET:?}; the rest was left open"
                )));
            }
            if first != last {
                let args = [first, last, 0].map(|a| u64::try_from(a).unwrap_or(u64::MAX));
                if self.call(insn, pt::NR_CLOSE_RANGE, args)? == 0 {
                    done.push(Done::Range(first, last));
                    continue;
                }
            }
            for fd in first..=last {
                let args = [u64::try_from(fd).unwrap_or(u64::MAX), 0, 0];
                let rv = self.call(insn, pt::NR_CLOSE, args)?;
                done.push(Done::One(fd, rv));
            }
        }
        Ok(())
    }

    /// Run system call `nr` in the injecting thread, which is in a ptrace stop, and return
    /// rax. It ends in the call's syscall-exit-stop, with its own registers back.
    fn call(&mut self, insn: u64, nr: u64, args: [u64; 3]) -> Result<i64, InjectError> {
        let Some(inj) = self.inj.as_mut() else {
            return Err(InjectError::Ptrace("no injecting thread".into()));
        };
        let (idx, tid) = (inj.idx, inj.tid);
        let regs = inj.saved.for_syscall(insn, nr, args);
        // Marked before the request: if it half-failed, restoring is harmless.
        inj.changed = true;
        inj.touched = true;
        let saved = inj.saved;
        pt::set_regs(tid, &regs).map_err(|e| self.step_error(idx, "PTRACE_SETREGS", &e))?;
        seam::step("injected");
        let deadline = Instant::now() + seam::call_timeout(CALL_TIMEOUT);
        self.run_to_syscall_stop(idx, tid, true, deadline)?;
        self.check_stop(idx, tid, insn, nr, "syscall-enter")?;
        seam::step("entered");
        self.run_to_syscall_stop(idx, tid, false, deadline)?;
        let rv = self.check_stop(idx, tid, insn, nr, "syscall-exit")?;
        seam::step("exited");
        // The thread's own registers back at once, after every call: between two calls,
        // and from the last one until it is let go, a dying helper leaves nothing behind
        // (the kernel's detach sends it through the signal check, which restarts its own
        // interrupted call). Only from the SETREGS above to this one could it not.
        pt::set_regs(tid, &saved)
            .map_err(|e| self.step_error(idx, "restoring registers (PTRACE_SETREGS)", &e))?;
        if let Some(inj) = self.inj.as_mut() {
            inj.changed = false;
        }
        seam::step("restored");
        Ok(rv)
    }

    /// The thread stopped at `what` of the injected call `nr` through `insn`: rax.
    fn check_stop(
        &mut self,
        idx: usize,
        tid: i32,
        insn: u64,
        nr: u64,
        what: &str,
    ) -> Result<i64, InjectError> {
        let now = pt::get_regs(tid).map_err(|e| self.step_error(idx, "PTRACE_GETREGS", &e))?;
        if now.syscall_nr() != i64::try_from(nr).unwrap_or(-1)
            || now.ip() != insn.wrapping_add(pt::SYSCALL_INSN_LEN)
        {
            return Err(InjectError::Ptrace(format!(
                "thread {tid} reached a {what}-stop with {now:?}, not one of the injected call {nr} at {insn:#x}"
            )));
        }
        Ok(now.syscall_result())
    }

    /// PTRACE_SYSCALL (towards a syscall-enter-stop when `to_enter`, else an exit-stop) or,
    /// when `syscall` is false, PTRACE_CONT; no signal is delivered.
    fn resume(
        &mut self,
        idx: usize,
        tid: i32,
        syscall: bool,
        to_enter: bool,
    ) -> Result<(), InjectError> {
        let (r, what) = if syscall {
            (pt::syscall(tid, 0), "PTRACE_SYSCALL")
        } else {
            (pt::cont(tid, 0), "PTRACE_CONT")
        };
        r.map_err(|e| self.step_error(idx, what, &e))?;
        if let Some(inj) = self.inj.as_mut() {
            inj.stop = Stop::Running;
            inj.to_enter = to_enter;
        }
        Ok(())
    }

    /// Resume with PTRACE_SYSCALL until the next syscall stop. A signal that arrives on the
    /// way is kept to be handed back at detach (it must not be delivered while the thread
    /// holds injected registers: its handler would run, and return, into them).
    fn run_to_syscall_stop(
        &mut self,
        idx: usize,
        tid: i32,
        to_enter: bool,
        deadline: Instant,
    ) -> Result<(), InjectError> {
        loop {
            self.resume(idx, tid, true, to_enter)?;
            let Some((signal, event)) = self.wait_stop(idx, deadline)? else {
                self.stop_running(idx, tid)?;
                let what = if to_enter { "enter" } else { "exit" };
                return Err(InjectError::Timeout(format!(
                    "thread {tid} did not reach the syscall-{what}-stop of an injected call within {:?}; it was interrupted, restored and released",
                    seam::call_timeout(CALL_TIMEOUT)
                )));
            };
            match (signal, event) {
                (pt::SYSCALL_STOP, 0) => return Ok(()),
                (signal, 0) => self.keep_signal(idx, signal),
                // A group-stop or another event: nothing to hand back, go on.
                _ => {}
            }
        }
    }

    /// A signal dequeued by the injecting thread: kept to be handed back at detach.
    fn keep_signal(&mut self, idx: usize, signal: i32) {
        self.tracees[idx].resend.push(signal);
        seam::step("signal-kept");
    }

    /// A resumed thread that must stop now: PTRACE_INTERRUPT and wait for any stop.
    fn stop_running(&mut self, idx: usize, tid: i32) -> Result<(), InjectError> {
        match pt::interrupt(tid) {
            Ok(()) => {}
            Err(e) if errno_of(&e) == libc::ESRCH => {}
            Err(e) => return Err(self.step_error(idx, "PTRACE_INTERRUPT", &e)),
        }
        let deadline = Instant::now() + RECOVER_TIMEOUT;
        let stopped = self.wait_stop(idx, deadline)?;
        if let Some((signal, 0)) = stopped
            && signal != pt::SYSCALL_STOP
        {
            self.keep_signal(idx, signal);
        }
        if stopped.is_none() {
            // Nothing more can be done from here: the thread never stopped, so its
            // registers cannot be set. Leave it to the kernel's detach when we exit,
            // instead of waiting again from the drop guard.
            self.inj = None;
            return Err(InjectError::Timeout(format!(
                "thread {tid} did not stop within {RECOVER_TIMEOUT:?} of PTRACE_INTERRUPT, in the middle of an injected call (uninterruptible sleep?); it may be left with the injected registers"
            )));
        }
        seam::step(match self.inj.map(|i| i.stop) {
            Some(Stop::Enter) => "caught-at-enter",
            Some(Stop::Exit) => "caught-at-exit",
            Some(Stop::Event) => "caught-at-interrupt",
            _ => "caught-elsewhere",
        });
        Ok(())
    }

    /// Undo the injection in the injecting thread: stop it if it runs, put its saved
    /// registers back (checked by reading them again), end any seccomp suspension, and
    /// bring it to a plain PTRACE_EVENT_STOP, from where detaching restarts an interrupted
    /// system call of its own. Nothing else happens in between: no /proc read, no other
    /// ptrace request.
    pub(super) fn finish_injection(&mut self) -> Result<(), InjectError> {
        let Some(inj) = self.inj else {
            return Ok(());
        };
        let (idx, tid) = (inj.idx, inj.tid);
        if inj.stop == Stop::Running {
            self.stop_running(idx, tid)?;
        }
        if self.inj.is_some_and(|i| i.changed) {
            if self.inj.is_some_and(|i| i.stop == Stop::Enter) {
                // Caught before an injected call ran (only after a deadline): skip it,
                // keeping rax, and restore fully once out of the system call.
                pt::set_regs(tid, &inj.saved.skipping_syscall())
                    .map_err(|e| self.step_error(idx, "PTRACE_SETREGS", &e))?;
                self.settle(idx, tid)?;
            }
            pt::set_regs(tid, &inj.saved)
                .map_err(|e| self.step_error(idx, "restoring registers (PTRACE_SETREGS)", &e))?;
            if let Some(i) = self.inj.as_mut() {
                i.changed = false;
            }
            seam::step("restored");
        }
        if inj.touched {
            match pt::get_regs(tid) {
                Ok(back) if back.same_as(&inj.saved) => {}
                Ok(back) => {
                    return Err(InjectError::Ptrace(format!(
                        "registers of thread {tid} read back as {back:?}, not {:?}",
                        inj.saved
                    )));
                }
                Err(e) => return Err(self.step_error(idx, "PTRACE_GETREGS", &e)),
            }
        }
        if inj.seccomp_suspended {
            // Detaching clears it too; this only ends it as early as possible.
            if pt::set_options(tid, pt::PTRACE_O_TRACESYSGOOD).is_ok()
                && let Some(i) = self.inj.as_mut()
            {
                i.seccomp_suspended = false;
            }
        }
        if self.inj.is_some_and(|i| i.stop != Stop::Event) {
            self.settle(idx, tid)?;
            seam::step("settled");
        }
        self.inj = None;
        Ok(())
    }

    /// From a syscall stop (or any stop but an interrupt's): PTRACE_INTERRUPT, then
    /// PTRACE_CONT, so the thread goes through the kernel's signal check once more and
    /// stops there in a PTRACE_EVENT_STOP.
    fn settle(&mut self, idx: usize, tid: i32) -> Result<(), InjectError> {
        pt::interrupt(tid).map_err(|e| self.step_error(idx, "PTRACE_INTERRUPT", &e))?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            self.resume(idx, tid, false, false)?;
            let Some((signal, event)) = self.wait_stop(idx, deadline)? else {
                return Err(InjectError::Timeout(format!(
                    "thread {tid} did not come back to an interrupt stop within {STOP_TIMEOUT:?}"
                )));
            };
            match (signal, event) {
                (libc::SIGTRAP, pt::PTRACE_EVENT_STOP) => return Ok(()),
                (pt::SYSCALL_STOP, 0) => {}
                (signal, 0) => self.keep_signal(idx, signal),
                _ => {}
            }
        }
    }
}
