//! What one daemon cycle did: the counts the daemon's status line and the metrics are made
//! of. The daemon fills a [`CycleReport`]; [`crate::daemon::metrics`] folds it into counters.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::shared::act::Outcome;
use crate::shared::config::Action;

/// Whether the owner let go of a socket cwreap shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Release {
    Released,
    StillHeld,
    /// The owner exited before it let go (its fds went with it).
    Gone,
}

impl Release {
    pub fn as_str(self) -> &'static str {
        match self {
            Release::Released => "released",
            Release::StillHeld => "still_held",
            Release::Gone => "gone",
        }
    }
}

/// What kind of step of a cycle failed (the `kind` label of `cwreap_cycle_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// Reading /proc: listing processes, or an fd table (denied, or the process vanished).
    Proc,
    /// A network namespace could not be entered.
    Netns,
    /// A sock_diag dump failed.
    Netlink,
    /// An action on a socket failed.
    Act,
    /// An escalation failed.
    Escalate,
    /// The audit log did not confirm the intent records in time.
    Audit,
    /// A target's pid file was refused or unreadable.
    PidFile,
    /// Reading a process's command line did not return in time: it was skipped.
    StalledRead,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Proc => "proc",
            ErrorKind::Netns => "netns",
            ErrorKind::Netlink => "netlink",
            ErrorKind::Act => "act",
            ErrorKind::Escalate => "escalate",
            ErrorKind::Audit => "audit",
            ErrorKind::PidFile => "pid_file",
            ErrorKind::StalledRead => "stalled_read",
        }
    }
}

/// What an escalation did to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EscalationKind {
    RaiseFdLimit,
    Signal,
}

impl EscalationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EscalationKind::RaiseFdLimit => "raise_fd_limit",
            EscalationKind::Signal => "signal",
        }
    }
}

/// What one cycle did; also the source of STATUS= and metrics.
#[derive(Debug, Default, Clone)]
pub struct CycleReport {
    pub close_wait: usize,
    pub candidates: usize,
    /// Nothing changed since the last full cycle: its candidates were aged again.
    pub quiet: bool,
    pub outcomes: BTreeMap<(String, Action, Outcome), usize>,
    pub releases: BTreeMap<(String, Release), usize>,
    /// Escalations done, by target and kind.
    pub escalations: BTreeMap<(String, EscalationKind), usize>,
    pub deferred: usize,
    /// Escalations due but held back by `limits.max_escalations_per_minute`.
    pub escalations_deferred: usize,
    /// Events the kernel dropped this cycle (its ring buffer was full).
    pub events_lost: u64,
    /// Full dumps the event source did this cycle to catch up.
    pub reconciles: u64,
    /// Actions not done because their intent records could not be written.
    pub skipped_unrecorded: usize,
    pub errors: BTreeMap<ErrorKind, usize>,
    /// Per target: CLOSE_WAIT sockets held now, oldest age, open fds, fd limit (summed),
    /// new CLOSE_WAIT sockets, and the process nearest its fd limit.
    pub targets: BTreeMap<String, TargetGauges>,
    pub duration: Duration,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TargetGauges {
    pub close_wait: usize,
    pub oldest_ms: u64,
    pub open_fds: usize,
    pub fd_limit: u64,
    /// CLOSE_WAIT sockets that appeared since the last cycle (arrivals, by cookie).
    pub new_close_wait: usize,
    /// Dead held sockets: connections that ended while the process still holds the fd.
    pub dead_held: usize,
    /// The process nearest its fd limit: (open fds, soft limit); limit 0 when none is known.
    /// A sum over processes would hide the one about to fail.
    pub fullest: (usize, u64),
    /// The soonest EMFILE forecast over the target's processes, in ms; None when none of
    /// them grows (or none has a limit, or only one sample is known).
    pub emfile_in_ms: Option<u64>,
    /// Whether one of its processes is in the fd-usage warning: above 80 % of its limit
    /// and not back below 70 % since.
    pub fd_warning: bool,
}

impl TargetGauges {
    /// Open fds / soft limit of the process nearest its limit; 0 without a known limit.
    pub fn fd_usage_ratio(&self) -> f64 {
        match self.fullest {
            (_, 0) => 0.0,
            (open, limit) => open as f64 / limit as f64,
        }
    }

    /// Count a process in: it becomes `fullest` if it is nearer its limit.
    pub fn consider(&mut self, open: usize, limit: Option<u64>) {
        let Some(limit) = limit.filter(|l| *l > 0) else {
            return;
        };
        let (o, l) = self.fullest;
        // open/limit > o/l, without floats.
        if l == 0 || (open as u128) * u128::from(l) > (o as u128) * u128::from(limit) {
            self.fullest = (open, limit);
        }
    }
}

impl CycleReport {
    /// Count one error of `kind`.
    pub fn error(&mut self, kind: ErrorKind) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fullest_process_by_ratio() {
        let mut g = TargetGauges::default();
        assert_eq!(g.fd_usage_ratio(), 0.0);
        g.consider(900, None);
        g.consider(900, Some(0));
        assert_eq!(g.fullest, (0, 0), "no limit known");
        g.consider(500, Some(1000));
        g.consider(60_000, Some(1_000_000));
        g.consider(1000, Some(1100));
        g.consider(10, Some(20));
        assert_eq!(g.fullest, (1000, 1100));
        assert!((g.fd_usage_ratio() - 1000.0 / 1100.0).abs() < 1e-12);
    }
}
