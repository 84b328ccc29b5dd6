//! [`Daemon`]: what the policy daemon keeps between cycles, and one cycle as plain steps:
//! match the target processes, discover their CLOSE_WAIT sockets, attribute them, list the
//! candidates, plan, execute, escalate. Every step reaches the system through the
//! [`Kernel`] it was built with: the real one in `cwreap run`, a recording double in the
//! unit tests. The state each part needs across cycles lives in a struct of its own: the
//! tracked sockets ([`Tracker`]), the fd-table cache ([`FdIndex`]), the release watch, the
//! escalations done, the rate limit, the fd-headroom warnings and the audit log.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use serde_json::json;
use tracing::{error, info, warn};

use cwreap_linux::kernel::{Boottime, Kernel, Linux, SocketKey, key_of};
use cwreap_linux::netlink::DiagSocket;

use crate::daemon::audit::{Auditor, unix_ts};
use crate::daemon::cycle::{self, Targets};
use crate::daemon::cycle_report::{CycleReport, ErrorKind, Release};
use crate::daemon::dead_held::DeadHeld;
use crate::daemon::escalate::{Budget, Escalations, Round};
use crate::daemon::fd_cache::{FdIndex, Refresh};
use crate::daemon::metrics::Health;
use crate::daemon::named_pids::NamedPids;
use crate::daemon::policy::{Headroom, RateLimiter};
use crate::daemon::publish::Publisher;
use crate::daemon::release::ReleaseWatch;
use crate::daemon::steady::{ClueLog, Steady};
use crate::daemon::tracker::Tracker;
use crate::shared::age::Clues;
use crate::shared::attribute::Snapshot;
use crate::shared::config::Config;

mod act;
mod detect;

pub use detect::Detected;

/// How often discovery takes a full snapshot instead of the changes since the last cycle:
/// a backstop against a change missed (an event lost, a namespace that came and went).
pub const RECONCILE_EVERY: Duration = Duration::from_secs(600);

pub struct Daemon<K: Kernel> {
    cfg: Config,
    /// `--dry-run` on the command line: wins over the file.
    force_dry_run: bool,
    kernel: K,
    self_pid: i32,
    tracker: Tracker,
    /// When discovery last took a full snapshot.
    last_snapshot: Option<Boottime>,
    cache: FdIndex<K::Process>,
    /// Inodes of last cycle's CLOSE_WAIT sockets that no target fd held.
    unowned: HashSet<u64>,
    limiter: RateLimiter,
    /// Escalations per minute, apart from the reaps.
    escalation_limiter: RateLimiter,
    /// The event source's counts at the end of the last cycle.
    event_counts: cwreap_linux::kernel::EventCounts,
    headroom: Headroom,
    /// Sockets already acted on (or reported), so each is handled once.
    handled: HashSet<SocketKey>,
    /// Handled sockets skipped in an accept queue: handled no more once accepted.
    awaiting_accept: HashSet<SocketKey>,
    releases: ReleaseWatch<K::Process>,
    escalations: Escalations,
    audit: Auditor,
    /// Bumped at each step and action of a cycle: the watchdog is fed while it moves.
    progress: Arc<AtomicU64>,
    /// SOCK_DESTROY is unsupported by this kernel (said once).
    destroy_unsupported: bool,
    /// Dead held sockets of the targets.
    dead: DeadHeld,
    /// Sockets that left CLOSE_WAIT this cycle, as last seen: where a socket can have died.
    left: Vec<DiagSocket>,
    /// Sockets that left CLOSE_WAIT since the last cycle, read between cycles.
    left_between: Vec<DiagSocket>,
    /// The last cycle's target processes.
    pids: Vec<i32>,
    /// Probe every socket fd of the targets for dead ones this cycle (at start and at each
    /// reconciliation).
    probe_all: bool,
    /// Inodes of sockets cwreap shut down, and when: a dead one among them is
    /// `reaped_by: cwreap`.
    reaped: HashMap<u64, Boottime>,
    /// Where to publish first sights for the command line, once enabled.
    publish: Option<Publisher>,
    /// The pid files refused or unreadable, with why, as last logged: each is logged once
    /// until it changes.
    problems: cycle::ProblemLog,
    /// Which process each pid the policy names by number is.
    named: NamedPids,
    /// The last full cycle's candidates, while nothing changes (events).
    steady: Option<Steady>,
}

impl Daemon<Linux> {
    /// A daemon on the real system.
    pub fn new(cfg: Config, force_dry_run: bool) -> Result<Self> {
        Self::with_kernel(Linux::default(), cfg, force_dry_run, Health::default())
    }
}

impl<K: Kernel> Daemon<K> {
    /// A daemon on `kernel`, whose output counters are `health` (those of the metrics
    /// endpoint).
    pub fn with_kernel(
        kernel: K,
        cfg: Config,
        force_dry_run: bool,
        health: Health,
    ) -> Result<Self> {
        cycle::warn_shadowed(&cfg);
        let mut audit = Auditor::start(health).context("starting the audit writer")?;
        audit
            .open(cfg.audit_log.as_deref())
            .map_err(|e| anyhow!(e))?;
        Ok(Daemon {
            cfg,
            force_dry_run,
            kernel,
            self_pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
            tracker: Tracker::default(),
            last_snapshot: None,
            cache: FdIndex::default(),
            unowned: HashSet::new(),
            limiter: RateLimiter::default(),
            escalation_limiter: RateLimiter::default(),
            event_counts: cwreap_linux::kernel::EventCounts::default(),
            headroom: Headroom::default(),
            handled: HashSet::new(),
            awaiting_accept: HashSet::new(),
            releases: ReleaseWatch::default(),
            escalations: Escalations::default(),
            audit,
            progress: Arc::default(),
            destroy_unsupported: false,
            dead: DeadHeld::default(),
            left: Vec::new(),
            left_between: Vec::new(),
            pids: Vec::new(),
            probe_all: true,
            reaped: HashMap::new(),
            publish: None,
            problems: cycle::ProblemLog::default(),
            named: NamedPids::default(),
            steady: None,
        })
    }

    /// Publish, after each cycle, when each CLOSE_WAIT socket was first seen, in `dir`, so
    /// the command line ages sockets as the daemon does.
    pub fn publish_to(&mut self, dir: std::path::PathBuf) {
        let start_time = self.kernel.start_time(self.self_pid).unwrap_or(0);
        self.publish = Some(Publisher::new(dir, self.self_pid, start_time));
    }

    /// Withdraw what was published (a clean stop).
    pub fn withdraw(&self) {
        if let Some(p) = &self.publish {
            p.withdraw();
        }
    }

    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    /// Whether the policy (or the command line) makes every action a dry run.
    pub fn dry_run(&self) -> bool {
        self.cfg.dry_run || self.force_dry_run
    }

    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }

    /// A counter that moves while cycles make progress (for the watchdog).
    pub fn progress_counter(&self) -> Arc<AtomicU64> {
        self.progress.clone()
    }

    pub(super) fn auditor(&self) -> &Auditor {
        &self.audit
    }

    /// Sockets shut down whose release is not decided yet.
    pub fn releases_pending(&self) -> usize {
        self.releases.pending()
    }

    fn step(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// Swap in a new, already validated policy (SIGHUP). The audit log is opened again
    /// whether its path changed or not: after logrotate moved it away, records go to a new
    /// file. If it cannot be opened, nothing changes.
    pub fn reload(&mut self, cfg: Config) -> Result<()> {
        self.audit
            .open(cfg.audit_log.as_deref())
            .map_err(|e| anyhow!(e))?;
        if cfg.metrics.listen != self.cfg.metrics.listen {
            warn!("metrics.listen changes take effect at the next restart");
        }
        if cfg.log_format != self.cfg.log_format {
            warn!("log_format changes take effect at the next restart");
        }
        if cfg.discovery != self.cfg.discovery {
            warn!("discovery changes take effect at the next restart");
        }
        if cfg.where_stacks != self.cfg.where_stacks {
            warn!("where changes take effect at the next restart");
        }
        cycle::warn_shadowed(&cfg);
        self.cfg = cfg;
        self.named.clear();
        self.steady = None;
        // Sockets only reported under the old policy (dry run, `log`) are judged again by
        // the new one: switching a dry run to enforcing must reap what the dry run showed.
        // Reaped sockets have left CLOSE_WAIT, so they are not acted on twice.
        self.handled.clear();
        Ok(())
    }

    /// One full cycle. `stop` is checked between actions so SIGTERM is honoured promptly.
    pub fn cycle(&mut self, stop: &AtomicBool) -> CycleReport {
        let started = Instant::now();
        let mut report = CycleReport::default();
        let now = self.kernel.now();

        let targets = self.match_processes(&mut report);
        let pids: Vec<i32> = targets.keys().copied().collect();
        self.pids.clone_from(&pids);
        self.step();
        if self.discover(&pids, now, &mut report) {
            self.check_releases(now, &mut report);
            // Nothing changed since a full cycle: age what it found again (see [`Steady`]).
            let quiet =
                self.kernel.mode() == "events" && !self.tracker.changed() && !self.probe_all;
            let kept = self.steady.take().filter(|_| quiet);
            let mut steady = kept.and_then(|s| s.at(&self.fd_counts(&pids), now));
            let snap = match steady {
                Some(_) => self.attribute_quiet(&pids, &mut report),
                None => self.attribute(&pids, &mut report),
            };
            self.step();
            self.find_dead(&snap, &targets, now, &mut report);
            self.step();
            let log = ClueLog::default();
            let mut found = match steady.as_mut() {
                Some(s) => std::mem::take(&mut s.found),
                None => cycle::candidates(&self.cfg, &snap, &targets, |diag| {
                    let key = key_of(diag);
                    let first_seen = self.tracker.first_seen(&key);
                    log.age(
                        Clues::of(diag, self.kernel.entered_at(key), first_seen),
                        now,
                    )
                }),
            };
            report.candidates = found.list.len();
            report.quiet = steady.is_some();
            found.dead_held = self.dead.per_target(&self.cfg, &targets);
            cycle::gauges(
                &self.cfg,
                &snap,
                &targets,
                &found,
                &self.tracker,
                &mut self.headroom,
                &mut report,
            );
            // Escalations first, on a budget of their own: no reap holds one back.
            self.escalate(&snap, &targets, &found, now, stop, &mut report);
            // A quiet cycle is before any candidate's due moment: nothing to decide.
            let (reaps, deferred) = match steady {
                Some(_) => (0, 0),
                None => {
                    let plan = self.plan(&found.list, now, stop, &mut report);
                    (
                        self.execute(&snap, &plan, now, stop, &mut report),
                        plan.deferred,
                    )
                }
            };
            self.limiter.record(reaps, now);
            let alive: HashSet<i32> = snap.processes.keys().copied().collect();
            self.headroom.retain(&alive);
            self.cache.restore(snap.processes);
            if let Some(p) = self.publish.as_mut() {
                p.publish(now, self.cfg.interval, &self.tracker.first_sights());
            }
            self.steady = match steady {
                Some(mut s) => {
                    s.found = found;
                    Some(s)
                }
                None if self.kernel.mode() == "events" => {
                    let counts = self.fd_counts(&pids);
                    Steady::keep(&self.cfg, found, log, counts, &self.handled, deferred, now)
                }
                None => None,
            };
        }
        self.kernel.cycle_done();
        cycle::event_counts(&self.kernel, &mut self.event_counts, &mut report);
        report.duration = started.elapsed();
        report
    }

    /// Each target's open fds now (one stat each).
    fn fd_counts(&self, pids: &[i32]) -> Vec<(i32, Option<usize>)> {
        pids.iter()
            .map(|&p| (p, self.kernel.fd_count(p, None).ok()))
            .collect()
    }

    /// The target processes of the last cycle.
    pub fn target_pids(&self) -> &[i32] {
        &self.pids
    }

    /// How the sockets are found: `events` or `poll`.
    pub fn discovery_mode(&self) -> &'static str {
        self.kernel.mode()
    }

    /// The processes the targets' process criteria accept (never cwreap itself, nor a
    /// later process with a pid the policy names).
    fn match_processes(&mut self, report: &mut CycleReport) -> Targets {
        let mut problems = cycle::MatchProblems::default();
        let found = cycle::match_processes(&self.kernel, &self.cfg, self.self_pid, &mut problems);
        let mut targets = found.unwrap_or_else(|_| {
            report.error(ErrorKind::Proc);
            Targets::new()
        });
        self.named.keep(&self.cfg, &self.kernel, &mut targets);
        self.problems.note(problems, report);
        targets
    }

    /// Watch the namespaces of `pids` and bring the tracked sockets up to date: a
    /// snapshot at first and every [`RECONCILE_EVERY`], the changes otherwise. False when
    /// discovery failed (the cycle then does nothing more).
    fn discover(&mut self, pids: &[i32], now: Boottime, report: &mut CycleReport) -> bool {
        self.kernel.cover(pids, false);
        for (ino, why) in self.kernel.take_failures() {
            warn!(netns = ino, error = %why, "network namespace skipped this cycle");
            report.error(ErrorKind::Netns);
        }
        let snapshot = self
            .last_snapshot
            .is_none_or(|t| now.saturating_since(t) >= RECONCILE_EVERY);
        let result = if snapshot {
            self.kernel.snapshot(false).map(|f| {
                self.last_snapshot = Some(now);
                self.probe_all = true;
                self.tracker.reset(f, now)
            })
        } else {
            self.kernel.changes().map(|c| self.tracker.apply(c, now))
        };
        let mut left = std::mem::take(&mut self.left_between);
        match result {
            Ok(now_left) => left.extend(now_left),
            Err(e) => {
                // The failed sockets were replaced by fresh ones; their failures are this
                // error, and must not keep the next cycle from covering those namespaces.
                error!(error = %e, "sock_diag dump failed; retrying next cycle");
                report.error(ErrorKind::Netlink);
                self.kernel.take_failures();
                self.last_snapshot = None;
                return false;
            }
        }
        self.left = left;
        for (ino, why) in self.kernel.take_failures() {
            warn!(netns = ino, error = %why, "sock_diag dump failed in a network namespace");
            report.error(ErrorKind::Netlink);
        }
        report.close_wait = self.tracker.len();
        // Only sockets still in CLOSE_WAIT can be handled again; one skipped in an accept
        // queue, once its server accepted it (it has an inode now).
        let (tracker, handled) = (&self.tracker, &mut self.handled);
        self.awaiting_accept.retain(|k| match tracker.inode(k) {
            Some(0) => true,
            Some(_) => !handled.remove(k),
            None => false,
        });
        handled.retain(|k| tracker.tracks(k));
        true
    }

    /// Bring the dead held sockets up to date: forget those released, probe the sockets
    /// that left CLOSE_WAIT while a target holds them, and every socket fd of the targets
    /// when due.
    fn find_dead(
        &mut self,
        snap: &Snapshot<Arc<K::Process>>,
        targets: &Targets,
        now: Boottime,
        report: &mut CycleReport,
    ) {
        self.dead.prune(&self.kernel, targets);
        self.reaped
            .retain(|_, at| now.saturating_since(*at) < RECONCILE_EVERY);
        let candidates =
            crate::daemon::dead_held::candidates(snap, &self.cache, &self.left, self.probe_all);
        let last_seen: HashMap<u64, DiagSocket> =
            self.left.iter().map(|d| (d.inode, d.clone())).collect();
        let reaped: HashSet<u64> = self.reaped.keys().copied().collect();
        match self.dead.probe(
            &mut self.kernel,
            snap,
            &candidates,
            &last_seen,
            &reaped,
            now,
        ) {
            Ok(_) => self.probe_all = false,
            Err(e) => {
                warn!(error = %e, "looking for dead held sockets failed; trying again next cycle");
                report.error(ErrorKind::Netlink);
            }
        }
    }

    /// Attribution from the cache: only changed tables are read (see [`FdIndex`]).
    fn attribute(&mut self, pids: &[i32], report: &mut CycleReport) -> Snapshot<Arc<K::Process>> {
        let found = self.tracker.found();
        let mut refresh = self.refresh_tables(pids, &found);
        // A CLOSE_WAIT socket of a target's uid that no known target fd holds, not seen
        // last cycle: a target may have reused an fd number for it (same fd count). Read
        // the tables again once. Other processes' sockets are remembered as unowned, so
        // they cost this only when they first appear; a target that changed uid since
        // creating the socket waits for the next full refresh.
        let uids = self.cache.uids();
        let fresh = found.close_wait.iter().any(|s| {
            s.inode != 0
                && uids.contains(&s.uid)
                && !self.cache.knows(s.inode)
                && !self.unowned.contains(&s.inode)
        });
        if !refresh.full && fresh {
            let again = self.cache.reread(&self.kernel, &self.kernel, pids);
            refresh = Refresh {
                walked: refresh.walked + again.walked,
                ..again
            };
        }
        self.unowned = found
            .close_wait
            .iter()
            .filter(|s| s.inode != 0 && !self.cache.knows(s.inode))
            .map(|s| s.inode)
            .collect();
        cycle::note_refresh(&refresh, report);
        self.cache.snapshot(found)
    }

    /// A quiet cycle's attribution: the target processes with their open fds counted, and
    /// no socket (the candidates are kept from the last full cycle).
    fn attribute_quiet(
        &mut self,
        pids: &[i32],
        report: &mut CycleReport,
    ) -> Snapshot<Arc<K::Process>> {
        let none = cwreap_linux::netns::Found::default();
        let refresh = self.refresh_tables(pids, &none);
        cycle::note_refresh(&refresh, report);
        self.cache.snapshot(none)
    }

    /// The targets' fd tables brought up to date for `found`: with events from the socket
    /// iterator where it can be used (a snapshot this cycle, `probe_all`, lists again),
    /// otherwise as when polling.
    fn refresh_tables(&mut self, pids: &[i32], found: &cwreap_linux::netns::Found) -> Refresh {
        let (k, unowned, due) = (&mut self.kernel, &self.unowned, self.probe_all);
        let listed = (k.mode() == "events")
            .then(|| self.cache.refresh_listed(k, pids, found, unowned, due))
            .flatten();
        listed.unwrap_or_else(|| self.cache.refresh(&self.kernel, &self.kernel, pids))
    }

    /// Verdicts on the sockets shut down earlier: did their owners release the fds?
    fn check_releases(&mut self, now: Boottime, report: &mut CycleReport) {
        for v in self.releases.check(&self.kernel, &self.cfg, now) {
            let waited_ms = u64::try_from(v.waited.as_millis()).unwrap_or(u64::MAX);
            let r = v.result.as_str();
            match v.result {
                Release::StillHeld => {
                    warn!(target = %v.target, pid = v.pid, fd = v.fd, comm = %v.comm,
                    inode = v.inode, result = r, waited_ms,
                    "owner still holds the fd of a socket cwreap shut down, a whole still_held_after later: the app ignores EPOLLHUP/EPIPE; fix its disconnect path or restart it")
                }
                Release::Released => {
                    info!(target = %v.target, pid = v.pid, fd = v.fd, comm = %v.comm,
                    inode = v.inode, result = r, waited_ms, "owner released the fd")
                }
                Release::Gone => info!(target = %v.target, pid = v.pid, fd = v.fd, comm = %v.comm,
                    inode = v.inode, result = r, waited_ms, "owner exited before releasing the fd"),
            }
            self.audit.record(json!({
                "ts": unix_ts(),
                "event": "fd_release",
                "target": v.target,
                "pid": v.pid,
                "fd": v.fd,
                "comm": v.comm,
                "inode": v.inode,
                "result": r,
                "waited_ms": waited_ms,
            }));
            *report.releases.entry((v.target, v.result)).or_default() += 1;
        }
    }

    /// Escalations due this cycle, within `limits.max_escalations_per_minute`.
    fn escalate(
        &mut self,
        snap: &Snapshot<Arc<K::Process>>,
        targets: &Targets,
        found: &cycle::Candidates,
        now: Boottime,
        stop: &AtomicBool,
        report: &mut CycleReport,
    ) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        self.step();
        let round = Round {
            kernel: &self.kernel,
            cfg: &self.cfg,
            force_dry_run: self.force_dry_run,
            audit: &self.audit,
            snap,
            targets,
            selected: &found.selected,
            dead_held: &found.dead_held,
            now,
        };
        let per_minute = self.cfg.limits.max_escalations_per_minute as usize;
        let mut budget = Budget {
            left: self.escalation_limiter.budget(usize::MAX, per_minute, now),
            used: 0,
        };
        self.escalations.run(&round, &mut budget, report);
        self.escalation_limiter.record(budget.used, now);
    }
}
