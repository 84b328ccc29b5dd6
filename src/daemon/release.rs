//! After a shutdown: did the owner release the fd? `released` as soon as it does,
//! `still_held` after a grace period. Still-held sockets of escalating targets are kept
//! (see [`super::escalate`]) for as long as the owner holds them.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::{info, warn};

use cwreap_linux::sys;

use super::Daemon;
use super::audit::unix_ts;
use crate::daemon::cycle_report::{CycleReport, Release};

/// A socket that cwreap shut down, watched until its owner releases the fd or the grace
/// period ends.
pub(super) struct PendingRelease {
    pub(super) target: String,
    pub(super) pid: i32,
    pub(super) fd: i32,
    pub(super) inode: u64,
    pub(super) comm: String,
    /// Shared by the sockets of one process reaped in the same cycle: one fd per process,
    /// not one per socket (thousands of reaps would otherwise exhaust our fd limit).
    pub(super) pidfd: Option<Arc<OwnedFd>>,
    pub(super) at: Instant,
}

impl Daemon {
    /// Whether the owner still holds the fd of a socket cwreap shut down: alive (through the
    /// pidfd kept since the shutdown; `without_pidfd` is the answer when there is none) and
    /// its fd still names the same socket inode.
    pub(super) fn owner_holds(&self, p: &PendingRelease, without_pidfd: bool) -> bool {
        let alive = p
            .pidfd
            .as_ref()
            .map_or(without_pidfd, |fd| sys::pidfd_alive(fd.as_fd()));
        alive && matches!(self.proc.fd_socket_inode(p.pid, p.fd), Ok(Some(i)) if i == p.inode)
    }

    /// Did owners release the fds of sockets we shut down? `released` as soon as seen;
    /// `still_held` once the grace period (one interval, at least 1 s) is over.
    pub(super) fn check_releases(&mut self, now: Instant, report: &mut CycleReport) {
        let grace = self.cfg.interval.max(Duration::from_secs(1));
        let pending = std::mem::take(&mut self.pending);
        for p in pending {
            let result = if !self.owner_holds(&p, true) {
                Release::Released
            } else if now.saturating_duration_since(p.at) >= grace {
                Release::StillHeld
            } else {
                self.pending.push(p);
                continue;
            };
            let waited_ms = now.saturating_duration_since(p.at).as_millis() as u64;
            let r = result.as_str();
            if result == Release::StillHeld {
                warn!(target = %p.target, pid = p.pid, fd = p.fd, comm = %p.comm, inode = p.inode,
                    result = r, waited_ms,
                    "owner still holds the fd of a socket cwreap shut down: the app ignores EPOLLHUP/EPIPE; fix its disconnect path or restart it");
            } else {
                info!(target = %p.target, pid = p.pid, fd = p.fd, comm = %p.comm, inode = p.inode,
                    result = r, waited_ms, "owner released the fd");
            }
            self.audit(json!({
                "ts": unix_ts(),
                "event": "fd_release",
                "target": p.target,
                "pid": p.pid,
                "fd": p.fd,
                "comm": p.comm,
                "inode": p.inode,
                "result": r,
                "waited_ms": waited_ms,
            }));
            *report
                .releases
                .entry((p.target.clone(), result))
                .or_default() += 1;
            // Escalations count the sockets a process still holds after shutdown.
            let escalates = self
                .cfg
                .targets
                .iter()
                .any(|t| t.name == p.target && t.escalate.any());
            if result == Release::StillHeld && escalates {
                self.held.push(p);
            }
        }
    }
}
