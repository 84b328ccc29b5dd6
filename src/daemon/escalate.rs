//! Escalations, for processes that keep their fds after shutdown (`still_held`) and near
//! EMFILE: raise the soft RLIMIT_NOFILE to the hard limit once, then send a signal once (a
//! restart before EMFILE), at a share of the limit or when the forecast puts EMFILE close.
//! Neither touches a socket or an fd of the process, so neither can misdeliver data; the
//! daemon never closes an fd inside a target. The decision is pure
//! ([`crate::daemon::policy::escalation`]); this does it, logs it and audits it.
//!
//! What was done is kept per process and per mode: a dry-run escalation is recorded as what
//! would have happened, and the real one stays armed, so a policy switched from dry run to
//! enforcing (by reload or restart) escalates for real. Escalations have a budget of their
//! own (`limits.max_escalations_per_minute`) and run before the cycle's reaps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tracing::{error, info, warn};

use cwreap_linux::kernel::{Boottime, Kernel, NofileRaise};
use cwreap_linux::procfs::Limits;

use crate::daemon::audit::{Auditor, unix_ts};
use crate::daemon::cycle_report::{CycleReport, ErrorKind, EscalationKind};
use crate::daemon::policy::{self, Escalated, Escalation, Load};
use crate::shared::attribute::{Process, Snapshot};
use crate::shared::config::{Config, Target};
use crate::shared::forecast::FdHistory;

/// What the escalations of one cycle may still do.
pub struct Budget {
    /// Escalations left under `limits.max_escalations_per_minute`.
    pub left: usize,
    /// Escalations done (or, in a dry run, that would have been), to record against it.
    pub used: usize,
}

impl Budget {
    fn spend(&mut self) {
        self.left = self.left.saturating_sub(1);
        self.used += 1;
    }
}

/// What was done to one process, in each mode.
#[derive(Debug, Clone, Copy, Default)]
struct Modes {
    dry_run: Escalated,
    enforcing: Escalated,
}

impl Modes {
    fn get(&self, dry_run: bool) -> Escalated {
        if dry_run {
            self.dry_run
        } else {
            self.enforcing
        }
    }

    fn set(&mut self, dry_run: bool, e: Escalated) {
        if dry_run {
            self.dry_run = e;
        } else {
            self.enforcing = e;
        }
    }
}

/// Escalations done per process and mode, so each happens once: pid → (its start time,
/// what was done). A pid reused by another process starts afresh. Also each process's fd
/// history for the forecast, and what was already said about it.
#[derive(Default)]
pub struct Escalations {
    done: HashMap<i32, (u64, Modes)>,
    history: HashMap<i32, (u64, FdHistory)>,
    /// (pid, target, what) warned about once: a deferral, a threshold the leak outruns.
    said: HashSet<(i32, usize, &'static str)>,
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
    pub now: Boottime,
}

fn limits_json(l: Option<Limits>) -> serde_json::Value {
    match l {
        Some(l) => json!({"soft": l.soft, "hard": l.hard}),
        None => serde_json::Value::Null,
    }
}

impl Escalations {
    /// Escalate where due, once per process and mode: for each process, the first of its
    /// targets that has `escalate`.
    pub fn run<K: Kernel>(
        &mut self,
        r: &Round<'_, K>,
        budget: &mut Budget,
        report: &mut CycleReport,
    ) {
        self.done.retain(|pid, _| r.targets.contains_key(pid));
        self.history.retain(|pid, _| r.targets.contains_key(pid));
        self.said.retain(|(pid, _, _)| r.targets.contains_key(pid));
        self.sample(r, report);
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
            // The limit may have changed since the fd table was read (we may have raised
            // it): read it fresh, and the start time that tells this process from a pid
            // reuse.
            let (Ok(limits), Ok(start)) = (r.kernel.nofile_limits(pid), r.kernel.start_time(pid))
            else {
                continue;
            };
            let history = match self.history.get(&pid) {
                Some((s, h)) if *s == start => h.clone(),
                _ => FdHistory::default(),
            };
            let leaking = r.selected.get(&(pid, t)).copied().unwrap_or(0)
                + r.dead_held.get(&(pid, t)).copied().unwrap_or(0);
            if leaking < target.min_close_wait as usize {
                continue;
            }
            self.warn_outrun(pid, t, target, process, &history, limits, r.cfg.interval);
            let dry_run = r.force_dry_run || target.effective_dry_run(r.cfg.dry_run);
            let modes = match self.done.get(&pid) {
                Some((s, m)) if *s == start => *m,
                _ => Modes::default(),
            };
            let done = modes.get(dry_run);
            let load = Load {
                open_fds: process.open_fds,
                soft: limits.soft,
                hard: limits.hard,
                leaking,
                emfile_in: history
                    .emfile_in_s(limits.soft)
                    .and_then(|s| Duration::try_from_secs_f64(s).ok()),
            };
            let Some(step) =
                policy::escalation(&target.escalate, target.min_close_wait, &load, done)
            else {
                continue;
            };
            let acts = !matches!(step, Escalation::NoRaise(_));
            if acts && budget.left == 0 {
                report.escalations_deferred += 1;
                if self.said.insert((pid, t, "deferred")) {
                    warn!(target = %target.name, pid, comm = %process.comm, open_fds = load.open_fds,
                        kind = step_kind(step).as_str(), dry_run,
                        "escalation due but deferred: limits.max_escalations_per_minute is used up; it goes out in the first cycle with room");
                }
                continue;
            }
            self.said.remove(&(pid, t, "deferred"));
            let mut now_done = done;
            let spent = match step {
                Escalation::RaiseFdLimit { from, to } => {
                    now_done.raise_settled = true;
                    raise(r, target, process, start, limits, from, to, dry_run, report)
                }
                Escalation::NoRaise(why) => {
                    now_done.raise_settled = true;
                    info!(target = %target.name, pid, comm = %process.comm, open_fds = load.open_fds,
                        soft = from_limit(limits.soft), hard = from_limit(limits.hard),
                        why = why.as_str(), "an fd-limit raise is due; the fd limit is not raised");
                    audit_escalation(
                        r.audit,
                        target,
                        process,
                        EscalationKind::RaiseFdLimit,
                        "skipped",
                        dry_run,
                        json!({"before": limits_json(Some(limits)), "why": why.as_str()}),
                    );
                    false
                }
                Escalation::Signal => {
                    now_done.signaled = true;
                    signal(r, target, process, &load, dry_run, report)
                }
            };
            if spent {
                budget.spend();
            }
            let mut modes = modes;
            modes.set(dry_run, now_done);
            self.done.insert(pid, (start, modes));
        }
    }

    /// This cycle's sample of the open fds of every process of a target (escalating or
    /// not), and per target the soonest EMFILE forecast of its processes (the estimator
    /// `explain` uses: growth over the last minute, carried to the soft limit read this
    /// cycle). A pid reused by another process starts a new history.
    fn sample<K: Kernel>(&mut self, r: &Round<'_, K>, report: &mut CycleReport) {
        for (&pid, ts) in r.targets {
            let Some(process) = r.snap.processes.get(&pid) else {
                continue;
            };
            let Ok(start) = r.kernel.start_time(pid) else {
                continue;
            };
            let history = self.history.entry(pid).or_default();
            if history.0 != start {
                *history = (start, FdHistory::default());
            }
            history.1.push(r.now, process.open_fds);
            let Some(secs) = history.1.emfile_in_s(process.nofile_soft) else {
                continue;
            };
            let ms = (secs * 1000.0).min(u64::MAX as f64) as u64;
            for &t in ts {
                if let Some(g) = r
                    .cfg
                    .targets
                    .get(t)
                    .and_then(|target| report.targets.get_mut(&target.name))
                {
                    g.emfile_in_ms = Some(g.emfile_in_ms.map_or(ms, |m| m.min(ms)));
                }
            }
        }
    }

    /// Warn once per process and threshold when a percentage leaves less headroom than
    /// one interval of the observed leak uses up: it can fire after EMFILE.
    #[allow(clippy::too_many_arguments)]
    fn warn_outrun<H>(
        &mut self,
        pid: i32,
        t: usize,
        target: &Target,
        process: &Process<H>,
        history: &FdHistory,
        limits: Limits,
        interval: Duration,
    ) {
        let (Some(per_s), Some(soft)) = (history.trend().and_then(|t| t.per_s()), limits.soft)
        else {
            return;
        };
        let per_interval = per_s * interval.as_secs_f64();
        let e = &target.escalate;
        for (key, at) in [
            ("raise_fd_limit_at", e.raise_fd_limit_at),
            ("signal_at", e.signal_at),
        ] {
            let Some(at) = at else { continue };
            let headroom = soft as f64 * f64::from(100u8.saturating_sub(at)) / 100.0;
            if per_interval > headroom && self.said.insert((pid, t, key)) {
                warn!(target = %target.name, pid, comm = %process.comm, threshold = key,
                    at_percent = at, headroom_fds = headroom as u64, fds_per_s = per_s,
                    interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
                    "this leak uses up the headroom above a percentage threshold within one interval, so the escalation can come after EMFILE; use a forecast (`signal_before_emfile` / `raise_before_emfile`), a lower percentage or a shorter interval");
            }
        }
    }
}

fn step_kind(step: Escalation) -> EscalationKind {
    match step {
        Escalation::Signal => EscalationKind::Signal,
        _ => EscalationKind::RaiseFdLimit,
    }
}

/// Raise the soft fd limit of `process` from `from` to `to`, keeping its hard limit.
/// Returns whether it counts against the escalation budget (raised, or would be in a dry
/// run).
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
) -> bool {
    let pid = process.pid;
    let kind = EscalationKind::RaiseFdLimit;
    let audit = |outcome: &str, extra: serde_json::Value| {
        audit_escalation(r.audit, target, process, kind, outcome, dry_run, extra);
    };
    if dry_run {
        info!(target = %target.name, pid, comm = %process.comm, open_fds = process.open_fds,
            from, to, dry_run, kind = kind.as_str(), outcome = "dry_run", "escalation");
        audit(
            "dry_run",
            json!({"before": limits_json(Some(before)), "to": to}),
        );
        return true;
    }
    // prlimit takes a pid, not a pidfd: the pin says the process lives, and its start time
    // that the pid still names it, before the write and after.
    let same = || {
        process.handle.as_ref().is_some_and(|h| r.kernel.alive(h))
            && r.kernel.start_time(pid).ok() == Some(start)
    };
    if !same() {
        info!(target = %target.name, pid, kind = kind.as_str(), outcome = "gone",
            "the process exited before its fd limit was raised");
        return false;
    }
    // Read again just before the write: a process that changed its limits since the
    // decision keeps them.
    let now = r.kernel.nofile_limits(pid).ok();
    let result = if now == Some(before) {
        r.kernel.raise_nofile_soft(pid, to, before)
    } else {
        Ok(NofileRaise::Changed(now.unwrap_or(before)))
    };
    let after = r.kernel.nofile_limits(pid).ok();
    // Without CAP_SYS_RESOURCE the kernel refuses (EPERM) a write that would raise a hard
    // limit the process lowered since the read: nothing was written, and the limits found
    // are the ones it set. That is a change, not a missing capability.
    let result = match (result, after) {
        (Err(e), Some(found)) if e.raw_os_error() == Some(libc::EPERM) && found != before => {
            Ok(NofileRaise::Changed(found))
        }
        (other, _) => other,
    };
    match result {
        Ok(NofileRaise::Raised) if same() => {
            warn!(target = %target.name, pid, comm = %process.comm, open_fds = process.open_fds,
                from, to, kind = kind.as_str(), outcome = "done",
                "escalation: raised the soft fd limit of a leaking process to its hard limit");
            audit(
                "done",
                json!({"before": limits_json(Some(before)), "after": limits_json(after)}),
            );
            *report
                .escalations
                .entry((target.name.clone(), kind))
                .or_default() += 1;
            true
        }
        Ok(NofileRaise::Raised) => {
            error!(target = %target.name, pid, kind = kind.as_str(),
                "the process exited while its fd limit was raised; the pid may name another process now");
            audit(
                "error",
                json!({"before": limits_json(Some(before)), "after": limits_json(after),
                "why": "the pid no longer names the process decided on"}),
            );
            report.error(ErrorKind::Escalate);
            false
        }
        Ok(NofileRaise::Changed(found)) => {
            warn!(target = %target.name, pid, comm = %process.comm, kind = kind.as_str(),
                outcome = "skipped", soft = from_limit(found.soft), hard = from_limit(found.hard),
                "the process changed its fd limits since they were read; they stay as it set them and nothing is raised");
            audit(
                "skipped",
                json!({"before": limits_json(Some(before)),
                "found": limits_json(Some(found)), "why": "the limits changed since they were read"}),
            );
            false
        }
        Err(e) => {
            let hint = if matches!(e.raw_os_error(), Some(libc::EPERM)) {
                "; prlimit needs CAP_SYS_RESOURCE (systemd/drop-ins/escalate.conf)"
            } else {
                ""
            };
            warn!(target = %target.name, pid, comm = %process.comm, kind = kind.as_str(),
                outcome = "error", error = %format!("{e}{hint}"), "escalation failed");
            audit(
                "error",
                json!({"before": limits_json(Some(before)), "error": format!("{e}{hint}")}),
            );
            report.error(ErrorKind::Escalate);
            false
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
