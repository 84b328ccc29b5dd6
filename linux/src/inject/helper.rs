//! The helper's side: read the whole request, take the pidfd from fd 3, run the engine,
//! write the report in one piece, exit. A request cut short (cwreap died while sending it)
//! is refused before anything is touched. A report nobody reads any more fails with EPIPE
//! (SIGPIPE is blocked and ignored), which changes nothing: the target was restored and
//! detached before the report was written.

use std::io::{Read, Write};
use std::os::fd::AsFd;

use super::{HELPER_PIDFD, InjectError, engine, seam, wire};

pub(super) fn main() -> i32 {
    seam::step("start");
    let mut input = String::new();
    if let Err(e) = std::io::stdin().lock().read_to_string(&mut input) {
        let _ = writeln!(
            std::io::stderr(),
            "cwreap inject-helper: reading the request: {e}"
        );
        return 2;
    }
    let request = match wire::decode_request(&input) {
        Ok(r) => r,
        Err(why) => {
            let _ = writeln!(std::io::stderr(), "cwreap inject-helper: {why}");
            return 2;
        }
    };
    let result = match crate::sys::helper::take_inherited_fd(HELPER_PIDFD) {
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
