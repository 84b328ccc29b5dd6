//! Restartable sequences of the injecting thread. glibc >= 2.35 registers an rseq area for
//! every thread, and tcmalloc, librseq and others run per-CPU critical sections in it. A
//! thread preempted (or stopped) inside one must not resume where it was: the kernel moves
//! it to the section's abort handler on its way back to user space. But it only looks at
//! the instruction pointer of that moment: if the injected call runs first, with the
//! pointer on the borrowed `syscall` instruction, the kernel finds no section, clears
//! `rseq_cs` and aborts nothing, and the thread later commits a section that was stopped
//! half-way, across a pause of milliseconds (per-CPU data corruption).
//!
//! So before injecting, the thread's *saved* instruction pointer is moved to the abort
//! handler, as CRIU does and as the kernel itself would do. Why abort rather than refuse:
//! aborting is exactly what the section's author prepared for (any preemption does it, and
//! the handler retries), it changes nothing else, and a refusal would make every process
//! whose only usable thread spins in a section impossible to help. The thread is refused
//! ([`super::Refusal::Rseq`]) only when the abort could not be done as the kernel does it:
//! an invalid descriptor or a wrong signature (the kernel would kill the thread with
//! SIGSEGV), or an rseq area we cannot read.
//!
//! struct rseq (include/uapi/linux/rseq.h): `rseq_cs` is the u64 at offset 8, the address of
//! a struct rseq_cs `{u32 version; u32 flags; u64 start_ip; u64 post_commit_offset; u64
//! abort_ip}`. It may be stale (left set after a commit), so a thread is inside only if
//! start_ip <= ip < start_ip + post_commit_offset.

use crate::sys::ptrace::{self as pt, Regs};

/// Highest user address + 1 on x86_64 with 4-level paging (the kernel's TASK_SIZE check).
const TASK_SIZE: u64 = 0x7fff_ffff_f000;
/// Offset of `rseq_cs` in struct rseq.
const RSEQ_CS_OFFSET: u64 = 8;

/// A struct rseq_cs as read from the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RseqCs {
    pub version: u32,
    pub flags: u32,
    pub start_ip: u64,
    pub post_commit_offset: u64,
    pub abort_ip: u64,
}

impl RseqCs {
    /// Parse the 32 bytes of a struct rseq_cs (native endianness).
    pub(super) fn parse(b: &[u8; 32]) -> RseqCs {
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_ne_bytes(w)
        };
        RseqCs {
            version: u32_at(0),
            flags: u32_at(4),
            start_ip: u64_at(8),
            post_commit_offset: u64_at(16),
            abort_ip: u64_at(24),
        }
    }

    /// Whether `ip` is inside the section (the kernel's in_rseq_cs).
    pub(super) fn contains(&self, ip: u64) -> bool {
        ip.wrapping_sub(self.start_ip) < self.post_commit_offset
    }

    /// What the kernel checks before it aborts to `abort_ip` (rseq_get_rseq_cs), and the
    /// deprecated flags it now rejects.
    pub(super) fn invalid(&self) -> Option<&'static str> {
        let end = self.start_ip.checked_add(self.post_commit_offset);
        if self.version != 0 {
            Some("unknown rseq_cs version")
        } else if self.flags != 0 {
            Some("rseq_cs flags the kernel rejects")
        } else if self.start_ip >= TASK_SIZE
            || self.abort_ip >= TASK_SIZE
            || end.is_none_or(|e| e >= TASK_SIZE)
        {
            Some("rseq_cs addresses out of range")
        } else if self.contains(self.abort_ip) {
            Some("the abort handler lies inside the critical section")
        } else {
            None
        }
    }
}

/// The registers to restore in thread `tid` of `pid` after the injection: `regs`, or `regs`
/// with the instruction pointer on the abort handler if the thread stopped inside an rseq
/// critical section; and the thread's current rseq_cs, if any (the borrowed `syscall`
/// instruction must lie outside it, or the kernel would abort the injected call itself).
/// Err(why) when that cannot be done safely.
pub(super) fn saved_regs(
    pid: i32,
    tid: i32,
    regs: &Regs,
) -> Result<(Regs, Option<RseqCs>), String> {
    if !super::seam::rseq_guard() {
        return Ok((*regs, None));
    }
    let config = match pt::rseq_configuration(tid) {
        Ok(c) => c,
        // A thread stopped in a system call is not in a critical section (no system
        // call is allowed in one).
        Err(_) if regs.in_syscall() => return Ok((*regs, None)),
        Err(e) if e.raw_os_error() == Some(libc::EIO) => {
            return Err("this kernel cannot say where the thread's rseq area is \
(PTRACE_GET_RSEQ_CONFIGURATION needs Linux 5.13) and the thread is not in a system call"
                .into());
        }
        Err(e) => return Err(format!("PTRACE_GET_RSEQ_CONFIGURATION: {e}")),
    };
    if config.abi_pointer == 0 {
        return Ok((*regs, None));
    }
    let mut word = [0u8; 8];
    read_exact(pid, config.abi_pointer + RSEQ_CS_OFFSET, &mut word)
        .map_err(|e| format!("reading struct rseq at {:#x}: {e}", config.abi_pointer))?;
    let cs_addr = u64::from_ne_bytes(word);
    if cs_addr == 0 {
        return Ok((*regs, None));
    }
    let mut raw = [0u8; 32];
    read_exact(pid, cs_addr, &mut raw)
        .map_err(|e| format!("reading struct rseq_cs at {cs_addr:#x}: {e}"))?;
    let cs = RseqCs::parse(&raw);
    if !cs.contains(regs.ip()) {
        return Ok((*regs, Some(cs)));
    }
    if regs.in_syscall() {
        // Against the rules of rseq, and the kernel would adjust the instruction pointer
        // to restart the call after we moved it: not ours to sort out.
        return Err("it stopped in a system call inside its critical section".into());
    }
    if let Some(why) = cs.invalid() {
        return Err(why.into());
    }
    let mut sig = [0u8; 4];
    read_exact(pid, cs.abort_ip - 4, &mut sig)
        .map_err(|e| format!("reading the abort signature at {:#x}: {e}", cs.abort_ip - 4))?;
    if u32::from_ne_bytes(sig) != config.signature {
        return Err(format!(
            "the abort handler at {:#x} lacks the registered signature {:#x}",
            cs.abort_ip, config.signature
        ));
    }
    Ok((regs.with_ip(cs.abort_ip), Some(cs)))
}

fn read_exact(pid: i32, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
    match pt::read_memory(pid, addr, buf)? {
        n if n == buf.len() => Ok(()),
        _ => Err(std::io::Error::from_raw_os_error(libc::EFAULT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A struct rseq_cs as a librseq x86_64 section lays it out.
    fn fixture() -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&0u32.to_ne_bytes()); // version
        b[4..8].copy_from_slice(&0u32.to_ne_bytes()); // flags
        b[8..16].copy_from_slice(&0x5555_0000_1000u64.to_ne_bytes()); // start_ip
        b[16..24].copy_from_slice(&0x40u64.to_ne_bytes()); // post_commit_offset
        b[24..32].copy_from_slice(&0x5555_0000_2007u64.to_ne_bytes()); // abort_ip
        b
    }

    #[test]
    fn descriptor_is_parsed_field_by_field() {
        let cs = RseqCs::parse(&fixture());
        assert_eq!(
            cs,
            RseqCs {
                version: 0,
                flags: 0,
                start_ip: 0x5555_0000_1000,
                post_commit_offset: 0x40,
                abort_ip: 0x5555_0000_2007,
            }
        );
        assert_eq!(cs.invalid(), None);
    }

    #[test]
    fn inside_means_start_to_post_commit_exclusive() {
        let cs = RseqCs::parse(&fixture());
        assert!(!cs.contains(0x5555_0000_0fff));
        assert!(cs.contains(0x5555_0000_1000));
        assert!(cs.contains(0x5555_0000_103f));
        assert!(
            !cs.contains(0x5555_0000_1040),
            "the post-commit ip is outside"
        );
        assert!(!cs.contains(0), "no wrap-around");
    }

    #[test]
    fn descriptors_the_kernel_rejects_are_invalid() {
        let ok = RseqCs::parse(&fixture());
        let bad = [
            RseqCs { version: 1, ..ok },
            RseqCs { flags: 1, ..ok },
            RseqCs {
                abort_ip: ok.start_ip + 4,
                ..ok
            },
            RseqCs {
                post_commit_offset: u64::MAX,
                ..ok
            },
            RseqCs {
                start_ip: TASK_SIZE,
                ..ok
            },
        ];
        for cs in bad {
            assert!(cs.invalid().is_some(), "{cs:?}");
        }
    }
}
