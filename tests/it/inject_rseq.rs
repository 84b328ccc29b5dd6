//! rseq critical sections and the injected close(): a C target (tests/runtimes/rseq_spin.c)
//! whose only thread spins inside a section in glibc's rseq area, so nearly every stop
//! lands inside one. While the target is stopped, the test bumps an epoch in memory the
//! target shares; a section that started before the stop and commits after it sees the
//! change and counts a crossing. That is the hazard: per-CPU data written from a section
//! that was stopped half-way.
//!
//! - With the guard (the default), every injection closes its fd and no section ever
//!   commits across the stop: the injecting thread's saved instruction pointer is moved to
//!   the abort handler, which runs (the target counts aborts across an epoch change).
//! - Without it (a testing-only switch), the injection moves the thread to the borrowed
//!   `syscall` instruction first, the kernel finds no section to abort and clears
//!   `rseq_cs`, and the section commits across the stop: the test shows it happens.
//! - A thread blocked in a system call *inside* a section (against the rules of rseq) is
//!   refused with the rseq reason: its instruction pointer cannot be moved safely.

use std::fs::File;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::pause::{SeamDir, env_refs, helper, victim};
use crate::support::runtimes;
use crate::support::{LineChild, target_tmpdir};
use cwreap_linux::inject::{InjectError, Refusal, Victim, close_in_target_with_env};
use cwreap_linux::sys;

const TRIALS: usize = 100;
const GUARD: Duration = Duration::from_secs(30);
const CLOSE_WAIT: u8 = 8;

/// Counters of the target's state file (see rseq_spin.c).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    commits: u64,
    aborts: u64,
    crossed: u64,
    aborted_across: u64,
}

struct Spinner {
    io: LineChild,
    addr: SocketAddr,
    state: File,
    state_path: PathBuf,
}

impl Spinner {
    fn start(test: &str) -> Option<Spinner> {
        Spinner::start_with(test, &[])
    }

    fn start_with(test: &str, extra: &[&str]) -> Option<Spinner> {
        let exe = runtimes::c_program(test, "rseq_spin.c")?;
        let state_path = target_tmpdir().join(format!("rseq-state-{}-{test}", std::process::id()));
        std::fs::write(&state_path, vec![0u8; 4096]).expect("create the state file");
        let state = File::options()
            .read(true)
            .write(true)
            .open(&state_path)
            .expect("open the state file");
        let io = LineChild::spawn("rseq_spin", Command::new(&exe).arg(&state_path).args(extra))
            .expect("start rseq_spin");
        let mut s = Spinner {
            io,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            state,
            state_path,
        };
        s.addr = s.expect("listen ").parse().expect("listen address");
        s.expect("ready");
        Some(s)
    }

    fn pid(&self) -> i32 {
        self.io.pid()
    }

    /// The rest of the next line starting with `prefix`; fails on an `error` line.
    fn expect(&mut self, prefix: &str) -> String {
        self.io
            .expect(prefix, GUARD)
            .unwrap_or_else(|e| panic!("{e}; it said {:?}", self.tail()))
    }

    fn tail(&self) -> Vec<String> {
        self.io
            .history
            .iter()
            .rev()
            .take(20)
            .rev()
            .cloned()
            .collect()
    }

    /// A connection the target accepted and the client half-closed: its fd, in CLOSE_WAIT.
    fn close_wait(&mut self) -> (TcpStream, i32) {
        let client = TcpStream::connect(self.addr).expect("connect");
        let me = client.local_addr().expect("local address").port();
        let fd = loop {
            let rest = self.expect("accepted ");
            let mut w = rest.split_whitespace();
            let fd: i32 = w.next().and_then(|v| v.parse().ok()).expect("fd");
            let port: u16 = w.next().and_then(|v| v.parse().ok()).expect("port");
            if port == me {
                break fd;
            }
        };
        client.shutdown(Shutdown::Write).expect("half-close");
        let pidfd = sys::pidfd_open(self.pid()).expect("pidfd_open");
        let deadline = Instant::now() + GUARD;
        loop {
            let state = sys::pidfd_getfd(pidfd.as_fd(), fd)
                .ok()
                .and_then(|d| sys::tcp_state(d.as_fd()).ok());
            if state == Some(CLOSE_WAIT) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "fd {fd} never reached CLOSE_WAIT"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        (client, fd)
    }

    fn victim(&self, fd: i32) -> Victim {
        victim(self.pid(), fd)
    }

    fn slot(&self, i: u64) -> u64 {
        let mut b = [0u8; 8];
        self.state
            .read_exact_at(&mut b, i * 8)
            .expect("read the state file");
        u64::from_ne_bytes(b)
    }

    fn counts(&self) -> Counts {
        Counts {
            commits: self.slot(1),
            aborts: self.slot(2),
            crossed: self.slot(3),
            aborted_across: self.slot(4),
        }
    }

    fn bump_epoch(&self) {
        let next = self.slot(0) + 1;
        self.state
            .write_all_at(&next.to_ne_bytes(), 0)
            .expect("write the epoch");
    }

    fn alive(&mut self) -> bool {
        matches!(self.io.child.try_wait(), Ok(None))
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.io.kill();
        let _ = std::fs::remove_file(&self.state_path);
    }
}

/// What the trials did.
#[derive(Debug, Default)]
struct Tally {
    closed: usize,
    refused_rseq: usize,
    other: Vec<String>,
}

/// `TRIALS` injections, each closing one CLOSE_WAIT socket while the thread spins, with
/// the epoch bumped while the target is stopped. Returns the tally and the counters.
fn trials(sp: &mut Spinner, guard_off: bool) -> (Tally, Counts) {
    let mut tally = Tally::default();
    let pid = sp.pid();
    let pidfd = sys::pidfd_open(pid).expect("pidfd_open");
    for _ in 0..TRIALS {
        let (_client, fd) = sp.close_wait();
        let v = sp.victim(fd);
        let seams = SeamDir::new("rseq");
        let mut env = seams.env(Some("stopped"));
        if guard_off {
            env.push(("CWREAP_INJECT_TEST_RSEQ_GUARD".into(), "off".into()));
        }
        let env = env_refs(&env);
        let (env, pidfd) = (&env, &pidfd);
        let r = std::thread::scope(|scope| {
            let call = scope
                .spawn(move || close_in_target_with_env(&helper(), pid, pidfd.as_fd(), &[v], env));
            if seams.wait_paused(GUARD, || call.is_finished()).is_some() {
                sp.bump_epoch();
                seams.release();
            }
            call.join().expect("the injecting thread panicked")
        });
        match r {
            Ok(report) if report.closed == [fd] => tally.closed += 1,
            Err(InjectError::Refused(Refusal::Rseq { .. })) => tally.refused_rseq += 1,
            other => tally.other.push(format!("fd {fd}: {other:?}")),
        }
    }
    // Let the thread run a few more sections so every stopped one has finished.
    let before = sp.counts();
    let deadline = Instant::now() + GUARD;
    while sp.counts().commits < before.commits + 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    (tally, sp.counts())
}

#[test]
#[ignore = "needs root: the helper stops the rseq target with ptrace to close an fd inside it (CAP_SYS_PTRACE)"]
fn sections_stopped_for_an_injection_are_aborted_never_committed() {
    let test = "sections_stopped_for_an_injection_are_aborted_never_committed";
    let Some(mut sp) = Spinner::start(test) else {
        return;
    };
    let (tally, counts) = trials(&mut sp, false);
    println!("guard on: {TRIALS} injections: {tally:?}; {counts:?}");
    assert!(sp.alive(), "the target died: {:?}", sp.tail());
    assert!(
        tally.other.is_empty(),
        "{:?}",
        &tally.other[..tally.other.len().min(20)]
    );
    assert_eq!(tally.closed + tally.refused_rseq, TRIALS);
    assert_eq!(
        counts.crossed, 0,
        "sections committed across a stop: {counts:?}"
    );
    // Nearly every stop lands in a section; the guard sent them to the abort handler.
    assert!(
        counts.aborted_across >= (TRIALS / 2) as u64,
        "too few sections were aborted across a stop to have tested anything: {counts:?}"
    );
    assert!(counts.commits > 0, "{counts:?}");
}

/// The hazard the guard exists for, shown: without it, sections commit across the stop.
#[test]
#[ignore = "needs root: the helper stops the rseq target with ptrace to close an fd inside it (CAP_SYS_PTRACE)"]
fn without_the_guard_sections_commit_across_the_stop() {
    let test = "without_the_guard_sections_commit_across_the_stop";
    let Some(mut sp) = Spinner::start(test) else {
        return;
    };
    let (tally, counts) = trials(&mut sp, true);
    println!("guard off: {TRIALS} injections: {tally:?}; {counts:?}");
    assert!(sp.alive(), "the target died: {:?}", sp.tail());
    assert_eq!(tally.closed, TRIALS, "{tally:?}");
    assert!(
        counts.crossed > 0,
        "no section committed across a stop without the guard: {counts:?}"
    );
}

/// Blocked in read() inside a critical section: refused with the rseq reason, and the
/// target runs on: the kernel aborts that section as after any stop, and the next one reads
/// what we write.
#[test]
#[ignore = "needs root: the helper stops the rseq target with ptrace to close an fd inside it (CAP_SYS_PTRACE)"]
fn thread_in_a_system_call_inside_a_section_is_refused() {
    let test = "thread_in_a_system_call_inside_a_section_is_refused";
    let Some(mut sp) = Spinner::start_with(test, &["--block"]) else {
        return;
    };
    let (_client, fd) = sp.close_wait();
    let pid = sp.pid();
    let pidfd = sys::pidfd_open(pid).expect("pidfd_open");
    let r = close_in_target_with_env(&helper(), pid, pidfd.as_fd(), &[sp.victim(fd)], &[]);
    match &r {
        Err(InjectError::Refused(Refusal::Rseq { tid, why })) => {
            assert_eq!(*tid, pid);
            assert!(why.contains("system call inside"), "{why}");
        }
        other => panic!("expected an rseq refusal, got {other:?}"),
    }
    assert!(sp.alive(), "the target died: {:?}", sp.tail());
    assert!(std::path::Path::new(&format!("/proc/{pid}/fd/{fd}")).exists());
    sp.expect("aborted");
    sp.io.write_stdin(b"x").expect("write to the target");
    // Aborted if the read blocked first (any switch away aborts a section), committed
    // with the byte if the byte was there first.
    let after = sp.expect("");
    assert!(
        after == "aborted" || after == "committed 1",
        "after the write: {after:?}"
    );
    assert!(sp.alive(), "the target died: {:?}", sp.tail());
}
