//! Raw ptrace(2), waitpid(2), tgkill(2) and process_vm_readv(2), and the x86_64 register
//! file, for injecting a close(2) into a stopped process (see [`crate::inject`]). Every
//! `unsafe` block carries its SAFETY note; callers get safe functions returning `io::Result`.
//!
//! Request numbers are the kernel's ABI (include/uapi/linux/ptrace.h), spelled out here
//! because libc types them differently per C library. There is deliberately no
//! PTRACE_SINGLESTEP: a step leaves the trap flag armed, and a tracer that dies before the
//! thread is resumed another way leaves it to die of SIGTRAP. Injected calls run with
//! [`syscall`] instead, which arms nothing in the thread.

use std::io;

const PTRACE_CONT: libc::c_long = 7;
#[cfg(target_arch = "x86_64")]
const PTRACE_GETREGS: libc::c_long = 12;
#[cfg(target_arch = "x86_64")]
const PTRACE_SETREGS: libc::c_long = 13;
const PTRACE_DETACH: libc::c_long = 17;
const PTRACE_SYSCALL: libc::c_long = 24;
const PTRACE_SETOPTIONS: libc::c_long = 0x4200;
const PTRACE_SEIZE: libc::c_long = 0x4206;
const PTRACE_INTERRUPT: libc::c_long = 0x4207;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_long = 0x420f;

/// Syscall stops report SIGTRAP | 0x80, so they cannot be mistaken for a real SIGTRAP.
pub const PTRACE_O_TRACESYSGOOD: usize = 1;
/// Seccomp filters of the tracee are not applied while this option is set (needs
/// CAP_SYS_ADMIN, a tracer not itself under seccomp, and CONFIG_CHECKPOINT_RESTORE).
pub const PTRACE_O_SUSPEND_SECCOMP: usize = 1 << 21;

/// `status >> 16` of a stop caused by PTRACE_INTERRUPT or a group-stop of a seized tracee.
pub const PTRACE_EVENT_STOP: i32 = 128;
/// WSTOPSIG of a syscall-enter-stop or syscall-exit-stop under PTRACE_O_TRACESYSGOOD.
pub const SYSCALL_STOP: i32 = libc::SIGTRAP | 0x80;

fn ptrace(request: libc::c_long, tid: i32, addr: usize, data: usize) -> io::Result<()> {
    // SAFETY: every request issued through this helper (SEIZE, INTERRUPT, DETACH, CONT,
    // SYSCALL, SETOPTIONS) takes plain integers for addr and data; none of them
    // dereferences a pointer in our address space.
    let rc = unsafe { libc::syscall(libc::SYS_ptrace, request, tid, addr, data) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// PTRACE_SEIZE with PTRACE_O_TRACESYSGOOD: become the tracer of thread `tid` without
/// stopping it and without queueing a SIGSTOP, so if this tracer dies the kernel detaches
/// and the thread runs on as if nothing happened.
pub fn seize(tid: i32) -> io::Result<()> {
    ptrace(PTRACE_SEIZE, tid, 0, PTRACE_O_TRACESYSGOOD)
}

/// PTRACE_SETOPTIONS on a stopped tracee (replaces all options).
pub fn set_options(tid: i32, options: usize) -> io::Result<()> {
    ptrace(PTRACE_SETOPTIONS, tid, 0, options)
}

/// PTRACE_SYSCALL: resume a stopped thread until its next syscall-enter-stop or
/// syscall-exit-stop, delivering `signal` (0 for none).
pub fn syscall(tid: i32, signal: i32) -> io::Result<()> {
    ptrace(PTRACE_SYSCALL, tid, 0, usize::try_from(signal).unwrap_or(0))
}

/// PTRACE_CONT: resume a stopped thread, delivering `signal` (0 for none).
pub fn cont(tid: i32, signal: i32) -> io::Result<()> {
    ptrace(PTRACE_CONT, tid, 0, usize::try_from(signal).unwrap_or(0))
}

/// PTRACE_INTERRUPT: ask a seized thread to stop (a blocking system call is interrupted and
/// restarted later, as for any stop). The stop is reported through [`wait_nohang`].
pub fn interrupt(tid: i32) -> io::Result<()> {
    ptrace(PTRACE_INTERRUPT, tid, 0, 0)
}

/// PTRACE_DETACH: let a stopped thread run again, delivering `signal` (0 for none).
pub fn detach(tid: i32, signal: i32) -> io::Result<()> {
    ptrace(PTRACE_DETACH, tid, 0, usize::try_from(signal).unwrap_or(0))
}

/// Where a stopped thread's rseq area is (PTRACE_GET_RSEQ_CONFIGURATION, Linux >= 5.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RseqConfig {
    /// Address of the thread's struct rseq; 0 when it registered none.
    pub abi_pointer: u64,
    pub abi_size: u32,
    /// The signature every abort handler must be preceded by.
    pub signature: u32,
}

/// struct ptrace_rseq_configuration (include/uapi/linux/ptrace.h).
#[repr(C)]
#[derive(Default)]
struct RawRseqConfiguration {
    rseq_abi_pointer: u64,
    rseq_abi_size: u32,
    signature: u32,
    flags: u32,
    pad: u32,
}

/// PTRACE_GET_RSEQ_CONFIGURATION of a stopped thread. EIO before Linux 5.13.
pub fn rseq_configuration(tid: i32) -> io::Result<RseqConfig> {
    let mut raw = RawRseqConfiguration::default();
    let size = std::mem::size_of::<RawRseqConfiguration>();
    // SAFETY: the kernel writes at most `size` bytes (addr) at `data`, which points to a
    // writable, initialised RawRseqConfiguration of exactly that size that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ptrace,
            PTRACE_GET_RSEQ_CONFIGURATION,
            tid,
            size,
            &mut raw as *mut RawRseqConfiguration,
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(RseqConfig {
        abi_pointer: raw.rseq_abi_pointer,
        abi_size: raw.rseq_abi_size,
        signature: raw.signature,
    })
}

/// What waitpid reported about a traced thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// In a ptrace stop: `signal` is WSTOPSIG, `event` is `status >> 16`
    /// ([`PTRACE_EVENT_STOP`] for an interrupt or group-stop, 0 for a signal-delivery-stop
    /// or, with `signal` == [`SYSCALL_STOP`], a syscall stop).
    Stopped { signal: i32, event: i32 },
    /// The thread exited or was killed.
    Exited,
}

/// waitpid(tid, __WALL | WNOHANG): the thread's new state, or None if it has not changed.
pub fn wait_nohang(tid: i32) -> io::Result<Option<Wait>> {
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a valid, writable c_int for the duration of the call.
    let rc = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
    if rc == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(None);
        }
        return Err(e);
    }
    if rc == 0 {
        return Ok(None);
    }
    if libc::WIFSTOPPED(status) {
        return Ok(Some(Wait::Stopped {
            signal: libc::WSTOPSIG(status),
            event: (status >> 16) & 0xff,
        }));
    }
    // WIFEXITED or WIFSIGNALED; nothing else is reported without WCONTINUED.
    Ok(Some(Wait::Exited))
}

/// tgkill(2): send `signal` to one thread of `pid` (to hand back a signal that arrived while
/// the thread ran an injected system call).
pub fn tgkill(pid: i32, tid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: plain integer arguments; no memory is passed.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Block SIGCHLD in the calling thread. A tracer is sent SIGCHLD at every stop and exit of
/// its tracees; blocked, it stays pending (a blocked signal is never discarded), so
/// [`wait_sigchld`] can sleep until the next one instead of polling.
pub fn block_sigchld() -> io::Result<()> {
    let set = sigchld_set();
    // SAFETY: pthread_sigmask reads `set`, an initialised sigset_t on our stack that
    // outlives the call, and writes no old mask (null).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Wait up to `timeout` for a SIGCHLD (blocked with [`block_sigchld`]) and consume it.
/// Returns whether one came. Several stops may share one SIGCHLD: callers check every
/// tracee they wait for after each return.
pub fn wait_sigchld(timeout: std::time::Duration) -> bool {
    let set = sigchld_set();
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(i32::try_from(timeout.subsec_nanos()).unwrap_or(0)),
    };
    // SAFETY: sigtimedwait reads `set` and `ts`, both initialised and on our stack for the
    // whole call, and writes no siginfo (null).
    let rc = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    rc == libc::SIGCHLD
}

/// The signal set that holds SIGCHLD alone.
fn sigchld_set() -> libc::sigset_t {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: sigemptyset writes only into `set`, a zeroed, writable sigset_t on our stack.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: sigaddset writes only into `set`, which sigemptyset initialised just above;
    // SIGCHLD is a valid signal number, so nothing is left half-done.
    unsafe { libc::sigaddset(set.as_mut_ptr(), libc::SIGCHLD) };
    // SAFETY: a sigset_t is plain integers: zeroed at creation, then filled by
    // sigemptyset and sigaddset, so every byte is initialised.
    unsafe { set.assume_init() }
}

/// Read `buf.len()` bytes of the memory of `pid` at `addr` (process_vm_readv; needs ptrace
/// access). Returns how many bytes were read: fewer at the end of a mapping.
pub fn read_memory(pid: i32, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    let Ok(remote_base) = usize::try_from(addr) else {
        return Err(io::Error::from_raw_os_error(libc::EFAULT));
    };
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: remote_base as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, which is valid and writable for its length and
    // outlives the call; `remote` is an address in the other process, which the kernel
    // checks (EFAULT) and never dereferences in ours.
    let rc = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(rc).unwrap_or(0))
}

/// The bytes of the x86_64 `syscall` instruction.
#[cfg(target_arch = "x86_64")]
pub const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];
/// Its length: after it executes, rip is this much further.
#[cfg(target_arch = "x86_64")]
pub const SYSCALL_INSN_LEN: u64 = 2;
/// __NR_close on x86_64.
#[cfg(target_arch = "x86_64")]
pub const NR_CLOSE: u64 = 3;
/// __NR_close_range on x86_64 (Linux >= 5.9).
#[cfg(target_arch = "x86_64")]
pub const NR_CLOSE_RANGE: u64 = 436;

/// The general-purpose registers of a stopped thread (struct user_regs_struct).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct Regs(libc::user_regs_struct);

#[cfg(target_arch = "x86_64")]
impl std::fmt::Debug for Regs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Regs")
            .field("rip", &format_args!("{:#x}", self.0.rip))
            .field("rax", &(self.0.rax as i64))
            .field("orig_rax", &(self.0.orig_rax as i64))
            .field("cs", &format_args!("{:#x}", self.0.cs))
            .finish_non_exhaustive()
    }
}

#[cfg(target_arch = "x86_64")]
impl Regs {
    /// User code segment selector of 64-bit mode (__USER_CS).
    const USER_CS_64: u64 = 0x33;

    /// The instruction pointer.
    pub fn ip(&self) -> u64 {
        self.0.rip
    }

    /// The stack pointer.
    pub fn sp(&self) -> u64 {
        self.0.rsp
    }

    /// The frame pointer (rbp).
    pub fn bp(&self) -> u64 {
        self.0.rbp
    }

    /// These registers with the instruction pointer at `ip` (an rseq abort handler).
    pub fn with_ip(&self, ip: u64) -> Regs {
        let mut r = self.0;
        r.rip = ip;
        Regs(r)
    }

    /// orig_rax: the number of the system call the thread is in, or -1.
    pub fn syscall_nr(&self) -> i64 {
        self.0.orig_rax as i64
    }

    /// Whether the thread stopped inside a system call: orig_rax holds its number (it is -1
    /// otherwise), and rip points just past the `syscall` instruction.
    pub fn in_syscall(&self) -> bool {
        (self.0.orig_rax as i64) >= 0
    }

    /// Whether the thread runs 64-bit code (a 32-bit compat thread has another ABI).
    pub fn is_64bit(&self) -> bool {
        self.0.cs == Self::USER_CS_64
    }

    /// These registers, changed so that resuming at `insn` (a `syscall` instruction) runs
    /// system call `nr` with its first three arguments `args`. orig_rax = -1 tells the
    /// kernel the thread is not in a system call, so it does not try to restart the
    /// interrupted one on the way out of the stop.
    pub fn for_syscall(&self, insn: u64, nr: u64, args: [u64; 3]) -> Regs {
        let mut r = self.0;
        r.rip = insn;
        r.rax = nr;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.orig_rax = u64::MAX;
        Regs(r)
    }

    /// These registers with orig_rax = -1: resumed from a syscall-enter-stop, the kernel
    /// then skips the system call and leaves rax as it is.
    pub fn skipping_syscall(&self) -> Regs {
        let mut r = self.0;
        r.orig_rax = u64::MAX;
        Regs(r)
    }

    /// The return value of the system call that just ran: >= 0 or -errno.
    pub fn syscall_result(&self) -> i64 {
        self.0.rax as i64
    }

    /// Every field equal (the kernel gave back exactly what was set).
    pub fn same_as(&self, other: &Regs) -> bool {
        Self::fields(&self.0) == Self::fields(&other.0)
    }

    fn fields(r: &libc::user_regs_struct) -> [u64; 27] {
        [
            r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx,
            r.rdx, r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base,
            r.gs_base, r.ds, r.es, r.fs, r.gs,
        ]
    }
}

/// PTRACE_GETREGS of a stopped thread.
#[cfg(target_arch = "x86_64")]
pub fn get_regs(tid: i32) -> io::Result<Regs> {
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
    Ok(Regs(unsafe { regs.assume_init() }))
}

/// PTRACE_SETREGS of a stopped thread.
#[cfg(target_arch = "x86_64")]
pub fn set_regs(tid: i32, regs: &Regs) -> io::Result<()> {
    // SAFETY: PTRACE_SETREGS only reads one user_regs_struct at `data`, which points to an
    // initialised one that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ptrace,
            PTRACE_SETREGS,
            tid,
            0usize,
            &regs.0 as *const libc::user_regs_struct,
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
