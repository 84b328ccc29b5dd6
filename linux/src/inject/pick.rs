//! Choosing the injecting thread among the stopped ones, and preparing it: its seccomp
//! mode (checked on the thread itself, /proc/PID/task/TID/status), its rseq critical
//! section (see `rseq`), the `syscall` instruction to borrow (see `site`).
//!
//! Preference, best first: no seccomp filter (a filter must be suspended, which needs
//! CAP_SYS_ADMIN); stopped inside a system call (it cannot be inside an rseq critical
//! section); the main thread. A thread in seccomp strict mode is never used: any call but
//! read, write, _exit and sigreturn kills it.

use super::reasons::{InjectError, Refusal};
use super::rseq;
use super::session::{Injector, Session, State, Stop};
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
        for idx in 0..self.tracees.len() {
            let t = &self.tracees[idx];
            if t.state != State::Interrupted {
                continue;
            }
            let tid = t.tid;
            let regs = pt::get_regs(tid).map_err(|e| self.step_error(idx, "PTRACE_GETREGS", &e))?;
            if regs.is_64bit() {
                candidates.push(Candidate {
                    idx,
                    tid,
                    regs,
                    filtered: false,
                });
            }
        }
        candidates.sort_by_key(|c| (!c.regs.in_syscall(), c.tid != self.pid));
        // Seccomp modes are read lazily, in order of preference (a /proc read per thread
        // is most of the cost of choosing); threads with a filter wait until no thread
        // without one will do.
        let mut strict = None;
        let mut rseq_refusal = None;
        let mut with_filter = Vec::new();
        let mut chosen = None;
        for mut c in candidates {
            match self.proc.seccomp_mode(self.pid, Some(c.tid)) {
                Some(0) => {}
                Some(1) => {
                    strict.get_or_insert(c.tid);
                    continue;
                }
                _ => {
                    c.filtered = true;
                    with_filter.push(c);
                    continue;
                }
            }
            if let Some(ok) = rseq_checked(self.pid, c, &mut rseq_refusal) {
                chosen = Some(ok);
                break;
            }
        }
        if chosen.is_none() {
            chosen = with_filter
                .into_iter()
                .find_map(|c| rseq_checked(self.pid, c, &mut rseq_refusal));
        }
        let Some((c, saved, cs)) = chosen else {
            return Err(InjectError::Refused(match (rseq_refusal, strict) {
                (Some(r), _) => r,
                (None, Some(tid)) => Refusal::SeccompStrict { tid },
                (None, None) => Refusal::NoUsableThread,
            }));
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
            touched: false,
            stop: Stop::Event,
            to_enter: false,
            seccomp_suspended: c.filtered,
        };
        Ok((inj, insn))
    }
}

/// `c` with the registers to restore and its rseq_cs, if its rseq state allows injecting;
/// else None, with the first such refusal kept in `refusal`.
fn rseq_checked(
    pid: i32,
    c: Candidate,
    refusal: &mut Option<Refusal>,
) -> Option<(Candidate, Regs, Option<rseq::RseqCs>)> {
    match rseq::saved_regs(pid, c.tid, &c.regs) {
        Ok((saved, cs)) => Some((c, saved, cs)),
        Err(why) => {
            refusal.get_or_insert(Refusal::Rseq { tid: c.tid, why });
            None
        }
    }
}
