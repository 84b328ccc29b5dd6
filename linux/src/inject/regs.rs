//! Register save and restore for the injecting thread: pick the thread, save its
//! registers, point it at a borrowed `syscall` instruction with the call's number and
//! arguments, step it through exactly that instruction, read the result, and put the saved
//! registers back (checked by reading them again). Until the restore took,
//! `Session::changed` stays set and the session's drop guard tries again.

use super::session::{Session, State, errno_of};
use super::{InjectError, InjectReport, SkipReason, proc_error, runs};
use crate::sys::ptrace::{self as pt, Regs};

/// Signals that may interrupt one single-step before we give up.
const MAX_STEP_ATTEMPTS: usize = 16;

impl Session {
    /// Close `fds` with one thread, then restore its registers (also on error).
    pub(super) fn close_fds(
        &mut self,
        fds: &[i32],
        report: &mut InjectReport,
    ) -> Result<(), InjectError> {
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
        let ranges_allowed = self.proc.seccomp_mode(self.pid, None) == Some(0);
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
                    let errno = i32::try_from(rv.unsigned_abs()).unwrap_or(0);
                    report.skipped.push((fd, SkipReason::CloseFailed(errno)));
                }
            }
        }
        if !range_closed.is_empty() {
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
            let now = pt::get_regs(tid).map_err(|e| self.step_error(idx, "PTRACE_GETREGS", &e))?;
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

    /// Put the injecting thread's saved registers back and check they took. Until
    /// they did, `changed` stays set (and the drop guard tries again).
    pub(super) fn restore(&mut self) -> Result<(), InjectError> {
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
}
