//! After a shutdown: did the owner release the fd? `released` as soon as it does,
//! `still_held` after a grace period. And the escalation that follows `still_held`.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::{info, warn};

use cwreap_linux::sys;

use super::Daemon;
use super::audit::unix_ts;
use crate::act::{self, ActResult, Outcome};
use crate::report::{CycleReport, Release};

/// A socket that cwreap shut down, watched until its owner releases the fd or the grace
/// period ends.
pub(super) struct PendingRelease {
    pub(super) target: String,
    pub(super) pid: i32,
    pub(super) fd: i32,
    pub(super) inode: u64,
    pub(super) cookie: u64,
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
    fn owner_holds(&self, p: &PendingRelease, without_pidfd: bool) -> bool {
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
            let escalates = self
                .cfg
                .targets
                .iter()
                .any(|t| t.name == p.target && t.escalate.is_some());
            if result == Release::StillHeld && escalates {
                self.held.push(p);
            }
        }
    }

    /// `escalate: {close_after}`: fds the owner still holds `close_after` after cwreap shut
    /// their socket down are closed inside the owner, one stop per process, each fd
    /// verified again while the process is stopped.
    pub(super) fn escalate(&mut self, now: Instant, stop: &AtomicBool, report: &mut CycleReport) {
        if self.held.is_empty() {
            return;
        }
        let mut due: BTreeMap<i32, Vec<PendingRelease>> = BTreeMap::new();
        for p in std::mem::take(&mut self.held) {
            let Some(after) = self
                .cfg
                .targets
                .iter()
                .find(|t| t.name == p.target)
                .and_then(|t| t.escalate)
                .map(|e| e.close_after)
            else {
                continue; // the target no longer escalates (reload)
            };
            // No pidfd, no injection: such an entry is dropped.
            if !self.owner_holds(&p, false) {
                continue; // released after all
            }
            if now.saturating_duration_since(p.at) >= after {
                due.entry(p.pid).or_default().push(p);
            } else {
                self.held.push(p);
            }
        }
        for (pid, batch) in due {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let Some(pidfd) = batch[0].pidfd.clone() else {
                continue;
            };
            let dry_run = self.force_dry_run
                || self
                    .cfg
                    .targets
                    .iter()
                    .find(|t| t.name == batch[0].target)
                    .is_some_and(|t| t.effective_dry_run(self.cfg.dry_run));
            let victims: Vec<cwreap_linux::inject::Victim> = batch
                .iter()
                .map(|p| cwreap_linux::inject::Victim {
                    fd: p.fd,
                    inode: p.inode,
                    cookie: p.cookie,
                })
                .collect();
            let results: Vec<(i32, ActResult)> = if dry_run {
                victims
                    .iter()
                    .map(|v| (v.fd, ActResult::ok(Outcome::DryRun)))
                    .collect()
            } else {
                let batch = cwreap_linux::inject::close_in_target(
                    &cwreap_linux::inject::Helper::this_program(&["inject-helper"]),
                    pid,
                    pidfd.as_fd(),
                    &victims,
                );
                if let Ok(r) = &batch {
                    info!(
                        pid,
                        closed = r.closed.len(),
                        skipped = r.skipped.len(),
                        pause_us = r.pause_us,
                        threads = r.threads,
                        open_fds_before = r.fds_before,
                        open_fds_after = r.fds_after,
                        "closed fds inside the owner"
                    );
                }
                let results = act::close_results(&victims, &batch);
                if results.iter().any(|(_, r)| r.outcome == Outcome::Error) {
                    report.error("inject");
                }
                results
            };
            for (fd, res) in results {
                let Some(p) = batch.iter().find(|p| p.fd == fd) else {
                    continue;
                };
                let (outcome, detail) = (res.outcome, res.detail());
                let detail_s = detail.as_deref().unwrap_or("");
                if outcome == Outcome::Error {
                    warn!(target = %p.target, pid, fd, comm = %p.comm, inode = p.inode,
                        action = "close", outcome = outcome.as_str(), dry_run, error = detail_s,
                        "injected close failed");
                } else {
                    info!(target = %p.target, pid, fd, comm = %p.comm, inode = p.inode,
                        action = "close", outcome = outcome.as_str(), dry_run, detail = detail_s,
                        "close_wait action");
                }
                self.audit(json!({
                    "ts": unix_ts(),
                    "event": "action",
                    "target": p.target,
                    "pid": pid,
                    "fd": fd,
                    "comm": p.comm,
                    "inode": p.inode,
                    "action": "close",
                    "outcome": outcome.as_str(),
                    "dry_run": dry_run,
                    "reason": res.reason.as_ref().map(crate::act::Reason::code),
                    "error": detail,
                }));
                *report
                    .outcomes
                    .entry((p.target.clone(), "close", outcome))
                    .or_default() += 1;
            }
        }
    }
}
