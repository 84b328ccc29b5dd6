//! The daemon's pure core: from the sockets seen this cycle, the policy, the time and what
//! was already done, decide what to do. No I/O: everything here is tested with plain values.
//!
//! Also the small pieces of state the decision needs across cycles (ages, rate limit, fd
//! headroom warnings), each a plain struct updated with an explicit `now`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use cwreap_linux::kernel::Boottime;
pub use cwreap_linux::kernel::SocketKey;

use crate::shared::age::Age;
use crate::shared::attribute::Holder;
use crate::shared::config::{Action, Config, Escalate};
use crate::shared::selector::SocketFacts;

/// One CLOSE_WAIT socket that `target` selects (see [`assign`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Index into `Config::targets`: the first target that selects the socket.
    pub target: usize,
    pub pid: i32,
    pub fd: i32,
    pub comm: String,
    pub inode: u64,
    pub cookie: u64,
    pub netns: u64,
    /// Still in the listener's accept queue (no fd; `pid`/`fd` are the listener's).
    pub unaccepted: bool,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Time in CLOSE_WAIT: decisions take its lower bound.
    pub age: Age,
    /// CLOSE_WAIT sockets of this owner that the same target selects (for
    /// `min_close_wait`).
    pub owner_close_wait: usize,
}

impl Candidate {
    pub fn key(&self) -> SocketKey {
        (self.netns, self.cookie)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub candidate: Candidate,
    pub action: Action,
    pub dry_run: bool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub decisions: Vec<Decision>,
    /// Eligible sockets put off by `max_reaps_per_cycle` / `max_reaps_per_minute`.
    pub deferred: usize,
}

/// Which target a socket belongs to, and the holder to act through: the first target, in
/// policy order, whose process criteria accept one of the socket's `owners` and whose
/// socket criteria accept the socket. `process_targets` gives, for each pid, the targets
/// whose process criteria accept it (ascending); holders it does not list are not targets.
/// Among holders of that same target, the first one listed is used.
pub fn assign<'t>(
    cfg: &Config,
    owners: &[Holder],
    process_targets: &impl Fn(i32) -> Option<&'t [usize]>,
    socket: &SocketFacts,
) -> Option<(Holder, usize)> {
    let mut best: Option<(Holder, usize)> = None;
    for h in owners {
        let Some(targets) = process_targets(h.pid) else {
            continue;
        };
        // Only a target before the best one so far can take the socket from it.
        let before = best.map_or(targets.len(), |(_, t)| targets.partition_point(|&i| i < t));
        if let Some(t) = cfg.target_for(&targets[..before], socket) {
            best = Some((*h, t));
        }
    }
    best
}

/// Decide this cycle's actions.
///
/// * a socket qualifies when it is at least `older_than` old, passes the target's port and
///   exclusion rules, and its owner holds at least `min_close_wait` CLOSE_WAIT sockets;
/// * a socket already handled (`handled`, by (netns, cookie)) is not acted on again;
/// * oldest first; socket-touching actions (shutdown, also in dry-run, so a dry run shows
///   what enforcing would do) are capped by `reap_budget`; `log` is never capped.
pub fn decide(
    candidates: &[Candidate],
    cfg: &Config,
    handled: &HashSet<SocketKey>,
    reap_budget: usize,
) -> Plan {
    let mut eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| !handled.contains(&c.key()))
        .filter(|c| {
            let Some(t) = cfg.targets.get(c.target) else {
                return false;
            };
            u128::from(c.age.min_ms) >= t.older_than.as_millis()
                && t.socket_selected(c.local, c.remote)
                && c.owner_close_wait >= t.min_close_wait as usize
        })
        .collect();
    eligible.sort_by(|a, b| {
        b.age
            .min_ms
            .cmp(&a.age.min_ms)
            .then(a.cookie.cmp(&b.cookie))
    });
    let mut seen = HashSet::new();
    let mut plan = Plan::default();
    let mut budget = reap_budget;
    for c in eligible {
        if !seen.insert(c.key()) {
            continue;
        }
        let Some(t) = cfg.targets.get(c.target) else {
            continue;
        };
        let dry_run = t.effective_dry_run(cfg.dry_run);
        if t.action != Action::Log {
            if budget == 0 {
                plan.deferred += 1;
                continue;
            }
            budget -= 1;
        }
        plan.decisions.push(Decision {
            candidate: c.clone(),
            action: t.action,
            dry_run,
        });
    }
    plan
}

/// Sliding one-minute window of reaps.
#[derive(Debug, Default)]
pub struct RateLimiter {
    recent: VecDeque<Boottime>,
}

impl RateLimiter {
    /// How many more reaps this cycle may do under both limits.
    pub fn budget(&mut self, per_cycle: usize, per_minute: usize, now: Boottime) -> usize {
        while let Some(&t) = self.recent.front() {
            if now.saturating_since(t) >= Duration::from_secs(60) {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        per_cycle.min(per_minute.saturating_sub(self.recent.len()))
    }

    pub fn record(&mut self, n: usize, now: Boottime) {
        for _ in 0..n {
            self.recent.push_back(now);
        }
    }
}

/// fd headroom warnings, with hysteresis so that fds swinging around a threshold give one
/// line, not one per swing: a warning above 80 %, then none again until the process fell
/// below 70 % (said once: cleared); one more above 95 %, re-armed below 90 %.
#[derive(Debug, Default)]
pub struct Headroom {
    level: HashMap<i32, u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadroomWarning {
    Above80,
    Above95,
    /// Back below 70 % after a warning.
    Cleared,
}

/// Percent of the limit at and above which the warning is set; below [`CLEAR_PCT`] it is
/// cleared.
pub const WARN_PCT: u64 = 80;
pub const CLEAR_PCT: u64 = 70;

impl Headroom {
    pub fn check(&mut self, pid: i32, open: usize, limit: Option<u64>) -> Option<HeadroomWarning> {
        let limit = limit.filter(|l| *l > 0)?;
        let pct = (open as u64).saturating_mul(100) / limit;
        let level = self.level.entry(pid).or_insert(0);
        let (new, said) = match (*level, pct) {
            (l, 95..) if l < 2 => (2, Some(HeadroomWarning::Above95)),
            (0, WARN_PCT..) => (1, Some(HeadroomWarning::Above80)),
            (1 | 2, ..CLEAR_PCT) => (0, Some(HeadroomWarning::Cleared)),
            (2, ..90) => (1, None),
            (l, _) => (l, None),
        };
        *level = new;
        said
    }

    /// Whether `pid` is in the warning (above 80 %, not below 70 % since).
    pub fn warning(&self, pid: i32) -> bool {
        self.level.get(&pid).is_some_and(|l| *l > 0)
    }

    /// Forget processes that are gone.
    pub fn retain(&mut self, alive: &HashSet<i32>) {
        self.level.retain(|pid, _| alive.contains(pid));
    }
}

/// The fd load of one process of a target, as the daemon saw it this cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub open_fds: usize,
    /// RLIMIT_NOFILE, read fresh (None is unlimited).
    pub soft: Option<u64>,
    pub hard: Option<u64>,
    /// Sockets of the process in CLOSE_WAIT, plus those cwreap shut down that it still
    /// holds.
    pub leaking: usize,
    /// When the forecast ([`crate::shared::forecast`]) puts EMFILE; None without a rate.
    pub emfile_in: Option<Duration>,
}

/// Which escalations a process already had (each happens at most once per process, and
/// per mode: see [`crate::daemon::escalate`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Escalated {
    /// The fd limit was raised, or found impossible to raise.
    pub raise_settled: bool,
    pub signaled: bool,
}

/// What a process of an escalating target is due for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escalation {
    /// Raise the soft RLIMIT_NOFILE from `from` to `to` (the hard limit).
    RaiseFdLimit { from: u64, to: u64 },
    /// `raise_fd_limit_at` was reached but the limit must not or cannot be raised.
    NoRaise(NoRaise),
    /// Send the target's signal.
    Signal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRaise {
    /// The soft limit is 1024 or less: past it, select() with FD_SETSIZE corrupts memory
    /// (or aborts under _FORTIFY_SOURCE) in apps that use it.
    SelectLimit,
    /// The soft limit is already the hard limit.
    AtHardLimit,
    /// The hard limit is unlimited: there is no limit to raise to.
    UnlimitedHard,
}

impl NoRaise {
    pub fn as_str(self) -> &'static str {
        match self {
            NoRaise::SelectLimit => "soft limit is 1024 or less (select() breaks above it)",
            NoRaise::AtHardLimit => "soft limit is already the hard limit",
            NoRaise::UnlimitedHard => "hard limit is unlimited",
        }
    }
}

/// The soft limit at or below which cwreap never raises it.
pub const SELECT_FD_SETSIZE: u64 = 1024;

/// The one escalation a process is due for now, if any: it must hold at least
/// `min_close_wait` leaking sockets and have reached a threshold: its open fds at a share of
/// the soft limit (`*_at`), or EMFILE forecast within a time (`*_before_emfile`). Raising
/// comes before signalling; each happens once.
pub fn escalation(
    e: &Escalate,
    min_close_wait: u32,
    load: &Load,
    done: Escalated,
) -> Option<Escalation> {
    if load.leaking < min_close_wait as usize {
        return None;
    }
    let soft = load.soft.filter(|s| *s > 0)?;
    let pct = (load.open_fds as u64).saturating_mul(100) / soft;
    let reached = |at: Option<u8>| at.is_some_and(|at| pct >= u64::from(at));
    let soon = |within: Option<Duration>| {
        within
            .zip(load.emfile_in)
            .is_some_and(|(within, left)| left <= within)
    };
    if !done.raise_settled && (reached(e.raise_fd_limit_at) || soon(e.raise_before_emfile)) {
        return Some(match load.hard {
            _ if soft <= SELECT_FD_SETSIZE => Escalation::NoRaise(NoRaise::SelectLimit),
            None => Escalation::NoRaise(NoRaise::UnlimitedHard),
            Some(hard) if hard <= soft => Escalation::NoRaise(NoRaise::AtHardLimit),
            Some(hard) => Escalation::RaiseFdLimit {
                from: soft,
                to: hard,
            },
        });
    }
    if !done.signaled && (reached(e.signal_at) || soon(e.signal_before_emfile)) {
        return Some(Escalation::Signal);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::age::AgeSource;
    use crate::shared::config;

    const POLICY: &str = r#"
dry_run: false
limits: { max_reaps_per_cycle: 3, max_reaps_per_minute: 5 }
targets:
  - name: api
    match: { comm: "^api$", local_ports: [8080] }
    older_than: 60s
    min_close_wait: 2
    exclude: { remote_cidrs: ["10.0.0.0/8"], remote_ports: [5432] }
    action: shutdown
  - name: audit-only
    match: { comm: "^batch$" }
    older_than: 10s
    action: log
  - name: careful
    match: { comm: "^db$" }
    older_than: 1s
    action: shutdown
    dry_run: true
"#;

    fn cfg() -> Config {
        config::parse(POLICY, "test.yaml").expect("valid policy")
    }

    fn cand(target: usize, cookie: u64, age_s: u64, remote: &str) -> Candidate {
        Candidate {
            target,
            pid: 100 + target as i32,
            fd: cookie as i32,
            comm: "x".into(),
            inode: cookie * 10,
            cookie,
            netns: 1,
            unaccepted: false,
            local: "127.0.0.1:8080".parse().expect("addr"),
            remote: remote.parse().expect("addr"),
            age: Age {
                min_ms: age_s * 1000,
                max_ms: None,
                source: AgeSource::FirstSeen,
                keepalive: false,
            },
            owner_close_wait: 5,
        }
    }

    fn cookies(p: &Plan) -> Vec<u64> {
        p.decisions.iter().map(|d| d.candidate.cookie).collect()
    }

    #[test]
    fn older_than_and_exclusions() {
        let c = cfg();
        let cands = vec![
            cand(0, 1, 59, "192.0.2.1:1000"),         // too young
            cand(0, 2, 60, "192.0.2.1:1000"),         // exactly old enough
            cand(0, 3, 600, "10.1.2.3:1000"),         // excluded CIDR
            cand(0, 4, 600, "192.0.2.1:5432"),        // excluded remote port
            cand(0, 5, 90, "[::ffff:10.9.9.9]:1000"), // IPv4-mapped, excluded CIDR
        ];
        let p = decide(&cands, &c, &HashSet::new(), 100);
        assert_eq!(cookies(&p), vec![2]);
        assert_eq!(p.decisions[0].action, Action::Shutdown);
        assert!(!p.decisions[0].dry_run);
    }

    #[test]
    fn local_ports_and_min_close_wait() {
        let c = cfg();
        let mut other_port = cand(0, 1, 600, "192.0.2.1:1000");
        other_port.local = "127.0.0.1:9090".parse().expect("addr");
        let mut lonely = cand(0, 2, 600, "192.0.2.1:1000");
        lonely.owner_close_wait = 1; // below min_close_wait: 2
        let p = decide(&[other_port, lonely], &c, &HashSet::new(), 100);
        assert!(p.decisions.is_empty());
    }

    #[test]
    fn oldest_first_capped_log_uncapped_once_each() {
        let c = cfg();
        let cands = vec![
            cand(0, 1, 100, "192.0.2.1:1"),
            cand(0, 2, 300, "192.0.2.1:2"),
            cand(0, 3, 200, "192.0.2.1:3"),
            cand(1, 4, 50, "192.0.2.1:4"),
            cand(1, 5, 20, "192.0.2.1:5"),
            cand(2, 6, 2, "192.0.2.1:6"),
            cand(0, 2, 300, "192.0.2.1:2"), // same socket seen twice: acted on once
        ];
        let p = decide(&cands, &c, &HashSet::new(), 2);
        // Budget 2 takes the two oldest socket-touching ones; log is never capped.
        assert_eq!(cookies(&p), vec![2, 3, 4, 5]);
        assert_eq!(p.deferred, 2);
        let handled: HashSet<SocketKey> = [(1, 2), (1, 4)].into_iter().collect();
        let p = decide(&cands, &c, &handled, 10);
        assert_eq!(cookies(&p), vec![3, 1, 5, 6]);
        // Per-target dry_run override.
        let last = p.decisions.last().expect("decision");
        assert_eq!((last.action, last.dry_run), (Action::Shutdown, true));
        let log = p
            .decisions
            .iter()
            .find(|d| d.candidate.cookie == 5)
            .expect("log");
        assert_eq!(log.action, Action::Log);
    }

    #[test]
    fn each_socket_goes_to_the_first_target_that_selects_it() {
        let c = config::parse(
            r#"
targets:
  - { name: api, match: { comm: "^srv$", local_ports: [8080] }, older_than: 1s }
  - { name: admin, match: { comm: "^srv$", local_ports: [9090] }, older_than: 1s }
  - { name: other, match: { uid: 0 }, older_than: 1s, exclude: { remote_ports: [22] } }
"#,
            "test.yaml",
        )
        .expect("valid policy");
        // pid 10 is "srv" (targets 0, 1, and 2 by uid); pid 20 only matches target 2.
        let by_pid = |pid: i32| -> Option<&'static [usize]> {
            match pid {
                10 => Some(&[0, 1, 2]),
                20 => Some(&[2]),
                _ => None,
            }
        };
        let h = |pid, fd| Holder { pid, fd };
        let sock = |local: &str, remote: &str| SocketFacts {
            local: local.parse().expect("addr"),
            remote: remote.parse().expect("addr"),
        };
        let peer = "192.0.2.1:4000";
        // Split by port: one process, two targets, each its own sockets.
        assert_eq!(
            assign(&c, &[h(10, 5)], &by_pid, &sock("127.0.0.1:8080", peer)),
            Some((h(10, 5), 0))
        );
        assert_eq!(
            assign(&c, &[h(10, 6)], &by_pid, &sock("127.0.0.1:9090", peer)),
            Some((h(10, 6), 1))
        );
        // Neither port: the next target that accepts the process.
        assert_eq!(
            assign(&c, &[h(10, 7)], &by_pid, &sock("127.0.0.1:7000", peer)),
            Some((h(10, 7), 2))
        );
        // Excluded everywhere it could go: no target.
        assert_eq!(
            assign(
                &c,
                &[h(10, 7)],
                &by_pid,
                &sock("127.0.0.1:7000", "192.0.2.1:22")
            ),
            None
        );
        // Shared after fork: the earliest target wins, through a holder it accepts, even
        // when another holder is listed first.
        assert_eq!(
            assign(
                &c,
                &[h(20, 3), h(10, 4)],
                &by_pid,
                &sock("127.0.0.1:8080", peer)
            ),
            Some((h(10, 4), 0))
        );
        assert_eq!(
            assign(
                &c,
                &[h(20, 3), h(10, 4)],
                &by_pid,
                &sock("127.0.0.1:7000", peer)
            ),
            Some((h(20, 3), 2)),
            "same target: the first holder"
        );
        // Holders that are no target's.
        assert_eq!(
            assign(&c, &[h(30, 1)], &by_pid, &sock("127.0.0.1:8080", peer)),
            None
        );
        assert_eq!(
            assign(&c, &[], &by_pid, &sock("127.0.0.1:8080", peer)),
            None
        );
    }

    #[test]
    fn rate_limiter_window() {
        let t0 = Boottime::from_duration(Duration::from_secs(100));
        let at = |s| t0.checked_add(Duration::from_secs(s)).expect("time");
        let mut rl = RateLimiter::default();
        assert_eq!(rl.budget(3, 5, t0), 3);
        rl.record(3, t0);
        assert_eq!(rl.budget(3, 5, at(1)), 2);
        rl.record(2, at(1));
        assert_eq!(rl.budget(3, 5, at(59)), 0);
        assert_eq!(rl.budget(3, 5, at(60)), 3);
        assert_eq!(rl.budget(3, 5, at(61)), 3);
    }

    fn esc(raise: Option<u8>, signal: Option<u8>) -> Escalate {
        Escalate {
            raise_fd_limit_at: raise,
            signal_at: signal,
            ..Escalate::default()
        }
    }

    fn load(open: usize, soft: u64, hard: Option<u64>, leaking: usize) -> Load {
        Load {
            open_fds: open,
            soft: Some(soft),
            hard,
            leaking,
            emfile_in: None,
        }
    }

    #[test]
    fn escalation_needs_the_leak_and_the_threshold() {
        let e = esc(Some(80), Some(95));
        let none = Escalated::default();
        // 880/1100 = 80 %: raise to the hard limit.
        assert_eq!(
            escalation(&e, 1, &load(880, 1100, Some(8192), 5), none),
            Some(Escalation::RaiseFdLimit {
                from: 1100,
                to: 8192
            })
        );
        // Below the threshold, or fewer leaking sockets than min_close_wait: nothing.
        assert_eq!(
            escalation(&e, 1, &load(879, 1100, Some(8192), 5), none),
            None
        );
        assert_eq!(
            escalation(&e, 6, &load(900, 1100, Some(8192), 5), none),
            None
        );
        assert_eq!(
            escalation(&e, 1, &load(900, 1100, Some(8192), 0), none),
            None
        );
        // Unlimited soft limit: never.
        let unlimited = Load {
            soft: None,
            ..load(10_000, 1, None, 5)
        };
        assert_eq!(escalation(&e, 1, &unlimited, none), None);
    }

    #[test]
    fn never_raise_at_or_below_1024_nor_past_the_hard_limit() {
        let e = esc(Some(80), None);
        let none = Escalated::default();
        assert_eq!(
            escalation(&e, 1, &load(1000, 1024, Some(524_288), 3), none),
            Some(Escalation::NoRaise(NoRaise::SelectLimit))
        );
        assert_eq!(
            escalation(&e, 1, &load(1000, 1100, Some(1100), 3), none),
            Some(Escalation::NoRaise(NoRaise::AtHardLimit))
        );
        assert_eq!(
            escalation(&e, 1, &load(1000, 1100, None, 3), none),
            Some(Escalation::NoRaise(NoRaise::UnlimitedHard))
        );
        // Once settled, never again.
        let settled = Escalated {
            raise_settled: true,
            ..Escalated::default()
        };
        assert_eq!(
            escalation(&e, 1, &load(1000, 1100, Some(8192), 3), settled),
            None
        );
    }

    #[test]
    fn signal_once_after_the_raise_is_settled() {
        let e = esc(Some(80), Some(95));
        // Soft = hard at 96 %: the raise settles as impossible, then the signal.
        let l = load(1056, 1100, Some(1100), 3);
        assert_eq!(
            escalation(&e, 1, &l, Escalated::default()),
            Some(Escalation::NoRaise(NoRaise::AtHardLimit))
        );
        let settled = Escalated {
            raise_settled: true,
            signaled: false,
        };
        assert_eq!(escalation(&e, 1, &l, settled), Some(Escalation::Signal));
        let both = Escalated {
            raise_settled: true,
            signaled: true,
        };
        assert_eq!(escalation(&e, 1, &l, both), None);
        // signal_at alone.
        assert_eq!(
            escalation(&esc(None, Some(95)), 1, &l, Escalated::default()),
            Some(Escalation::Signal)
        );
    }

    #[test]
    fn headroom_warns_once_per_crossing_with_hysteresis() {
        let mut h = Headroom::default();
        assert_eq!(h.check(1, 700, Some(1000)), None);
        assert!(!h.warning(1));
        assert_eq!(h.check(1, 800, Some(1000)), Some(HeadroomWarning::Above80));
        assert!(h.warning(1));
        // Swinging around 80 %: no new line, still in the warning.
        for open in [790, 810, 750, 820, 700, 799] {
            assert_eq!(h.check(1, open, Some(1000)), None, "at {open}");
            assert!(h.warning(1), "at {open}");
        }
        assert_eq!(h.check(1, 960, Some(1000)), Some(HeadroomWarning::Above95));
        assert_eq!(h.check(1, 990, Some(1000)), None);
        assert_eq!(
            h.check(1, 940, Some(1000)),
            None,
            "no new warning going down"
        );
        assert_eq!(h.check(1, 960, Some(1000)), None, "95 % re-arms below 90 %");
        assert_eq!(h.check(1, 890, Some(1000)), None);
        assert_eq!(h.check(1, 960, Some(1000)), Some(HeadroomWarning::Above95));
        assert_eq!(h.check(1, 699, Some(1000)), Some(HeadroomWarning::Cleared));
        assert!(!h.warning(1));
        assert_eq!(h.check(1, 600, Some(1000)), None, "cleared once");
        assert_eq!(
            h.check(1, 990, Some(1000)),
            Some(HeadroomWarning::Above95),
            "re-armed"
        );
        assert_eq!(h.check(2, 10, None), None, "unlimited never warns");
        assert!(!h.warning(2));
    }
}
