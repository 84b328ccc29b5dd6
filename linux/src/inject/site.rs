//! Finding a `syscall` instruction in the target to borrow: nothing is ever written to the
//! target's memory, so the injected call runs through an instruction that is already there.

use super::batch::proc_error;
use super::reasons::{InjectError, Refusal};
use super::session::Session;
use crate::procfs::parse_maps_line;
use crate::sys::ptrace::{self as pt, Regs};

/// How much mapped text to search for a `syscall` instruction, at most.
const SCAN_BUDGET: u64 = 16 << 20;

impl Session {
    /// The address of an existing `syscall` instruction in the target: the one the
    /// injecting thread (or another) stopped after, else one in the vDSO or a text
    /// mapping. Every candidate is read back from the target's memory.
    pub(super) fn find_syscall_insn(&self, saved: &Regs) -> Result<u64, InjectError> {
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
        let maps = self
            .proc
            .maps_within(&crate::procfs::SlowReads::global(), self.pid)
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
        Err(InjectError::Refused(Refusal::NoSyscallInsn))
    }
}
