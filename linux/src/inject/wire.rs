//! What cwreap and its injection helper say to each other: one JSON object each way, with
//! the protocol version first.
//!
//! Request (cwreap → helper's stdin):
//! ```text
//! {"version":1,"request":{"requester":4242,"pid":5151,
//!  "victims":[{"fd":7,"inode":183920,"cookie":4103}]}}
//! ```
//! `requester` is the pid of the process asking (never a target), `pid` the target, whose
//! pidfd is the helper's fd 3, and each victim an fd with the inode and cookie it must still
//! have. A request cut short by the death of cwreap is not a whole JSON object, so it is
//! recognised and nothing is done.
//!
//! Report (helper's stdout → cwreap), the injection's `Ok` or its `Err`:
//! ```text
//! {"version":1,"report":{"Ok":{"closed":[7],
//!  "skipped":[[9,{"inode_changed":{"found":1234,"expected":183922}}]],
//!  "pause_us":812,"threads":4,"fds_before":40,"fds_after":39}}}
//! {"version":1,"report":{"Err":{"refused":"own_process"}}}
//! ```
//! Every [`SkipReason`](super::reasons::SkipReason), [`InjectError`] and
//! [`Refusal`](super::reasons::Refusal) comes back exactly as it was; the `&'static str`s
//! they hold must be among `reasons::STATIC_TEXTS`. A message over [`MAX_MESSAGE`] bytes,
//! of another version, with a field unknown or missing, or followed by anything but
//! whitespace is refused whole.

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::batch::{InjectReport, Victim};
use super::reasons::InjectError;

/// The shape of both messages. The helper need not be this very program (see
/// [`Helper`](super::batch::Helper)), so a change of shape bumps it, and a message of
/// another version is refused before its body is read.
const VERSION: u32 = 1;

/// Most bytes of a message read, either way: a request or report holds an entry per fd,
/// a few dozen bytes each, so this allows about a million.
pub(super) const MAX_MESSAGE: usize = 64 << 20;

/// What the helper is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Request {
    /// The process that asked: refused as a target, like the helper itself.
    pub requester: i32,
    pub pid: i32,
    pub victims: Vec<Victim>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestMessage<'a> {
    version: u32,
    request: Cow<'a, Request>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportMessage<'a> {
    version: u32,
    report: Cow<'a, Result<InjectReport, InjectError>>,
}

/// Why a message was refused.
#[derive(Debug, Error)]
pub(super) enum WireError {
    #[error("the {what} is {len} bytes, over the limit of {MAX_MESSAGE}")]
    TooLong { what: &'static str, len: usize },
    #[error("the {what} was cut short ({source})")]
    CutShort {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("the {what} is of protocol version {found}, not {VERSION}")]
    Version { what: &'static str, found: u32 },
    #[error("malformed {what}: {source}")]
    Malformed {
        what: &'static str,
        source: serde_json::Error,
    },
}

pub(super) fn encode_request(r: &Request) -> String {
    encode(&RequestMessage {
        version: VERSION,
        request: Cow::Borrowed(r),
    })
}

pub(super) fn decode_request(text: &str) -> Result<Request, WireError> {
    let m: RequestMessage<'static> = decode(text, "request")?;
    Ok(m.request.into_owned())
}

pub(super) fn encode_report(result: &Result<InjectReport, InjectError>) -> String {
    encode(&ReportMessage {
        version: VERSION,
        report: Cow::Borrowed(result),
    })
}

pub(super) fn decode_report(text: &str) -> Result<Result<InjectReport, InjectError>, WireError> {
    let m: ReportMessage<'static> = decode(text, "report")?;
    Ok(m.report.into_owned())
}

/// One line of JSON. serde_json fails only on maps with keys that are not strings, which
/// these messages have none of; should it fail anyway, the empty message is read as one
/// cut short, never acted on.
fn encode<T: Serialize>(message: &T) -> String {
    let mut text = serde_json::to_string(message).unwrap_or_default();
    text.push('\n');
    text
}

fn decode<T: DeserializeOwned>(text: &str, what: &'static str) -> Result<T, WireError> {
    let parse_error = |source: serde_json::Error| {
        if source.is_eof() {
            WireError::CutShort { what, source }
        } else {
            WireError::Malformed { what, source }
        }
    };
    if text.len() > MAX_MESSAGE {
        return Err(WireError::TooLong {
            what,
            len: text.len(),
        });
    }
    // The version alone first (this pass skips over the rest, so it also finds a message
    // cut short): a body of another version would only fail with a puzzling field error.
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let found = serde_json::from_str::<Versioned>(text)
        .map_err(parse_error)?
        .version;
    if found != VERSION {
        return Err(WireError::Version { what, found });
    }
    serde_json::from_str(text).map_err(parse_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::batch::UNSUPPORTED_ARCH;
    use crate::inject::reasons::{Refusal, STATIC_TEXTS, SkipReason};
    use std::time::Duration;

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
            InjectError::Timeout("a\\b\nc\rd  two  spaces \"quoted\" \u{0} é".into()),
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

    fn request() -> Request {
        Request {
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
        }
    }

    fn report() -> Result<InjectReport, InjectError> {
        Ok(InjectReport {
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
        })
    }

    /// Whether `e` says that `part` was cut short. A cut right after the sign of a negative
    /// number is the one that serde_json calls an invalid number instead.
    fn cut_short(part: &str, e: &WireError) -> bool {
        match e {
            WireError::CutShort { .. } => true,
            WireError::Malformed { .. } => part.ends_with('-'),
            _ => false,
        }
    }

    #[test]
    fn requests_round_trip() {
        let r = request();
        let text = encode_request(&r);
        assert_eq!(decode_request(&text).expect("decodes"), r);
        assert!(text.starts_with("{\"version\":1,\"request\":{"), "{text}");
        assert_eq!(text.lines().count(), 1, "{text}");
        let none = Request {
            victims: Vec::new(),
            ..request()
        };
        assert_eq!(
            decode_request(&encode_request(&none)).expect("decodes"),
            none
        );
    }

    #[test]
    fn requests_cut_short_or_garbled_are_rejected() {
        let text = encode_request(&request());
        let whole = text.trim_end();
        // Cut anywhere, it is no whole object: the helper refuses it before touching
        // anything.
        for cut in 0..whole.len() {
            let e = decode_request(&whole[..cut]).expect_err("cut short");
            assert!(cut_short(&whole[..cut], &e), "at {cut}: {e}");
        }
        assert!(
            decode_request("")
                .expect_err("empty")
                .to_string()
                .contains("request was cut short"),
        );
        let garbled = |from: &str, to: &str| {
            assert!(whole.contains(from), "{from}");
            decode_request(&whole.replacen(from, to, 1)).expect_err(to)
        };
        for (from, to) in [
            ("\"fd\":7", "\"fd\":\"x\""),
            ("\"fd\":7", "\"fd\":7.5"),
            ("\"pid\":5151", "\"pid\":5151,\"pid\":9"),
            ("\"pid\":5151", "\"pid\":5151,\"more\":9"),
            ("\"requester\":4242,", ""),
            (
                "\"cookie\":18446744073709551615",
                "\"cookie\":18446744073709551616",
            ),
            ("\"request\"", "\"report\""),
        ] {
            let e = garbled(from, to);
            assert!(matches!(e, WireError::Malformed { .. }), "{to}: {e}");
        }
        let e = decode_request(&format!("{whole}{whole}")).expect_err("two");
        assert!(matches!(e, WireError::Malformed { .. }), "{e}");
        let e = decode_request("[1]").expect_err("not an object");
        assert!(matches!(e, WireError::Malformed { .. }), "{e}");
        // A report is not a request.
        let e = decode_request(&encode_report(&report())).expect_err("a report");
        assert!(matches!(e, WireError::Malformed { .. }), "{e}");
    }

    #[test]
    fn other_versions_are_refused_before_their_body_is_read() {
        let text = encode_request(&request()).replace("\"version\":1", "\"version\":2");
        let e = decode_request(&text).expect_err("version 2");
        assert!(matches!(e, WireError::Version { found: 2, .. }), "{e}");
        assert_eq!(e.to_string(), "the request is of protocol version 2, not 1");
        let reshaped = "{\"version\":2,\"report\":{\"Done\":[]}}";
        let e = decode_report(reshaped).expect_err("version 2");
        assert!(matches!(e, WireError::Version { found: 2, .. }), "{e}");
        let unversioned = encode_request(&request()).replace("\"version\":1,", "");
        let e = decode_request(&unversioned).expect_err("no version");
        assert!(e.to_string().contains("missing field `version`"), "{e}");
    }

    #[test]
    fn messages_over_the_limit_are_refused_unread() {
        let text = encode_request(&request());
        let padded = format!("{text}{}", " ".repeat(MAX_MESSAGE - text.len()));
        assert_eq!(decode_request(&padded).expect("at the limit"), request());
        let over = format!("{padded} ");
        let e = decode_request(&over).expect_err("over the limit");
        assert!(
            matches!(e, WireError::TooLong { len, .. } if len == MAX_MESSAGE + 1),
            "{e}"
        );
        assert!(decode_report(&over).is_err());
    }

    #[test]
    fn reports_round_trip_every_reason_and_error() {
        let ok = report();
        assert_eq!(decode_report(&encode_report(&ok)).expect("decodes"), ok);
        let empty = Ok(InjectReport::default());
        assert_eq!(
            decode_report(&encode_report(&empty)).expect("decodes"),
            empty
        );
        for e in every_error() {
            let err = Err(e);
            let text = encode_report(&err);
            assert_eq!(text.lines().count(), 1, "{text}");
            assert_eq!(decode_report(&text).expect("decodes"), err);
        }
        assert_eq!(
            encode_report(&Err(InjectError::Refused(Refusal::OwnProcess))),
            "{\"version\":1,\"report\":{\"Err\":{\"refused\":\"own_process\"}}}\n"
        );
    }

    #[test]
    fn reports_cut_short_or_garbled_are_rejected() {
        let text = encode_report(&report());
        let whole = text.trim_end();
        for cut in (0..whole.len()).filter(|&c| whole.is_char_boundary(c)) {
            let e = decode_report(&whole[..cut]).expect_err("cut short");
            assert!(cut_short(&whole[..cut], &e), "at {cut}: {e}");
        }
        let report = |body: &str| format!("{{\"version\":1,\"report\":{body}}}");
        for bad in [
            // Not a number, an unknown variant, an unknown reason.
            "{\"Ok\":{\"closed\":[\"five\"]}}",
            "{\"Done\":{}}",
            "{\"Err\":{\"lost\":null}}",
            // A fixed text that no reason holds.
            "{\"Ok\":{\"closed\":[],\"skipped\":[[5,{\"syscall\":{\"call\":\"nosuchcall\",\
\"errno\":1}}]],\"pause_us\":0,\"threads\":0,\"fds_before\":0,\"fds_after\":0}}",
            "{\"Err\":{\"unsupported\":\"elsewhere\"}}",
            // A linger whose nanoseconds carry past u64 seconds: an error, not a panic.
            "{\"Ok\":{\"closed\":[],\"skipped\":[[5,{\"linger\":{\"secs\":18446744073709551615,\
\"nanos\":1000000000}}]],\"pause_us\":0,\"threads\":0,\"fds_before\":0,\"fds_after\":0}}",
            // A field missing.
            "{\"Ok\":{\"closed\":[]}}",
        ] {
            let e = decode_report(&report(bad)).expect_err(bad);
            assert!(matches!(e, WireError::Malformed { .. }), "{bad}: {e}");
        }
    }
}
