//! What one daemon cycle did: the counts the daemon's status line and the metrics are made
//! of. The daemon fills a [`CycleReport`]; [`crate::metrics`] folds it into counters.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::act::Outcome;

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
    /// Escalations done, by target and kind (`raise_fd_limit`, `signal`).
    pub escalations: BTreeMap<(String, &'static str), usize>,
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
    /// Count one error of `kind` (the `kind` label of `cwreap_cycle_errors_total`).
    pub fn error(&mut self, kind: &'static str) {
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
