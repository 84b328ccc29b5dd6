//! One batch: the fds to close in one target ([`Victim`]), what came of each
//! ([`InjectReport`]), the helper process that does the work, and the entry points on
//! both sides of it.

use std::ffi::OsString;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::reasons::{InjectError, SkipReason};
pub use super::reasons::{PTRACE_ATTACH_HINT, UNSUPPORTED_ARCH};

/// One fd to close in the target, with the identity attribution saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Victim {
    pub fd: i32,
    /// Inode of the socket (fstat of a duplicate must match).
    pub inode: u64,
    /// SO_COOKIE of the socket (must match).
    pub cookie: u64,
}

/// What one injection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectReport {
    /// Fds closed in the target (close returned 0).
    pub closed: Vec<i32>,
    /// Fds left alone, with the reason.
    pub skipped: Vec<(i32, SkipReason)>,
    /// How long the target was stopped: from the first PTRACE_INTERRUPT to the last
    /// detach, in microseconds (0 when nothing had to be stopped).
    pub pause_us: u64,
    /// Threads of the target that were stopped.
    pub threads: usize,
    /// Open fds of the target (/proc/PID/fd) while stopped, before the closes.
    pub fds_before: usize,
    /// Open fds of the target while still stopped, after the closes.
    pub fds_after: usize,
}

/// The fd number at which the helper finds the target's pidfd.
pub const HELPER_PIDFD: i32 = 3;

/// How to start the injection helper: an executable and the arguments that make it run
/// [`helper_main`].
#[derive(Debug, Clone)]
pub struct Helper {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Helper {
    /// This program again (/proc/self/exe) with `args`, e.g. `["inject-helper"]`.
    pub fn this_program(args: &[&str]) -> Helper {
        Helper {
            exe: PathBuf::from("/proc/self/exe"),
            args: args.iter().map(OsString::from).collect(),
        }
    }
}

/// The victims worth stopping the target for: no negative fds, each fd once.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn prefilter(victims: &[Victim], skipped: &mut Vec<(i32, SkipReason)>) -> Vec<Victim> {
    let mut seen = std::collections::HashSet::new();
    let mut keep = Vec::with_capacity(victims.len());
    for v in victims {
        if v.fd < 0 {
            skipped.push((v.fd, SkipReason::InvalidFd));
        } else if !seen.insert(v.fd) {
            skipped.push((v.fd, SkipReason::Duplicate));
        } else {
            keep.push(*v);
        }
    }
    keep
}

/// `fds` as (first, last) runs of consecutive numbers, ascending; each fd alone unless
/// `join` (then a run may be closed with one close_range).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn runs(fds: &[i32], join: bool) -> Vec<(i32, i32)> {
    let mut sorted = fds.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<(i32, i32)> = Vec::new();
    for fd in sorted {
        match out.last_mut() {
            Some((_, last)) if join && last.checked_add(1) == Some(fd) => *last = fd,
            _ => out.push((fd, fd)),
        }
    }
    out
}

/// A failed /proc read: the process is gone, or something unexpected.
#[cfg(target_arch = "x86_64")]
pub(super) fn proc_error(pid: i32, leaf: &str, e: &std::io::Error) -> InjectError {
    if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH)) {
        InjectError::Gone
    } else {
        InjectError::Ptrace(format!("reading /proc/{pid}/{leaf}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(fd: i32) -> Victim {
        Victim {
            fd,
            inode: 1,
            cookie: 2,
        }
    }

    #[test]
    fn prefilter_drops_bad_and_repeated_fds() {
        let mut skipped = Vec::new();
        let keep = prefilter(&[v(5), v(-1), v(5), v(6)], &mut skipped);
        assert_eq!(keep, vec![v(5), v(6)]);
        assert_eq!(
            skipped,
            vec![(-1, SkipReason::InvalidFd), (5, SkipReason::Duplicate)]
        );
    }

    #[test]
    fn consecutive_fds_make_runs() {
        assert_eq!(
            runs(&[9, 3, 4, 5, 7, 10, 4], true),
            vec![(3, 5), (7, 7), (9, 10)]
        );
        assert_eq!(runs(&[4, 3], false), vec![(3, 3), (4, 4)]);
        assert_eq!(
            runs(&[i32::MAX, i32::MAX - 1], true),
            vec![(i32::MAX - 1, i32::MAX)]
        );
        assert!(runs(&[], true).is_empty());
    }

    #[test]
    fn this_program_runs_proc_self_exe() {
        let h = Helper::this_program(&["inject-helper"]);
        assert_eq!(h.exe, PathBuf::from("/proc/self/exe"));
        assert_eq!(h.args, vec![OsString::from("inject-helper")]);
    }
}
