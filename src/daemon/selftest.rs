//! The start-up self-test: fail fast, with the fix in the message.

use std::os::fd::AsFd;

use tracing::warn;

use cwreap_linux::sys::{self, Capability};

use crate::shared::usage::UsageError;

/// Start-up self-test: duplicate one of our own fds through a pidfd. It proves the kernel
/// has pidfd_getfd and no seccomp filter blocks it; it also names the capability needed for
/// other users' processes when we lack it.
pub fn self_test() -> Result<(), UsageError> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .map_err(|e| UsageError(format!("self-test: cannot create a socket: {e}")))?;
    let me = sys::pidfd_open(std::process::id() as i32).map_err(|e| {
        UsageError(format!(
            "self-test: pidfd_open failed ({e}); cwreap needs Linux ≥ 5.6 and pidfd_open allowed by seccomp"
        ))
    })?;
    use std::os::fd::AsRawFd;
    let dup = sys::pidfd_getfd(me.as_fd(), sock.as_raw_fd()).map_err(|e| {
        UsageError(format!(
            "self-test: pidfd_getfd failed ({e}). It needs Linux ≥ 5.6, CAP_SYS_PTRACE for other \
users' processes, and a seccomp filter that allows it (systemd: SystemCallFilter=pidfd_getfd; \
Docker: --cap-add SYS_PTRACE)"
        ))
    })?;
    let same = sys::inode(dup.as_fd()).ok() == sys::inode(sock.as_fd()).ok();
    if !same {
        return Err(UsageError(
            "self-test: pidfd_getfd returned a different file".into(),
        ));
    }
    // Root without CAP_SYS_PTRACE (a dropped bounding set, a container) is as limited as
    // any user, so the capability is what counts, not the uid.
    if !Capability::SysPtrace.held() {
        warn!(
            "running without CAP_SYS_PTRACE: only dumpable processes of our own uid (and no more capabilities than ours) can be inspected and reaped; others are counted as permission errors each cycle. Run as root or grant it: AmbientCapabilities=CAP_SYS_PTRACE CAP_DAC_READ_SEARCH in the unit, or `setcap cap_sys_ptrace,cap_dac_read_search+ep $(command -v cwreap)`"
        );
    }
    Ok(())
}
