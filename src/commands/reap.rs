//! `cwreap reap`: act on the matching sockets now, each verified through the pidfd held
//! since attribution: shutdown (default), SOCK_DESTROY (`--destroy`), or close() inside
//! the owner (`--close`, the manual last resort).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};

use anyhow::Result;

use cwreap_linux::inject::{Helper, Victim, close_in_target};
use cwreap_linux::os::{Os, RealOs};
use cwreap_linux::procfs::ProcFs;
use cwreap_linux::tcp;

use super::{Status, missing_ptrace, observe};
use crate::act::{self, ActResult, Expected, Outcome, Reason, Via};
use crate::cli::ReapArgs;
use crate::config::UsageError;
use crate::output;
use crate::select::{self, Row};
use crate::snapshot::Snapshot;

pub fn reap(args: &ReapArgs, out: &mut impl Write, err: &mut impl Write) -> Result<Status> {
    if args.selectors.is_empty() {
        return Err(UsageError(
            "reap needs a selector: --pid PID, --comm REGEX or --port PORT (use `cwreap scan` \
to see candidates)"
                .into(),
        )
        .into());
    }
    let os = RealOs;
    let (snap, mut namespaces) = observe(Some(&os), &args.selectors)?;
    let filter = args.selectors.filter(Some(args.older_than));
    let rows = select::select(&snap, &filter);
    let max = args.max.map(|m| usize::try_from(m).unwrap_or(usize::MAX));
    let (plan, unowned) = select::plan_reap(&rows, max, args.destroy);
    let action = if args.destroy {
        "destroy"
    } else if args.close {
        "close"
    } else {
        "shutdown"
    };
    // close(): one stop per process for all of its fds, done before reporting.
    let mut closed = if args.close && !args.dry_run {
        close_batches(&snap, &plan, err)?
    } else {
        HashMap::new()
    };

    let mut done: Vec<(Row<'_, _>, ActResult)> = Vec::with_capacity(plan.len());
    let mut unsupported = false;
    for row in plan {
        let res = if args.close && row.unaccepted {
            ActResult::with(Outcome::Skipped, Reason::Unaccepted(Via::ReapClose))
        } else if args.close && !args.dry_run {
            row.holder
                .and_then(|h| closed.remove(&(h.pid, h.fd)))
                .unwrap_or_else(|| ActResult::with(Outcome::Error, Reason::NotInBatch))
        } else if args.destroy {
            if unsupported {
                ActResult::with(Outcome::Error, Reason::DestroyUnsupported { error: None })
            } else {
                let res = act::destroy_verified(&mut namespaces, &row.socket.diag, args.dry_run);
                unsupported = matches!(res.reason, Some(Reason::DestroyUnsupported { .. }));
                res
            }
        } else if row.unaccepted {
            ActResult::with(Outcome::Skipped, Reason::Unaccepted(Via::ReapShutdown))
        } else {
            reap_row(&os, &snap, row, args.dry_run)
        };
        if args.json {
            output::write_reap_json(out, row, action, &res)?;
        }
        done.push((*row, res));
    }
    if unsupported {
        writeln!(err, "cwreap: {}", act::NO_DESTROY_HINT)?;
    }
    let mut extra_errors = false;
    if args.close {
        extra_errors = close_held_after_shutdown(
            &os,
            &snap,
            &args.selectors.pids,
            args.dry_run,
            args.json,
            out,
            err,
        )?;
    }

    let mut counts: BTreeMap<Outcome, usize> = BTreeMap::new();
    for (_, res) in &done {
        *counts.entry(res.outcome).or_default() += 1;
    }
    let summary = Outcome::ALL
        .iter()
        .map(|o| format!("{} {}", counts.get(o).copied().unwrap_or(0), o.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    let mut footer = format!(
        "reap{}: {} matched, {summary}",
        if args.dry_run { " (dry run)" } else { "" },
        done.len()
    );
    if unowned > 0 {
        footer.push_str(&format!(
            "; {unowned} matching socket(s) have no owner fd (unreadable process) and were left alone; --destroy can reach them"
        ));
    }
    if args.json {
        writeln!(err, "{footer}")?;
    } else {
        if done.is_empty() {
            writeln!(
                out,
                "Nothing to reap: no CLOSE_WAIT socket matches the selection and --older-than."
            )?;
        } else {
            write!(out, "{}", output::reap_table(&done, action))?;
            writeln!(out)?;
        }
        writeln!(out, "{footer}")?;
    }

    let denied = done.iter().filter(|(_, r)| r.permission_denied()).count();
    if denied > 0 && denied == done.len() {
        if args.destroy {
            return Err(UsageError(format!("permission denied: {}", act::NET_ADMIN_HINT)).into());
        }
        return Err(missing_ptrace("duplicating the sockets").into());
    }
    if denied > 0 {
        let hint = if args.destroy {
            act::NET_ADMIN_HINT
        } else {
            act::PTRACE_HINT
        };
        writeln!(err, "hint: {hint}")?;
    }
    Ok(if counts.contains_key(&Outcome::Error) || extra_errors {
        Status::Failed
    } else {
        Status::Ok
    })
}

/// Act on one planned row through the pidfd held since attribution.
pub fn reap_row<O: Os>(
    os: &O,
    snap: &Snapshot<O::Process>,
    row: &Row<'_, O::Process>,
    dry_run: bool,
) -> ActResult {
    let Some(holder) = row.holder else {
        return ActResult::with(Outcome::Error, Reason::NoOwner);
    };
    let Some(handle) = snap
        .processes
        .get(&holder.pid)
        .and_then(|p| p.handle.as_ref())
    else {
        return ActResult::with(Outcome::Error, Reason::NotPinned);
    };
    let exp = Expected {
        pid: holder.pid,
        fd: holder.fd,
        inode: row.socket.diag.inode,
        cookie: row.socket.diag.cookie,
    };
    act::shutdown_verified(os, handle, &exp, dry_run)
}

/// Run the injected close() for the planned rows, one stop per owner. Results by (pid, fd).
fn close_batches(
    snap: &Snapshot<OwnedFd>,
    plan: &[&Row<'_, OwnedFd>],
    err: &mut impl Write,
) -> Result<HashMap<(i32, i32), ActResult>> {
    let mut by_pid: BTreeMap<i32, Vec<Victim>> = BTreeMap::new();
    for row in plan {
        if let (Some(h), false) = (row.holder, row.unaccepted) {
            by_pid.entry(h.pid).or_default().push(Victim {
                fd: h.fd,
                inode: row.socket.diag.inode,
                cookie: row.socket.diag.cookie,
            });
        }
    }
    let mut out = HashMap::new();
    for (pid, victims) in by_pid {
        let Some(pidfd) = snap.processes.get(&pid).and_then(|p| p.handle.as_ref()) else {
            for v in &victims {
                out.insert(
                    (pid, v.fd),
                    ActResult::with(Outcome::Gone, Reason::NotPinned),
                );
            }
            continue;
        };
        let batch = close_in_target(
            &Helper::this_program(&["inject-helper"]),
            pid,
            pidfd.as_fd(),
            &victims,
        );
        if let Ok(report) = &batch {
            writeln!(
                err,
                "close: pid {pid}: {} closed, {} skipped; target paused {} µs ({} threads); open fds {} -> {}",
                report.closed.len(),
                report.skipped.len(),
                report.pause_us,
                report.threads,
                report.fds_before,
                report.fds_after
            )?;
        }
        for (fd, res) in act::close_results(&victims, &batch) {
            out.insert((pid, fd), res);
        }
    }
    Ok(out)
}

/// Sockets of the named processes that were already shut down (TCP state CLOSE) but whose
/// fd the owner still holds: invisible to sock_diag, found by inspecting each socket fd
/// through the pidfd. Closed inside the target like the rest. Returns whether any failed.
fn close_held_after_shutdown(
    os: &RealOs,
    snap: &Snapshot<OwnedFd>,
    pids: &[i32],
    dry_run: bool,
    json: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<bool> {
    let proc = ProcFs::default();
    let mut failed = false;
    for &pid in pids {
        let Some(pidfd) = snap.processes.get(&pid).and_then(|p| p.handle.as_ref()) else {
            continue;
        };
        let Ok(table) = proc.fd_table(pid) else {
            continue;
        };
        let mut victims = Vec::new();
        for (fd, _) in table.sockets {
            let Ok(dup) = os.duplicate(pidfd, fd) else {
                continue;
            };
            if let Ok(id) = os.identify(&dup)
                && id.tcp_state == tcp::CLOSE
            {
                victims.push(Victim {
                    fd,
                    inode: id.inode,
                    cookie: id.cookie,
                });
            }
        }
        if victims.is_empty() {
            continue;
        }
        let results: Vec<(i32, ActResult)> = if dry_run {
            victims
                .iter()
                .map(|v| (v.fd, ActResult::ok(Outcome::DryRun)))
                .collect()
        } else {
            let batch = close_in_target(
                &Helper::this_program(&["inject-helper"]),
                pid,
                pidfd.as_fd(),
                &victims,
            );
            if let Ok(r) = &batch {
                writeln!(
                    err,
                    "close: pid {pid}: {} already-shut-down socket(s) closed, paused {} µs; open fds {} -> {}",
                    r.closed.len(),
                    r.pause_us,
                    r.fds_before,
                    r.fds_after
                )?;
            }
            act::close_results(&victims, &batch)
        };
        for (fd, res) in results {
            failed |= res.outcome == Outcome::Error;
            let outcome = res.outcome.as_str();
            if json {
                let line = serde_json::json!({"pid": pid, "fd": fd, "state": "CLOSE", "action": "close", "outcome": outcome, "reason": res.reason.as_ref().map(Reason::code), "error": res.detail()});
                writeln!(out, "{line}")?;
            } else {
                writeln!(
                    out,
                    "pid {pid} fd {fd}: shut down earlier, still held: close {outcome}{}",
                    res.detail().map(|d| format!(" ({d})")).unwrap_or_default()
                )?;
            }
        }
    }
    Ok(failed)
}
