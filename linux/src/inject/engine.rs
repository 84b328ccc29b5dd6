//! The injection itself, run inside the helper: refuse what must not be touched, stop
//! every thread, verify, close through one thread, restore, let go (steps in the module
//! docs of [`crate::inject`]).

use std::os::fd::BorrowedFd;

use super::batch::{InjectReport, prefilter, proc_error};
use super::reasons::{InjectError, Refusal, SkipReason};
use super::session::{Session, State};
use super::wire::Request;
use super::{seam, verify};
use crate::procfs::ProcFs;

pub(super) fn run(req: &Request, pidfd: BorrowedFd<'_>) -> Result<InjectReport, InjectError> {
    let pid = req.pid;
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let parent = i32::try_from(std::os::unix::process::parent_id()).unwrap_or(0);
    // Neither the helper, nor whoever asked, nor the helper's parent: stopping the
    // process that waits for our report would only end in a timeout, or worse.
    if pid == me || pid == req.requester || pid == parent {
        return Err(InjectError::Refused(Refusal::OwnProcess));
    }
    if pid <= 0 {
        return Err(InjectError::Refused(Refusal::InvalidPid(pid)));
    }
    let proc = ProcFs::default();
    super::client::check_pidfd(&proc, pid, pidfd)?;
    let mut report = InjectReport::default();
    let victims = prefilter(&req.victims, &mut report.skipped);
    if victims.is_empty() {
        report.fds_before = fd_count(&proc, pid)?;
        report.fds_after = report.fds_before;
        return Ok(report);
    }

    // Tracee stops are awaited on SIGCHLD rather than by polling (see session::backoff).
    crate::sys::ptrace::block_sigchld()
        .map_err(|e| InjectError::Ptrace(format!("blocking SIGCHLD: {e}")))?;
    let mut session = Session::new(pid);
    let started = session.stop_all()?;
    report.threads = session.stopped_threads();
    seam::step("stopped");

    // The pid could only have been reused if the pidfd's process is gone.
    if !crate::sys::pidfd_alive(pidfd) {
        return Err(InjectError::Gone);
    }
    if let Some(tid) = session.first_in(State::GroupStopped) {
        return Err(InjectError::Refused(Refusal::JobControlStopped { tid }));
    }
    report.fds_before = fd_count(&proc, pid)?;
    let verified = verify::verify(pidfd, &victims, &mut report.skipped)?;
    if !verified.is_empty()
        && let Err(e) = session.close_fds(&verified, &mut report)
    {
        // A thread left with changed registers, or a dead process, is an error
        // whatever was closed before.
        if matches!(e, InjectError::Gone) || session.regs_changed() || report.closed.is_empty() {
            return Err(e);
        }
        for fd in verified {
            let handled = report.closed.contains(&fd)
                || report.skipped.iter().any(|(skipped, _)| *skipped == fd);
            if !handled {
                report.skipped.push((fd, SkipReason::NotClosed(e.clone())));
            }
        }
    }
    report.fds_after = fd_count(&proc, pid)?;
    session.detach_all()?;
    report.pause_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    seam::step("detached");
    Ok(report)
}

fn fd_count(proc: &ProcFs, pid: i32) -> Result<usize, InjectError> {
    proc.fd_count_fast(pid)
        .map_err(|e| proc_error(pid, "fd", &e))
}
