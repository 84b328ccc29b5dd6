//! `cwreap run`: the policy daemon. Owns the cycle (discover → attribute → age → decide →
//! act → report), the state kept between cycles, and the process around it: signals
//! (SIGHUP reload, SIGTERM/SIGINT stop), sd_notify (READY, STATUS, WATCHDOG), the start-up
//! self-test. The decision itself is pure and lives in [`crate::policy`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::json;
use tracing::{error, info, warn};

use crate::act::{self, ActResult, Expected, Outcome};
use crate::commands::UsageError;
use crate::config::{self, Action, Config, LogFormat, ProcessFacts};
use crate::discover::Namespaces;
use crate::index::{FdIndex, Refresh};
use crate::os::RealOs;
use crate::policy::{
    self, Ages, Candidate, Decision, Headroom, HeadroomWarning, RateLimiter, SocketKey,
};
use crate::procfs::ProcFs;
use crate::snapshot::Snapshot;
use crate::sys;

/// Load a policy for running or checking: ownership/mode first (when root), then content.
pub fn load_config(path: &Path) -> Result<Config, config::ConfigError> {
    config::check_file_permissions(path)?;
    config::load(path)
}

/// A socket that cwreap shut down, watched until its owner releases the fd or the grace
/// period ends.
struct PendingRelease {
    target: String,
    pid: i32,
    fd: i32,
    inode: u64,
    cookie: u64,
    comm: String,
    /// Shared by the sockets of one process reaped in the same cycle: one fd per process,
    /// not one per socket (thousands of reaps would otherwise exhaust our fd limit).
    pidfd: Option<Arc<OwnedFd>>,
    at: Instant,
}

/// Whether the owner let go of a socket cwreap shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Release {
    Released,
    StillHeld,
}

impl Release {
    pub fn as_str(self) -> &'static str {
        match self {
            Release::Released => "released",
            Release::StillHeld => "still_held",
        }
    }
}

/// What one cycle did; also the source of STATUS= and metrics.
#[derive(Debug, Default, Clone)]
pub struct CycleReport {
    pub close_wait: usize,
    pub candidates: usize,
    pub outcomes: BTreeMap<(String, &'static str, Outcome), usize>,
    pub releases: BTreeMap<(String, Release), usize>,
    pub deferred: usize,
    pub errors: BTreeMap<&'static str, usize>,
    /// Per target: CLOSE_WAIT sockets held now, oldest age, open fds, fd limit (summed).
    pub targets: BTreeMap<String, TargetGauges>,
    pub duration: Duration,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TargetGauges {
    pub close_wait: usize,
    pub oldest_ms: u64,
    pub open_fds: usize,
    pub fd_limit: u64,
}

impl CycleReport {
    fn error(&mut self, kind: &'static str) {
        *self.errors.entry(kind).or_default() += 1;
    }

    pub fn status_line(&self) -> String {
        let reaped: usize = self
            .outcomes
            .iter()
            .filter(|((_, _, o), _)| *o == Outcome::Reaped)
            .map(|(_, n)| n)
            .sum();
        format!(
            "{} CLOSE_WAIT in targets ({} host-wide), {} reaped this cycle, {} deferred by limits",
            self.candidates, self.close_wait, reaped, self.deferred
        )
    }
}

pub struct Daemon {
    pub cfg: Config,
    /// `--dry-run` on the command line: wins over the file.
    force_dry_run: bool,
    os: RealOs,
    proc: ProcFs,
    /// One sock_diag socket per network namespace of the target processes.
    namespaces: Namespaces,
    /// SOCK_DESTROY is unsupported by this kernel (said once).
    destroy_unsupported: bool,
    ages: Ages,
    limiter: RateLimiter,
    headroom: Headroom,
    /// Sockets already acted on (or reported), so each is handled once.
    handled: HashSet<SocketKey>,
    pending: Vec<PendingRelease>,
    /// Shut down but still held, on targets with `escalate`: closed inside the owner once
    /// `close_after` has passed since the shutdown.
    held: Vec<PendingRelease>,
    audit: Option<File>,
    /// Every socket fd of the target processes, kept between cycles (with their pidfds).
    index: FdIndex<OwnedFd>,
    self_pid: i32,
    /// This cycle's pidfd copies for the release watch, one per process.
    release_pidfds: HashMap<i32, Arc<OwnedFd>>,
    /// Inodes of last cycle's CLOSE_WAIT sockets that no target fd held.
    unowned: HashSet<u64>,
    /// See [`Daemon::on_stage`].
    hook: Option<StageHook>,
}

/// Fixed points of a cycle, for [`Daemon::on_stage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The target processes are listed; their fd tables are not read yet.
    Matched,
    /// About to act on the socket that `pid` holds as `fd`.
    BeforeAct { pid: i32, fd: i32 },
}

type StageHook = Box<dyn FnMut(Stage) + Send>;

fn open_audit(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl Daemon {
    pub fn new(cfg: Config, force_dry_run: bool) -> Result<Self> {
        let audit = match &cfg.audit_log {
            Some(p) => {
                Some(open_audit(p).with_context(|| format!("opening audit log {}", p.display()))?)
            }
            None => None,
        };
        Ok(Self {
            cfg,
            force_dry_run,
            os: RealOs,
            proc: ProcFs::default(),
            namespaces: Namespaces::default(),
            destroy_unsupported: false,
            ages: Ages::default(),
            limiter: RateLimiter::default(),
            headroom: Headroom::default(),
            handled: HashSet::new(),
            pending: Vec::new(),
            held: Vec::new(),
            audit,
            index: FdIndex::default(),
            self_pid: std::process::id() as i32,
            release_pidfds: HashMap::new(),
            unowned: HashSet::new(),
            hook: None,
        })
    }

    /// Call `hook` at each [`Stage`] of every cycle. A seam for tests: some faults (a
    /// target exiting or closing an fd between attribution and action) happen for real
    /// only in a window of microseconds; the hook lets a test make the change exactly there.
    pub fn on_stage(&mut self, hook: impl FnMut(Stage) + Send + 'static) {
        self.hook = Some(Box::new(hook));
    }

    /// Dump `d.netns()` through `d` until a dump fails; the daemon then opens sockets of its
    /// own again. A seam for tests of how a cycle handles a failed dump (see
    /// [`crate::netlink::Diag::over`]).
    pub fn use_diag(&mut self, d: crate::netlink::Diag) {
        self.namespaces.insert(d);
    }

    fn stage(&mut self, stage: Stage) {
        if let Some(hook) = self.hook.as_mut() {
            hook(stage);
        }
    }

    /// Swap in a new, already validated policy (SIGHUP).
    pub fn reload(&mut self, cfg: Config) -> Result<()> {
        if cfg.audit_log != self.cfg.audit_log {
            self.audit = match &cfg.audit_log {
                Some(p) => Some(
                    open_audit(p).with_context(|| format!("opening audit log {}", p.display()))?,
                ),
                None => None,
            };
        }
        if cfg.metrics.listen != self.cfg.metrics.listen {
            warn!("metrics.listen changes take effect at the next restart");
        }
        if cfg.log_format != self.cfg.log_format {
            warn!("log_format changes take effect at the next restart");
        }
        self.cfg = cfg;
        // Sockets only reported under the old policy (dry run, `log`) are judged again by
        // the new one: switching a dry run to enforcing must reap what the dry run showed.
        // Reaped sockets have left CLOSE_WAIT, so they are not acted on twice.
        self.handled.clear();
        Ok(())
    }

    /// Read what the targets' match blocks need to know about a process.
    fn facts(&self, pid: i32) -> io::Result<ProcessFacts> {
        let comm = self.proc.comm(pid)?;
        Ok(ProcessFacts {
            pid,
            comm,
            exe: self.proc.exe(pid).ok(),
            cmdline: self.proc.cmdline(pid).ok(),
            cgroup: self
                .proc
                .cgroup(pid)
                .ok()
                .and_then(|t| config::parse_cgroup_file(&t)),
            uid: self.proc.uid(pid).ok(),
        })
    }

    /// pid → index of the first target whose match block accepts the process.
    fn match_processes(&self, report: &mut CycleReport) -> BTreeMap<i32, usize> {
        let pid_files: Vec<Option<i32>> = self
            .cfg
            .targets
            .iter()
            .map(|t| {
                t.matcher.pid_file.as_ref().and_then(|p| {
                    std::fs::read_to_string(p)
                        .ok()
                        .and_then(|s| s.trim().parse::<i32>().ok())
                })
            })
            .collect();
        let mut out = BTreeMap::new();
        let Ok(pids) = self.proc.pids() else {
            report.error("proc");
            return out;
        };
        for pid in pids {
            if pid == self.self_pid {
                continue;
            }
            let Ok(facts) = self.facts(pid) else { continue };
            if let Some(i) = self
                .cfg
                .targets
                .iter()
                .enumerate()
                .position(|(i, t)| t.matcher.matches(&facts, pid_files[i]))
            {
                out.insert(pid, i);
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
        self.stage(Stage::Matched);

        // One sock_diag socket per network namespace the targets live in.
        self.namespaces.cover(&self.proc, &pids, false);
        let live: HashSet<u64> = pids
            .iter()
            .filter_map(|p| {
                crate::netlink::netns_inode(&self.proc.root().join(p.to_string()).join("ns/net"))
                    .ok()
            })
            .collect();
        self.namespaces.retain(|ino| live.contains(&ino));
        for (ino, why) in std::mem::take(&mut self.namespaces.failures) {
            warn!(netns = ino, error = %why, "network namespace skipped this cycle");
            report.error("netns");
        }
        let found = match self.namespaces.dump() {
            Ok(f) => f,
            Err(e) => {
                error!(error = %e, "sock_diag dump failed; retrying next cycle");
                report.error("netlink");
                self.namespaces = Namespaces::default();
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
        self.escalate(now, stop, &mut report);

        // Attribution from the cache; only changed targets' fd tables are read again.
        let mut refresh = self.index.refresh(&self.proc, &self.os, &pids);
        // A CLOSE_WAIT socket of a target's uid that no known target fd holds, not seen
        // last cycle: a target may have reused an fd number for it (same fd count, so the
        // cache could not tell). Read the tables again once. Sockets of other processes are
        // remembered as unowned, so they cost this only when they first appear; a target
        // that changed uid since creating the socket waits for the next full refresh.
        let unowned = |index: &FdIndex<OwnedFd>| -> HashSet<u64> {
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

        // Candidates: each attributed socket under the first holder that is a target.
        let mut per_pid_cw: HashMap<i32, usize> = HashMap::new();
        for s in &snap.sockets {
            // An unaccepted connection counts for whoever holds its listener.
            for h in s.owners() {
                *per_pid_cw.entry(h.pid).or_default() += 1;
            }
        }
        let mut candidates = Vec::new();
        for s in &snap.sockets {
            let unaccepted = s.unaccepted();
            let Some((h, t)) = s
                .owners()
                .iter()
                .find_map(|h| targets.get(&h.pid).map(|t| (*h, *t)))
            else {
                continue;
            };
            let Some(p) = snap.processes.get(&h.pid) else {
                continue;
            };
            candidates.push(Candidate {
                target: t,
                pid: h.pid,
                fd: h.fd,
                comm: p.comm.clone(),
                inode: s.diag.inode,
                cookie: s.diag.cookie,
                netns: s.diag.netns,
                unaccepted,
                local: s.diag.local,
                remote: s.diag.remote,
                age_ms: self.ages.age_ms(
                    (s.diag.netns, s.diag.cookie),
                    s.diag.last_ack_recv_ms,
                    now,
                ),
                owner_close_wait: per_pid_cw.get(&h.pid).copied().unwrap_or(0),
            });
        }
        report.candidates = candidates.len();
        self.gauges(&snap, &targets, &candidates, &mut report);

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
        let mut reaps = 0usize;
        for d in &plan.decisions {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            self.stage(Stage::BeforeAct {
                pid: d.candidate.pid,
                fd: d.candidate.fd,
            });
            let res = self.act(&snap, d);
            if d.action != Action::Log {
                reaps += 1;
            }
            self.record(d, &res, now, &snap, &mut report);
        }
        self.limiter.record(reaps, now);
        self.release_pidfds.clear();

        let alive: HashSet<i32> = snap.processes.keys().copied().collect();
        self.headroom.retain(&alive);
        self.index.restore(snap.processes);
        report.duration = started.elapsed();
        report
    }

    fn act(&mut self, snap: &Snapshot<OwnedFd>, d: &Decision) -> ActResult {
        let c = &d.candidate;
        match d.action {
            Action::Log => ActResult {
                outcome: Outcome::Logged,
                detail: None,
                permission_denied: false,
            },
            Action::Destroy => {
                if self.destroy_unsupported {
                    return ActResult::with(Outcome::Error, act::NO_DESTROY_HINT);
                }
                let Some(diag) = snap
                    .sockets
                    .iter()
                    .find(|s| s.diag.netns == c.netns && s.diag.cookie == c.cookie)
                    .map(|s| s.diag.clone())
                else {
                    return ActResult::with(Outcome::Gone, "socket left the snapshot");
                };
                let res = act::destroy_verified(&mut self.namespaces, &diag, d.dry_run);
                if res
                    .detail
                    .as_deref()
                    .is_some_and(|x| x.contains(act::NO_DESTROY_HINT))
                {
                    error!("{}", act::NO_DESTROY_HINT);
                    self.destroy_unsupported = true;
                }
                res
            }
            Action::Shutdown if c.unaccepted => ActResult::with(
                Outcome::Skipped,
                "unaccepted: the app never accept()ed it, so no fd exists to shut down; use action: destroy",
            ),
            Action::Shutdown => {
                let Some(handle) = snap.processes.get(&c.pid).and_then(|p| p.handle.as_ref())
                else {
                    return ActResult {
                        outcome: Outcome::Gone,
                        detail: Some("owner no longer pinned".into()),
                        permission_denied: false,
                    };
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
        snap: &Snapshot<OwnedFd>,
        report: &mut CycleReport,
    ) {
        let c = &d.candidate;
        let target = self
            .cfg
            .targets
            .get(c.target)
            .map_or_else(String::new, |t| t.name.clone());
        let action = d.action.as_str();
        let outcome = res.outcome.as_str();
        let detail = res.detail.as_deref().unwrap_or("");
        if res.outcome == Outcome::Error {
            warn!(target = %target, pid = c.pid, fd = c.fd, comm = %c.comm, inode = c.inode, netns = c.netns, unaccepted = c.unaccepted,
                local = %c.local, remote = %c.remote, age_ms = c.age_ms, action, outcome,
                dry_run = d.dry_run, error = detail, "action failed");
            report.error("act");
        } else {
            info!(target = %target, pid = c.pid, fd = c.fd, comm = %c.comm, inode = c.inode, netns = c.netns, unaccepted = c.unaccepted,
                local = %c.local, remote = %c.remote, age_ms = c.age_ms, action, outcome,
                dry_run = d.dry_run, detail, "close_wait action");
        }
        self.audit(json!({
            "ts": unix_ts(),
            "event": "action",
            "target": target,
            "pid": c.pid,
            "fd": if c.unaccepted { None } else { Some(c.fd) },
            "unaccepted": c.unaccepted,
            "netns": c.netns,
            "comm": c.comm,
            "inode": c.inode,
            "local": c.local.to_string(),
            "remote": c.remote.to_string(),
            "age_ms": c.age_ms,
            "action": action,
            "outcome": outcome,
            "dry_run": d.dry_run,
            "error": res.detail,
        }));
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
                        .and_then(|h| h.try_clone().ok())
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
                cookie: c.cookie,
                comm: c.comm.clone(),
                pidfd,
                at: now,
            });
        }
    }

    /// Whether the owner still holds the fd of a socket cwreap shut down: alive (through the
    /// pidfd kept since the shutdown; `without_pidfd` is the answer when there is none) and
    /// its fd still names the same socket inode.
    fn owner_holds(&self, p: &PendingRelease, without_pidfd: bool) -> bool {
        let alive = p
            .pidfd
            .as_ref()
            .map_or(without_pidfd, |fd| sys::pidfd_alive(fd.as_fd()));
        alive && matches!(self.proc.fd_socket_inode(p.pid, p.fd), Ok(Some(i)) if i == p.inode)
    }

    /// Did owners release the fds of sockets we shut down? `released` as soon as seen;
    /// `still_held` once the grace period (one interval, at least 1 s) is over.
    fn check_releases(&mut self, now: Instant, report: &mut CycleReport) {
        let grace = self.cfg.interval.max(Duration::from_secs(1));
        let pending = std::mem::take(&mut self.pending);
        for p in pending {
            let result = if !self.owner_holds(&p, true) {
                Release::Released
            } else if now.saturating_duration_since(p.at) >= grace {
                Release::StillHeld
            } else {
                self.pending.push(p);
                continue;
            };
            let waited_ms = now.saturating_duration_since(p.at).as_millis() as u64;
            let r = result.as_str();
            if result == Release::StillHeld {
                warn!(target = %p.target, pid = p.pid, fd = p.fd, comm = %p.comm, inode = p.inode,
                    result = r, waited_ms,
                    "owner still holds the fd of a socket cwreap shut down: the app ignores EPOLLHUP/EPIPE; fix its disconnect path or restart it");
            } else {
                info!(target = %p.target, pid = p.pid, fd = p.fd, comm = %p.comm, inode = p.inode,
                    result = r, waited_ms, "owner released the fd");
            }
            self.audit(json!({
                "ts": unix_ts(),
                "event": "fd_release",
                "target": p.target,
                "pid": p.pid,
                "fd": p.fd,
                "comm": p.comm,
                "inode": p.inode,
                "result": r,
                "waited_ms": waited_ms,
            }));
            *report
                .releases
                .entry((p.target.clone(), result))
                .or_default() += 1;
            let escalates = self
                .cfg
                .targets
                .iter()
                .any(|t| t.name == p.target && t.escalate.is_some());
            if result == Release::StillHeld && escalates {
                self.held.push(p);
            }
        }
    }

    /// `escalate: {close_after}`: fds the owner still holds `close_after` after cwreap shut
    /// their socket down are closed inside the owner, one stop per process, each fd
    /// verified again while the process is stopped.
    fn escalate(&mut self, now: Instant, stop: &AtomicBool, report: &mut CycleReport) {
        if self.held.is_empty() {
            return;
        }
        let mut due: BTreeMap<i32, Vec<PendingRelease>> = BTreeMap::new();
        for p in std::mem::take(&mut self.held) {
            let Some(after) = self
                .cfg
                .targets
                .iter()
                .find(|t| t.name == p.target)
                .and_then(|t| t.escalate)
                .map(|e| e.close_after)
            else {
                continue; // the target no longer escalates (reload)
            };
            // No pidfd, no injection: such an entry is dropped.
            if !self.owner_holds(&p, false) {
                continue; // released after all
            }
            if now.saturating_duration_since(p.at) >= after {
                due.entry(p.pid).or_default().push(p);
            } else {
                self.held.push(p);
            }
        }
        for (pid, batch) in due {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let Some(pidfd) = batch[0].pidfd.clone() else {
                continue;
            };
            let dry_run = self.force_dry_run
                || self
                    .cfg
                    .targets
                    .iter()
                    .find(|t| t.name == batch[0].target)
                    .is_some_and(|t| t.effective_dry_run(self.cfg.dry_run));
            let victims: Vec<crate::inject::Victim> = batch
                .iter()
                .map(|p| crate::inject::Victim {
                    fd: p.fd,
                    inode: p.inode,
                    cookie: p.cookie,
                })
                .collect();
            let results: Vec<(i32, ActResult)> = if dry_run {
                victims
                    .iter()
                    .map(|v| (v.fd, ActResult::ok(Outcome::DryRun)))
                    .collect()
            } else {
                let batch = crate::inject::close_in_target(pid, pidfd.as_fd(), &victims);
                if let Ok(r) = &batch {
                    info!(
                        pid,
                        closed = r.closed.len(),
                        skipped = r.skipped.len(),
                        pause_us = r.pause_us,
                        threads = r.threads,
                        open_fds_before = r.fds_before,
                        open_fds_after = r.fds_after,
                        "closed fds inside the owner"
                    );
                }
                let results = act::close_results(&victims, &batch);
                if results.iter().any(|(_, r)| r.outcome == Outcome::Error) {
                    report.error("inject");
                }
                results
            };
            for (fd, res) in results {
                let Some(p) = batch.iter().find(|p| p.fd == fd) else {
                    continue;
                };
                let (outcome, detail) = (res.outcome, res.detail);
                let detail_s = detail.as_deref().unwrap_or("");
                if outcome == Outcome::Error {
                    warn!(target = %p.target, pid, fd, comm = %p.comm, inode = p.inode,
                        action = "close", outcome = outcome.as_str(), dry_run, error = detail_s,
                        "injected close failed");
                } else {
                    info!(target = %p.target, pid, fd, comm = %p.comm, inode = p.inode,
                        action = "close", outcome = outcome.as_str(), dry_run, detail = detail_s,
                        "close_wait action");
                }
                self.audit(json!({
                    "ts": unix_ts(),
                    "event": "action",
                    "target": p.target,
                    "pid": pid,
                    "fd": fd,
                    "comm": p.comm,
                    "inode": p.inode,
                    "action": "close",
                    "outcome": outcome.as_str(),
                    "dry_run": dry_run,
                    "error": detail,
                }));
                *report
                    .outcomes
                    .entry((p.target.clone(), "close", outcome))
                    .or_default() += 1;
            }
        }
    }

    fn gauges(
        &mut self,
        snap: &Snapshot<OwnedFd>,
        targets: &BTreeMap<i32, usize>,
        candidates: &[Candidate],
        report: &mut CycleReport,
    ) {
        for t in &self.cfg.targets {
            report
                .targets
                .insert(t.name.clone(), TargetGauges::default());
        }
        let name = |i: usize| self.cfg.targets.get(i).map(|t| t.name.clone());
        for c in candidates {
            if let Some(g) = name(c.target).and_then(|n| report.targets.get_mut(&n)) {
                g.close_wait += 1;
                g.oldest_ms = g.oldest_ms.max(c.age_ms);
            }
        }
        for (pid, t) in targets {
            let Some(p) = snap.processes.get(pid) else {
                continue;
            };
            let Some(tname) = name(*t) else { continue };
            if let Some(g) = report.targets.get_mut(&tname) {
                g.open_fds += p.open_fds;
                g.fd_limit += p.nofile_soft.unwrap_or(0);
            }
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
    }

    fn audit(&mut self, line: serde_json::Value) {
        let Some(f) = self.audit.as_mut() else { return };
        if let Err(e) = writeln!(f, "{line}").and_then(|()| f.flush()) {
            error!(error = %e, "cannot write the audit log");
        }
    }
}

fn unix_ts() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Start-up self-test: duplicate one of our own fds through a pidfd. It proves the kernel
/// has pidfd_getfd and no seccomp filter blocks it; it also names the capability needed for
/// other users' processes when we lack it.
pub fn self_test() -> Result<(), UsageError> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .map_err(|e| UsageError(format!("self-test: cannot create a socket: {e}")))?;
    let me = sys::pidfd_open(std::process::id() as i32).map_err(|e| {
        UsageError(format!(
            "self-test: pidfd_open failed ({e}); cwreap needs Linux ≥ 5.6 and pidfd_open allowed by seccomp"
        ))
    })?;
    use std::os::fd::AsRawFd;
    let dup = sys::pidfd_getfd(me.as_fd(), sock.as_raw_fd()).map_err(|e| {
        UsageError(format!(
            "self-test: pidfd_getfd failed ({e}). It needs Linux ≥ 5.6, CAP_SYS_PTRACE for other \
users' processes, and a seccomp filter that allows it (systemd: SystemCallFilter=pidfd_getfd; \
Docker: --cap-add SYS_PTRACE)"
        ))
    })?;
    let same = sys::inode(dup.as_fd()).ok() == sys::inode(sock.as_fd()).ok();
    if !same {
        return Err(UsageError(
            "self-test: pidfd_getfd returned a different file".into(),
        ));
    }
    // Root without CAP_SYS_PTRACE (a dropped bounding set, a container) is as limited as
    // any user, so the capability is what counts, not the uid.
    if !sys::has_cap(sys::CAP_SYS_PTRACE) {
        warn!(
            "running without CAP_SYS_PTRACE: only dumpable processes of our own uid (and no more capabilities than ours) can be inspected and reaped; others are counted as permission errors each cycle. Run as root or grant it: AmbientCapabilities=CAP_SYS_PTRACE CAP_DAC_READ_SEARCH in the unit, or `setcap cap_sys_ptrace,cap_dac_read_search+ep $(command -v cwreap)`"
        );
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&io::stderr()))
        .with_target(false);
    // journald stamps every line itself.
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let _ = match (format, under_journal) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Text, true) => builder.without_time().try_init(),
        (LogFormat::Text, false) => builder.try_init(),
    };
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "sd_notify failed");
    }
}

/// Raise the soft RLIMIT_NOFILE to the hard limit. systemd's default soft limit is 1024,
/// and every metrics client holds an fd for up to its deadline: a local flood of idle
/// connections would otherwise leave cycles without fds for pidfds, /proc and duplicates.
fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
}

/// `cwreap run`: load, self-test, notify READY, then cycle until SIGTERM/SIGINT.
pub fn run(config_path: &Path, force_dry_run: bool) -> Result<()> {
    sys::limit_heap_growth();
    raise_fd_limit();
    let cfg = load_config(config_path).map_err(|e| UsageError(e.to_string()))?;
    init_logging(cfg.log_format);
    self_test()?;
    let daemon = Daemon::new(cfg, force_dry_run).map_err(|e| UsageError(format!("{e:#}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(async {
        let metrics = crate::metrics::Metrics::new();
        if let Some(addr) = daemon.cfg.metrics.listen {
            let listener = crate::metrics::bind(addr).await.map_err(|e| {
                UsageError(format!(
                    "metrics.listen {addr}: cannot listen ({e}); pick a free address or set `metrics: {{listen: off}}`"
                ))
            })?;
            info!(listen = %addr, "metrics endpoint: GET /metrics");
            tokio::spawn(crate::metrics::serve(listener, metrics.clone()));
        }
        main_loop(daemon, config_path.to_path_buf(), metrics).await
    });
    // After SIGTERM a cycle may still be running on the blocking pool (the stop flag is
    // only checked between actions, and `shutdown` already gave it its time): dropping the
    // runtime would join that thread, however long the cycle takes.
    rt.shutdown_background();
    result
}

async fn main_loop(
    mut daemon: Daemon,
    config_path: PathBuf,
    metrics: crate::metrics::Metrics,
) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let stop = Arc::new(AtomicBool::new(false));
    let watchdog = sd_notify::watchdog_enabled();
    let targets: Vec<String> = daemon.cfg.targets.iter().map(|t| t.name.clone()).collect();
    info!(
        config = %config_path.display(),
        dry_run = daemon.cfg.dry_run || daemon.force_dry_run,
        interval_ms = daemon.cfg.interval.as_millis() as u64,
        targets = %targets.join(","),
        "cwreap started"
    );
    notify(&[sd_notify::NotifyState::Ready]);

    loop {
        let flag = stop.clone();
        let mut job = tokio::task::spawn_blocking(move || {
            let report = daemon.cycle(&flag);
            (daemon, report)
        });
        let (d, report) = tokio::select! {
            r = &mut job => r.context("cycle thread panicked")?,
            _ = term.recv() => return shutdown(stop, job, "SIGTERM").await,
            _ = int.recv() => return shutdown(stop, job, "SIGINT").await,
        };
        daemon = d;
        metrics.observe(&report);
        let status = report.status_line();
        notify(&[sd_notify::NotifyState::Status(&status)]);
        if watchdog.is_some() {
            notify(&[sd_notify::NotifyState::Watchdog]);
        }

        // Sleep until the next cycle, feeding the watchdog and answering signals.
        let wake = tokio::time::Instant::now() + daemon.cfg.interval;
        loop {
            let tick = watchdog.map_or(daemon.cfg.interval, |w| w / 2);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => break,
                _ = tokio::time::sleep(tick), if watchdog.is_some() => {
                    notify(&[sd_notify::NotifyState::Watchdog]);
                }
                _ = hup.recv() => {
                    notify(&[sd_notify::NotifyState::Reloading, sd_notify::NotifyState::monotonic_usec_now()?]);
                    match load_config(&config_path) {
                        Ok(cfg) => match daemon.reload(cfg) {
                            Ok(()) => info!(config = %config_path.display(), "config reloaded"),
                            Err(e) => error!(error = %format!("{e:#}"), "config reload failed; keeping the previous config"),
                        },
                        Err(e) => error!(error = %e, "config reload rejected; keeping the previous config"),
                    }
                    notify(&[sd_notify::NotifyState::Ready]);
                    break;
                }
                _ = term.recv() => { return stopping("SIGTERM"); }
                _ = int.recv() => { return stopping("SIGINT"); }
            }
        }
    }
}

/// Between cycles: say so and leave.
fn stopping(signal: &str) -> Result<()> {
    info!(signal, "stopping");
    notify(&[sd_notify::NotifyState::Stopping]);
    Ok(())
}

async fn shutdown(
    stop: Arc<AtomicBool>,
    job: tokio::task::JoinHandle<(Daemon, CycleReport)>,
    signal: &str,
) -> Result<()> {
    info!(signal, "stopping after the current action");
    notify(&[sd_notify::NotifyState::Stopping]);
    stop.store(true, Ordering::Relaxed);
    // The cycle stops between actions; give it well under a second.
    let _ = tokio::time::timeout(Duration::from_millis(800), job).await;
    Ok(())
}
