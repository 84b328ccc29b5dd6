//! After a helper died in the middle of an injection: wait until every thread of the
//! target has run again, so that its fd table shows everything the injection did.
//!
//! A helper SIGKILLed while the injecting thread holds the injected registers (from the
//! PTRACE_SETREGS of a call to the restore at its syscall-exit-stop) leaves that call to
//! run: the kernel detaches every tracee when the helper exits and wakes it, and the thread
//! then executes the close() it was pointed at, first thing, once a CPU takes it. That can
//! be after cwreap has seen the helper's exit status, and a re-read of the fd table in
//! between would count that fd as still held. Measured with the solo test: one fd in two
//! of ten kills.
//!
//! Every thread was woken before the helper's exit could be collected. A thread that is
//! not runnable (`R`) at that point, or later, has run since; a runnable one has run once
//! its time on a CPU (schedstat) grows. Waiting for both is a condition on the threads,
//! with a deadline only as a guard.

use std::time::{Duration, Instant};

use crate::procfs::ProcFs;

/// Wait, at most `guard`, until every thread of `pid` has run since the injection helper
/// exited (call it after collecting the helper's exit status). True when they all did (or
/// the process is gone), false when some thread was still waiting for a CPU at the guard.
pub fn await_threads_ran(pid: i32, guard: Duration) -> bool {
    await_in(&ProcFs::default(), pid, guard)
}

fn await_in(proc: &ProcFs, pid: i32, guard: Duration) -> bool {
    let deadline = Instant::now() + guard;
    let mut waiting = runnable(proc, pid);
    let mut pause = Duration::from_micros(50);
    loop {
        waiting = still_waiting(proc, pid, waiting);
        if waiting.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// The threads of `pid` that are runnable now, with their time on a CPU so far (None when
/// it cannot be read: then only a change of state tells).
fn runnable(proc: &ProcFs, pid: i32) -> Vec<(i32, Option<u64>)> {
    let Ok(mut tids) = proc.tasks(pid) else {
        return Vec::new();
    };
    tids.sort_unstable();
    tids.into_iter()
        .filter(|&tid| matches!(proc.task_state(pid, tid), Ok(Some('R'))))
        .map(|tid| (tid, proc.task_cpu_ns(pid, tid).ok()))
        .collect()
}

/// Those of `waiting` that have not run since they were sampled: still runnable, with no
/// more time on a CPU. A thread gone, or in any other state, has run (or never will).
fn still_waiting(
    proc: &ProcFs,
    pid: i32,
    waiting: Vec<(i32, Option<u64>)>,
) -> Vec<(i32, Option<u64>)> {
    waiting
        .into_iter()
        .filter(|&(tid, ran)| {
            matches!(proc.task_state(pid, tid), Ok(Some('R')))
                && (ran.is_none() || proc.task_cpu_ns(pid, tid).ok() == ran)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn thread(dir: &std::path::Path, tid: i32, state: char, cpu_ns: u64) {
        let t = dir.join(format!("42/task/{tid}"));
        fs::create_dir_all(&t).expect("mkdir");
        fs::write(
            t.join("stat"),
            format!("{tid} (srv) {state} 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0\n"),
        )
        .expect("write stat");
        fs::write(t.join("schedstat"), format!("{cpu_ns} 5000 7\n")).expect("write schedstat");
    }

    #[test]
    fn a_thread_has_run_once_it_is_not_runnable_or_got_cpu_time() {
        let dir = std::env::temp_dir().join(format!("cwreap-settle-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let proc = ProcFs::new(&dir);
        thread(&dir, 42, 'S', 100);
        thread(&dir, 43, 'R', 200);
        thread(&dir, 44, 'R', 300);
        thread(&dir, 45, 'R', 400);
        let sample = runnable(&proc, 42);
        assert_eq!(
            sample,
            [(43, Some(200)), (44, Some(300)), (45, Some(400))],
            "only runnable threads are waited for"
        );
        // 43 got CPU time, 44 went to sleep, 45 is gone: none is waited for any more.
        thread(&dir, 43, 'R', 250);
        thread(&dir, 44, 'S', 300);
        fs::remove_dir_all(dir.join("42/task/45")).expect("rm");
        assert!(still_waiting(&proc, 42, sample.clone()).is_empty());
        // One still runnable without CPU time is waited for, up to the guard.
        thread(&dir, 43, 'R', 200);
        thread(&dir, 44, 'R', 300);
        let waiting = still_waiting(&proc, 42, sample);
        assert_eq!(waiting, [(43, Some(200)), (44, Some(300))]);
        assert!(!await_in(&proc, 42, Duration::from_millis(1)));
        thread(&dir, 43, 'S', 200);
        thread(&dir, 44, 'D', 300);
        assert!(await_in(&proc, 42, Duration::from_millis(1)));
        // A process gone: nothing to wait for.
        assert!(await_in(&proc, 7, Duration::ZERO));
        let _ = fs::remove_dir_all(&dir);
    }
}
