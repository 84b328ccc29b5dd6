//! Choosing the injecting thread among the stopped ones, and preparing it: its seccomp
//! mode (checked on the thread itself, /proc/PID/task/TID/status), its rseq critical
//! section (see `rseq`), the `syscall` instruction to borrow (see `site`).
//!
//! Preference, best first: no seccomp filter (a filter must be suspended, which needs
//! CAP_SYS_ADMIN); stopped inside a system call (it cannot be inside an rseq critical
//! section); the main thread. A thread in seccomp strict mode is never used: any call but
//! read, write, _exit and sigreturn kills it.

use super::session::{Injector, Session, State, Stop};
use super::{InjectError, Refusal, rseq};
use crate::sys::ptrace::{self as pt, Regs};

struct Candidate {
    idx: usize,
    tid: i32,
    regs: Regs,
    /// Under a seccomp filter (or its mode could not be read).
    filtered: bool,
}

impl Session {
    /// The injecting thread, ready (its registers saved, any seccomp filter suspended),
    /// and the address of the `syscall` instruction to run the calls through.
    pub(super) fn prepare_injector(&mut self) -> Result<(Injector, u64), InjectError> {
        let mut candidates = Vec::new();
        let mut strict = None;
        for idx in 0..self.tracees.len() {
            let t = &self.tracees[idx];
            if t.state != State::Interrupted {
                continue;
            }
            let tid = t.tid;
            let regs = pt::get_regs(tid).map_err(|e| self.step_error(idx, "PTRACE_GETREGS", &e))?;
            if !regs.is_64bit() {
                continue;
            }
            let mode = self.proc.seccomp_mode(self.pid, Some(tid));
            if mode == Some(1) {
                strict.get_or_insert(tid);
                continue;
            }
            candidates.push(Candidate {
                idx,
                tid,
                regs,
                filtered: mode != Some(0),
            });
        }
        candidates.sort_by_key(|c| (c.filtered, !c.regs.in_syscall(), c.tid != self.pid));
        if candidates.is_empty() {
            return Err(InjectError::Refused(match strict {
                Some(tid) => Refusal::SeccompStrict { tid },
                None => Refusal::NoUsableThread,
            }));
        }
        let mut rseq_refusal = None;
        let mut chosen = None;
        for c in candidates {
            match rseq::saved_regs(self.pid, c.tid, &c.regs) {
                Ok((saved, cs)) => {
                    chosen = Some((c, saved, cs));
                    break;
                }
                Err(why) => {
                    rseq_refusal.get_or_insert(Refusal::Rseq { tid: c.tid, why });
                }
            }
        }
        let Some((c, saved, cs)) = chosen else {
            return Err(InjectError::Refused(
                rseq_refusal.unwrap_or(Refusal::NoUsableThread),
            ));
        };
        let insn = self.find_syscall_insn(&c.regs)?;
        if cs.is_some_and(|cs| cs.contains(insn)) {
            return Err(InjectError::Refused(Refusal::Rseq {
                tid: c.tid,
                why: format!(
                    "the only syscall instruction found ({insn:#x}) lies inside its critical section"
                ),
            }));
        }
        if c.filtered {
            let options = pt::PTRACE_O_TRACESYSGOOD | pt::PTRACE_O_SUSPEND_SECCOMP;
            pt::set_options(c.tid, options).map_err(|e| {
                InjectError::Refused(Refusal::SeccompFilter {
                    tid: c.tid,
                    why: format!(
                        "PTRACE_O_SUSPEND_SECCOMP: {e} (needs CAP_SYS_ADMIN, an injector not itself under seccomp, and a kernel with CONFIG_CHECKPOINT_RESTORE)"
                    ),
                })
            })?;
        }
        let inj = Injector {
            idx: c.idx,
            tid: c.tid,
            saved,
            changed: false,
            stop: Stop::Event,
            to_enter: false,
            seccomp_suspended: c.filtered,
        };
        Ok((inj, insn))
    }
}
