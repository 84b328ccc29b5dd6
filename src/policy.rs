//! The daemon's pure core: from the sockets seen this cycle, the policy, the time and what
//! was already done, decide what to do. No I/O: everything here is tested with plain values.
//!
//! Also the small pieces of state the decision needs across cycles (ages, rate limit, fd
//! headroom warnings), each a plain struct updated with an explicit `now`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::{Action, Config};

/// One CLOSE_WAIT socket held by a process that matched `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Index into `Config::targets` (the first target whose match block accepts the owner).
    pub target: usize,
    pub pid: i32,
    pub fd: i32,
    pub comm: String,
    pub inode: u64,
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Lower bound on time in CLOSE_WAIT (see [`Ages`]).
    pub age_ms: u64,
    /// CLOSE_WAIT sockets the owner holds in all (for `min_close_wait`).
    pub owner_close_wait: usize,
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

/// Decide this cycle's actions.
///
/// * a socket qualifies when it is at least `older_than` old, passes the target's port and
///   exclusion rules, and its owner holds at least `min_close_wait` CLOSE_WAIT sockets;
/// * a socket already handled (`handled`, by cookie) is not acted on again;
/// * oldest first; socket-touching actions (shutdown, also in dry-run, so a dry run shows
///   what enforcing would do) are capped by `reap_budget`; `log` is never capped.
pub fn decide(
    candidates: &[Candidate],
    cfg: &Config,
    handled: &HashSet<u64>,
    reap_budget: usize,
) -> Plan {
    let mut eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| !handled.contains(&c.cookie))
        .filter(|c| {
            let Some(t) = cfg.targets.get(c.target) else {
                return false;
            };
            u128::from(c.age_ms) >= t.older_than.as_millis()
                && t.socket_selected(c.local, c.remote)
                && c.owner_close_wait >= t.min_close_wait as usize
        })
        .collect();
    eligible.sort_by(|a, b| b.age_ms.cmp(&a.age_ms).then(a.cookie.cmp(&b.cookie)));
    let mut seen = HashSet::new();
    let mut plan = Plan::default();
    let mut budget = reap_budget;
    for c in eligible {
        if !seen.insert(c.cookie) {
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

/// First-seen times per socket cookie, so a socket's age is the larger of two lower bounds:
/// tcp_info `last_ack_recv` and the time since cwreap first saw it in CLOSE_WAIT.
#[derive(Debug, Default)]
pub struct Ages {
    first_seen: HashMap<u64, Instant>,
}

impl Ages {
    /// Record the sockets present now and forget the ones that are gone.
    pub fn observe(&mut self, cookies: impl IntoIterator<Item = u64>, now: Instant) {
        let present: HashSet<u64> = cookies.into_iter().collect();
        self.first_seen.retain(|c, _| present.contains(c));
        for c in present {
            self.first_seen.entry(c).or_insert(now);
        }
    }

    pub fn age_ms(&self, cookie: u64, last_ack_recv_ms: Option<u32>, now: Instant) -> u64 {
        let seen = self
            .first_seen
            .get(&cookie)
            .map_or(0, |t| now.saturating_duration_since(*t).as_millis() as u64);
        seen.max(u64::from(last_ack_recv_ms.unwrap_or(0)))
    }

    pub fn len(&self) -> usize {
        self.first_seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.first_seen.is_empty()
    }
}

/// Sliding one-minute window of reaps.
#[derive(Debug, Default)]
pub struct RateLimiter {
    recent: VecDeque<Instant>,
}

impl RateLimiter {
    /// How many more reaps this cycle may do under both limits.
    pub fn budget(&mut self, per_cycle: usize, per_minute: usize, now: Instant) -> usize {
        while let Some(&t) = self.recent.front() {
            if now.saturating_duration_since(t) >= Duration::from_secs(60) {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        per_cycle.min(per_minute.saturating_sub(self.recent.len()))
    }

    pub fn record(&mut self, n: usize, now: Instant) {
        for _ in 0..n {
            self.recent.push_back(now);
        }
    }
}

/// fd headroom warnings: once at 80 %, once more at 95 %, re-armed below 80 %.
#[derive(Debug, Default)]
pub struct Headroom {
    level: HashMap<i32, u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadroomWarning {
    Above80,
    Above95,
}

impl Headroom {
    pub fn check(&mut self, pid: i32, open: usize, limit: Option<u64>) -> Option<HeadroomWarning> {
        let limit = limit.filter(|l| *l > 0)?;
        let pct = (open as u64).saturating_mul(100) / limit;
        let level = self.level.entry(pid).or_insert(0);
        let new = if pct >= 95 {
            2
        } else if pct >= 80 {
            (*level).max(1)
        } else {
            0
        };
        let warn = match (new > *level, new) {
            (true, 2) => Some(HeadroomWarning::Above95),
            (true, 1) => Some(HeadroomWarning::Above80),
            _ => None,
        };
        *level = new;
        warn
    }

    /// Forget processes that are gone.
    pub fn retain(&mut self, alive: &HashSet<i32>) {
        self.level.retain(|pid, _| alive.contains(pid));
    }
}
