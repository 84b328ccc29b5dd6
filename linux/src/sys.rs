//! Raw system calls: pidfds and fd duplication, socket identity (inode, SO_COOKIE, TCP_INFO),
//! shutdown, setns, capabilities. Each `unsafe` block carries its SAFETY note; callers get
//! safe functions returning `io::Result`. The ptrace calls are in [`ptrace`]; starting the
//! injection helper (fork/exec) and taking the fd it inherits are in [`spawn`].

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags};
use rustix::thread::CapabilitySet;

pub mod ptrace;
pub mod spawn;

/// A pidfd for `pid`. Holding it pins the identity of the process: if the process exits
/// and its pid is reused, operations on this fd fail with ESRCH instead of reaching the
/// newcomer.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// `PIDFD_THREAD` (include/uapi/linux/pidfd.h, Linux ≥ 6.9): a pidfd for one thread
/// rather than a thread-group leader. It has `O_EXCL`'s value; rustix has no name for it,
/// and its flag type passes unknown bits through as they are.
const PIDFD_THREAD: u32 = libc::O_EXCL as u32;

/// A pidfd for thread `tid` (pidfd_open with PIDFD_THREAD). Once a process's thread-group
/// leader has exited, pidfd_getfd through the process's pidfd fails with ESRCH (the leader
/// has no fd table any more); through a live thread's pidfd it reaches the table the
/// threads share. EINVAL on kernels before 6.9.
pub fn pidfd_open_thread(tid: i32) -> io::Result<OwnedFd> {
    let tid = Pid::from_raw(tid).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::process::pidfd_open(
        tid,
        PidfdFlags::from_bits_retain(PIDFD_THREAD),
    )?)
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

/// What TCP_INFO says about a TCP socket, the fields cwreap reads (struct tcp_info in
/// include/uapi/linux/tcp.h; the kernel may return a shorter struct, so each field is read
/// only when the length covers it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpInfo {
    /// `tcpi_state`.
    pub state: u8,
    /// `tcpi_last_ack_recv`: ms since the last ACK from the peer (0 when unknown).
    pub last_ack_recv_ms: u32,
    /// `tcpi_last_data_recv`: ms since data last arrived (or since the connection was set
    /// up): an upper bound on the time since the peer's FIN.
    pub last_data_recv_ms: u32,
    /// `tcpi_rtt`: smoothed RTT in µs; 0 for a socket that never exchanged a segment.
    pub rtt_us: u32,
    /// `tcpi_delivered`: data segments the peer acknowledged, counting the SYN/ACK
    /// exchange; 0 for a socket that was never connected. Survives FIN, RST and shutdown.
    pub delivered: u32,
}

/// Parse the bytes TCP_INFO returned (`buf` is exactly what the kernel wrote).
pub fn parse_tcp_info(buf: &[u8]) -> Option<TcpInfo> {
    use crate::tcp::{
        TCPI_DELIVERED, TCPI_LAST_ACK_RECV, TCPI_LAST_DATA_RECV, TCPI_RTT, TCPI_STATE, tcp_info_u32,
    };
    let u32_at = |off: usize| tcp_info_u32(buf, off).unwrap_or(0);
    Some(TcpInfo {
        state: *buf.get(TCPI_STATE)?,
        last_ack_recv_ms: u32_at(TCPI_LAST_ACK_RECV),
        last_data_recv_ms: u32_at(TCPI_LAST_DATA_RECV),
        rtt_us: u32_at(TCPI_RTT),
        delivered: u32_at(TCPI_DELIVERED),
    })
}

/// TCP_INFO of a TCP socket. ENOPROTOOPT/EOPNOTSUPP for a socket that is not TCP.
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    let mut buf = [0u8; 512];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the buffer is 512 writable bytes that outlive the call; the kernel writes at
    // most `len` bytes and reports how many in `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = usize::try_from(len).unwrap_or(0).min(buf.len());
    parse_tcp_info(&buf[..len])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "TCP_INFO returned no data"))
}

/// Whether the socket is a stream socket (SO_TYPE).
pub fn is_stream_socket(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(rustix::net::sockopt::socket_type(fd)? == rustix::net::SocketType::STREAM)
}

/// The local address (getsockname), for an IPv4 or IPv6 socket.
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<Option<std::net::SocketAddr>> {
    Ok(inet(rustix::net::getsockname(fd)?))
}

/// The peer's address (getpeername); ENOTCONN once the connection is gone.
pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<Option<std::net::SocketAddr>> {
    Ok(rustix::net::getpeername(fd)?.and_then(inet))
}

fn inet(a: rustix::net::SocketAddrAny) -> Option<std::net::SocketAddr> {
    std::net::SocketAddr::try_from(a).ok()
}

/// Set RLIMIT_NOFILE of process `pid` (prlimit(2); None is unlimited) and return the
/// limits it had, read in the same call. Needs matching real, effective and saved ids, or
/// CAP_SYS_RESOURCE.
pub fn prlimit_nofile(
    pid: i32,
    soft: Option<u64>,
    hard: Option<u64>,
) -> io::Result<(Option<u64>, Option<u64>)> {
    use rustix::process::{Resource, Rlimit, prlimit};
    let pid = Pid::from_raw(pid).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let old = prlimit(
        Some(pid),
        Resource::Nofile,
        Rlimit {
            current: soft,
            maximum: hard,
        },
    )?;
    Ok((old.current, old.maximum))
}

/// Send `signal` to the process behind `pidfd` (pidfd_send_signal(2)): never to another
/// process that reused the pid. Needs CAP_KILL for other users' processes.
pub fn pidfd_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    let sig = rustix::process::Signal::from_named_raw(signal)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::process::pidfd_send_signal(pidfd, sig)?)
}

/// SO_LINGER of a socket: Some(timeout) when close(2) may wait that long for unsent data.
pub fn socket_linger(fd: BorrowedFd<'_>) -> io::Result<Option<std::time::Duration>> {
    Ok(rustix::net::sockopt::socket_linger(fd)?)
}

/// shutdown(SHUT_RDWR): the connection closes (FIN to the peer) for every holder of the
/// socket, even though the owner keeps its fd.
pub fn shutdown_rdwr(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::net::shutdown(fd, rustix::net::Shutdown::Both)?)
}

/// Raise this process's soft RLIMIT_NOFILE to its hard limit (best effort).
pub fn raise_own_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
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

/// Hand heap memory that is free back to the system (glibc `malloc_trim`), e.g. after a
/// burst of short-lived allocations: glibc keeps freed chunks in its arenas otherwise, and
/// the resident size stays at the burst's peak. Elsewhere a no-op.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists, under its locks; it
    // takes no pointer from us and may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A Linux capability cwreap may need. Named so a refusal can say exactly what is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    /// Read other users' /proc/PID/fd without being their owner.
    DacReadSearch,
    /// Signal other users' processes.
    Kill,
    /// SOCK_DESTROY.
    NetAdmin,
    /// bind(2) to a port below net.ipv4.ip_unprivileged_port_start.
    NetBindService,
    /// setns(2) into another network namespace.
    SysAdmin,
    /// pidfd_getfd(2) and ptrace of other users' processes.
    SysPtrace,
    /// Raise another process's RLIMIT_NOFILE (prlimit(2)) without matching ids.
    SysResource,
}

impl Capability {
    /// The name as capabilities(7) spells it, e.g. `CAP_SYS_PTRACE`.
    pub fn name(self) -> &'static str {
        match self {
            Capability::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Capability::Kill => "CAP_KILL",
            Capability::NetAdmin => "CAP_NET_ADMIN",
            Capability::NetBindService => "CAP_NET_BIND_SERVICE",
            Capability::SysAdmin => "CAP_SYS_ADMIN",
            Capability::SysPtrace => "CAP_SYS_PTRACE",
            Capability::SysResource => "CAP_SYS_RESOURCE",
        }
    }

    fn flag(self) -> CapabilitySet {
        match self {
            Capability::DacReadSearch => CapabilitySet::DAC_READ_SEARCH,
            Capability::Kill => CapabilitySet::KILL,
            Capability::NetAdmin => CapabilitySet::NET_ADMIN,
            Capability::NetBindService => CapabilitySet::NET_BIND_SERVICE,
            Capability::SysAdmin => CapabilitySet::SYS_ADMIN,
            Capability::SysPtrace => CapabilitySet::SYS_PTRACE,
            Capability::SysResource => CapabilitySet::SYS_RESOURCE,
        }
    }

    /// Whether this process holds it in its effective set (false when unreadable).
    pub fn held(self) -> bool {
        rustix::thread::capabilities(None).is_ok_and(|c| c.effective.contains(self.flag()))
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The lowest port a process without CAP_NET_BIND_SERVICE may bind
/// (net.ipv4.ip_unprivileged_port_start of this network namespace; 1024 when unreadable,
/// the kernel's default).
pub fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// This process's effective uid.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// This process's real uid.
pub fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// Whether this process runs privileged: euid 0, or any effective capability (the shipped
/// unit runs as a transient user with ambient capabilities). When the capabilities cannot
/// be read, the answer is yes: callers use it to decide whether to be strict.
pub fn runs_privileged() -> bool {
    rustix::process::geteuid().is_root()
        || rustix::thread::capabilities(None).map_or(true, |c| !c.effective.is_empty())
}
