//! Verification while the target is stopped: each fd is duplicated through the pidfd and
//! must still be the attributed socket (inode, SO_COOKIE), a TCP socket in CLOSE_WAIT or
//! CLOSE, with no SO_LINGER timeout (so close() cannot block). Nothing in the target can
//! change an fd between this check and the close: none of its threads runs.

use std::os::fd::{AsFd, BorrowedFd};

use super::batch::{PTRACE_ATTACH_HINT, Victim};
use super::reasons::{InjectError, SkipReason};
use crate::{sys, tcp};

/// Duplicate each fd and keep those that are still the attributed socket, in
/// CLOSE_WAIT or CLOSE, and that close() cannot block on. The duplicates are closed
/// before returning, so the target's close drops the last reference.
pub(super) fn verify(
    pidfd: BorrowedFd<'_>,
    victims: &[Victim],
    skipped: &mut Vec<(i32, SkipReason)>,
) -> Result<Vec<i32>, InjectError> {
    let mut ok = Vec::with_capacity(victims.len());
    for v in victims {
        let dup = match sys::pidfd_getfd(pidfd, v.fd) {
            Ok(dup) => dup,
            Err(e) => match e.raw_os_error() {
                Some(libc::ESRCH) => return Err(InjectError::Gone),
                Some(libc::EBADF) => {
                    skipped.push((v.fd, SkipReason::NotOpen));
                    continue;
                }
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    return Err(InjectError::Permission(format!(
                        "pidfd_getfd: {e}; {PTRACE_ATTACH_HINT}"
                    )));
                }
                _ => {
                    let errno = e.raw_os_error().unwrap_or(0);
                    skipped.push((
                        v.fd,
                        SkipReason::Syscall {
                            call: "pidfd_getfd",
                            errno,
                        },
                    ));
                    continue;
                }
            },
        };
        match check(dup.as_fd(), v) {
            Ok(()) => ok.push(v.fd),
            Err(why) => skipped.push((v.fd, why)),
        }
    }
    Ok(ok)
}

fn check(dup: BorrowedFd<'_>, v: &Victim) -> Result<(), SkipReason> {
    let errno = |call: &'static str, e: std::io::Error| SkipReason::Syscall {
        call,
        errno: e.raw_os_error().unwrap_or(0),
    };
    let inode = sys::inode(dup).map_err(|e| errno("fstat", e))?;
    if inode != v.inode {
        return Err(SkipReason::InodeChanged {
            found: inode,
            expected: v.inode,
        });
    }
    let cookie = sys::socket_cookie(dup).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTSOCK) => SkipReason::NotSocket,
        _ => errno("SO_COOKIE", e),
    })?;
    if cookie != v.cookie {
        return Err(SkipReason::CookieChanged {
            found: cookie,
            expected: v.cookie,
        });
    }
    let state = sys::tcp_state(dup).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOPROTOOPT) | Some(libc::EOPNOTSUPP) => SkipReason::NotTcp,
        _ => errno("TCP_INFO", e),
    })?;
    if state != tcp::CLOSE_WAIT && state != tcp::CLOSE {
        return Err(SkipReason::State(state));
    }
    match sys::socket_linger(dup) {
        Ok(Some(linger)) if !linger.is_zero() => Err(SkipReason::Linger(linger)),
        Ok(_) => Ok(()),
        Err(e) => Err(errno("SO_LINGER", e)),
    }
}
