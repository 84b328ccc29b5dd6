//! cwreap's side of an injection: quick refusals that need no helper, then start the
//! helper (see [`crate::sys::spawn::spawn_isolated`]), hand it the request, and read its
//! report within a generous guard.

use std::io::{Read, Write};
use std::os::fd::BorrowedFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::batch::{HELPER_PIDFD, Helper, InjectReport, Victim, prefilter};
use super::reasons::{InjectError, Refusal};
use super::wire::{self, Request};
use crate::procfs::ProcFs;

/// How long cwreap waits for the helper's report. The helper's own deadlines end its work
/// much sooner (about 1 s to stop the target, a few seconds per injected call, 10 s per
/// batch); this only guards against a helper that hangs for a reason nobody foresaw.
const HELPER_GUARD: Duration = Duration::from_secs(120);

/// Most bytes of report read (a report is a line per fd).
const MAX_REPORT: usize = 64 << 20;

pub(super) fn close_in_target(
    helper: &Helper,
    pid: i32,
    pidfd: BorrowedFd<'_>,
    victims: &[Victim],
    env: &[(&str, &str)],
) -> Result<InjectReport, InjectError> {
    if u32::try_from(pid).ok() == Some(std::process::id()) {
        return Err(InjectError::Refused(Refusal::OwnProcess));
    }
    if pid <= 0 {
        return Err(InjectError::Refused(Refusal::InvalidPid(pid)));
    }
    let proc = ProcFs::default();
    check_pidfd(&proc, pid, pidfd)?;
    let mut skipped = Vec::new();
    let victims = prefilter(victims, &mut skipped);
    if victims.is_empty() {
        let fds = proc
            .fd_count_fast(pid)
            .map_err(|e| super::batch::proc_error(pid, "fd", &e))?;
        return Ok(InjectReport {
            skipped,
            fds_before: fds,
            fds_after: fds,
            ..InjectReport::default()
        });
    }
    let request = Request {
        requester: i32::try_from(std::process::id()).unwrap_or(0),
        pid,
        victims,
    };
    let mut report = run_helper(helper, pidfd, &request, env)?;
    skipped.append(&mut report.skipped);
    report.skipped = skipped;
    Ok(report)
}

/// The pidfd must pin the very process `pid` names, or we would verify one process's fds
/// and close another's.
pub(super) fn check_pidfd(
    proc: &ProcFs,
    pid: i32,
    pidfd: BorrowedFd<'_>,
) -> Result<(), InjectError> {
    use std::os::fd::AsRawFd;
    let raw = pidfd.as_raw_fd();
    match proc.pidfd_pid(raw) {
        Ok(Some(p)) if p == pid => Ok(()),
        Ok(Some(-1)) => Err(InjectError::Gone),
        Ok(Some(other)) => Err(InjectError::Refused(Refusal::PidfdOfOther {
            pidfd_pid: other,
            pid,
        })),
        Ok(None) => Err(InjectError::Refused(Refusal::NotPidfd)),
        Err(e) => Err(InjectError::Ptrace(format!(
            "reading /proc/self/fdinfo/{raw}: {e}"
        ))),
    }
}

fn run_helper(
    helper: &Helper,
    pidfd: BorrowedFd<'_>,
    request: &Request,
    env: &[(&str, &str)],
) -> Result<InjectReport, InjectError> {
    let mut cmd = Command::new(&helper.exe);
    cmd.args(&helper.args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = crate::sys::spawn::spawn_isolated(&mut cmd, pidfd, HELPER_PIDFD)
        .map_err(|e| InjectError::Helper(format!("cannot start {}: {e}", helper.exe.display())))?;
    // The helper reads the whole request before it touches the target, so this write
    // cannot wait on a helper that waits on us. If it fails, the helper died: its exit
    // status below says how.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(wire::encode_request(request).as_bytes());
    }
    let deadline = Instant::now() + HELPER_GUARD;
    let text = match read_report(&mut child, deadline) {
        Ok(text) => text,
        Err(e) => {
            reap_later(child);
            return Err(e);
        }
    };
    let status = match wait_exit(&mut child, deadline) {
        Some(status) => status,
        None => {
            reap_later(child);
            return Err(InjectError::Helper(
                "it reported but did not exit; left running".into(),
            ));
        }
    };
    match wire::decode_report(&text) {
        Ok(result) => result,
        Err(why) if text.is_empty() => Err(InjectError::Helper(format!(
            "it ended ({status}) without a report ({why}); if it was killed during the \
injection, some fds may have been closed"
        ))),
        Err(why) => Err(InjectError::Helper(format!(
            "unreadable report ({why}); it ended with {status}"
        ))),
    }
}

/// The helper's stdout up to EOF, or a timeout past `deadline`.
fn read_report(child: &mut Child, deadline: Instant) -> Result<String, InjectError> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let Some(mut stdout) = child.stdout.take() else {
        return Err(InjectError::Helper("no pipe from the helper".into()));
    };
    let mut text = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(InjectError::Timeout(format!(
                "the injection helper (pid {}) did not report within {HELPER_GUARD:?}; it \
was left to finish on its own",
                child.id()
            )));
        }
        let timeout = Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(&stdout, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(InjectError::Helper(format!("poll: {e}"))),
        }
        match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                text.extend_from_slice(&buf[..n]);
                if text.len() > MAX_REPORT {
                    return Err(InjectError::Helper("report too long".into()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(InjectError::Helper(format!("reading the report: {e}"))),
        }
    }
    String::from_utf8(text).map_err(|_| InjectError::Helper("report is not UTF-8".into()))
}

/// The helper's exit status, once it exits (it does right after its report), or None past
/// `deadline` plus a few seconds.
fn wait_exit(child: &mut Child, deadline: Instant) -> Option<std::process::ExitStatus> {
    let until = deadline.max(Instant::now()) + Duration::from_secs(5);
    let mut pause = Duration::from_micros(50);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < until => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            _ => return None,
        }
    }
}

/// Collect a helper that outlives our wait, so it never lingers as a zombie. Never kill
/// it: it may be holding a thread of the target with injected registers.
fn reap_later(mut child: Child) {
    let spawned = std::thread::Builder::new()
        .name("cwreap-reap-helper".into())
        .spawn(move || {
            let _ = child.wait();
        });
    // Without a thread the child is collected when cwreap exits.
    drop(spawned);
}
