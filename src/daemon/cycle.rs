//! One daemon cycle: match the target processes, discover their CLOSE_WAIT sockets (one
//! sock_diag socket per network namespace), attribute them from the fd-table cache, age
//! them, decide (pure, [`crate::daemon::policy::decide`]), act through the pidfds held since
//! attribution, and report each action (log event, audit line, counters, release watch).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::json;
use tracing::{error, info, warn};

use cwreap_linux::os::Pinned;

use super::escalate::Budget;
use super::release::PendingRelease;
use super::{Daemon, Point};
use crate::daemon::cycle_report::{CycleReport, TargetGauges};
use crate::daemon::fd_cache::{FdIndex, Refresh};
use crate::daemon::policy::{self, Candidate, Decision, HeadroomWarning};
use crate::shared::act::{self, ActResult, Expected, Outcome, Reason, Via};
use crate::shared::attribute::Snapshot;
use crate::shared::config::Action;
use crate::shared::selector::Needs;
use crate::shared::selector::{ProcessFacts, SocketFacts};

impl Daemon {
    /// Read what the targets' match blocks need to know about a process.
    fn facts(&self, pid: i32, needs: Needs) -> io::Result<ProcessFacts> {
        crate::shared::attribute::process_facts(&self.proc, pid, needs)
    }

    /// pid → the targets whose process criteria accept the process, ascending. Which of
    /// them a socket of the process belongs to depends on the socket ([`policy::assign`]).
    fn match_processes(&self, report: &mut CycleReport) -> BTreeMap<i32, Vec<usize>> {
        // Pid files are read every cycle: the service may have restarted.
        let pid_files: Vec<Vec<i32>> = self
            .cfg
            .targets
            .iter()
            .map(|t| crate::shared::attribute::read_pid_files(&t.selector.pid_files))
            .collect();
        let needs = self
            .cfg
            .targets
            .iter()
            .fold(Needs::default(), |n, t| n.or(t.selector.needs()));
        let mut out = BTreeMap::new();
        let Ok(pids) = self.proc.pids() else {
            report.error("proc");
            return out;
        };
        for pid in pids {
            if pid == self.self_pid {
                continue;
            }
            let Ok(facts) = self.facts(pid, needs) else {
                continue;
            };
            let matched: Vec<usize> = self
                .cfg
                .targets
                .iter()
                .enumerate()
                .filter(|(i, t)| t.selector.process_matches(&facts, &pid_files[*i]))
                .map(|(i, _)| i)
                .collect();
            if !matched.is_empty() {
                out.insert(pid, matched);
            }
        }
        out
    }

    /// One full cycle. `stop` is checked between actions so SIGTERM is honoured promptly.
    pub fn cycle(&mut self, stop: &AtomicBool) -> CycleReport {
        let started = Instant::now();
        let mut report = CycleReport::default();
        let now = Instant::now();

        let targets = self.match_processes(&mut report);
        let pids: Vec<i32> = targets.keys().copied().collect();
        self.stage(Point::Matched);

        // One sock_diag socket per network namespace the targets live in.
        self.namespaces.cover(&self.proc, &pids, false);
        let live: HashSet<u64> = pids
            .iter()
            .filter_map(|p| cwreap_linux::netlink::netns_inode(&self.proc.netns_path(*p)).ok())
            .collect();
        self.namespaces.retain(|ino| live.contains(&ino));
        for (ino, why) in std::mem::take(&mut self.namespaces.failures) {
            warn!(netns = ino, error = %why, "network namespace skipped this cycle");
            report.error("netns");
        }
        let found = match self.namespaces.dump() {
            Ok(f) => f,
            Err(e) => {
                // The failed sockets were already replaced by fresh ones (netns.rs); their
                // failures are this error, and must not keep the next cycle from covering
                // those namespaces again.
                error!(error = %e, "sock_diag dump failed; retrying next cycle");
                report.error("netlink");
                self.namespaces.failures.clear();
                report.duration = started.elapsed();
                return report;
            }
        };
        for (ino, why) in std::mem::take(&mut self.namespaces.failures) {
            warn!(netns = ino, error = %why, "sock_diag dump failed in a network namespace");
            report.error("netlink");
        }
        report.close_wait = found.close_wait.len();
        self.ages
            .observe(found.close_wait.iter().map(|s| (s.netns, s.cookie)), now);
        // Ages tracks exactly the sockets present now.
        self.handled.retain(|k| self.ages.tracks(k));
        self.check_releases(now, &mut report);

        // Attribution from the cache; only changed targets' fd tables are read again.
        let mut refresh = self.index.refresh(&self.proc, &self.os, &pids);
        // A CLOSE_WAIT socket of a target's uid that no known target fd holds, not seen
        // last cycle: a target may have reused an fd number for it (same fd count, so the
        // cache could not tell). Read the tables again once. Sockets of other processes are
        // remembered as unowned, so they cost this only when they first appear; a target
        // that changed uid since creating the socket waits for the next full refresh.
        let unowned = |index: &FdIndex<Pinned>| -> HashSet<u64> {
            found
                .close_wait
                .iter()
                .filter(|s| s.inode != 0 && !index.knows(s.inode))
                .map(|s| s.inode)
                .collect()
        };
        let uids = self.index.uids();
        let fresh = found.close_wait.iter().any(|s| {
            s.inode != 0
                && uids.contains(&s.uid)
                && !self.index.knows(s.inode)
                && !self.unowned.contains(&s.inode)
        });
        if !refresh.full && fresh {
            let again = self.index.reread(&self.proc, &self.os, &pids);
            refresh = Refresh {
                walked: refresh.walked + again.walked,
                ..again
            };
        }
        self.unowned = unowned(&self.index);
        if refresh.stats.denied > 0 {
            warn!(
                processes = refresh.stats.denied,
                "cannot read the fd table of some target processes (permission denied; CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH are needed)"
            );
            report.error("proc");
        }
        if refresh.stats.vanished > 0 {
            // Listed a moment ago, gone before (or while) its fd table was read.
            info!(
                processes = refresh.stats.vanished,
                "target processes exited while their fd tables were read; skipped this cycle"
            );
            report.error("proc");
        }
        let snap = self.index.snapshot(found);

        // Candidates: each attributed socket under the first target that selects it.
        let mut candidates = Vec::new();
        let mut selected: HashMap<(i32, usize), usize> = HashMap::new();
        let process_targets = |pid: i32| targets.get(&pid).map(Vec::as_slice);
        for s in &snap.sockets {
            let socket = SocketFacts {
                local: s.diag.local,
                remote: s.diag.remote,
            };
            let Some((h, t)) = policy::assign(&self.cfg, s.owners(), &process_targets, &socket)
            else {
                continue;
            };
            let Some(p) = snap.processes.get(&h.pid) else {
                continue;
            };
            *selected.entry((h.pid, t)).or_default() += 1;
            candidates.push(Candidate {
                target: t,
                pid: h.pid,
                fd: h.fd,
                comm: p.comm.clone(),
                inode: s.diag.inode,
                cookie: s.diag.cookie,
                netns: s.diag.netns,
                unaccepted: s.unaccepted(),
                local: s.diag.local,
                remote: s.diag.remote,
                age_ms: self.ages.age_ms(
                    (s.diag.netns, s.diag.cookie),
                    s.diag.last_ack_recv_ms,
                    now,
                ),
                owner_close_wait: 0,
            });
        }
        for c in &mut candidates {
            c.owner_close_wait = selected.get(&(c.pid, c.target)).copied().unwrap_or(0);
        }
        report.candidates = candidates.len();
        self.gauges(&snap, &targets, &candidates, now, &mut report);

        let budget = self.limiter.budget(
            self.cfg.limits.max_reaps_per_cycle as usize,
            self.cfg.limits.max_reaps_per_minute as usize,
            now,
        );
        let mut plan = policy::decide(&candidates, &self.cfg, &self.handled, budget);
        report.deferred = plan.deferred;
        if plan.deferred > 0 {
            warn!(
                deferred = plan.deferred,
                "rate limit reached (max_reaps_per_cycle / max_reaps_per_minute); the rest waits for the next cycle"
            );
        }
        if self.force_dry_run {
            for d in &mut plan.decisions {
                d.dry_run = true;
            }
        }
        if !self.announce(&plan.decisions, stop, &mut report) {
            // The intents are not on the disk: act on nothing that changes a socket.
            plan.decisions
                .retain(|d| d.action == Action::Log || d.dry_run);
        }
        let mut reaps = 0usize;
        for d in &plan.decisions {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            self.stage(Point::BeforeAct {
                pid: d.candidate.pid,
                fd: d.candidate.fd,
            });
            let res = self.act(&snap, d);
            if d.action != Action::Log {
                reaps += 1;
            }
            self.record(d, &res, now, &snap, &mut report);
        }
        if !stop.load(Ordering::Relaxed) {
            let mut left = Budget {
                actions: budget.saturating_sub(reaps),
                signals: 0,
            };
            self.escalate(&snap, &targets, &selected, &mut left, &mut report);
            reaps += left.signals;
        }
        self.limiter.record(reaps, now);
        self.release_pidfds.clear();

        let alive: HashSet<i32> = snap.processes.keys().copied().collect();
        self.headroom.retain(&alive);
        self.index.restore(snap.processes);
        report.duration = started.elapsed();
        report
    }

    fn act(&mut self, snap: &Snapshot<Pinned>, d: &Decision) -> ActResult {
        let c = &d.candidate;
        match d.action {
            Action::Log => ActResult::ok(Outcome::Logged),
            Action::Destroy => {
                if self.destroy_unsupported {
                    return ActResult::with(
                        Outcome::Error,
                        Reason::DestroyUnsupported { error: None },
                    );
                }
                let Some(diag) = snap
                    .sockets
                    .iter()
                    .find(|s| s.diag.netns == c.netns && s.diag.cookie == c.cookie)
                    .map(|s| s.diag.clone())
                else {
                    return ActResult::with(Outcome::Gone, Reason::LeftSnapshot);
                };
                let res = act::destroy_verified(&mut self.namespaces, &diag, d.dry_run);
                if matches!(res.reason, Some(Reason::DestroyUnsupported { .. })) {
                    error!("{}", act::NO_DESTROY_HINT);
                    self.destroy_unsupported = true;
                }
                res
            }
            Action::Shutdown if c.unaccepted => {
                ActResult::with(Outcome::Skipped, Reason::Unaccepted(Via::Policy))
            }
            Action::Shutdown => {
                let Some(handle) = snap.processes.get(&c.pid).and_then(|p| p.handle.as_ref())
                else {
                    return ActResult::with(Outcome::Gone, Reason::NotPinned);
                };
                let exp = Expected {
                    pid: c.pid,
                    fd: c.fd,
                    inode: c.inode,
                    cookie: c.cookie,
                };
                act::shutdown_verified(&self.os, handle, &exp, d.dry_run)
            }
        }
    }

    /// Report one action: tracing event, audit line, counters, release watch.
    fn record(
        &mut self,
        d: &Decision,
        res: &ActResult,
        now: Instant,
        snap: &Snapshot<Pinned>,
        report: &mut CycleReport,
    ) {
        let c = &d.candidate;
        let target = self.target_name(c.target);
        let action = d.action.as_str();
        let outcome = res.outcome.as_str();
        let text = res.detail();
        let detail = text.as_deref().unwrap_or("");
        let reason = res.reason.as_ref().map_or("", Reason::code);
        if res.outcome == Outcome::Error {
            warn!(target = %target, pid = c.pid, fd = c.fd, comm = %c.comm, inode = c.inode, netns = c.netns, unaccepted = c.unaccepted,
                local = %c.local, remote = %c.remote, age_ms = c.age_ms, action, outcome, reason,
                dry_run = d.dry_run, error = detail, "action failed");
            report.error("act");
        } else {
            info!(target = %target, pid = c.pid, fd = c.fd, comm = %c.comm, inode = c.inode, netns = c.netns, unaccepted = c.unaccepted,
                local = %c.local, remote = %c.remote, age_ms = c.age_ms, action, outcome, reason,
                dry_run = d.dry_run, detail, "close_wait action");
        }
        let mut line = self.decision_record("action", d);
        line.insert("outcome".into(), json!(outcome));
        line.insert("dry_run".into(), json!(d.dry_run));
        line.insert(
            "reason".into(),
            json!(res.reason.as_ref().map(Reason::code)),
        );
        line.insert("error".into(), json!(text));
        self.audit(serde_json::Value::Object(line));
        *report
            .outcomes
            .entry((target.clone(), action, res.outcome))
            .or_default() += 1;
        if matches!(
            res.outcome,
            Outcome::Reaped | Outcome::DryRun | Outcome::Logged | Outcome::Error | Outcome::Skipped
        ) {
            self.handled.insert(c.key());
        }
        // Destroy frees the owner's fd slot only when the owner reacts to ECONNABORTED, and
        // shutdown only when it reacts to EPOLLHUP: watch both.
        if res.outcome == Outcome::Reaped && !c.unaccepted {
            // Within one cycle a pid names the process the snapshot pinned, so sharing by
            // pid is safe; the map is emptied when the cycle ends.
            let pidfd = match self.release_pidfds.get(&c.pid) {
                Some(fd) => Some(fd.clone()),
                None => {
                    let fd = snap
                        .processes
                        .get(&c.pid)
                        .and_then(|p| p.handle.as_ref())
                        .and_then(|h| h.pidfd.try_clone().ok())
                        .map(Arc::new);
                    if let Some(fd) = &fd {
                        self.release_pidfds.insert(c.pid, fd.clone());
                    }
                    fd
                }
            };
            self.pending.push(PendingRelease {
                target,
                pid: c.pid,
                fd: c.fd,
                inode: c.inode,
                comm: c.comm.clone(),
                pidfd,
                at: now,
            });
        }
    }

    /// Per target: the CLOSE_WAIT sockets it selects and the oldest of them; the open fds
    /// and fd limits of the processes its process criteria accept. fd headroom warnings,
    /// once per process.
    fn gauges(
        &mut self,
        snap: &Snapshot<Pinned>,
        targets: &BTreeMap<i32, Vec<usize>>,
        candidates: &[Candidate],
        now: Instant,
        report: &mut CycleReport,
    ) {
        let mut gauges = vec![TargetGauges::default(); self.cfg.targets.len()];
        for c in candidates {
            if let Some(g) = gauges.get_mut(c.target) {
                g.close_wait += 1;
                g.oldest_ms = g.oldest_ms.max(c.age_ms);
                if self.ages.arrived(&(c.netns, c.cookie), now) {
                    g.new_close_wait += 1;
                }
            }
        }
        for (pid, ts) in targets {
            let Some(p) = snap.processes.get(pid) else {
                continue;
            };
            for &t in ts {
                if let Some(g) = gauges.get_mut(t) {
                    g.open_fds += p.open_fds;
                    g.fd_limit += p.nofile_soft.unwrap_or(0);
                    g.consider(p.open_fds, p.nofile_soft);
                }
            }
            let tname = ts
                .first()
                .and_then(|&t| self.cfg.targets.get(t))
                .map_or("", |t| t.name.as_str());
            if let Some(w) = self.headroom.check(*pid, p.open_fds, p.nofile_soft) {
                let pct = match w {
                    HeadroomWarning::Above80 => 80,
                    HeadroomWarning::Above95 => 95,
                };
                warn!(target = %tname, pid = *pid, comm = %p.comm, open_fds = p.open_fds,
                    fd_limit = p.nofile_soft.unwrap_or(0), threshold_pct = pct,
                    "process is close to its fd limit (RLIMIT_NOFILE): accept() will fail with EMFILE");
            }
        }
        for (t, g) in self.cfg.targets.iter().zip(gauges) {
            report.targets.insert(t.name.clone(), g);
        }
    }
}
