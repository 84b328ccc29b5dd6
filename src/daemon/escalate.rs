//! Escalations, for processes that keep their fds after shutdown (`still_held`) and near
//! EMFILE: raise the soft RLIMIT_NOFILE to the hard limit once, then send a signal once (a
//! restart before EMFILE). Neither touches a socket or an fd of the process, so neither can
//! misdeliver data; the daemon never closes an fd inside a target. The decision is pure
//! ([`crate::daemon::policy::escalation`]); this does it, logs it and audits it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::json;
use tracing::{error, info, warn};

use cwreap_linux::kernel::Kernel;
use cwreap_linux::procfs::Limits;

use crate::daemon::audit::{Auditor, unix_ts};
use crate::daemon::cycle_report::{CycleReport, ErrorKind, EscalationKind};
use crate::daemon::policy::{self, Escalated, Escalation, Load};
use crate::shared::attribute::{Process, Snapshot};
use crate::shared::config::{Config, Target};

/// What the escalations of one cycle may still do.
pub struct Budget {
    /// Signals left under the rate limits (a signal counts as an action).
    pub actions: usize,
    /// Signals sent, to record against the rate limits.
    pub signals: usize,
}

/// Escalations done per process, so each happens once: pid → (its start time, what was
/// done). A pid reused by another process starts afresh.
#[derive(Default)]
pub struct Escalations {
    done: HashMap<i32, (u64, Escalated)>,
}

/// What one cycle's escalations work with.
pub struct Round<'a, K: Kernel> {
    pub kernel: &'a K,
    pub cfg: &'a Config,
    pub force_dry_run: bool,
    pub audit: &'a Auditor,
    pub snap: &'a Snapshot<Arc<K::Process>>,
    /// pid → the targets whose process criteria accept it.
    pub targets: &'a BTreeMap<i32, Vec<usize>>,
    /// (pid, target) → CLOSE_WAIT sockets it selects this cycle.
    pub selected: &'a HashMap<(i32, usize), usize>,
    /// (pid, target) → dead held sockets of the process under that target (those cwreap
    /// shut down and the owner never closed among them).
    pub dead_held: &'a HashMap<(i32, usize), usize>,
}

fn limits_json(l: Option<Limits>) -> serde_json::Value {
    match l {
        Some(l) => json!({"soft": l.soft, "hard": l.hard}),
        None => serde_json::Value::Null,
    }
}

impl Escalations {
    /// Escalate where due, once per process: for each process, the first of its targets
    /// that has `escalate`.
    pub fn run<K: Kernel>(
        &mut self,
        r: &Round<'_, K>,
        budget: &mut Budget,
        report: &mut CycleReport,
    ) {
        self.done.retain(|pid, _| r.targets.contains_key(pid));
        for (&pid, ts) in r.targets {
            let Some((t, target)) = ts.iter().find_map(|&t| {
                r.cfg
                    .targets
                    .get(t)
                    .filter(|target| target.escalate.any())
                    .map(|target| (t, target))
            }) else {
                continue;
            };
            let Some(process) = r.snap.processes.get(&pid) else {
                continue;
            };
            let leaking = r.selected.get(&(pid, t)).copied().unwrap_or(0)
                + r.dead_held.get(&(pid, t)).copied().unwrap_or(0);
            if leaking < target.min_close_wait as usize {
                continue;
            }
            // The limit may have changed since the fd table was read (we may have raised
            // it): read it fresh, and the start time that tells this process from a pid
            // reuse.
            let (Ok(limits), Ok(start)) = (r.kernel.nofile_limits(pid), r.kernel.start_time(pid))
            else {
                continue;
            };
            let done = match self.done.get(&pid) {
                Some((s, d)) if *s == start => *d,
                _ => Escalated::default(),
            };
            let load = Load {
                open_fds: process.open_fds,
                soft: limits.soft,
                hard: limits.hard,
                leaking,
            };
            let Some(step) =
                policy::escalation(&target.escalate, target.min_close_wait, &load, done)
            else {
                continue;
            };
            let dry_run = r.force_dry_run || target.effective_dry_run(r.cfg.dry_run);
            let mut now_done = done;
            match step {
                Escalation::RaiseFdLimit { from, to } => {
                    now_done.raise_settled = true;
                    raise(r, target, process, start, limits, from, to, dry_run, report);
                }
                Escalation::NoRaise(why) => {
                    now_done.raise_settled = true;
                    info!(target = %target.name, pid, comm = %process.comm, open_fds = load.open_fds,
                        soft = from_limit(limits.soft), hard = from_limit(limits.hard),
                        why = why.as_str(), "raise_fd_limit_at reached; the fd limit is not raised");
                    audit_escalation(
                        r.audit,
                        target,
                        process,
                        EscalationKind::RaiseFdLimit,
                        "skipped",
                        dry_run,
                        json!({"before": limits_json(Some(limits)), "why": why.as_str()}),
                    );
                }
                Escalation::Signal => {
                    if budget.actions == 0 {
                        report.deferred += 1;
                        continue;
                    }
                    now_done.signaled = true;
                    if signal(r, target, process, &load, dry_run, report) {
                        budget.actions -= 1;
                        budget.signals += 1;
                    }
                }
            }
            self.done.insert(pid, (start, now_done));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn raise<K: Kernel>(
    r: &Round<'_, K>,
    target: &Target,
    process: &Process<Arc<K::Process>>,
    start: u64,
    before: Limits,
    from: u64,
    to: u64,
    dry_run: bool,
    report: &mut CycleReport,
) {
    let pid = process.pid;
    let kind = EscalationKind::RaiseFdLimit;
    if dry_run {
        info!(target = %target.name, pid, comm = %process.comm, open_fds = process.open_fds,
            from, to, dry_run, kind = kind.as_str(), outcome = "dry_run", "escalation");
        audit_escalation(
            r.audit,
            target,
            process,
            kind,
            "dry_run",
            true,
            json!({"before": limits_json(Some(before)), "to": to}),
        );
        return;
    }
    let alive = process.handle.as_ref().is_some_and(|h| r.kernel.alive(h));
    let result = if alive {
        r.kernel.set_nofile(pid, to, to)
    } else {
        Err(std::io::Error::from_raw_os_error(libc::ESRCH))
    };
    let after = r.kernel.nofile_limits(pid).ok();
    // prlimit takes a pid, not a pidfd: check it still named the same process.
    let same = r.kernel.start_time(pid).ok() == Some(start);
    match result {
        Ok(()) if same => {
            warn!(target = %target.name, pid, comm = %process.comm, open_fds = process.open_fds,
                from, to, kind = kind.as_str(), outcome = "done",
                "escalation: raised the soft fd limit of a leaking process to its hard limit");
            audit_escalation(
                r.audit,
                target,
                process,
                kind,
                "done",
                false,
                json!({"before": limits_json(Some(before)), "after": limits_json(after)}),
            );
            *report
                .escalations
                .entry((target.name.clone(), kind))
                .or_default() += 1;
        }
        Ok(()) => {
            error!(target = %target.name, pid, kind = kind.as_str(),
                "the process exited while its fd limit was raised; the pid may name another process now");
            report.error(ErrorKind::Escalate);
        }
        Err(e) => {
            let hint = if matches!(e.raw_os_error(), Some(libc::EPERM)) {
                "; prlimit needs CAP_SYS_RESOURCE (systemd/drop-ins/escalate.conf)"
            } else {
                ""
            };
            warn!(target = %target.name, pid, comm = %process.comm, kind = kind.as_str(),
                outcome = "error", error = %format!("{e}{hint}"), "escalation failed");
            audit_escalation(
                r.audit,
                target,
                process,
                kind,
                "error",
                false,
                json!({"before": limits_json(Some(before)), "error": format!("{e}{hint}")}),
            );
            report.error(ErrorKind::Escalate);
        }
    }
}

/// Send the target's signal through the pin held since attribution. Returns whether it
/// counts as an action (sent, or would be in a dry run).
fn signal<K: Kernel>(
    r: &Round<'_, K>,
    target: &Target,
    process: &Process<Arc<K::Process>>,
    load: &Load,
    dry_run: bool,
    report: &mut CycleReport,
) -> bool {
    let pid = process.pid;
    let kind = EscalationKind::Signal;
    let name = target.escalate.signal.name();
    let extra = json!({"signal": name, "open_fds": load.open_fds, "soft": load.soft,
        "leaking": load.leaking});
    if dry_run {
        info!(target = %target.name, pid, comm = %process.comm, signal = name,
            open_fds = load.open_fds, dry_run, kind = kind.as_str(), outcome = "dry_run", "escalation");
        audit_escalation(r.audit, target, process, kind, "dry_run", true, extra);
        return true;
    }
    let Some(pin) = process.handle.as_ref() else {
        return false;
    };
    match r.kernel.signal(pin, target.escalate.signal.number()) {
        Ok(()) => {
            warn!(target = %target.name, pid, comm = %process.comm, signal = name,
                open_fds = load.open_fds, leaking = load.leaking, kind = kind.as_str(), outcome = "done",
                "escalation: signalled a leaking process near its fd limit (a restart before EMFILE)");
            audit_escalation(r.audit, target, process, kind, "done", false, extra);
            *report
                .escalations
                .entry((target.name.clone(), kind))
                .or_default() += 1;
            true
        }
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
            info!(target = %target.name, pid, kind = kind.as_str(), outcome = "gone",
                "the process exited before the signal");
            false
        }
        Err(e) => {
            let hint = if matches!(e.raw_os_error(), Some(libc::EPERM)) {
                "; signalling another user's process needs CAP_KILL (systemd/drop-ins/escalate.conf)"
            } else {
                ""
            };
            warn!(target = %target.name, pid, kind = kind.as_str(), outcome = "error",
                error = %format!("{e}{hint}"), "escalation failed");
            audit_escalation(
                r.audit,
                target,
                process,
                kind,
                "error",
                false,
                json!({"signal": name, "error": format!("{e}{hint}")}),
            );
            report.error(ErrorKind::Escalate);
            false
        }
    }
}

fn audit_escalation<H>(
    audit: &Auditor,
    target: &Target,
    process: &Process<H>,
    kind: EscalationKind,
    outcome: &str,
    dry_run: bool,
    extra: serde_json::Value,
) {
    let mut line = json!({
        "ts": unix_ts(),
        "event": "escalation",
        "target": target.name,
        "pid": process.pid,
        "comm": process.comm,
        "kind": kind.as_str(),
        "outcome": outcome,
        "dry_run": dry_run,
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (line.as_object_mut(), extra) {
        obj.extend(more);
    }
    audit.record(line);
}

fn from_limit(l: Option<u64>) -> String {
    l.map_or_else(|| "unlimited".to_string(), |v| v.to_string())
}
