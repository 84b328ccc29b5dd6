//! The steps of a cycle that need no state of the daemon's: which processes the targets
//! accept, which sockets are candidates (each under the first target that selects it), the
//! per-target gauges, the action on one socket, and its log event. The order they run in,
//! and what is kept between cycles, is [`crate::daemon::engine`].

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;

use tracing::{error, info, warn};

use cwreap_linux::kernel::{Kernel, ProcRead};
use cwreap_linux::netlink::DiagSocket;

use crate::daemon::cycle_report::{CycleReport, ErrorKind, TargetGauges};
use crate::daemon::policy::{self, Candidate, Decision, Headroom, HeadroomWarning};
use crate::daemon::tracker::Tracker;
use crate::shared::act::{self, ActResult, Expected, Outcome, Reason, Via};
use crate::shared::age::Age;
use crate::shared::attribute::{Snapshot, process_facts, read_cmdline, read_pid_files};
use crate::shared::config::{Action, Config};
use crate::shared::pid_file::PidFileError;
use crate::shared::selector::{Needs, SocketFacts};

/// pid → the targets whose process criteria accept the process, ascending.
pub type Targets = BTreeMap<i32, Vec<usize>>;

/// What kept processes from being matched this cycle.
#[derive(Debug, Default)]
pub struct MatchProblems {
    /// Pid files refused or unreadable: their targets select nothing this cycle.
    pub pid_files: Vec<PidFileError>,
    /// Processes skipped because reading their command line did not return in time (its
    /// pages are stalled: a FUSE file that never answers, an unserved userfaultfd).
    pub stalled: Vec<i32>,
}

/// What was last said about [`MatchProblems`]: each is logged when it starts or changes,
/// not every cycle.
#[derive(Debug, Default)]
pub struct ProblemLog {
    pid_files: HashMap<std::path::PathBuf, String>,
    stalled: Vec<i32>,
}

impl ProblemLog {
    /// Log what is new in `problems`, and count them in `report`.
    pub fn note(&mut self, problems: MatchProblems, report: &mut CycleReport) {
        let mut now: HashMap<std::path::PathBuf, String> = HashMap::new();
        for e in problems.pid_files {
            let (PidFileError::Refused { path, .. }
            | PidFileError::Unreadable { path, .. }
            | PidFileError::Missing(path)) = &e;
            now.insert(path.clone(), e.to_string());
        }
        for (path, why) in &now {
            if self.pid_files.get(path) != Some(why) {
                warn!(pid_file = %path.display(), error = %why,
                    "pid file not trusted; its target selects nothing until it is fixed");
            }
        }
        if !now.is_empty() {
            report.error(ErrorKind::PidFile);
        }
        self.pid_files = now;
        let mut stalled = problems.stalled;
        stalled.sort_unstable();
        let new: Vec<i32> = stalled
            .iter()
            .copied()
            .filter(|p| self.stalled.binary_search(p).is_err())
            .collect();
        if !new.is_empty() {
            warn!(pids = ?new, stalled = stalled.len(),
                "reading the command line of these processes did not return in time (their memory map is locked); they are skipped until it does");
        }
        if !stalled.is_empty() {
            report.error(ErrorKind::StalledRead);
        }
        self.stalled = stalled;
    }
}

/// pid → the targets whose process criteria accept the process, ascending; never
/// `self_pid`. Which of them a socket of the process belongs to depends on the socket
/// ([`policy::assign`]). A target whose pid file is refused or unreadable selects nothing
/// this cycle, and a process whose command line a target needs but cannot be read in time
/// is skipped; both go into `problems`. The command line is read last, only for a process
/// that passes every cheaper criterion of a target that needs it. An error only when the
/// process list cannot be read.
/// Say what reading the targets' fd tables ran into, and count it.
pub(super) fn note_refresh(refresh: &crate::daemon::fd_cache::Refresh, report: &mut CycleReport) {
    if refresh.stats.denied > 0 {
        tracing::warn!(
            processes = refresh.stats.denied,
            "cannot read the fd table of some target processes (permission denied; CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH are needed)"
        );
        report.error(ErrorKind::Proc);
    }
    if refresh.stats.vanished > 0 {
        // Listed a moment ago, gone before (or while) its fd table was read.
        info!(
            processes = refresh.stats.vanished,
            "target processes exited while their fd tables were read; skipped this cycle"
        );
        report.error(ErrorKind::Proc);
    }
}

/// Say which targets can never act (an earlier one selects all their sockets).
pub(super) fn warn_shadowed(cfg: &Config) {
    for s in cfg.shadowed() {
        let target = cfg.targets.get(s.target).map_or("", |t| t.name.as_str());
        tracing::warn!(target, "{}", cfg.shadow_message(s));
    }
}

pub fn match_processes(
    k: &impl ProcRead,
    cfg: &Config,
    self_pid: i32,
    problems: &mut MatchProblems,
) -> io::Result<Targets> {
    // Pid files are read every cycle: the service may have restarted.
    let pid_files: Vec<Vec<i32>> = cfg
        .targets
        .iter()
        .map(|t| {
            let (pids, errors) = read_pid_files(&t.selector.pid_files);
            problems.pid_files.extend(errors);
            pids
        })
        .collect();
    let needs = cfg
        .targets
        .iter()
        .fold(Needs::default(), |n, t| n.or(t.selector.needs()));
    let mut out = Targets::new();
    for pid in k.pids()? {
        if pid == self_pid {
            continue;
        }
        let Ok(mut facts) = process_facts(k, pid, needs) else {
            continue;
        };
        let maybe: Vec<usize> = cfg
            .targets
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                t.selector
                    .process_matches_before_cmdline(&facts, &pid_files[*i])
            })
            .map(|(i, _)| i)
            .collect();
        if maybe
            .iter()
            .any(|&i| cfg.targets[i].selector.needs().cmdline)
        {
            match read_cmdline(k, pid) {
                Ok(c) => facts.cmdline = c,
                Err(_) => {
                    problems.stalled.push(pid);
                    continue;
                }
            }
        }
        let matched: Vec<usize> = maybe
            .into_iter()
            .filter(|&i| {
                cfg.targets[i]
                    .selector
                    .process_matches(&facts, &pid_files[i])
            })
            .collect();
        if !matched.is_empty() {
            out.insert(pid, matched);
        }
    }
    Ok(out)
}

/// This cycle's candidates, and per (pid, target) how many sockets that target selects.
#[derive(Default)]
pub struct Candidates {
    pub list: Vec<Candidate>,
    pub selected: HashMap<(i32, usize), usize>,
    /// Per (pid, target): its dead held sockets (filled in by the caller).
    pub dead_held: HashMap<(i32, usize), usize>,
}

/// Each attributed socket under the first target that selects it, aged by `age_of`.
pub fn candidates<H>(
    cfg: &Config,
    snap: &Snapshot<H>,
    targets: &Targets,
    age_of: impl Fn(&DiagSocket) -> Age,
) -> Candidates {
    let mut list = Vec::new();
    let mut selected: HashMap<(i32, usize), usize> = HashMap::new();
    let process_targets = |pid: i32| targets.get(&pid).map(Vec::as_slice);
    for s in &snap.sockets {
        let socket = SocketFacts {
            local: s.diag.local,
            remote: s.diag.remote,
        };
        let Some((h, t)) = policy::assign(cfg, s.owners(), &process_targets, &socket) else {
            continue;
        };
        let Some(p) = snap.processes.get(&h.pid) else {
            continue;
        };
        *selected.entry((h.pid, t)).or_default() += 1;
        list.push(Candidate {
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
            age: age_of(&s.diag),
            owner_close_wait: 0,
        });
    }
    for c in &mut list {
        c.owner_close_wait = selected.get(&(c.pid, c.target)).copied().unwrap_or(0);
    }
    Candidates {
        list,
        selected,
        dead_held: HashMap::new(),
    }
}

/// Per target: the CLOSE_WAIT sockets it selects and the oldest of them; the open fds and
/// fd limits of the processes its process criteria accept. fd headroom warnings, once per
/// process.
pub fn gauges<H>(
    cfg: &Config,
    snap: &Snapshot<H>,
    targets: &Targets,
    found: &Candidates,
    tracker: &Tracker,
    headroom: &mut Headroom,
    report: &mut CycleReport,
) {
    let mut gauges = vec![TargetGauges::default(); cfg.targets.len()];
    for c in &found.list {
        if let Some(g) = gauges.get_mut(c.target) {
            g.close_wait += 1;
            g.oldest_ms = g.oldest_ms.max(c.age.min_ms);
            if tracker.arrived(&c.key()) {
                g.new_close_wait += 1;
            }
        }
    }
    for (&(_, t), n) in &found.dead_held {
        if let Some(g) = gauges.get_mut(t) {
            g.dead_held += n;
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
            .and_then(|&t| cfg.targets.get(t))
            .map_or("", |t| t.name.as_str());
        let fd_limit = p.nofile_soft.unwrap_or(0);
        match headroom.check(*pid, p.open_fds, p.nofile_soft) {
            Some(HeadroomWarning::Cleared) => {
                info!(target = %tname, pid = *pid, comm = %p.comm, open_fds = p.open_fds,
                    fd_limit, threshold_pct = policy::CLEAR_PCT,
                    "process is back below 70 % of its fd limit: the fd-usage warning is cleared");
            }
            Some(w) => {
                let pct = if w == HeadroomWarning::Above95 {
                    95
                } else {
                    policy::WARN_PCT
                };
                warn!(target = %tname, pid = *pid, comm = %p.comm, open_fds = p.open_fds,
                    fd_limit, threshold_pct = pct,
                    "process is close to its fd limit (RLIMIT_NOFILE): accept() will fail with EMFILE");
            }
            None => {}
        }
        if headroom.warning(*pid) {
            for &t in ts {
                if let Some(g) = gauges.get_mut(t) {
                    g.fd_warning = true;
                }
            }
        }
    }
    for (t, g) in cfg.targets.iter().zip(gauges) {
        report.targets.insert(t.name.clone(), g);
    }
}

/// Do decision `d`: through the pin held since attribution for a shutdown, through a
/// fresh lookup for SOCK_DESTROY (said unsupported once, then not tried again).
pub fn act<K: Kernel>(
    k: &mut K,
    snap: &Snapshot<Arc<K::Process>>,
    d: &Decision,
    destroy_unsupported: &mut bool,
) -> ActResult {
    let c = &d.candidate;
    match d.action {
        Action::Log => ActResult::ok(Outcome::Logged),
        Action::Destroy => {
            if *destroy_unsupported {
                return ActResult::with(Outcome::Error, Reason::DestroyUnsupported { error: None });
            }
            let Some(diag) = snap
                .sockets
                .iter()
                .find(|s| s.diag.netns == c.netns && s.diag.cookie == c.cookie)
                .map(|s| s.diag.clone())
            else {
                return ActResult::with(Outcome::Gone, Reason::LeftSnapshot);
            };
            let res = act::destroy_verified(k, &diag, d.dry_run);
            if matches!(res.reason, Some(Reason::DestroyUnsupported { .. })) {
                error!("{}", act::NO_DESTROY_HINT);
                *destroy_unsupported = true;
            }
            res
        }
        Action::Shutdown if c.unaccepted => {
            ActResult::with(Outcome::Skipped, Reason::Unaccepted(Via::Policy))
        }
        Action::Shutdown => {
            let Some(pin) = snap.processes.get(&c.pid).and_then(|p| p.handle.as_ref()) else {
                return ActResult::with(Outcome::Gone, Reason::NotPinned);
            };
            let exp = Expected {
                pid: c.pid,
                fd: c.fd,
                inode: c.inode,
                cookie: c.cookie,
            };
            act::shutdown_verified(&*k, pin.as_ref(), &exp, d.dry_run)
        }
    }
}

/// The structured event of one action: a warning when it failed.
pub fn log_action(target: &str, d: &Decision, res: &ActResult) {
    let c = &d.candidate;
    let action = d.action.as_str();
    let outcome = res.outcome.as_str();
    let text = res.detail();
    let detail = text.as_deref().unwrap_or("");
    let reason = res.reason.as_ref().map_or("", Reason::code);
    if res.outcome == Outcome::Error {
        warn!(target = %target, pid = c.pid, fd = c.fd, comm = %c.comm, inode = c.inode, netns = c.netns, unaccepted = c.unaccepted,
            local = %c.local, remote = %c.remote, age_ms = c.age.min_ms, age_max_ms = c.age.max_ms,
            age_source = c.age.source.as_str(), action, outcome, reason,
            dry_run = d.dry_run, error = detail, "action failed");
    } else {
        info!(target = %target, pid = c.pid, fd = c.fd, comm = %c.comm, inode = c.inode, netns = c.netns, unaccepted = c.unaccepted,
            local = %c.local, remote = %c.remote, age_ms = c.age.min_ms, age_max_ms = c.age.max_ms,
            age_source = c.age.source.as_str(), action, outcome, reason,
            dry_run = d.dry_run, detail, "close_wait action");
    }
}

/// This cycle's share of the event source's counts (events lost, catch-up dumps), from its
/// totals and `last`, the totals at the end of the previous cycle.
pub fn event_counts(
    k: &impl Kernel,
    last: &mut cwreap_linux::kernel::EventCounts,
    report: &mut CycleReport,
) {
    let Some(c) = k.event_counts() else { return };
    report.events_lost = c.lost.saturating_sub(last.lost);
    report.reconciles = c.reconciles.saturating_sub(last.reconciles);
    if report.events_lost > 0 {
        warn!(
            lost = report.events_lost,
            "the kernel dropped socket events (its ring buffer was full); a full dump caught up"
        );
    }
    *last = c;
}
