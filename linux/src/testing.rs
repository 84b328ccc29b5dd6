//! Helpers for cwreap's own tests and benchmarks that need `unsafe` (code run in a child
//! between fork and exec). Compiled only with the `testing` feature.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Run `cmd` under a seccomp filter that answers system call `nr` with `verdict` (e.g.
/// `SECCOMP_RET_ERRNO | EPERM`, as a container runtime's or a unit's syscall filter would,
/// or `SECCOMP_RET_KILL_PROCESS`). Every other call, and every other ABI, is allowed.
#[cfg(target_arch = "x86_64")]
pub fn filter_syscall(cmd: &mut Command, nr: libc::c_long, verdict: u32) {
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let nr = u32::try_from(nr).unwrap_or(u32::MAX);
    let filter = [
        insn(LD_W_ABS, 0, 0, 4),              // A = seccomp_data.arch
        insn(JEQ_K, 0, 3, AUDIT_ARCH_X86_64), // another ABI: allow
        insn(LD_W_ABS, 0, 0, 0),              // A = seccomp_data.nr
        insn(JEQ_K, 0, 1, nr),
        insn(RET_K, 0, 0, verdict),
        insn(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    // Runs in the child between fork and exec: two prctl calls, no allocation, no lock.
    let in_child = move || {
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr().cast_mut(),
        };
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only and touches no memory of
        // ours.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: PR_SET_SECCOMP reads the sock_fprog at `&prog` and the `filter` array it
        // points to, both on this closure's stack for the whole call; the kernel copies
        // the program and keeps no pointer to either.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: pre_exec runs `in_child` in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes two prctl(2) system calls with a
    // filter that lives on its own stack, allocates nothing and takes no lock.
    unsafe { cmd.pre_exec(in_child) };
}

/// Have the child killed (SIGKILL) when the thread that spawned it dies, so a fixture or
/// daemon never outlives a test or benchmark that crashed.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: between fork and exec only async-signal-safe calls are allowed; this is one
    // prctl(2) system call, no allocation and no lock.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
}
