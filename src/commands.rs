//! The `scan` and `reap` commands: discovery → attribution → selection → action → report.
//! This is the edge: errors carry context here, and usage errors become exit code 2.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use anyhow::{Context, Result};

use crate::act::{self, ActResult, Expected, Outcome};
use crate::cli::{ReapArgs, ScanArgs, Selectors};
use crate::discover::Namespaces;
use crate::os::{Os, RealOs};
use crate::output;
use crate::procfs::ProcFs;
use crate::select::{self, Filter, Row};
use crate::snapshot::{self, Attributor, Snapshot};
use crate::sys;

/// An error the user can fix by changing how cwreap is invoked or privileged: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit status of a command that ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Some socket failed.
    Failed,
}

fn missing_ptrace(what: &str) -> UsageError {
    UsageError(format!(
        "permission denied {what}: reading another user's /proc/PID/fd and pidfd_getfd need \
CAP_SYS_PTRACE. Run as root, or grant it: `sudo setcap cap_sys_ptrace,cap_dac_read_search+ep \
$(command -v cwreap)`"
    ))
}

/// Turn the selected pids that could not be read into a usage error.
fn check_unreadable<H>(snap: &Snapshot<H>) -> Result<()> {
    if let Some((pid, e)) = snap.unreadable.first() {
        if snapshot::is_permission(e) {
            return Err(missing_ptrace(&format!("for pid {pid}")).into());
        }
        return Err(UsageError(format!("pid {pid}: no such process ({e})")).into());
    }
    Ok(())
}

/// Everything up to selection, shared by scan and reap: one sock_diag socket per network
/// namespace of the processes in scope, then attribution.
fn observe<O: Os>(
    os: Option<&O>,
    selectors: &Selectors,
) -> Result<(Snapshot<O::Process>, Namespaces)> {
    let proc = ProcFs::default();
    let scope = selectors.scope();
    let mut namespaces = Namespaces::default();
    match &scope.pids {
        Some(pids) => namespaces.cover(&proc, pids, false),
        None => {
            let all = proc.pids().context("listing /proc")?;
            namespaces.cover(&proc, &all, true);
        }
    }
    let found = namespaces
        .dump()
        .context("dumping CLOSE_WAIT sockets over sock_diag")?;
    let attributor = Attributor {
        proc: &proc,
        os,
        self_pid: std::process::id() as i32,
    };
    let snap = attributor.attribute(found, &scope);
    check_unreadable(&snap)?;
    Ok((snap, namespaces))
}

fn denied_note(denied: usize) -> Option<String> {
    (denied > 0 && !sys::has_cap(sys::CAP_SYS_PTRACE)).then(|| {
        format!(
            "note: {denied} process(es) could not be inspected (permission denied); their \
sockets show no owner. Run as root or with CAP_SYS_PTRACE to see them."
        )
    })
}

fn stdout_color() -> bool {
    output::use_color(
        std::io::IsTerminal::is_terminal(&std::io::stdout()),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

pub fn scan(args: &ScanArgs, out: &mut impl Write, err: &mut impl Write) -> Result<Status> {
    if let Some(every) = args.watch {
        return watch(args, every, out, err);
    }
    let color = stdout_color();
    let (snap, namespaces) = observe::<RealOs>(None, &args.selectors)?;
    for (_, why) in &namespaces.failures {
        writeln!(err, "warning: {why}")?;
    }
    let filter = args.selectors.filter(args.older_than);
    let rows = select::select(&snap, &filter);
    if args.json {
        for r in &rows {
            output::write_scan_json(out, r)?;
        }
    } else if rows.is_empty() {
        writeln!(out, "{}", empty_message(&filter, snap.stats.inspected))?;
    } else {
        write!(out, "{}", output::scan_table(&rows, color))?;
        writeln!(out)?;
        write!(
            out,
            "{}",
            output::summary_table(&select::summarize(&rows), color)
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "{} CLOSE_WAIT socket(s). AGE is a lower bound: time since the peer's last ACK.",
            rows.len()
        )?;
        let st = snap.stats;
        if st.vanished + st.denied > 0 {
            writeln!(
                out,
                "Skipped {} process(es) that exited during the scan and {} that could not be read.",
                st.vanished, st.denied
            )?;
        }
    }
    if let Some(note) = denied_note(snap.stats.denied) {
        writeln!(err, "{note}")?;
    }
    Ok(Status::Ok)
}

/// `scan --watch`: the per-process view, redrawn every `every` like watch(1), with how
/// each process moved since the previous refresh. Runs until interrupted.
fn watch(
    args: &ScanArgs,
    every: std::time::Duration,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<Status> {
    let color = stdout_color();
    let filter = args.selectors.filter(args.older_than);
    let mut previous: BTreeMap<i32, (usize, usize)> = BTreeMap::new();
    loop {
        let (snap, namespaces) = observe::<RealOs>(None, &args.selectors)?;
        let rows = select::select(&snap, &filter);
        let sums = select::summarize(&rows);
        let view: Vec<output::WatchRow> = sums
            .iter()
            .map(|s| {
                let before = previous.get(&s.pid);
                output::WatchRow {
                    summary: s.clone(),
                    close_wait_delta: before.map(|(cw, _)| s.close_wait as i64 - *cw as i64),
                    fds_delta: before.map(|(_, fds)| s.open_fds as i64 - *fds as i64),
                }
            })
            .collect();
        previous = sums
            .iter()
            .map(|s| (s.pid, (s.close_wait, s.open_fds)))
            .collect();
        // Home the cursor and clear, as watch(1) does.
        write!(out, "\x1b[H\x1b[2J")?;
        writeln!(
            out,
            "cwreap scan --watch {}    {} CLOSE_WAIT socket(s) in {} process(es)    Ctrl-C to quit",
            humantime::format_duration(every),
            rows.len(),
            sums.len()
        )?;
        writeln!(out)?;
        if view.is_empty() {
            writeln!(out, "{}", empty_message(&filter, snap.stats.inspected))?;
        } else {
            write!(out, "{}", output::watch_table(&view, color))?;
        }
        for (_, why) in &namespaces.failures {
            writeln!(err, "warning: {why}")?;
        }
        out.flush()?;
        std::thread::sleep(every);
    }
}

fn empty_message(filter: &Filter, inspected: usize) -> String {
    let narrowed =
        filter.selects_processes() || filter.port.is_some() || filter.older_than.is_some();
    let mut msg = String::from("No CLOSE_WAIT sockets");
    if narrowed {
        msg.push_str(" match the selection");
    } else {
        msg.push_str(" on this host (network namespace)");
    }
    if inspected > 0 {
        msg.push_str(&format!(" ({inspected} process(es) inspected)"));
    }
    msg.push('.');
    msg
}

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
            ActResult::with(
                Outcome::Skipped,
                "unaccepted: no fd exists to close; use --destroy",
            )
        } else if args.close && !args.dry_run {
            row.holder
                .and_then(|h| closed.remove(&(h.pid, h.fd)))
                .unwrap_or_else(|| ActResult::with(Outcome::Error, "not part of any batch"))
        } else if args.destroy {
            if unsupported {
                ActResult::with(Outcome::Error, act::NO_DESTROY_HINT)
            } else {
                let res = act::destroy_verified(&mut namespaces, &row.socket.diag, args.dry_run);
                unsupported = res
                    .detail
                    .as_deref()
                    .is_some_and(|d| d.contains(act::NO_DESTROY_HINT));
                res
            }
        } else if row.unaccepted {
            ActResult::with(
                Outcome::Skipped,
                "unaccepted: the app never accept()ed it, so no fd exists to shut down; use --destroy",
            )
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

    let denied = done.iter().filter(|(_, r)| r.permission_denied).count();
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
        return ActResult {
            outcome: Outcome::Error,
            detail: Some("no owner fd".into()),
            permission_denied: false,
        };
    };
    let Some(handle) = snap
        .processes
        .get(&holder.pid)
        .and_then(|p| p.handle.as_ref())
    else {
        return ActResult {
            outcome: Outcome::Error,
            detail: Some("no pidfd held for the owner".into()),
            permission_denied: false,
        };
    };
    let exp = Expected {
        pid: holder.pid,
        fd: holder.fd,
        inode: row.socket.diag.inode,
        cookie: row.socket.diag.cookie,
    };
    act::shutdown_verified(os, handle, &exp, dry_run)
}

/// `cwreap check`: validate a policy (ownership and mode too, when root) and print it.
pub fn check(path: &std::path::Path, out: &mut impl Write) -> Result<Status> {
    let cfg = crate::daemon::load_config(path).map_err(|e| UsageError(e.to_string()))?;
    writeln!(out, "{}: OK", path.display())?;
    write!(out, "{}", cfg.describe())?;
    Ok(Status::Ok)
}

/// Run the injected close() for the planned rows, one stop per owner. Results by (pid, fd).
fn close_batches(
    snap: &Snapshot<std::os::fd::OwnedFd>,
    plan: &[&Row<'_, std::os::fd::OwnedFd>],
    err: &mut impl Write,
) -> Result<HashMap<(i32, i32), ActResult>> {
    use crate::inject::{Victim, close_in_target};
    use std::os::fd::AsFd;
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
                    ActResult::with(Outcome::Gone, "owner no longer pinned"),
                );
            }
            continue;
        };
        let batch = close_in_target(pid, pidfd.as_fd(), &victims);
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
    snap: &Snapshot<std::os::fd::OwnedFd>,
    pids: &[i32],
    dry_run: bool,
    json: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<bool> {
    use crate::inject::{Victim, close_in_target};
    use std::os::fd::AsFd;
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
                && id.tcp_state == 7
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
            let batch = close_in_target(pid, pidfd.as_fd(), &victims);
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
                let line = serde_json::json!({"pid": pid, "fd": fd, "state": "CLOSE", "action": "close", "outcome": outcome, "error": res.detail});
                writeln!(out, "{line}")?;
            } else {
                writeln!(
                    out,
                    "pid {pid} fd {fd}: shut down earlier, still held: close {outcome}{}",
                    res.detail.map(|d| format!(" ({d})")).unwrap_or_default()
                )?;
            }
        }
    }
    Ok(failed)
}
