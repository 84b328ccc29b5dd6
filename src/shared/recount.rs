//! What became of each fd of an injected close() batch that failed as a whole, read back
//! from the target's fd table.
//!
//! A helper SIGKILLed in the middle of an injection leaves no report, yet the calls it made
//! before dying closed their fds (and one whose registers were already set runs as soon as
//! the kernel lets the thread go). cwreap knows each fd and the inode it meant to close,
//! so it reads /proc/PID/fd again, through the process pinned since attribution, and says
//! per fd what it finds: gone (closed), the same socket (still held), or another file at
//! that number (closed, and the number already reused by the target: reported as closed,
//! never as held, and never acted on). If the process is gone, or the table cannot be
//! read, nothing can be known, and that is what is said.
//!
//! [`reread`] is the one read; [`recount`] is pure: victims, the table read just before
//! the helper started and the one read after → one outcome per fd, and the counts.

use std::io;

use cwreap_linux::inject::{InjectError, Victim};
use cwreap_linux::kernel::{Effects, ProcRead};
use cwreap_linux::procfs::{FdFile, FdFiles};

use super::act::{ActResult, Outcome, Reason};

/// Whether a batch that failed with `e` may have closed some fds without saying which: the
/// helper died or its report was lost, or a ptrace step failed after some calls.
pub fn needs_recount(e: &InjectError) -> bool {
    matches!(e, InjectError::Helper(_) | InjectError::Ptrace(_))
}

/// What reading the fd table again gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reread {
    /// The fd table of the pinned process.
    Table(FdFiles),
    /// The process exited (or its pid names another process now).
    Gone,
    /// The table could not be read, with the error.
    Unreadable(String),
}

/// Read the fd table of `pid`, pinned by `process`, through thread `via` when the leader
/// has exited (as attribution read it). The numbers are only the pinned process's if it is
/// still alive after the read.
pub fn reread<K: ProcRead + Effects>(
    k: &K,
    process: &K::Process,
    pid: i32,
    via: Option<i32>,
) -> Reread {
    let mut table = ProcRead::fd_files(k, pid, via);
    if via.is_none()
        && table.as_ref().is_ok_and(|t| t.is_empty())
        && let Some(tid) = k.thread_for_empty_table(pid)
    {
        table = ProcRead::fd_files(k, pid, Some(tid));
    }
    if !k.alive(process) {
        return Reread::Gone;
    }
    match table {
        Ok(t) => Reread::Table(t),
        Err(e) if gone_error(&e) => Reread::Gone,
        Err(e) => Reread::Unreadable(e.to_string()),
    }
}

fn gone_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH))
}

/// How the fds of one failed batch came out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Closed: gone from the table, or their number now holds another file.
    pub closed: usize,
    /// Of `closed`, those whose number the target already reused.
    pub reused: usize,
    /// Still the same socket.
    pub held: usize,
    /// Not the socket any more before the helper even started (the target closed or
    /// replaced it itself): `gone` or `changed`, as without a failure.
    pub before: usize,
    /// Not knowable: the process exited, or the table could not be read.
    pub unknown: usize,
}

/// Each victim's outcome after a batch failed with `failure`, from the fd table `after`
/// the failure, and `before` the helper started when it could be read.
pub fn recount(
    victims: &[Victim],
    before: Option<&FdFiles>,
    after: &Reread,
    failure: &InjectError,
) -> (Vec<(i32, ActResult)>, Counts) {
    let mut counts = Counts::default();
    let mut out = Vec::with_capacity(victims.len());
    for v in victims {
        let was = FdFile::Socket(v.inode);
        if let Some(before) = before
            && before.get(&v.fd) != Some(&was)
        {
            counts.before += 1;
            let res = match before.get(&v.fd) {
                None => ActResult::with(Outcome::Gone, Reason::FdClosed),
                Some(FdFile::Socket(found)) => ActResult::with(
                    Outcome::Changed,
                    Reason::InodeChanged {
                        fd: v.fd,
                        found: *found,
                        expected: v.inode,
                    },
                ),
                Some(FdFile::Other(_)) => {
                    ActResult::with(Outcome::Changed, Reason::NotSocket { fd: v.fd })
                }
            };
            out.push((v.fd, res));
            continue;
        }
        let res = match after {
            Reread::Gone => {
                counts.unknown += 1;
                ActResult::with(
                    Outcome::Gone,
                    Reason::Unknowable {
                        failure: failure.clone(),
                        exited: true,
                        why: "the process exited".into(),
                    },
                )
            }
            Reread::Unreadable(e) => {
                counts.unknown += 1;
                ActResult::with(
                    Outcome::Error,
                    Reason::Unknowable {
                        failure: failure.clone(),
                        exited: false,
                        why: format!("the fd table could not be re-read ({e})"),
                    },
                )
            }
            Reread::Table(now) => {
                let closed = |reused| {
                    ActResult::with(
                        Outcome::Reaped,
                        Reason::ClosedPerTable {
                            failure: failure.clone(),
                            reused,
                        },
                    )
                };
                match now.get(&v.fd) {
                    Some(file) if *file == was => {
                        counts.held += 1;
                        ActResult::with(
                            Outcome::Error,
                            Reason::StillHeld {
                                failure: failure.clone(),
                            },
                        )
                    }
                    None => {
                        counts.closed += 1;
                        closed(None)
                    }
                    Some(file) => {
                        counts.closed += 1;
                        counts.reused += 1;
                        closed(Some(match file {
                            FdFile::Socket(inode) => format!("socket:[{inode}]"),
                            FdFile::Other(link) => link.clone(),
                        }))
                    }
                }
            }
        };
        out.push((v.fd, res));
    }
    (out, counts)
}

impl Counts {
    /// One line for a pid whose batch failed with `failure`.
    pub fn describe(&self, pid: i32, failure: &InjectError) -> String {
        let mut s = format!("close: pid {pid}: the injection failed ({failure}); ");
        if self.unknown > 0 {
            s.push_str(&format!(
                "the fd table could not be re-read: whether {} fd(s) were closed cannot be known",
                self.unknown
            ));
        } else {
            s.push_str(&format!(
                "re-read from the fd table: {} closed ({} of them with the number already reused), {} still held",
                self.closed, self.reused, self.held
            ));
        }
        if self.before > 0 {
            s.push_str(&format!(
                "; {} no longer the socket before the injection started",
                self.before
            ));
        }
        s
    }
}

/// The summary's note on how the counts of batches that failed with `failures` were
/// obtained.
pub fn summary_note(failures: &[(&InjectError, &Counts)]) -> Option<String> {
    let (first, _) = failures.first()?;
    let what = if failures
        .iter()
        .all(|(e, _)| matches!(e, InjectError::Helper(_)))
    {
        "helper failed".to_string()
    } else {
        format!(
            "injection failed ({})",
            Reason::InjectFailed((*first).clone()).code()
        )
    };
    let unknown: usize = failures.iter().map(|(_, c)| c.unknown).sum();
    Some(if unknown > 0 {
        format!(
            "{what}: counts re-read from the fd table; {unknown} fd(s) unknown (process exited or table unreadable)"
        )
    } else {
        format!("{what}: counts re-read from the fd table")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cwreap_linux::kernel::fake::{FakeKernel, Process};

    fn v(fd: i32, inode: u64) -> Victim {
        Victim {
            fd,
            inode,
            cookie: inode * 10,
        }
    }

    fn table(entries: &[(i32, FdFile)]) -> FdFiles {
        entries.iter().cloned().collect()
    }

    fn killed() -> InjectError {
        InjectError::Helper("it ended (signal: 9 (SIGKILL)) without a report".into())
    }

    fn outcome_of(got: &[(i32, ActResult)], fd: i32) -> (Outcome, &'static str) {
        let (_, r) = got
            .iter()
            .find(|(f, _)| *f == fd)
            .expect("every victim answered");
        (r.outcome, r.reason.as_ref().map(Reason::code).unwrap_or(""))
    }

    #[test]
    fn each_fd_is_what_the_table_shows() {
        let victims = [v(4, 40), v(6, 60), v(8, 80), v(10, 100), v(12, 120)];
        let before = table(&[
            (0, FdFile::Other("/dev/null".into())),
            (4, FdFile::Socket(40)),
            (5, FdFile::Socket(50)),
            (6, FdFile::Socket(60)),
            (8, FdFile::Socket(80)),
            (10, FdFile::Socket(100)),
            (12, FdFile::Socket(120)),
        ]);
        // 4 and 6 closed; 8 held; 10 reused by a new socket, 12 by a pipe.
        let after = Reread::Table(table(&[
            (0, FdFile::Other("/dev/null".into())),
            (5, FdFile::Socket(50)),
            (8, FdFile::Socket(80)),
            (10, FdFile::Socket(101)),
            (12, FdFile::Other("pipe:[7]".into())),
        ]));
        let (got, counts) = recount(&victims, Some(&before), &after, &killed());
        assert_eq!(got.len(), victims.len());
        assert_eq!(
            outcome_of(&got, 4),
            (Outcome::Reaped, "closed_per_fd_table")
        );
        assert_eq!(
            outcome_of(&got, 6),
            (Outcome::Reaped, "closed_per_fd_table")
        );
        assert_eq!(outcome_of(&got, 8), (Outcome::Error, "helper_failed"));
        assert_eq!(
            outcome_of(&got, 10),
            (Outcome::Reaped, "closed_number_reused")
        );
        assert_eq!(
            outcome_of(&got, 12),
            (Outcome::Reaped, "closed_number_reused")
        );
        assert_eq!(
            counts,
            Counts {
                closed: 4,
                reused: 2,
                held: 1,
                ..Counts::default()
            }
        );
        // The texts say how it is known, and what a reused number holds now.
        let text = |fd| {
            got.iter()
                .find(|(f, _)| *f == fd)
                .and_then(|(_, r)| r.detail())
                .unwrap_or_default()
        };
        assert!(
            text(4).contains("fd table re-read after the helper failed"),
            "{}",
            text(4)
        );
        assert!(text(8).contains("still held"), "{}", text(8));
        assert!(text(12).contains("pipe:[7]"), "{}", text(12));
        assert!(text(10).contains("socket:[101]"), "{}", text(10));
    }

    #[test]
    fn a_reused_number_is_never_still_held() {
        // Same fd, a socket again, but another inode: closed, not held, whatever the
        // number holds now.
        let victims = [v(7, 70)];
        for now in [FdFile::Socket(71), FdFile::Other("/tmp/x".into())] {
            let after = Reread::Table(table(&[(7, now.clone())]));
            let (got, counts) = recount(&victims, None, &after, &killed());
            assert_eq!(got[0].1.outcome, Outcome::Reaped, "{now:?}");
            assert_eq!((counts.closed, counts.reused, counts.held), (1, 1, 0));
        }
    }

    #[test]
    fn what_changed_before_the_helper_started_is_not_ours() {
        let victims = [v(4, 40), v(5, 50), v(6, 60), v(7, 70)];
        let before = table(&[
            (5, FdFile::Socket(51)),
            (6, FdFile::Other("/dev/null".into())),
            (7, FdFile::Socket(70)),
        ]);
        let after = Reread::Table(FdFiles::new());
        let (got, counts) = recount(&victims, Some(&before), &after, &killed());
        assert_eq!(outcome_of(&got, 4), (Outcome::Gone, "fd_closed"));
        assert_eq!(outcome_of(&got, 5), (Outcome::Changed, "inode_changed"));
        assert_eq!(outcome_of(&got, 6), (Outcome::Changed, "not_socket"));
        assert_eq!(
            outcome_of(&got, 7),
            (Outcome::Reaped, "closed_per_fd_table")
        );
        assert_eq!((counts.before, counts.closed), (3, 1));
    }

    #[test]
    fn a_process_gone_or_unreadable_table_is_unknown() {
        let victims = [v(4, 40), v(5, 50)];
        let (got, counts) = recount(&victims, None, &Reread::Gone, &killed());
        assert!(got.iter().all(|(_, r)| r.outcome == Outcome::Gone
            && r.detail().is_some_and(|d| d.contains("cannot be known"))));
        assert_eq!(outcome_of(&got, 4).1, "process_exited");
        assert_eq!((counts.unknown, counts.closed, counts.held), (2, 0, 0));
        let (got, counts) = recount(
            &victims,
            None,
            &Reread::Unreadable("Permission denied".into()),
            &killed(),
        );
        assert!(
            got.iter()
                .all(|(_, r)| r.outcome == Outcome::Error && r.reason.is_some())
        );
        assert_eq!(outcome_of(&got, 5).1, "helper_failed");
        assert_eq!(counts.unknown, 2);
        assert!(
            counts.describe(9, &killed()).contains("cannot be known"),
            "{}",
            counts.describe(9, &killed())
        );
    }

    #[test]
    fn the_summary_says_how_the_counts_were_obtained() {
        let counts = Counts {
            closed: 3,
            held: 2,
            ..Counts::default()
        };
        let helper = killed();
        assert_eq!(
            summary_note(&[(&helper, &counts)]).as_deref(),
            Some("helper failed: counts re-read from the fd table")
        );
        let ptrace = InjectError::Ptrace("PTRACE_SETREGS: ESRCH".into());
        assert_eq!(
            summary_note(&[(&ptrace, &counts)]).as_deref(),
            Some("injection failed (ptrace_failed): counts re-read from the fd table")
        );
        let gone = Counts {
            unknown: 4,
            ..Counts::default()
        };
        assert!(
            summary_note(&[(&helper, &counts), (&helper, &gone)])
                .is_some_and(|n| n.contains("4 fd(s) unknown"))
        );
        assert_eq!(summary_note(&[]), None);
        let line = counts.describe(42, &helper);
        assert!(
            line.starts_with("close: pid 42: the injection failed")
                && line.contains("3 closed")
                && line.contains("2 still held"),
            "{line}"
        );
    }

    #[test]
    fn only_failures_that_may_have_closed_are_recounted() {
        assert!(needs_recount(&killed()));
        assert!(needs_recount(&InjectError::Ptrace("x".into())));
        assert!(!needs_recount(&InjectError::Gone));
        assert!(!needs_recount(&InjectError::Permission("x".into())));
        assert!(!needs_recount(&InjectError::Timeout("x".into())));
    }

    #[test]
    fn reread_goes_through_the_pinned_process() {
        const P: i32 = 300;
        let k = FakeKernel::new();
        k.spawn(Process::new(P, "srv"));
        k.close_wait(P, 4, "10.0.0.1:80", "10.0.0.2:5000");
        k.close_wait(P, 5, "10.0.0.1:80", "10.0.0.2:5001");
        let pin = Effects::open_process(&k, P).expect("pin");
        let Reread::Table(t) = reread(&k, &pin, P, None) else {
            panic!("the table of a live process")
        };
        assert_eq!(t.keys().copied().collect::<Vec<_>>(), [4, 5]);
        assert!(t.values().all(|f| matches!(f, FdFile::Socket(_))));
        k.with(|w| w.processes.get_mut(&P).map(|p| p.fds.remove(&4)));
        let Reread::Table(t) = reread(&k, &pin, P, None) else {
            panic!("the table of a live process")
        };
        assert_eq!(t.keys().copied().collect::<Vec<_>>(), [5]);
        k.exit(P);
        assert_eq!(reread(&k, &pin, P, None), Reread::Gone);
        // A new process with the same pid is not the pinned one.
        let mut other = Process::new(P, "other");
        other.start_time += 1;
        other.fds = k.with(|w| {
            w.processes
                .get(&P)
                .map(|p| p.fds.clone())
                .unwrap_or_default()
        });
        k.spawn(other);
        assert_eq!(reread(&k, &pin, P, None), Reread::Gone);
    }
}
