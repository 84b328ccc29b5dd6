//! Every raw syscall and every `unsafe` block of cwreap lives here, each with its SAFETY
//! note. The rest of the crate sees safe functions returning `io::Result`.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags};
pub mod ptrace;

/// A pidfd for `pid`. Holding it pins the identity of the process: if the process exits
/// and its pid is reused, operations on this fd fail with ESRCH instead of reaching the
/// newcomer.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// Duplicate file descriptor `fd` of the process behind `pidfd` into this process
/// (pidfd_getfd(2); needs ptrace-attach rights over the target). The copy is close-on-exec.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: i32) -> io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_getfd(
        pidfd,
        fd,
        PidfdGetfdFlags::empty(),
    )?)
}

/// Whether the process behind `pidfd` has not exited yet (signal 0 through the pidfd).
pub fn pidfd_alive(pidfd: BorrowedFd<'_>) -> bool {
    // SAFETY: pidfd_send_signal with signal 0 and a null siginfo only checks existence and
    // permission; the fd is borrowed and valid for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        return true;
    }
    // EPERM means it exists but we may not signal it; only ESRCH means gone.
    io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// setns(2) into the network namespace behind `ns` (a /proc/PID/ns/net file), for the
/// calling thread only. Needs CAP_SYS_ADMIN.
pub fn join_netns(ns: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::thread::move_into_link_name_space(
        ns,
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?)
}

/// Inode number of the file behind `fd`.
pub fn inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(rustix::fs::fstat(fd)?.st_ino)
}

/// SO_COOKIE: the kernel's unique, never reused id of a socket.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(rustix::net::sockopt::socket_cookie(fd)?)
}

/// TCP state (`tcpi_state`, the first byte of struct tcp_info) of a TCP socket.
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<u8> {
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the buffer is a zeroed tcp_info of `len` bytes that outlives the call; the
    // kernel writes at most `len` bytes and reports how many in `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len < 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "TCP_INFO returned no data",
        ));
    }
    // SAFETY: zero-initialised, and the kernel filled at least the first byte.
    Ok(unsafe { info.assume_init() }.tcpi_state)
}

/// shutdown(SHUT_RDWR): the connection closes (FIN to the peer) for every holder of the
/// socket, even though the owner keeps its fd.
pub fn shutdown_rdwr(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::net::shutdown(fd, rustix::net::Shutdown::Both)?)
}

/// Keep big per-cycle buffers out of the heap arenas: with glibc's default, the mmap
/// threshold grows after the first large free and later multi-MB vectors stay in an arena
/// that is never returned, so a daemon's RSS ratchets up. 128 KiB pins the threshold.
pub fn limit_heap_growth() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; called once at start-up before the
    // runtime spawns threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Effective capability set of this process, from the kernel (capget).
pub fn effective_caps() -> io::Result<u64> {
    let mut header = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and a two-element data array, as version 3 requires, both outlive the
    // call; the kernel writes only into `data`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;

/// Whether this process holds `cap` in its effective set.
pub fn has_cap(cap: u32) -> bool {
    effective_caps().is_ok_and(|caps| caps & (1u64 << cap) != 0)
}
