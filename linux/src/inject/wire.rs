//! What cwreap and its injection helper say to each other, one item per line of text.
//!
//! Request (cwreap → helper's stdin), ended by `end` so that a request cut short by the
//! death of cwreap is recognised and nothing is done:
//! ```text
//! cwreap-inject-request 1
//! requester 4242          (the pid of the process asking: never a target)
//! pid 5151                (the target; its pidfd is the helper's fd 3)
//! victim 7 183920 4103    (fd inode cookie, once per fd)
//! end
//! ```
//! Report (helper's stdout → cwreap), ended by `ok` or by one `error` line:
//! ```text
//! cwreap-inject-report 1
//! closed 7
//! skipped 9 inode_changed 1234 183922
//! pause_us 812
//! threads 4
//! fds_before 40
//! fds_after 39
//! ok
//! ```
//! Reasons and errors are a snake_case word and their fields; free text comes last on its
//! line, with `\`, CR and LF escaped, so every [`SkipReason`], [`InjectError`] and
//! [`Refusal`] comes back exactly as it was.

use std::time::Duration;

use super::batch::{InjectReport, UNSUPPORTED_ARCH, Victim};
use super::reasons::{InjectError, Refusal, SkipReason};

const REQUEST_HEADER: &str = "cwreap-inject-request 1";
const REPORT_HEADER: &str = "cwreap-inject-report 1";

/// The `&'static str`s a reason or error may hold: the system calls verification names,
/// and the one unsupported-platform message.
const STATIC_TEXTS: [&str; 6] = [
    "pidfd_getfd",
    "fstat",
    "SO_COOKIE",
    "TCP_INFO",
    "SO_LINGER",
    UNSUPPORTED_ARCH,
];

/// What the helper is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Request {
    /// The process that asked: refused as a target, like the helper itself.
    pub requester: i32,
    pub pid: i32,
    pub victims: Vec<Victim>,
}

pub(super) fn encode_request(r: &Request) -> String {
    let mut s = format!(
        "{REQUEST_HEADER}\nrequester {}\npid {}\n",
        r.requester, r.pid
    );
    for v in &r.victims {
        s.push_str(&format!("victim {} {} {}\n", v.fd, v.inode, v.cookie));
    }
    s.push_str("end\n");
    s
}

pub(super) fn decode_request(text: &str) -> Result<Request, String> {
    let mut lines = text.lines();
    if lines.next() != Some(REQUEST_HEADER) {
        return Err("not an injection request (wrong header)".into());
    }
    let mut requester = None;
    let mut pid = None;
    let mut victims = Vec::new();
    for line in lines {
        let mut w = Words::new(line);
        match w.word()? {
            "requester" => requester = Some(w.num()?),
            "pid" => pid = Some(w.num()?),
            "victim" => victims.push(Victim {
                fd: w.num()?,
                inode: w.num()?,
                cookie: w.num()?,
            }),
            "end" => {
                return Ok(Request {
                    requester: requester.ok_or("no requester line")?,
                    pid: pid.ok_or("no pid line")?,
                    victims,
                });
            }
            other => return Err(format!("unknown request line {other:?}")),
        }
        w.end()?;
    }
    Err("the request ended before its `end` line".into())
}

pub(super) fn encode_report(result: &Result<InjectReport, InjectError>) -> String {
    let mut s = format!("{REPORT_HEADER}\n");
    match result {
        Ok(r) => {
            for fd in &r.closed {
                s.push_str(&format!("closed {fd}\n"));
            }
            for (fd, why) in &r.skipped {
                s.push_str(&format!("skipped {fd} {}\n", encode_skip(why)));
            }
            s.push_str(&format!(
                "pause_us {}\nthreads {}\nfds_before {}\nfds_after {}\nok\n",
                r.pause_us, r.threads, r.fds_before, r.fds_after
            ));
        }
        Err(e) => s.push_str(&format!("error {}\n", encode_error(e))),
    }
    s
}

pub(super) fn decode_report(text: &str) -> Result<Result<InjectReport, InjectError>, String> {
    let mut lines = text.lines();
    if lines.next() != Some(REPORT_HEADER) {
        return Err("no report header".into());
    }
    let mut r = InjectReport::default();
    for line in lines {
        let mut w = Words::new(line);
        match w.word()? {
            "closed" => r.closed.push(w.num()?),
            "skipped" => {
                let fd = w.num()?;
                r.skipped.push((fd, decode_skip(&mut w)?));
            }
            "pause_us" => r.pause_us = w.num()?,
            "threads" => r.threads = w.num()?,
            "fds_before" => r.fds_before = w.num()?,
            "fds_after" => r.fds_after = w.num()?,
            "ok" => return Ok(Ok(r)),
            "error" => {
                let e = decode_error(&mut w)?;
                w.end()?;
                return Ok(Err(e));
            }
            other => return Err(format!("unknown report line {other:?}")),
        }
        w.end()?;
    }
    Err("the report ended before its `ok` or `error` line".into())
}

fn encode_skip(why: &SkipReason) -> String {
    match why {
        SkipReason::InvalidFd => "invalid_fd".into(),
        SkipReason::Duplicate => "duplicate".into(),
        SkipReason::NotOpen => "not_open".into(),
        SkipReason::InodeChanged { found, expected } => {
            format!("inode_changed {found} {expected}")
        }
        SkipReason::NotSocket => "not_socket".into(),
        SkipReason::CookieChanged { found, expected } => {
            format!("cookie_changed {found} {expected}")
        }
        SkipReason::NotTcp => "not_tcp".into(),
        SkipReason::State(s) => format!("state {s}"),
        SkipReason::Linger(d) => format!("linger {} {}", d.as_secs(), d.subsec_nanos()),
        SkipReason::Syscall { call, errno } => format!("syscall {errno} {}", escape(call)),
        SkipReason::CloseFailed(errno) => format!("close_failed {errno}"),
        SkipReason::StillOpen => "still_open".into(),
        SkipReason::NotClosed(e) => format!("not_closed {}", encode_error(e)),
    }
}

fn decode_skip(w: &mut Words<'_>) -> Result<SkipReason, String> {
    Ok(match w.word()? {
        "invalid_fd" => SkipReason::InvalidFd,
        "duplicate" => SkipReason::Duplicate,
        "not_open" => SkipReason::NotOpen,
        "inode_changed" => SkipReason::InodeChanged {
            found: w.num()?,
            expected: w.num()?,
        },
        "not_socket" => SkipReason::NotSocket,
        "cookie_changed" => SkipReason::CookieChanged {
            found: w.num()?,
            expected: w.num()?,
        },
        "not_tcp" => SkipReason::NotTcp,
        "state" => SkipReason::State(w.num()?),
        "linger" => SkipReason::Linger(Duration::new(w.num()?, w.num()?)),
        "syscall" => {
            let errno = w.num()?;
            SkipReason::Syscall {
                call: static_text(&w.text()?)?,
                errno,
            }
        }
        "close_failed" => SkipReason::CloseFailed(w.num()?),
        "still_open" => SkipReason::StillOpen,
        "not_closed" => SkipReason::NotClosed(decode_error(w)?),
        other => return Err(format!("unknown skip reason {other:?}")),
    })
}

fn encode_error(e: &InjectError) -> String {
    match e {
        InjectError::Unsupported(text) => format!("unsupported {}", escape(text)),
        InjectError::Gone => "gone".into(),
        InjectError::Permission(text) => format!("permission {}", escape(text)),
        InjectError::Refused(r) => format!("refused {}", encode_refusal(r)),
        InjectError::Timeout(text) => format!("timeout {}", escape(text)),
        InjectError::Ptrace(text) => format!("ptrace {}", escape(text)),
        InjectError::Helper(text) => format!("helper {}", escape(text)),
    }
}

fn decode_error(w: &mut Words<'_>) -> Result<InjectError, String> {
    Ok(match w.word()? {
        "unsupported" => InjectError::Unsupported(static_text(&w.text()?)?),
        "gone" => InjectError::Gone,
        "permission" => InjectError::Permission(w.text()?),
        "refused" => InjectError::Refused(decode_refusal(w)?),
        "timeout" => InjectError::Timeout(w.text()?),
        "ptrace" => InjectError::Ptrace(w.text()?),
        "helper" => InjectError::Helper(w.text()?),
        other => return Err(format!("unknown error kind {other:?}")),
    })
}

fn encode_refusal(r: &Refusal) -> String {
    match r {
        Refusal::OwnProcess => "own_process".into(),
        Refusal::InvalidPid(pid) => format!("invalid_pid {pid}"),
        Refusal::NotPidfd => "not_pidfd".into(),
        Refusal::PidfdOfOther { pidfd_pid, pid } => format!("pidfd_of_other {pidfd_pid} {pid}"),
        Refusal::JobControlStopped { tid } => format!("job_control_stopped {tid}"),
        Refusal::SeccompStrict { tid } => format!("seccomp_strict {tid}"),
        Refusal::SeccompFilter { tid, why } => format!("seccomp_filter {tid} {}", escape(why)),
        Refusal::Rseq { tid, why } => format!("rseq {tid} {}", escape(why)),
        Refusal::NoUsableThread => "no_usable_thread".into(),
        Refusal::NoSyscallInsn => "no_syscall_insn".into(),
    }
}

fn decode_refusal(w: &mut Words<'_>) -> Result<Refusal, String> {
    Ok(match w.word()? {
        "own_process" => Refusal::OwnProcess,
        "invalid_pid" => Refusal::InvalidPid(w.num()?),
        "not_pidfd" => Refusal::NotPidfd,
        "pidfd_of_other" => Refusal::PidfdOfOther {
            pidfd_pid: w.num()?,
            pid: w.num()?,
        },
        "job_control_stopped" => Refusal::JobControlStopped { tid: w.num()? },
        "seccomp_strict" => Refusal::SeccompStrict { tid: w.num()? },
        "seccomp_filter" => Refusal::SeccompFilter {
            tid: w.num()?,
            why: w.text()?,
        },
        "rseq" => Refusal::Rseq {
            tid: w.num()?,
            why: w.text()?,
        },
        "no_usable_thread" => Refusal::NoUsableThread,
        "no_syscall_insn" => Refusal::NoSyscallInsn,
        other => return Err(format!("unknown refusal {other:?}")),
    })
}

fn static_text(s: &str) -> Result<&'static str, String> {
    STATIC_TEXTS
        .iter()
        .find(|known| **known == s)
        .copied()
        .ok_or_else(|| format!("unknown fixed text {s:?}"))
}

/// Free text on one line: `\` → `\\`, LF → `\n`, CR → `\r`.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            other => return Err(format!("bad escape \\{other:?} in {text:?}")),
        }
    }
    Ok(out)
}

/// The words of one line, read left to right; [`Words::text`] takes the rest.
struct Words<'a> {
    rest: &'a str,
}

impl<'a> Words<'a> {
    fn new(line: &'a str) -> Self {
        Words { rest: line }
    }

    fn word(&mut self) -> Result<&'a str, String> {
        if self.rest.is_empty() {
            return Err("a line ended too early".into());
        }
        let (word, rest) = self.rest.split_once(' ').unwrap_or((self.rest, ""));
        self.rest = rest;
        Ok(word)
    }

    fn num<T: std::str::FromStr>(&mut self) -> Result<T, String> {
        let word = self.word()?;
        word.parse()
            .map_err(|_| format!("{word:?} is not a number of the expected kind"))
    }

    /// Everything left on the line (possibly empty), unescaped.
    fn text(&mut self) -> Result<String, String> {
        let rest = std::mem::take(&mut self.rest);
        unescape(rest)
    }

    fn end(&self) -> Result<(), String> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!("unexpected {:?} at the end of a line", self.rest))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_error() -> Vec<InjectError> {
        let refusals = vec![
            Refusal::OwnProcess,
            Refusal::InvalidPid(-1),
            Refusal::NotPidfd,
            Refusal::PidfdOfOther {
                pidfd_pid: 3,
                pid: 4,
            },
            Refusal::JobControlStopped { tid: 5 },
            Refusal::SeccompStrict { tid: 6 },
            Refusal::SeccompFilter {
                tid: 7,
                why: "PTRACE_SETOPTIONS: Operation not permitted (os error 1)".into(),
            },
            Refusal::Rseq {
                tid: 8,
                why: String::new(),
            },
            Refusal::NoUsableThread,
            Refusal::NoSyscallInsn,
        ];
        let mut all = vec![
            InjectError::Unsupported(UNSUPPORTED_ARCH),
            InjectError::Gone,
            InjectError::Permission("thread 9 is already traced by pid 10".into()),
            InjectError::Timeout("a\\b\nc\rd  two  spaces ".into()),
            InjectError::Ptrace(String::new()),
            InjectError::Helper("exit status 2".into()),
        ];
        all.extend(refusals.into_iter().map(InjectError::Refused));
        all
    }

    fn every_skip() -> Vec<SkipReason> {
        let mut all = vec![
            SkipReason::InvalidFd,
            SkipReason::Duplicate,
            SkipReason::NotOpen,
            SkipReason::InodeChanged {
                found: u64::MAX,
                expected: 0,
            },
            SkipReason::NotSocket,
            SkipReason::CookieChanged {
                found: 1,
                expected: 2,
            },
            SkipReason::NotTcp,
            SkipReason::State(255),
            SkipReason::Linger(Duration::new(3, 999_999_999)),
            SkipReason::CloseFailed(libc::EBADF),
            SkipReason::StillOpen,
        ];
        for call in &STATIC_TEXTS[..5] {
            all.push(SkipReason::Syscall {
                call,
                errno: libc::EINVAL,
            });
        }
        all.extend(every_error().into_iter().map(SkipReason::NotClosed));
        all
    }

    #[test]
    fn requests_round_trip() {
        let r = Request {
            requester: 4242,
            pid: 5151,
            victims: vec![
                Victim {
                    fd: 7,
                    inode: 183920,
                    cookie: u64::MAX,
                },
                Victim {
                    fd: -1,
                    inode: 0,
                    cookie: 0,
                },
            ],
        };
        assert_eq!(decode_request(&encode_request(&r)), Ok(r));
    }

    #[test]
    fn requests_cut_short_or_garbled_are_rejected() {
        let r = Request {
            requester: 1,
            pid: 2,
            victims: vec![Victim {
                fd: 3,
                inode: 4,
                cookie: 5,
            }],
        };
        let text = encode_request(&r);
        let cut = &text[..text.len() - "end\n".len()];
        assert!(decode_request(cut).is_err());
        assert!(decode_request("").is_err());
        assert!(decode_request(&text.replace("victim 3", "victim x")).is_err());
        assert!(decode_request(&text.replace("pid 2", "pid 2 9")).is_err());
        assert!(decode_request(&text.replace("requester 1\n", "")).is_err());
    }

    #[test]
    fn reports_round_trip_every_reason_and_error() {
        let report = InjectReport {
            closed: vec![3, 4, 1000],
            skipped: every_skip()
                .into_iter()
                .enumerate()
                .map(|(i, why)| (i as i32 + 10, why))
                .collect(),
            pause_us: u64::MAX,
            threads: 11,
            fds_before: 40,
            fds_after: 37,
        };
        let ok = Ok(report);
        assert_eq!(decode_report(&encode_report(&ok)), Ok(ok));
        assert_eq!(
            decode_report(&encode_report(&Ok(InjectReport::default()))),
            Ok(Ok(InjectReport::default()))
        );
        for e in every_error() {
            let err = Err(e);
            let text = encode_report(&err);
            assert_eq!(text.lines().count(), 2, "{text}");
            assert_eq!(decode_report(&text), Ok(err));
        }
    }

    #[test]
    fn reports_cut_short_or_garbled_are_rejected() {
        let text = encode_report(&Ok(InjectReport {
            closed: vec![5],
            ..InjectReport::default()
        }));
        assert!(decode_report(&text[..text.len() - "ok\n".len()]).is_err());
        assert!(decode_report("").is_err());
        assert!(decode_report(&text.replace("closed 5", "closed five")).is_err());
        assert!(decode_report(&text.replace("closed 5", "opened 5")).is_err());
        let bad_call = "cwreap-inject-report 1\nskipped 5 syscall 1 nosuchcall\nok\n";
        assert!(decode_report(bad_call).is_err());
        let bad_escape = "cwreap-inject-report 1\nerror ptrace a\\qb\n";
        assert!(decode_report(bad_escape).is_err());
    }
}
