//! Reads of /proc that another process can hold up for as long as it wants:
//! /proc/PID/cmdline (and environ, and maps) are read under the target's mmap lock, and a
//! thread of the target stuck in a fault that never completes (a read of a FUSE file whose
//! server never answers, through /proc/self/mem) keeps that lock held, while a second
//! thread queued for it keeps every new reader out. Older kernels (before 4.17) also read
//! the argv pages themselves, so a FUSE page mapped over argv stalled the reader directly;
//! newer ones read anonymous memory only, and a remote read of an unserved userfaultfd
//! page fails at once instead of waiting.
//!
//! Each such read runs on a thread of its own and is waited for at most a deadline. Late is
//! not stuck: a reader thread the kernel still shows runnable at the deadline (a host so
//! loaded it has not run yet) is waited for on, up to [`RUNNABLE_GRACE`]; only one asleep
//! in the kernel (the mmap lock) is given up on. A read given up on stays in flight
//! (nothing can interrupt it); until it returns, the same
//! pid is not read again (one read in flight per pid), and past a cap of stuck reads no new
//! slow read starts at all. The caller gets [`io::ErrorKind::TimedOut`] and skips that
//! process: it costs one thread per stuck pid, never a cycle.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{RecvTimeoutError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How long a slow read is waited for: a command line takes microseconds.
pub const SLOW_READ_DEADLINE: Duration = Duration::from_millis(500);
/// How long past its deadline a read whose thread is still runnable (waiting for a CPU, not
/// for a lock) is waited for.
pub const RUNNABLE_GRACE: Duration = Duration::from_secs(10);
/// At most this many reads stuck at once.
pub const MAX_STUCK: usize = 16;

/// Set by a reader thread once its read returned.
type Pending = Arc<AtomicBool>;

/// The reads in flight past their deadline, by pid.
#[derive(Clone, Default)]
pub struct SlowReads {
    stuck: Arc<Mutex<HashMap<i32, Pending>>>,
}

fn stalled(pid: i32, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("pid {pid}: {why}"))
}

impl SlowReads {
    /// The one set of slow reads of this process: the cap on stuck reads holds across
    /// every reader (the cycle, the CLI, the injector) that uses it.
    pub fn global() -> Self {
        static GLOBAL: std::sync::OnceLock<SlowReads> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(SlowReads::default).clone()
    }

    /// Run `read` for `pid` with the deadline, unless a read of it is still stuck or too
    /// many are. Whatever it returns is dropped on its thread when it comes back late.
    pub fn read<T: Send + 'static>(
        &self,
        pid: i32,
        deadline: Duration,
        read: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let mut stuck = self.stuck.lock().unwrap_or_else(PoisonError::into_inner);
        // Reads that came back since: done, whatever they found (it is old now).
        stuck.retain(|_, returned| !returned.load(Ordering::Acquire));
        if stuck.contains_key(&pid) {
            return Err(stalled(
                pid,
                "an earlier read of its memory has not returned",
            ));
        }
        if stuck.len() >= MAX_STUCK {
            return Err(stalled(
                pid,
                "too many reads of other processes' memory have not returned",
            ));
        }
        let (tx, rx) = sync_channel(1);
        let returned: Pending = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&returned);
        let reader = Arc::new(AtomicI32::new(0));
        let tid = Arc::clone(&reader);
        let spawned = std::thread::Builder::new()
            .name("cwreap-slow-read".into())
            .spawn(move || {
                tid.store(
                    rustix::thread::gettid().as_raw_nonzero().get(),
                    Ordering::Release,
                );
                let got = read();
                flag.store(true, Ordering::Release);
                let _ = tx.send(got);
            });
        if let Err(e) = spawned {
            return Err(io::Error::other(format!(
                "cannot start a reader thread: {e}"
            )));
        }
        let grace_ends = std::time::Instant::now() + deadline + RUNNABLE_GRACE;
        let mut wait = deadline;
        loop {
            match rx.recv_timeout(wait) {
                Ok(got) => return got,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(io::Error::other("the reader thread died"));
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if !(runnable(reader.load(Ordering::Acquire)) && std::time::Instant::now() < grace_ends)
            {
                stuck.insert(pid, returned);
                return Err(stalled(pid, "reading its memory did not return in time"));
            }
            wait = Duration::from_millis(20);
        }
    }

    /// How many reads are stuck now.
    pub fn stuck(&self) -> usize {
        let mut stuck = self.stuck.lock().unwrap_or_else(PoisonError::into_inner);
        stuck.retain(|_, returned| !returned.load(Ordering::Acquire));
        stuck.len()
    }
}

/// Whether this process's thread `tid` is runnable (state `R`: running or waiting for a
/// CPU), or has not told its tid yet (0: it has not run at all). A thread asleep in the
/// kernel, or whose state cannot be read, is not.
fn runnable(tid: i32) -> bool {
    if tid == 0 {
        return true;
    }
    std::fs::read(format!("/proc/self/task/{tid}/stat"))
        .ok()
        .and_then(|stat| super::parse::stat_after_comm(&stat).map(|(state, _)| state == 'R'))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn a_stuck_read_is_skipped_until_it_returns_and_others_go_on() {
        let reads = SlowReads::default();
        let (release, gate) = channel::<()>();
        let short = Duration::from_millis(50);
        let e = reads
            .read(7, short, move || {
                let _ = gate.recv();
                Ok(b"late".to_vec())
            })
            .expect_err("past its deadline");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(reads.stuck(), 1);
        // The same pid is not read again while that read is stuck; others are.
        let again = reads
            .read(7, short, || Ok(b"x".to_vec()))
            .expect_err("still stuck");
        assert!(again.to_string().contains("has not returned"), "{again}");
        assert_eq!(
            reads.read(8, short, || Ok(b"ok".to_vec())).expect("fine"),
            b"ok"
        );
        // Once it returns, the pid is read again.
        release.send(()).expect("release");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while reads.stuck() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the read never came back"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            reads.read(7, short, || Ok(b"now".to_vec())).expect("fresh"),
            b"now"
        );
    }

    #[test]
    fn a_read_still_running_at_its_deadline_is_late_not_stuck() {
        let reads = SlowReads::default();
        // The reader computes (state R) well past its deadline, as on a host too loaded to
        // run it in time; a reader asleep in the kernel is given up on at once (above).
        let got = reads
            .read(9, Duration::from_millis(10), || {
                let until = std::time::Instant::now() + Duration::from_millis(300);
                let mut spins = 0u64;
                while std::time::Instant::now() < until {
                    spins = std::hint::black_box(spins + 1);
                }
                Ok(spins)
            })
            .expect("a late read returns");
        assert!(got > 0);
        assert_eq!(reads.stuck(), 0);
    }

    #[test]
    fn past_the_cap_no_new_slow_read_starts() {
        let reads = SlowReads::default();
        let mut gates = Vec::new();
        for pid in 0..i32::try_from(MAX_STUCK).unwrap_or(16) {
            let (release, gate) = channel::<()>();
            gates.push(release);
            let _ = reads.read(pid, Duration::from_millis(1), move || {
                let _ = gate.recv();
                Ok(Vec::<u8>::new())
            });
        }
        assert_eq!(reads.stuck(), MAX_STUCK);
        let e = reads
            .read(999, Duration::from_secs(1), || Ok(Vec::<u8>::new()))
            .expect_err("capped");
        assert!(e.to_string().contains("too many"), "{e}");
        drop(gates);
    }
}
