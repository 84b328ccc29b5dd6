//! Escalations, for processes that keep their fds after shutdown (`still_held`) and near
//! EMFILE: raise the soft RLIMIT_NOFILE to the hard limit once, then send a signal once (a
//! restart before EMFILE). Neither touches a socket or an fd of the process, so neither can
//! misdeliver data; the daemon never closes an fd inside a target. The decision is pure
//! ([`crate::daemon::policy::escalation`]); this does it, logs it and audits it.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;

use serde_json::json;
use tracing::{error, info, warn};

use cwreap_linux::os::Pinned;
use cwreap_linux::procfs::Limits;
use cwreap_linux::sys;

use super::audit::unix_ts;
use super::{Daemon, Point};
use crate::daemon::cycle_report::CycleReport;
use crate::daemon::policy::{self, Escalated, Escalation, Load};
use crate::shared::attribute::{Process, Snapshot};
use crate::shared::config::Target;

/// What the escalations of one cycle may still do.
pub(super) struct Budget {
    /// Signals left under the rate limits (a signal counts as an action).
    pub(super) actions: usize,
    /// Signals sent, to record against the rate limits.
    pub(super) signals: usize,
}

fn limits_json(l: Option<Limits>) -> serde_json::Value {
    match l {
        Some(l) => json!({"soft": l.soft, "hard": l.hard}),
        None => serde_json::Value::Null,
    }
}

impl Daemon {
    /// Escalate where due, once per process: for each process, the first of its targets
    /// that has `escalate`. `selected` counts the CLOSE_WAIT sockets each (process, target)
    /// selects this cycle.
    pub(super) fn escalate(
        &mut self,
        snap: &Snapshot<Pinned>,
        targets: &BTreeMap<i32, Vec<usize>>,
        selected: &HashMap<(i32, usize), usize>,
        budget: &mut Budget,
        report: &mut CycleReport,
    ) {
        // Still-held sockets count, for the target that shut them down, while their owner
        // holds them.
        let held = std::mem::take(&mut self.held);
        let mut still_held: HashMap<(i32, String), usize> = HashMap::new();
        for p in held {
            if targets.contains_key(&p.pid) && self.owner_holds(&p, false) {
                *still_held.entry((p.pid, p.target.clone())).or_default() += 1;
                self.held.push(p);
            }
        }
        self.escalated.retain(|pid, _| targets.contains_key(pid));
        for (&pid, ts) in targets {
            let Some((t, target)) = ts.iter().find_map(|&t| {
                self.cfg
                    .targets
                    .get(t)
                    .filter(|target| target.escalate.any())
                    .map(|target| (t, target.clone()))
            }) else {
                continue;
            };
            let Some(process) = snap.processes.get(&pid) else {
                continue;
            };
            let leaking = selected.get(&(pid, t)).copied().unwrap_or(0)
                + still_held
                    .get(&(pid, target.name.clone()))
                    .copied()
                    .unwrap_or(0);
            if leaking < target.min_close_wait as usize {
                continue;
            }
            // The limit may have changed since the fd table was read (we may have raised it):
            // read it fresh, and the start time that tells this process from a pid reuse.
            let (Ok(limits), Ok(start)) = (self.proc.nofile_limits(pid), self.proc.start_time(pid))
            else {
                continue;
            };
            let done = match self.escalated.get(&pid) {
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
            let dry_run = self.force_dry_run || target.effective_dry_run(self.cfg.dry_run);
            self.stage(Point::BeforeEscalate { pid });
            let mut now_done = done;
            match step {
                Escalation::RaiseFdLimit { from, to } => {
                    now_done.raise_settled = true;
                    self.raise(&target, process, start, limits, from, to, dry_run, report);
                }
                Escalation::NoRaise(why) => {
                    now_done.raise_settled = true;
                    info!(target = %target.name, pid, comm = %process.comm, open_fds = load.open_fds,
                        soft = from_limit(limits.soft), hard = from_limit(limits.hard),
                        why = why.as_str(), "raise_fd_limit_at reached; the fd limit is not raised");
                    self.audit_escalation(
                        &target,
                        process,
                        "raise_fd_limit",
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
                    if self.signal(&target, process, &load, dry_run, report) {
                        budget.actions -= 1;
                        budget.signals += 1;
                    }
                }
            }
            self.escalated.insert(pid, (start, now_done));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn raise(
        &mut self,
        target: &Target,
        process: &Process<Pinned>,
        start: u64,
        before: Limits,
        from: u64,
        to: u64,
        dry_run: bool,
        report: &mut CycleReport,
    ) {
        let pid = process.pid;
        if dry_run {
            info!(target = %target.name, pid, comm = %process.comm, open_fds = process.open_fds,
                from, to, dry_run, kind = "raise_fd_limit", outcome = "dry_run", "escalation");
            self.audit_escalation(
                target,
                process,
                "raise_fd_limit",
                "dry_run",
                true,
                json!({"before": limits_json(Some(before)), "to": to}),
            );
            return;
        }
        let alive = process
            .handle
            .as_ref()
            .is_some_and(|h| sys::pidfd_alive(h.as_fd()));
        let result = if alive {
            sys::set_nofile_soft(pid, to, to)
        } else {
            Err(std::io::Error::from_raw_os_error(libc::ESRCH))
        };
        let after = self.proc.nofile_limits(pid).ok();
        // prlimit takes a pid, not a pidfd: check it still named the same process.
        let same = self.proc.start_time(pid).ok() == Some(start);
        match result {
            Ok(()) if same => {
                warn!(target = %target.name, pid, comm = %process.comm, open_fds = process.open_fds,
                    from, to, kind = "raise_fd_limit", outcome = "done",
                    "escalation: raised the soft fd limit of a leaking process to its hard limit");
                self.audit_escalation(
                    target,
                    process,
                    "raise_fd_limit",
                    "done",
                    false,
                    json!({"before": limits_json(Some(before)), "after": limits_json(after)}),
                );
                *report
                    .escalations
                    .entry((target.name.clone(), "raise_fd_limit"))
                    .or_default() += 1;
            }
            Ok(()) => {
                error!(target = %target.name, pid, kind = "raise_fd_limit",
                    "the process exited while its fd limit was raised; the pid may name another process now");
                report.error("escalate");
            }
            Err(e) => {
                let hint = if matches!(e.raw_os_error(), Some(libc::EPERM)) {
                    "; prlimit needs CAP_SYS_RESOURCE (systemd/drop-ins/escalate.conf)"
                } else {
                    ""
                };
                warn!(target = %target.name, pid, comm = %process.comm, kind = "raise_fd_limit",
                    outcome = "error", error = %format!("{e}{hint}"), "escalation failed");
                self.audit_escalation(
                    target,
                    process,
                    "raise_fd_limit",
                    "error",
                    false,
                    json!({"before": limits_json(Some(before)), "error": format!("{e}{hint}")}),
                );
                report.error("escalate");
            }
        }
    }

    /// Send the target's signal through the pidfd held since attribution. Returns whether
    /// it counts as an action (sent, or would be in a dry run).
    fn signal(
        &mut self,
        target: &Target,
        process: &Process<Pinned>,
        load: &Load,
        dry_run: bool,
        report: &mut CycleReport,
    ) -> bool {
        let pid = process.pid;
        let name = target.escalate.signal.name();
        let extra = json!({"signal": name, "open_fds": load.open_fds, "soft": load.soft,
            "leaking": load.leaking});
        if dry_run {
            info!(target = %target.name, pid, comm = %process.comm, signal = name,
                open_fds = load.open_fds, dry_run, kind = "signal", outcome = "dry_run", "escalation");
            self.audit_escalation(target, process, "signal", "dry_run", true, extra);
            return true;
        }
        let Some(pidfd) = process.handle.as_ref() else {
            return false;
        };
        match sys::pidfd_signal(pidfd.as_fd(), target.escalate.signal.number()) {
            Ok(()) => {
                warn!(target = %target.name, pid, comm = %process.comm, signal = name,
                    open_fds = load.open_fds, leaking = load.leaking, kind = "signal", outcome = "done",
                    "escalation: signalled a leaking process near its fd limit (a restart before EMFILE)");
                self.audit_escalation(target, process, "signal", "done", false, extra);
                *report
                    .escalations
                    .entry((target.name.clone(), "signal"))
                    .or_default() += 1;
                true
            }
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                info!(target = %target.name, pid, kind = "signal", outcome = "gone",
                    "the process exited before the signal");
                false
            }
            Err(e) => {
                let hint = if matches!(e.raw_os_error(), Some(libc::EPERM)) {
                    "; signalling another user's process needs CAP_KILL (systemd/drop-ins/escalate.conf)"
                } else {
                    ""
                };
                warn!(target = %target.name, pid, kind = "signal", outcome = "error",
                    error = %format!("{e}{hint}"), "escalation failed");
                self.audit_escalation(
                    target,
                    process,
                    "signal",
                    "error",
                    false,
                    json!({"signal": name, "error": format!("{e}{hint}")}),
                );
                report.error("escalate");
                false
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn audit_escalation(
        &mut self,
        target: &Target,
        process: &Process<Pinned>,
        kind: &str,
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
            "kind": kind,
            "outcome": outcome,
            "dry_run": dry_run,
        });
        if let (Some(obj), serde_json::Value::Object(more)) = (line.as_object_mut(), extra) {
            obj.extend(more);
        }
        self.audit(line);
    }
}

fn from_limit(l: Option<u64>) -> String {
    l.map_or_else(|| "unlimited".to_string(), |v| v.to_string())
}
