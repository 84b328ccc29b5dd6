//! Test seams of the helper. Built without the `testing` feature, [`step`] does nothing and
//! the rseq guard is always on; with it, the helper honours these environment variables:
//!
//! - `CWREAP_INJECT_TEST_LOG=FILE`: append `STEP MONOTONIC_NS PID` to FILE at each step
//!   (`start`, `stopped`, `injected`, `entered`, `exited`, `restored`, `settled`,
//!   `detached`, `done`; `signal-kept` for each signal held back to be handed over at
//!   detach; `caught-at-enter`, `-exit`, `-interrupt` or `-elsewhere` where a call past its
//!   deadline was stopped), so a test knows how far the helper got.
//! - `CWREAP_INJECT_TEST_PAUSE=STEP[:N]` with `CWREAP_INJECT_TEST_DIR=DIR`: at the Nth
//!   (default first) time STEP is reached, write `PID STEP` to DIR/paused and wait until
//!   DIR/go exists (at most 60 s), so a test can look at the stopped target, or SIGKILL the
//!   helper exactly there.
//! - `CWREAP_INJECT_TEST_RSEQ_GUARD=off`: inject into a thread inside an rseq critical
//!   section as if it were not (the hazard the guard exists for, shown by its test).
//! - `CWREAP_INJECT_TEST_CALL_TIMEOUT_US=N`: the deadline of each injected call, instead
//!   of a few seconds, to drive the recovery from a call that does not finish in time.

/// The helper reached `name` (see the module docs).
#[cfg(not(feature = "testing"))]
#[inline(always)]
pub(super) fn step(_name: &str) {}

/// Whether a thread inside an rseq critical section is handled (always, in production).
#[cfg(not(feature = "testing"))]
#[inline(always)]
pub(super) fn rseq_guard() -> bool {
    true
}

/// The deadline of one injected call: `default`, in production.
#[cfg(not(feature = "testing"))]
#[inline(always)]
pub(super) fn call_timeout(default: std::time::Duration) -> std::time::Duration {
    default
}

#[cfg(feature = "testing")]
pub(super) use testing::{call_timeout, rseq_guard, step};

#[cfg(feature = "testing")]
mod testing {
    use std::io::Write;
    use std::path::PathBuf;
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, Instant};

    const MAX_PAUSE: Duration = Duration::from_secs(60);

    #[derive(Default)]
    struct Seams {
        log: Option<PathBuf>,
        pause: Option<(String, u32)>,
        dir: Option<PathBuf>,
        rseq_guard_off: bool,
        call_timeout: Option<Duration>,
    }

    fn seams() -> &'static Seams {
        static SEAMS: OnceLock<Seams> = OnceLock::new();
        SEAMS.get_or_init(|| {
            let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
            let pause = var("CWREAP_INJECT_TEST_PAUSE").and_then(|v| {
                let v = v.to_string_lossy().into_owned();
                match v.split_once(':') {
                    Some((s, n)) => n.parse().ok().map(|n| (s.to_string(), n)),
                    None => Some((v, 1)),
                }
            });
            Seams {
                log: var("CWREAP_INJECT_TEST_LOG").map(PathBuf::from),
                pause,
                dir: var("CWREAP_INJECT_TEST_DIR").map(PathBuf::from),
                rseq_guard_off: var("CWREAP_INJECT_TEST_RSEQ_GUARD").is_some_and(|v| v == "off"),
                call_timeout: var("CWREAP_INJECT_TEST_CALL_TIMEOUT_US")
                    .and_then(|v| v.to_str()?.parse().ok())
                    .map(Duration::from_micros),
            }
        })
    }

    pub(in crate::inject) fn rseq_guard() -> bool {
        !seams().rseq_guard_off
    }

    pub(in crate::inject) fn call_timeout(default: Duration) -> Duration {
        seams().call_timeout.unwrap_or(default)
    }

    pub(in crate::inject) fn step(name: &str) {
        let s = seams();
        let pid = std::process::id();
        if let Some(log) = &s.log {
            let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
            let ns = now.tv_sec as i128 * 1_000_000_000 + now.tv_nsec as i128;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
            {
                let _ = f.write_all(format!("{name} {ns} {pid}\n").as_bytes());
            }
        }
        let (Some((at, nth)), Some(dir)) = (&s.pause, &s.dir) else {
            return;
        };
        if at != name {
            return;
        }
        static SEEN: Mutex<u32> = Mutex::new(0);
        let Ok(mut seen) = SEEN.lock() else {
            return;
        };
        *seen += 1;
        if *seen != *nth {
            return;
        }
        let tmp = dir.join("paused.tmp");
        if std::fs::write(&tmp, format!("{pid} {name}\n")).is_err()
            || std::fs::rename(&tmp, dir.join("paused")).is_err()
        {
            return;
        }
        let go = dir.join("go");
        let until = Instant::now() + MAX_PAUSE;
        while !go.exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
