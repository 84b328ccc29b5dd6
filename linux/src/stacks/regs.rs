//! The registers of a thread that this process has stopped under ptrace, as [`UserRegs`]:
//! what the BPF capture reads with `bpf_task_pt_regs`, for a capture without BPF.

use std::io;

use super::UserRegs;

/// ip, sp and bp of thread `tid`, which this process traces and which is in a ptrace stop
/// (seized and interrupted, see [`crate::sys::ptrace`]).
#[cfg(target_arch = "x86_64")]
pub fn stopped_thread_regs(tid: i32) -> io::Result<UserRegs> {
    let regs = crate::sys::ptrace::get_regs(tid)?;
    Ok(UserRegs {
        ip: regs.ip(),
        sp: regs.sp(),
        bp: regs.bp(),
    })
}

/// Not available off x86_64.
#[cfg(not(target_arch = "x86_64"))]
pub fn stopped_thread_regs(_tid: i32) -> io::Result<UserRegs> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}
