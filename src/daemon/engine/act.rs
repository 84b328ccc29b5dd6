//! Acting on a cycle's decisions: the plan within the rate limits (intents on the disk
//! first), each action through the pin held since attribution, and its record.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::json;
use tracing::warn;

use cwreap_linux::kernel::{Boottime, Kernel};

use super::Daemon;
use crate::daemon::audit::{decision_record, target_name};
use crate::daemon::cycle;
use crate::daemon::cycle_report::{CycleReport, ErrorKind};
use crate::daemon::policy::{self, Decision, Plan};
use crate::daemon::release::Pending;
use crate::shared::act::{ActResult, Outcome, Reason};
use crate::shared::attribute::Snapshot;
use crate::shared::config::Action;

impl<K: Kernel> Daemon<K> {
    /// The decisions of this cycle within the rate limits, with their intents on the disk
    /// when the policy has an audit log.
    pub(super) fn plan(
        &mut self,
        candidates: &[policy::Candidate],
        now: Boottime,
        stop: &AtomicBool,
        report: &mut CycleReport,
    ) -> Plan {
        let budget = self.limiter.budget(
            self.cfg.limits.max_reaps_per_cycle as usize,
            self.cfg.limits.max_reaps_per_minute as usize,
            now,
        );
        let mut plan = policy::decide(candidates, &self.cfg, &self.handled, budget);
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
        if !self
            .audit
            .announce(&self.cfg, &plan.decisions, stop, &self.progress, report)
        {
            // The intents are not on the disk: act on nothing that changes a socket.
            plan.decisions
                .retain(|d| d.action == Action::Log || d.dry_run);
        }
        plan
    }

    /// Act on each decision, and report it. Returns the socket-touching actions done.
    pub(super) fn execute(
        &mut self,
        snap: &Snapshot<Arc<K::Process>>,
        plan: &Plan,
        now: Boottime,
        stop: &AtomicBool,
        report: &mut CycleReport,
    ) -> usize {
        let mut reaps = 0usize;
        // Within one cycle a pid names the process the snapshot pinned.
        for d in &plan.decisions {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            self.step();
            let res = cycle::act(&mut self.kernel, snap, d, &mut self.destroy_unsupported);
            if d.action != Action::Log {
                reaps += 1;
            }
            self.record(d, &res, now, snap, report);
        }
        reaps
    }

    /// Report one action: log event, audit line, counters, release watch.
    fn record(
        &mut self,
        d: &Decision,
        res: &ActResult,
        now: Boottime,
        snap: &Snapshot<Arc<K::Process>>,
        report: &mut CycleReport,
    ) {
        let c = &d.candidate;
        let target = target_name(&self.cfg, c.target);
        cycle::log_action(&target, d, res);
        if res.outcome == Outcome::Error {
            report.error(ErrorKind::Act);
        }
        let mut line = decision_record(&self.cfg, "action", d);
        line.insert("outcome".into(), json!(res.outcome.as_str()));
        line.insert("dry_run".into(), json!(d.dry_run));
        line.insert(
            "reason".into(),
            json!(res.reason.as_ref().map(Reason::code)),
        );
        line.insert("error".into(), json!(res.detail()));
        self.audit.record(serde_json::Value::Object(line));
        *report
            .outcomes
            .entry((target.clone(), d.action, res.outcome))
            .or_default() += 1;
        if matches!(
            res.outcome,
            Outcome::Reaped | Outcome::DryRun | Outcome::Logged | Outcome::Error | Outcome::Skipped
        ) {
            self.handled.insert(c.key());
        }
        // Skipped while in an accept queue: judged again once its server accepts it.
        if res.outcome == Outcome::Skipped && c.unaccepted {
            self.awaiting_accept.insert(c.key());
        }
        // Destroy frees the owner's fd slot only when the owner reacts to ECONNABORTED,
        // and shutdown only when it reacts to EPOLLHUP: watch both.
        if res.outcome == Outcome::Reaped && !c.unaccepted {
            self.reaped.insert(c.inode, now);
            let pin = snap.processes.get(&c.pid).and_then(|p| p.handle.clone());
            self.releases.watch(Pending {
                target,
                pid: c.pid,
                fd: c.fd,
                inode: c.inode,
                comm: c.comm.clone(),
                pin,
                at: now,
            });
        }
    }
}
