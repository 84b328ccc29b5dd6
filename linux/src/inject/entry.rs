//! The entry points on both sides of the helper: [`close_in_target`] (cwreap's side) and
//! [`helper_main`] (the helper's side).

use std::os::fd::BorrowedFd;

#[cfg(not(target_arch = "x86_64"))]
use super::batch::UNSUPPORTED_ARCH;
use super::batch::{Helper, InjectReport, Victim};
use super::reasons::InjectError;
#[cfg(not(target_arch = "x86_64"))]
use super::wire;
#[cfg(target_arch = "x86_64")]
use super::{client, helper};

/// Close `victims` inside process `pid` (pinned by `pidfd`), each only after verifying it
/// is still the attributed socket and in CLOSE_WAIT or CLOSE. The work is done by a helper
/// process started with `helper`; see the module docs for how.
///
/// `Err` means nothing was closed (and the target is running as before), except for
/// [`InjectError::Gone`], when the process died during the stop, and
/// [`InjectError::Helper`] when the helper ended without a report. If a step fails after
/// some fds were closed, the report lists the closed ones and gives the error as the
/// reason for the others.
pub fn close_in_target(
    helper: &Helper,
    pid: i32,
    pidfd: BorrowedFd<'_>,
    victims: &[Victim],
) -> Result<InjectReport, InjectError> {
    #[cfg(target_arch = "x86_64")]
    {
        client::close_in_target(helper, pid, pidfd, victims, &[])
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (helper, pid, pidfd, victims);
        Err(InjectError::Unsupported(UNSUPPORTED_ARCH))
    }
}

/// [`close_in_target`] with extra environment variables for the helper: the test seams
/// it honours when built with the `testing` feature (see `seam`), e.g.
/// `CWREAP_INJECT_TEST_PAUSE=stopped` with `CWREAP_INJECT_TEST_DIR=DIR`.
#[cfg(all(feature = "testing", target_arch = "x86_64"))]
pub fn close_in_target_with_env(
    helper: &Helper,
    pid: i32,
    pidfd: BorrowedFd<'_>,
    victims: &[Victim],
    env: &[(&str, &str)],
) -> Result<InjectReport, InjectError> {
    client::close_in_target(helper, pid, pidfd, victims, env)
}

/// The helper's side: read the request from stdin and the pidfd from fd 3, inject, write
/// the report to stdout. Returns the process exit code (0 when a report was written, 2 for
/// a request cut short or malformed, in which case nothing was done).
pub fn helper_main() -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        helper::main()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let report = wire::encode_report(&Err(InjectError::Unsupported(UNSUPPORTED_ARCH)));
        let _ = std::io::Write::write_all(&mut std::io::stdout(), report.as_bytes());
        0
    }
}
