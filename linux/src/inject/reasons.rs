//! Why an fd was left alone ([`SkipReason`]), why a whole injection failed
//! ([`InjectError`]), and why it was declined on purpose ([`Refusal`]): typed, so callers
//! map them to stable codes, and carried across the helper's pipe exactly (see `wire`).

use std::fmt;
use std::time::Duration;

/// The hint given with a denied ptrace.
pub const PTRACE_ATTACH_HINT: &str = "injecting close() needs ptrace over the target: run as root or grant CAP_SYS_PTRACE, keep Yama ptrace_scope at 2 or less, and allow ptrace and process_vm_readv in any seccomp filter";

/// The reason given on platforms without an implementation.
pub const UNSUPPORTED_ARCH: &str = "injecting close() is implemented for x86_64 only";

use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

/// The `&'static str`s a reason or error may hold: the system calls verification names,
/// and the one unsupported-platform message. Text read back from the helper must be one of
/// them, to be the same `&'static str` again.
pub(super) const STATIC_TEXTS: [&str; 6] = [
    "pidfd_getfd",
    "fstat",
    "SO_COOKIE",
    "TCP_INFO",
    "SO_LINGER",
    UNSUPPORTED_ARCH,
];

/// `&'static str`, spelled so that serde's derive does not take it for text borrowed from
/// the message (which would make every report decodable only from `'static` input): it is
/// read back through [`static_text`] instead.
type StaticText = &'static str;

fn static_text<'de, D: Deserializer<'de>>(d: D) -> Result<StaticText, D::Error> {
    let text = String::deserialize(d)?;
    STATIC_TEXTS
        .iter()
        .find(|known| **known == text)
        .copied()
        .ok_or_else(|| serde::de::Error::custom(format!("unknown fixed text {text:?}")))
}

/// Why one fd was left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SkipReason {
    /// A negative fd number.
    InvalidFd,
    /// The same fd was listed twice; it is handled once.
    Duplicate,
    /// The fd was not open when the process was stopped.
    NotOpen,
    /// The fd now refers to another file.
    InodeChanged { found: u64, expected: u64 },
    /// The fd is not a socket any more.
    NotSocket,
    /// The fd is a socket with another SO_COOKIE: another socket that got the same inode.
    CookieChanged { found: u64, expected: u64 },
    /// The socket is not a TCP socket.
    NotTcp,
    /// Only CLOSE_WAIT or CLOSE sockets are closed.
    State(u8),
    /// SO_LINGER with a timeout: close() could block the stopped process.
    Linger(Duration),
    /// A system call used to inspect the fd failed (`call`, errno).
    Syscall {
        #[serde(deserialize_with = "static_text")]
        call: StaticText,
        errno: i32,
    },
    /// close() inside the target returned this errno.
    CloseFailed(i32),
    /// close_range() returned 0 but the fd is still open.
    StillOpen,
    /// The batch stopped before this fd was closed.
    NotClosed(InjectError),
}

impl SkipReason {
    /// Whether the fd is simply not the socket it was (the "changed" outcome), rather than
    /// a failure.
    pub fn is_change(&self) -> bool {
        matches!(
            self,
            SkipReason::NotOpen
                | SkipReason::InodeChanged { .. }
                | SkipReason::NotSocket
                | SkipReason::CookieChanged { .. }
                | SkipReason::NotTcp
                | SkipReason::State(_)
        )
    }
}

fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::InvalidFd => write!(f, "not a valid fd number"),
            SkipReason::Duplicate => write!(f, "listed more than once"),
            SkipReason::NotOpen => write!(f, "fd is not open any more"),
            SkipReason::InodeChanged { found, expected } => {
                write!(f, "changed: fd now holds inode {found}, not {expected}")
            }
            SkipReason::NotSocket => write!(f, "changed: not a socket"),
            SkipReason::CookieChanged { found, expected } => {
                write!(f, "changed: socket cookie {found}, not {expected}")
            }
            SkipReason::NotTcp => write!(f, "changed: not a TCP socket"),
            SkipReason::State(s) => write!(
                f,
                "TCP state is {}: only CLOSE_WAIT or CLOSE sockets are closed",
                crate::tcp::state_name(*s)
            ),
            SkipReason::Linger(d) => write!(
                f,
                "SO_LINGER is {d:?}: close() could block the stopped process"
            ),
            SkipReason::Syscall { call, errno } => write!(f, "{call}: {}", errno_text(*errno)),
            SkipReason::CloseFailed(errno) => {
                write!(f, "close() in the target failed: {}", errno_text(*errno))
            }
            SkipReason::StillOpen => write!(f, "still open after close_range() in the target"),
            SkipReason::NotClosed(e) => write!(f, "not closed: {e}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InjectError {
    /// Injection is not implemented for this platform.
    #[error("closing an fd inside another process is not supported here: {0}")]
    Unsupported(#[serde(deserialize_with = "static_text")] StaticText),
    /// The process exited (before or during the stop).
    #[error("the process exited")]
    Gone,
    /// ptrace or pidfd_getfd was denied; the text says what is missing.
    #[error("permission denied: {0}")]
    Permission(String),
    /// Declined on purpose; nothing was closed and the target runs as before.
    #[error("refused: {0}")]
    Refused(Refusal),
    /// A thread did not stop, or an injected call did not finish, in time. Whatever was
    /// injected was undone (registers restored, every thread detached).
    #[error("timed out: {0}")]
    Timeout(String),
    /// A ptrace or /proc step failed unexpectedly; the target was restored and detached.
    #[error("ptrace: {0}")]
    Ptrace(String),
    /// The helper process could not be started, or ended without a valid report.
    #[error("injection helper: {0}")]
    Helper(String),
}

/// Why an injection was declined before anything was closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Refusal {
    /// The target is cwreap itself (or the process that asked for the injection).
    OwnProcess,
    /// A pid that names no process (zero or negative).
    InvalidPid(i32),
    /// The fd passed as the target's pidfd is not a pidfd.
    NotPidfd,
    /// The pidfd refers to another process than the pid given.
    PidfdOfOther { pidfd_pid: i32, pid: i32 },
    /// The process is stopped by job control (SIGSTOP, Ctrl-Z); resuming it is not ours.
    JobControlStopped { tid: i32 },
    /// The injecting thread runs in seccomp strict mode, where close() would kill it.
    SeccompStrict { tid: i32 },
    /// The injecting thread has a seccomp filter that could not be suspended.
    SeccompFilter { tid: i32, why: String },
    /// The injecting thread is inside an rseq critical section that could not be aborted
    /// safely.
    Rseq { tid: i32, why: String },
    /// No thread is in a plain ptrace stop in 64-bit mode.
    NoUsableThread,
    /// No `syscall` instruction was found in the target's code to borrow.
    NoSyscallInsn,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::OwnProcess => write!(f, "cwreap never acts on its own process"),
            Refusal::InvalidPid(pid) => write!(f, "invalid pid {pid}"),
            Refusal::NotPidfd => write!(f, "the fd given is not a pidfd"),
            Refusal::PidfdOfOther { pidfd_pid, pid } => {
                write!(f, "the pidfd belongs to pid {pidfd_pid}, not {pid}")
            }
            Refusal::JobControlStopped { tid } => write!(
                f,
                "the process is stopped by job control (thread {tid}); not touching it"
            ),
            Refusal::SeccompStrict { tid } => write!(
                f,
                "thread {tid} runs in seccomp strict mode, where close() would kill it"
            ),
            Refusal::SeccompFilter { tid, why } => write!(
                f,
                "thread {tid} has a seccomp filter that could not be suspended: {why}"
            ),
            Refusal::Rseq { tid, why } => write!(
                f,
                "thread {tid} is inside an rseq critical section that could not be aborted: {why}"
            ),
            Refusal::NoUsableThread => {
                write!(f, "no thread is in a plain ptrace stop in 64-bit mode")
            }
            Refusal::NoSyscallInsn => {
                write!(f, "no syscall instruction found in the target's code")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_as_before() {
        assert_eq!(
            SkipReason::State(1).to_string(),
            "TCP state is ESTABLISHED: only CLOSE_WAIT or CLOSE sockets are closed"
        );
        assert_eq!(
            SkipReason::InodeChanged {
                found: 9,
                expected: 8
            }
            .to_string(),
            "changed: fd now holds inode 9, not 8"
        );
        assert!(SkipReason::NotOpen.is_change());
        assert!(!SkipReason::CloseFailed(libc::EBADF).is_change());
    }

    #[test]
    fn refusals_are_one_line_each() {
        let all = [
            Refusal::OwnProcess,
            Refusal::InvalidPid(-3),
            Refusal::NotPidfd,
            Refusal::PidfdOfOther {
                pidfd_pid: 7,
                pid: 8,
            },
            Refusal::JobControlStopped { tid: 9 },
            Refusal::SeccompStrict { tid: 10 },
            Refusal::SeccompFilter {
                tid: 11,
                why: "EPERM".into(),
            },
            Refusal::Rseq {
                tid: 12,
                why: "bad signature".into(),
            },
            Refusal::NoUsableThread,
            Refusal::NoSyscallInsn,
        ];
        for r in all {
            let text = InjectError::Refused(r).to_string();
            assert!(
                text.starts_with("refused: ") && !text.contains('\n'),
                "{text}"
            );
        }
        assert_eq!(
            Refusal::PidfdOfOther {
                pidfd_pid: 7,
                pid: 8
            }
            .to_string(),
            "the pidfd belongs to pid 7, not 8"
        );
    }
}
