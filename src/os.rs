//! The seam between cwreap and the kernel's process/socket effects.
//!
//! [`Os`] is what acting needs: pin a process, duplicate one of its fds, identify the copy,
//! shut it down. [`RealOs`] does it with pidfds (see `sys`); tests of the loop use a
//! recording fake. The real implementation is tested against real sockets in `tests/`.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use crate::sys;

/// What a duplicated fd turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub inode: u64,
    pub cookie: u64,
    pub tcp_state: u8,
}

pub trait Os {
    /// A pinned process (a pidfd): stays bound to the same process even if its pid is reused.
    type Process;
    /// A duplicate of one of the target's fds, closed when dropped.
    type Dup;

    fn open_process(&self, pid: i32) -> io::Result<Self::Process>;
    fn alive(&self, process: &Self::Process) -> bool;
    fn duplicate(&self, process: &Self::Process, fd: i32) -> io::Result<Self::Dup>;
    fn identify(&self, dup: &Self::Dup) -> io::Result<Identity>;
    fn shutdown(&self, dup: &Self::Dup) -> io::Result<()>;
}

/// The real thing: pidfd_open, pidfd_getfd, fstat, SO_COOKIE, TCP_INFO, shutdown.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealOs;

impl Os for RealOs {
    type Process = OwnedFd;
    type Dup = OwnedFd;

    fn open_process(&self, pid: i32) -> io::Result<OwnedFd> {
        sys::pidfd_open(pid)
    }

    fn alive(&self, process: &OwnedFd) -> bool {
        sys::pidfd_alive(process.as_fd())
    }

    fn duplicate(&self, process: &OwnedFd, fd: i32) -> io::Result<OwnedFd> {
        sys::pidfd_getfd(process.as_fd(), fd)
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
}
