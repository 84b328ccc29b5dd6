//! `cwreap reap --pid PID --close`: the verified replacement of `gdb -ex 'call close(FD)'`,
//! for one named process, with consent. It frees the fd slots of sockets that are over:
//! CLOSE_WAIT ones, and CLOSE ones left over from a connection that ended (shut down but
//! still held). It never closes anything else.
//!
//! The hazard, said wherever this is offered: an application that still holds the number
//! may later use it after it was reused and misdeliver data or kill another connection
//! (seen in Python, Go, Java and Node), so it is only for a process that will be restarted
//! anyway, to keep it serving until then. The daemon never does this.
//!
//! Guards: at least one `--pid` (other selectors only narrow); every filter applies to
//! everything closed; confirmation with `--yes` or a typed `yes` on a terminal; each fd is
//! verified again while the process is stopped (inode, cookie, state). CLOSE sockets are
//! not in sock_diag dumps, so every socket fd of the named processes is duplicated and
//! inspected here.
//!
//! A helper that fails mid-batch (killed, or a ptrace step failing) reports nothing of what
//! it closed: the target's fd table is then read again and each fd reported by what it
//! shows ([`crate::shared::recount`]), and the summary says so.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::os::fd::AsFd;

use anyhow::Result;

use cwreap_linux::inject::{Helper, InjectError, Victim, await_threads_ran, close_in_target};
use cwreap_linux::kernel::{Effects, Linux, Pinned, ProcRead, inspect_socket};

use super::common::{Status, observe, stalled_note};
use crate::cli::args::ReapArgs;
use crate::cli::plan::{self, HeldSocket};
use crate::cli::render;
use crate::shared::act::{self, ActResult, Outcome};
use crate::shared::attribute::Snapshot;
use crate::shared::recount::{self, Reread};
use crate::shared::usage::UsageError;

/// Said with every confirmation prompt, in `--help` and in the README.
pub const CLOSE_HAZARD: &str = "--close runs close(fd) inside the process (ptrace). The application still holds the fd number: it may later read, write or close that number after it was reused for a new connection, and misdeliver data or kill the new connection. This was seen in a Python connection pool, a Go server, Java (the GC's Cleaner) and Node (timers). Use it only on a process you will restart anyway, to keep it serving until then.";

/// How long, after a helper failed, the target's threads get to run again before its fd
/// table is re-read (a guard: they normally run within microseconds).
const THREADS_GUARD: std::time::Duration = std::time::Duration::from_secs(2);

/// The one program `--close` starts to do the ptrace work: this binary again.
pub fn helper() -> Helper {
    Helper::this_program(&["inject-helper"])
}

pub fn reap_close(
    args: &ReapArgs,
    older_than: std::time::Duration,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<Status> {
    let mut k = Linux::default();
    let (snap, _failures, _unprobed) = observe(&mut k, true, &args.selectors)?;
    if let Some(note) = stalled_note(&snap.stalled) {
        writeln!(err, "{note}")?;
    }
    let held = inspect_held(&k, &snap);
    let filter = args.selectors.filter(Some(older_than));
    let max = args.max.map(|m| usize::try_from(m).unwrap_or(usize::MAX));
    let plan = plan::plan_close(&held, &filter, max);

    if plan.is_empty() {
        if !args.json {
            writeln!(
                out,
                "Nothing to close: no CLOSE_WAIT socket, and no socket of an ended connection, matches the selection and --older-than."
            )?;
        }
        let footer = "close: 0 matched, 0 closed";
        writeln!(
            if args.json {
                &mut *err as &mut dyn Write
            } else {
                out
            },
            "{footer}"
        )?;
        return Ok(Status::Ok);
    }
    if !args.dry_run && !args.yes {
        confirm(&plan, err)?;
    }

    let mut results: BTreeMap<(i32, i32), ActResult> = BTreeMap::new();
    // Batches that failed as a whole and were counted from the fd table instead.
    let mut recounted: Vec<(InjectError, recount::Counts)> = Vec::new();
    if args.dry_run {
        for (h, _) in &plan {
            results.insert((h.pid, h.fd), ActResult::ok(Outcome::DryRun));
        }
    } else {
        let mut by_pid: BTreeMap<i32, Vec<Victim>> = BTreeMap::new();
        for (h, _) in &plan {
            by_pid.entry(h.pid).or_default().push(Victim {
                fd: h.fd,
                inode: h.facts.inode,
                cookie: h.facts.cookie,
            });
        }
        let helper = helper();
        for (pid, victims) in by_pid {
            let Some(p) = snap.processes.get(&pid) else {
                continue;
            };
            let Some(pidfd) = p.handle.as_ref() else {
                continue;
            };
            // The victims' fds just before the helper starts: anything the target closed
            // or replaced itself by then is not counted as closed by us if the batch fails.
            let before = match recount::reread(&k, pidfd, pid, p.thread) {
                Reread::Table(t) => Some(t),
                Reread::Gone | Reread::Unreadable(_) => None,
            };
            let batch = close_in_target(&helper, pid, pidfd.as_fd(), &victims);
            if let Ok(r) = &batch {
                writeln!(
                    err,
                    "close: pid {pid}: {} closed, {} left alone; target paused {} µs ({} threads); open fds {} -> {}",
                    r.closed.len(),
                    r.skipped.len(),
                    r.pause_us,
                    r.threads,
                    r.fds_before,
                    r.fds_after
                )?;
            }
            let rows = match &batch {
                // The helper died (or a ptrace step failed) and may have closed some fds
                // without a report: the fd table says which.
                Err(e) if recount::needs_recount(e) => {
                    // A call the dying helper had already set up runs as soon as its thread
                    // gets a CPU again: only then does the table show it.
                    if !await_threads_ran(pid, THREADS_GUARD) {
                        writeln!(
                            err,
                            "close: pid {pid}: a thread of the target had not run again {THREADS_GUARD:?} after the helper ended; an fd it was about to close may close later"
                        )?;
                    }
                    let after = recount::reread(&k, pidfd, pid, p.thread);
                    let (rows, counts) = recount::recount(&victims, before.as_ref(), &after, e);
                    writeln!(err, "{}", counts.describe(pid, e))?;
                    recounted.push((e.clone(), counts));
                    rows
                }
                _ => act::close_results(&victims, &batch),
            };
            for (fd, res) in rows {
                results.insert((pid, fd), res);
            }
        }
    }

    let mut done = Vec::with_capacity(plan.len());
    for (h, kind) in &plan {
        let res = results
            .remove(&(h.pid, h.fd))
            .unwrap_or_else(|| ActResult::with(Outcome::Gone, act::Reason::NotPinned));
        if args.json {
            render::write_close_json(out, h, *kind, &res)?;
        }
        done.push((*h, *kind, res));
    }
    let mut counts: BTreeMap<Outcome, usize> = BTreeMap::new();
    for (_, _, res) in &done {
        *counts.entry(res.outcome).or_default() += 1;
    }
    let closed = counts.get(&Outcome::Reaped).copied().unwrap_or(0);
    let summary = Outcome::ALL
        .iter()
        .filter(|o| **o != Outcome::Reaped)
        .map(|o| format!("{} {}", counts.get(o).copied().unwrap_or(0), o.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    let failures: Vec<(&InjectError, &recount::Counts)> =
        recounted.iter().map(|(e, c)| (e, c)).collect();
    let note = recount::summary_note(&failures)
        .map(|n| format!("; {n}"))
        .unwrap_or_default();
    let footer = format!(
        "close{}: {} matched, {closed} closed, {summary}{note}",
        if args.dry_run { " (dry run)" } else { "" },
        done.len()
    );
    if args.json {
        writeln!(err, "{footer}")?;
    } else {
        write!(out, "{}", render::close_table(&done))?;
        writeln!(out)?;
        writeln!(out, "{footer}")?;
    }
    let denied = done
        .iter()
        .filter(|(_, _, r)| r.permission_denied())
        .count();
    if denied > 0 {
        return Err(super::common::missing_ptrace(&format!(
            "running close() inside the target for {denied} fd(s)"
        ))
        .into());
    }
    // A refusal leaves the fd untouched on purpose (`skipped`), but what was asked for did
    // not happen: scripts see it in the exit status, as they do an error.
    let refused = done.iter().any(|(_, _, r)| {
        matches!(
            r.reason,
            Some(act::Reason::InjectFailed(InjectError::Refused(_)))
        )
    });
    // A batch whose helper failed is a failure even when every fd turned out closed: the
    // helper did not finish as it should (and its target may have been left mid-call).
    Ok(
        if counts.contains_key(&Outcome::Error) || refused || !recounted.is_empty() {
            Status::Failed
        } else {
            Status::Ok
        },
    )
}

/// Every socket fd of the pinned processes, duplicated through the pidfd and inspected.
/// Anything that cannot be read is left out: it will not be closed.
fn inspect_held(k: &Linux, snap: &Snapshot<Pinned>) -> Vec<HeldSocket> {
    let mut out = Vec::new();
    for (pid, p) in &snap.processes {
        let Some(pidfd) = p.handle.as_ref() else {
            continue;
        };
        let Ok(table) = ProcRead::fd_table(k, *pid) else {
            continue;
        };
        for (fd, _) in table.sockets {
            let Ok(dup) = k.duplicate(pidfd, fd) else {
                continue;
            };
            if let Ok(facts) = inspect_socket(dup.as_fd()) {
                out.push(HeldSocket {
                    pid: *pid,
                    fd,
                    comm: p.comm.clone(),
                    facts,
                });
            }
        }
    }
    out
}

/// Print what will be closed and the hazard, and ask for a typed `yes` on a terminal.
fn confirm(plan: &[(&HeldSocket, plan::Closable)], err: &mut impl Write) -> Result<()> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(UsageError(format!(
            "--close needs --yes, or a typed `yes` on a terminal; nothing was closed ({} fd(s) would be). {CLOSE_HAZARD}",
            plan.len()
        ))
        .into());
    }
    let mut per_pid: BTreeMap<(i32, &str), usize> = BTreeMap::new();
    for (h, _) in plan {
        *per_pid.entry((h.pid, h.comm.as_str())).or_default() += 1;
    }
    for ((pid, comm), n) in &per_pid {
        writeln!(err, "will close {n} fd(s) inside pid {pid} ({comm})")?;
    }
    writeln!(err, "{CLOSE_HAZARD}")?;
    write!(err, "Type yes to go on: ")?;
    err.flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    if answer.trim() != "yes" {
        return Err(UsageError("not confirmed; nothing was closed".into()).into());
    }
    Ok(())
}
