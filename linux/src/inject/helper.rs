//! The helper's side: read the whole request, take the pidfd from fd 3, run the engine,
//! write the report in one piece, exit. A request cut short (cwreap died while sending it)
//! is refused before anything is touched. A report nobody reads any more fails with EPIPE
//! (SIGPIPE is blocked and ignored), which changes nothing: the target was restored and
//! detached before the report was written.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::batch::HELPER_PIDFD;
use super::reasons::InjectError;
use super::{engine, seam, wire};

/// How long the request may take to arrive (cwreap writes it at once).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) fn main() -> i32 {
    seam::step("start");
    let input = match read_request(Instant::now() + REQUEST_TIMEOUT) {
        Ok(input) => input,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "cwreap inject-helper: reading the request: {e}"
            );
            return 2;
        }
    };
    let request = match wire::decode_request(&input) {
        Ok(r) => r,
        Err(why) => {
            let _ = writeln!(std::io::stderr(), "cwreap inject-helper: {why}");
            return 2;
        }
    };
    let result = match crate::sys::spawn::take_inherited_fd(HELPER_PIDFD) {
        Ok(pidfd) => std::panic::catch_unwind(|| engine::run(&request, pidfd.as_fd()))
            .unwrap_or_else(|_| {
                // The session's guard restored and detached while unwinding.
                Err(InjectError::Ptrace(
                    "the injection helper panicked (target restored and detached)".into(),
                ))
            }),
        Err(e) => Err(InjectError::Helper(format!(
            "no pidfd at fd {HELPER_PIDFD}: {e}"
        ))),
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(wire::encode_report(&result).as_bytes());
    let _ = out.flush();
    seam::step("done");
    0
}

/// stdin up to EOF, within `deadline`, and no more than the protocol allows.
fn read_request(deadline: Instant) -> std::io::Result<String> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let stdin = std::io::stdin();
    let mut lock = stdin.lock();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
        }
        let timeout = Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let ready = {
            let mut fds = [PollFd::new(&stdin, PollFlags::IN)];
            poll(&mut fds, Some(&timeout))
        };
        match ready {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        match lock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if bytes.len() > wire::MAX_MESSAGE {
            return Err(std::io::Error::other(format!(
                "the request is over the limit of {} bytes",
                wire::MAX_MESSAGE
            )));
        }
    }
    String::from_utf8(bytes).map_err(|_| std::io::Error::other("request is not UTF-8"))
}
