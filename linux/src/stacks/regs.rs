//! The registers of a thread that this process has stopped under ptrace, as [`UserRegs`]:
//! what the BPF capture reads with `bpf_task_pt_regs`, for a capture without BPF.

use std::io;

use super::UserRegs;

/// PTRACE_GETREGS.
#[cfg(target_arch = "x86_64")]
const PTRACE_GETREGS: libc::c_long = 12;

/// ip, sp and bp of thread `tid`, which this process traces and which is in a ptrace stop
/// (seized and interrupted, see [`crate::sys::ptrace`]).
#[cfg(target_arch = "x86_64")]
pub fn stopped_thread_regs(tid: i32) -> io::Result<UserRegs> {
    let mut regs = std::mem::MaybeUninit::<libc::user_regs_struct>::zeroed();
    // SAFETY: PTRACE_GETREGS writes exactly one user_regs_struct at `data`, which points to
    // a zeroed, writable one that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ptrace,
            PTRACE_GETREGS,
            tid,
            0usize,
            regs.as_mut_ptr(),
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised plain integers, filled by the kernel on success.
    let regs = unsafe { regs.assume_init() };
    Ok(UserRegs {
        ip: regs.rip,
        sp: regs.rsp,
        bp: regs.rbp,
    })
}

/// Not available off x86_64.
#[cfg(not(target_arch = "x86_64"))]
pub fn stopped_thread_regs(_tid: i32) -> io::Result<UserRegs> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}
