//! The steady cycle with events. Between two cycles where the kernel reported no state
//! change, no fd table was read and the targets are the same processes, every tracked
//! socket has the same owner, the same target and the same clues to its age: only time
//! moved. So a full cycle keeps what it found ([`Steady`]) with the earliest moment any of
//! it can become due, and until then a cycle ages the kept candidates again (the same
//! function of the same clues) instead of cloning, attributing and assigning every
//! tracked socket anew. Anything else (an event, a reconciliation, a reload, a new or gone
//! target, a deferral, the due moment) makes the next cycle a full one.

use std::cell::RefCell;
use std::collections::HashSet;
use std::time::Duration;

use cwreap_linux::kernel::{Boottime, SocketKey};

use crate::daemon::cycle::Candidates;
use crate::shared::age::{self, Clues};
use crate::shared::config::Config;

/// What a full cycle found, to be aged again while nothing changes.
pub struct Steady {
    pub found: Candidates,
    /// The clues each candidate was aged by, in the order of `found.list`.
    clues: Vec<Clues>,
    /// The target processes it was found for, with their open fds then (a count that
    /// moved may be a socket accepted since: it needs a full cycle).
    pids: Vec<(i32, Option<usize>)>,
    /// Before this moment no candidate can be due; None: none ever can (all handled or
    /// not selected).
    due: Option<Boottime>,
}

/// The clues of each candidate, recorded in order while a full cycle ages them.
#[derive(Default)]
pub struct ClueLog(RefCell<Vec<Clues>>);

impl ClueLog {
    /// Age by `clues` at `now`, and remember them.
    pub fn age(&self, clues: Clues, now: Boottime) -> age::Age {
        self.0.borrow_mut().push(clues);
        age::age(&clues, now)
    }
}

impl Steady {
    /// Keep this full cycle's `found` (aged through `log`) for later cycles, unless the
    /// cycle deferred any (those must be decided again next cycle).
    pub fn keep(
        cfg: &Config,
        found: Candidates,
        log: ClueLog,
        pids: Vec<(i32, Option<usize>)>,
        handled: &HashSet<SocketKey>,
        deferred: usize,
        now: Boottime,
    ) -> Option<Steady> {
        let clues = log.0.into_inner();
        if deferred > 0 || clues.len() != found.list.len() {
            return None;
        }
        // An age grows at most as fast as time (the exact one as fast, the lower bounds
        // from tcp_info never faster), so this is the earliest a candidate can be due.
        let due = found
            .list
            .iter()
            .filter(|c| !handled.contains(&c.key()))
            .filter_map(|c| {
                let t = cfg.targets.get(c.target)?;
                let selected = t.socket_selected(c.local, c.remote)
                    && c.owner_close_wait >= t.min_close_wait as usize;
                let older = u64::try_from(t.older_than.as_millis()).unwrap_or(u64::MAX);
                let left = Duration::from_millis(older.saturating_sub(c.age.min_ms));
                selected.then(|| now.checked_add(left).unwrap_or(now))
            })
            .min();
        Some(Steady {
            found,
            clues,
            pids,
            due,
        })
    }

    /// The kept candidates aged at `now`, if this cycle may use them: the same target
    /// processes with the same open fd counts, and before the due moment.
    pub fn at(mut self, pids: &[(i32, Option<usize>)], now: Boottime) -> Option<Steady> {
        if self.pids != pids || self.due.is_some_and(|d| now >= d) {
            return None;
        }
        for (c, clues) in self.found.list.iter_mut().zip(&self.clues) {
            c.age = age::age(clues, now);
        }
        Some(self)
    }
}
