//! `cwreap reap`: act on the matching sockets now, each verified through the pidfd held
//! since attribution: shutdown (default), SOCK_DESTROY (`--destroy`), or close() inside
//! the owner (`--close`, the manual last resort).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use anyhow::Result;

use cwreap_linux::kernel::{Effects, Kernel};

use cwreap_linux::sys::Capability;

use super::common::{
    FD_TABLE_CAPS, Status, lacking, observe, privilege_error, published_note, stalled_note,
    unprobed_note,
};
use crate::cli::args::ReapArgs;
use crate::cli::plan::{self, Row};
use crate::cli::render;
use crate::shared::act::{self, ActResult, Expected, Outcome, Reason, Via};
use crate::shared::attribute::Snapshot;
use crate::shared::usage::UsageError;

/// Everything a `reap` invocation lacks, all at once, or None when it can go on.
pub fn missing_requirements(args: &ReapArgs) -> Option<String> {
    let mut missing = Vec::new();
    if args.close && args.selectors.pids.is_empty() {
        missing.push(
            "--close needs --pid PID: it acts inside one named process at a time (other selectors only narrow what is closed)"
                .to_owned(),
        );
    } else if args.selectors.is_empty() {
        missing.push(
            "a selector: --pid PID, --comm REGEX or --port PORT (use `cwreap scan` to see candidates)"
                .to_owned(),
        );
    }
    if args.older_than.is_none() {
        missing.push(
            "--older-than DUR, e.g. 10m (no default, so a slip cannot reap fresh sockets)"
                .to_owned(),
        );
    }
    match missing.len() {
        0 => None,
        1 if args.close && args.selectors.pids.is_empty() => missing.pop(),
        _ => Some(format!("reap needs {}", missing.join("; and "))),
    }
}

pub fn reap(args: &ReapArgs, out: &mut impl Write, err: &mut impl Write) -> Result<Status> {
    if let Some(what) = missing_requirements(args) {
        return Err(UsageError(what).into());
    }
    let older_than = args.older_than.unwrap_or_default();
    if args.close {
        return super::close::reap_close(args, older_than, out, err);
    }
    let mut k = super::common::cli_kernel(&args.selectors);
    let status = reap_on(&mut k, args, out, err)?;
    published_note(&k, err)?;
    Ok(status)
}

/// [`reap`] (shutdown or destroy; not `--close`) on `k`.
pub fn reap_on<K: Kernel>(
    k: &mut K,
    args: &ReapArgs,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<Status> {
    if let Some(what) = missing_requirements(args) {
        return Err(UsageError(what).into());
    }
    let older_than = args.older_than.unwrap_or_default();
    let (snap, _failures, unprobed) = observe(k, true, &args.selectors)?;
    for note in [unprobed_note(&unprobed), stalled_note(&snap.stalled)]
        .into_iter()
        .flatten()
    {
        writeln!(err, "{note}")?;
    }
    let filter = args.selectors.filter(Some(older_than));
    let rows = plan::select(&snap, &filter);
    // Sockets the lower bound keeps out, though the upper bound says they may be old
    // enough: never reaped on that, but said.
    let maybe = plan::select(&snap, &args.selectors.filter(None))
        .iter()
        .filter(|r| !r.dead() && r.age.might_reach(older_than))
        .count();
    let max = args.max.map(|m| usize::try_from(m).unwrap_or(usize::MAX));
    let (plan, unowned) = plan::plan_reap(&rows, max, args.destroy);
    let action = if args.destroy { "destroy" } else { "shutdown" };

    // A dry run proves the permission the real run needs. For SOCK_DESTROY a made-up socket
    // proves nothing (the kernel looks it up before checking CAP_NET_ADMIN), so destroy a
    // loopback connection of our own in each namespace involved.
    let mut refused_netns: BTreeMap<u64, ActResult> = BTreeMap::new();
    if args.destroy && args.dry_run {
        let netns: BTreeSet<u64> = plan.iter().map(|r| r.socket.diag.netns).collect();
        for ns in netns {
            if let Err(e) = k.prove_destroy(ns) {
                refused_netns.insert(ns, act::destroy_error(&e));
            }
        }
    }

    let mut done: Vec<(Row<'_, _>, ActResult)> = Vec::with_capacity(plan.len());
    let mut unsupported = false;
    for row in plan {
        let res = if let Some(refused) = refused_netns.get(&row.socket.diag.netns) {
            refused.clone()
        } else if args.destroy {
            if unsupported {
                ActResult::with(Outcome::Error, Reason::DestroyUnsupported { error: None })
            } else {
                let res = act::destroy_verified(k, &row.socket.diag, args.dry_run);
                unsupported = matches!(res.reason, Some(Reason::DestroyUnsupported { .. }));
                res
            }
        } else if row.unaccepted {
            ActResult::with(Outcome::Skipped, Reason::Unaccepted(Via::ReapShutdown))
        } else {
            reap_row(&*k, &snap, row, args.dry_run)
        };
        if args.json {
            render::write_reap_json(out, row, action, &res)?;
        }
        done.push((*row, res));
    }
    if unsupported {
        writeln!(err, "cwreap: {}", act::NO_DESTROY_HINT)?;
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
    let dead = rows.iter().filter(|r| r.dead()).count();
    if dead > 0 {
        footer.push_str(&format!(
            "; {dead} dead held socket(s) matched: their connection already ended, so there is nothing to shut down, and only close() frees the fd: restart the process, let the daemon's escalations (signal_at) do it, or close them by hand with `cwreap reap --pid PID --close`"
        ));
    }
    if maybe > 0 {
        footer.push_str(&format!(
            "; {maybe} more socket(s) may be older than {}: their lower bound (time since the peer's last ACK, which keepalive probes and heartbeats reset) is younger, their upper bound (time since data last arrived) older. Their exact age: run the daemon (`cwreap run` ages sockets from its first sight and publishes it for this command) or event discovery",
            humantime::format_duration(older_than)
        ));
    }
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
            write!(out, "{}", render::reap_table(&done, action))?;
            writeln!(out)?;
        }
        writeln!(out, "{footer}")?;
    }

    // Any matching socket that could not be acted on for lack of privilege makes the reap
    // fail with exit 2, naming every capability missing.
    let mut missing: BTreeSet<Capability> = BTreeSet::new();
    let mut refused = 0usize;
    for (_, res) in &done {
        if let Some(cap) = res.missing_capability() {
            refused += 1;
            missing.insert(cap);
        }
    }
    // Processes in scope whose fd tables we could not read may hold matching sockets we
    // never saw an owner for (or, with a process selector, never saw at all).
    let unseen =
        !snap.denied.is_empty() && !args.destroy && (unowned > 0 || filter.selects_processes());
    if unseen {
        missing.extend(lacking(&FD_TABLE_CAPS));
    }
    if refused > 0 || unseen {
        let what = if unseen {
            format!(
                "reading the fds of {} process(es) in scope (matching sockets there cannot be reaped)",
                snap.denied.len()
            )
        } else if args.destroy {
            format!("destroying {refused} socket(s)")
        } else {
            format!("duplicating {refused} socket(s)")
        };
        let missing = if args.destroy {
            missing
                .into_iter()
                .filter(|c| *c == Capability::NetAdmin)
                .collect()
        } else {
            missing
        };
        return Err(privilege_error(&what, &missing).into());
    }
    Ok(if counts.contains_key(&Outcome::Error) {
        Status::Failed
    } else {
        Status::Ok
    })
}

/// Act on one planned row through the pidfd held since attribution.
pub fn reap_row<O: Effects>(
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
