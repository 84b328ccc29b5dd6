//! Effects on sockets and processes, with their real implementations.
//!
//! [`Effects`] is what acting on a socket through its owner needs: pin a process, duplicate
//! one of its fds, identify the copy, shut it down; and the escalations: a signal through
//! the pin, a new fd limit. [`RealOs`] does it with pidfds (see [`crate::sys`]).
//! [`Destroy`] is what SOCK_DESTROY needs: find a socket by its exact identity and destroy
//! it; [`crate::netns::Namespaces`] is the real one. Unit tests of the decisions use
//! recording doubles; the real implementations are tested against real sockets and
//! processes.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::netlink::DiagSocket;
use crate::procfs::Limits;
use crate::sys;

/// What a duplicated fd turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub inode: u64,
    pub cookie: u64,
    pub tcp_state: u8,
}

pub trait Effects {
    /// A pinned process (a pidfd): stays bound to the same process even if its pid is reused.
    type Process;
    /// A duplicate of one of the target's fds, closed when dropped.
    type Dup;

    fn open_process(&self, pid: i32) -> io::Result<Self::Process>;
    /// Reach the process's fds through its thread `tid` from now on. Needed once the
    /// thread-group leader has exited: duplicating through the process then fails (ESRCH),
    /// while every live thread shares the fd table. Pin the thread before reading its fd
    /// table, like the process. A fake may keep this default, which changes nothing.
    fn pin_thread(&self, process: &mut Self::Process, tid: i32) -> io::Result<()> {
        let _ = (process, tid);
        Ok(())
    }
    /// Whether the process has not exited (its thread group, not one thread of it).
    fn alive(&self, process: &Self::Process) -> bool;
    fn duplicate(&self, process: &Self::Process, fd: i32) -> io::Result<Self::Dup>;
    fn identify(&self, dup: &Self::Dup) -> io::Result<Identity>;
    fn shutdown(&self, dup: &Self::Dup) -> io::Result<()>;
    /// What a duplicated socket fd is: identity, TCP state and history (tcp_info), and
    /// addresses. Errors only when it is no socket at all. Unsupported (EOPNOTSUPP) unless
    /// implemented: shutting a socket down does not need it.
    fn inspect(&self, dup: &Self::Dup) -> io::Result<SocketFacts> {
        let _ = dup;
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    /// Send `signal` to the pinned process (never to a pid reused since). Unsupported
    /// (EOPNOTSUPP) unless implemented: acting on sockets alone does not need it.
    fn signal(&self, process: &Self::Process, signal: i32) -> io::Result<()> {
        let _ = (process, signal);
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    /// Raise the soft RLIMIT_NOFILE of `pid` to `soft`, keeping the hard limit, provided
    /// the limits are still `expected` (those the decision was made on). prlimit sets both
    /// limits and returns the old ones in the same call: if they were not `expected` (the
    /// process changed them meanwhile), they are put back as found and nothing is raised.
    /// prlimit takes a pid, not a pidfd: check before and after that the pid still names
    /// the process meant. Unsupported unless implemented, as above.
    fn raise_nofile_soft(&self, pid: i32, soft: u64, expected: Limits) -> io::Result<NofileRaise> {
        let _ = (pid, soft, expected);
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
}

/// What [`Effects::raise_nofile_soft`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NofileRaise {
    /// The soft limit is raised; the hard limit is what it was.
    Raised,
    /// The limits were not the ones expected: they were put back as found (these), and
    /// nothing was raised.
    Changed(Limits),
}

/// A process pinned by [`RealOs`]: its pidfd, and once its thread-group leader has
/// exited, the pidfd of a live thread (PIDFD_THREAD) that duplication goes through. As an
/// fd it is the process's pidfd (signals, liveness, ptrace).
#[derive(Debug)]
pub struct Pinned {
    pub pidfd: OwnedFd,
    /// (tid, pidfd of that thread).
    pub thread: Option<(i32, OwnedFd)>,
}

impl AsFd for Pinned {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }
}

impl Pinned {
    /// The fd duplication goes through: the thread's when one is pinned.
    pub fn getfd_via(&self) -> BorrowedFd<'_> {
        self.thread
            .as_ref()
            .map_or(self.pidfd.as_fd(), |(_, fd)| fd.as_fd())
    }
}

/// The real thing: pidfd_open, pidfd_getfd, fstat, SO_COOKIE, TCP_INFO, shutdown.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealOs;

impl Effects for RealOs {
    type Process = Pinned;
    type Dup = OwnedFd;

    fn open_process(&self, pid: i32) -> io::Result<Pinned> {
        Ok(Pinned {
            pidfd: sys::pidfd_open(pid)?,
            thread: None,
        })
    }

    fn pin_thread(&self, process: &mut Pinned, tid: i32) -> io::Result<()> {
        process.thread = Some((tid, sys::pidfd_open_thread(tid)?));
        Ok(())
    }

    fn alive(&self, process: &Pinned) -> bool {
        sys::pidfd_alive(process.pidfd.as_fd())
    }

    fn duplicate(&self, process: &Pinned, fd: i32) -> io::Result<OwnedFd> {
        sys::pidfd_getfd(process.getfd_via(), fd)
    }

    fn identify(&self, dup: &OwnedFd) -> io::Result<Identity> {
        let inode = sys::inode(dup.as_fd())?;
        let cookie = sys::socket_cookie(dup.as_fd())?;
        let tcp_state = sys::tcp_state(dup.as_fd())?;
        Ok(Identity {
            inode,
            cookie,
            tcp_state,
        })
    }

    fn shutdown(&self, dup: &OwnedFd) -> io::Result<()> {
        sys::shutdown_rdwr(dup.as_fd())
    }

    fn inspect(&self, dup: &OwnedFd) -> io::Result<SocketFacts> {
        inspect_socket(dup.as_fd())
    }

    fn signal(&self, process: &Pinned, signal: i32) -> io::Result<()> {
        sys::pidfd_signal(process.pidfd.as_fd(), signal)
    }

    fn raise_nofile_soft(&self, pid: i32, soft: u64, expected: Limits) -> io::Result<NofileRaise> {
        let (old_soft, old_hard) = sys::prlimit_nofile(pid, Some(soft), expected.hard)?;
        let found = Limits {
            soft: old_soft,
            hard: old_hard,
        };
        if found == expected {
            return Ok(NofileRaise::Raised);
        }
        // Changed between the read and the write: undo ours at once, so the process keeps
        // the limits it set (lowering a hard limit back is always allowed).
        sys::prlimit_nofile(pid, found.soft, found.hard)?;
        Ok(NofileRaise::Changed(found))
    }
}

/// What a duplicated socket fd is, as far as `reap --close` needs to know: identity, TCP
/// state and history, and its addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFacts {
    pub inode: u64,
    pub cookie: u64,
    /// TCP_INFO of a TCP stream socket; None for any other socket.
    pub tcp: Option<sys::TcpInfo>,
    /// getsockname (None when unbound or not IP).
    pub local: Option<std::net::SocketAddr>,
    /// getpeername (None once the connection is gone, ENOTCONN).
    pub remote: Option<std::net::SocketAddr>,
}

/// Inspect a duplicated socket fd. Errors only when the fd is not a socket at all
/// (ENOTSOCK) or the first calls fail; a non-TCP socket gives `tcp: None`.
pub fn inspect_socket(fd: BorrowedFd<'_>) -> io::Result<SocketFacts> {
    let inode = sys::inode(fd)?;
    let cookie = sys::socket_cookie(fd)?;
    let tcp = if sys::is_stream_socket(fd)? {
        match sys::tcp_info(fd) {
            Ok(info) => Some(info),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOPROTOOPT | libc::EOPNOTSUPP)) => {
                None
            }
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    Ok(SocketFacts {
        inode,
        cookie,
        tcp,
        local: sys::local_addr(fd).ok().flatten(),
        remote: sys::peer_addr(fd).ok().flatten(),
    })
}

/// What SOCK_DESTROY needs: find a socket by its exact identity, and destroy it.
pub trait Destroy {
    /// The socket as the kernel sees it now (4-tuple and cookie must match), or None.
    fn lookup(&mut self, s: &DiagSocket) -> io::Result<Option<DiagSocket>>;
    fn destroy(&mut self, s: &DiagSocket) -> io::Result<()>;
    /// Prove that SOCK_DESTROY works in namespace `netns` (what a dry run of a destroy
    /// checks): EPERM means CAP_NET_ADMIN is missing, EOPNOTSUPP that the kernel has no
    /// SOCK_DESTROY.
    fn prove_destroy(&mut self, netns: u64) -> io::Result<()>;
}
