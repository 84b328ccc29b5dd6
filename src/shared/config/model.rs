//! The validated policy: [`Config`], its [`Target`]s and their settings, with the defaults
//! and the texts `cwreap check` prints about escalations.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::error::Position;
use crate::shared::selector::{ProcessFacts, Selector, SocketFacts};

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// The shortest `interval` accepted.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
pub const DEFAULT_MAX_REAPS_PER_CYCLE: u32 = 100;
pub const DEFAULT_MAX_REAPS_PER_MINUTE: u32 = 600;
/// Escalations (fd-limit raises and signals) per minute, over all targets: a budget of
/// their own, so socket reaps never hold one back.
pub const DEFAULT_MAX_ESCALATIONS_PER_MINUTE: u32 = 60;
/// The shortest default wait before a socket cwreap shut down is called `still_held`.
pub const MIN_STILL_HELD_AFTER: Duration = Duration::from_secs(30);
/// The longest `*_before_emfile` forecast window.
pub const MAX_FORECAST_WINDOW: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9814";

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Config {
    /// Time between two cycles (at least [`MIN_INTERVAL`]).
    pub interval: Duration,
    /// Global dry-run; a target may override it (see [`Target::effective_dry_run`]).
    pub dry_run: bool,
    pub log_format: LogFormat,
    /// Where to append one JSON line per action (absolute path), if anywhere.
    pub audit_log: Option<PathBuf>,
    /// With an audit log: what to do when the intent records cannot be written.
    pub on_audit_failure: OnAuditFailure,
    /// How long an owner has to release the fd of a socket cwreap shut down before the
    /// verdict is `still_held`; None: [`Config::still_held_window`]'s default.
    pub still_held_after: Option<Duration>,
    /// How the daemon finds CLOSE_WAIT sockets.
    pub discovery: Discovery,
    /// `where: on`: the daemon keeps the programs of `explain --where` attached to its
    /// targets and publishes the stacks for the command line.
    pub where_stacks: bool,
    pub limits: Limits,
    pub metrics: Metrics,
    /// At least one; names are unique.
    pub targets: Vec<Target>,
}

impl Config {
    /// How long an owner has to release the fd of a socket cwreap shut down: the
    /// `still_held_after` given, else 3 intervals or [`MIN_STILL_HELD_AFTER`], whichever is
    /// longer (an app that closes on its next heartbeat or poll is not `still_held`).
    pub fn still_held_window(&self) -> Duration {
        self.still_held_after
            .unwrap_or_else(|| self.interval.saturating_mul(3).max(MIN_STILL_HELD_AFTER))
    }
}

/// How the daemon finds CLOSE_WAIT sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Discovery {
    /// The kernel's events when the BPF programs load, else polling (the default).
    #[default]
    Auto,
    /// The kernel's events (BPF); the daemon does not start without them.
    Events,
    /// A sock_diag dump every cycle.
    Poll,
}

impl Discovery {
    pub fn as_str(self) -> &'static str {
        match self {
            Discovery::Auto => "auto",
            Discovery::Events => "events",
            Discovery::Poll => "poll",
        }
    }
}

/// What a cycle does when its intent records could not be written (a full or failing disk).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnAuditFailure {
    /// Act on nothing that changes a socket: no action without its record (the default).
    #[default]
    Skip,
    /// Act anyway; the journal has each action.
    Act,
}

impl OnAuditFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnAuditFailure::Skip => "skip",
            OnAuditFailure::Act => "act",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Caps over all targets together, so a bad policy cannot reap a whole host at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_reaps_per_cycle: u32,
    pub max_reaps_per_minute: u32,
    /// Fd-limit raises and signals per minute, apart from the reaps.
    pub max_escalations_per_minute: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metrics {
    /// `None` when the policy says `listen: off`.
    pub listen: Option<SocketAddr>,
}

/// What to do with a selected socket. A new variant (e.g. `Destroy` through SOCK_DESTROY)
/// is meant to break exhaustive matches, so every place that acts is revisited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Report only.
    Log,
    /// Duplicate the socket out of its owner and shut it down (verified).
    Shutdown,
    /// Reset it with netlink SOCK_DESTROY (needs CAP_NET_ADMIN); also reaches connections
    /// never accepted.
    Destroy,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Log => "log",
            Action::Shutdown => "shutdown",
            Action::Destroy => "destroy",
        }
    }
}

/// One `targets:` entry.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    /// Where the entry starts in the file (for warnings about it).
    pub at: Option<Position>,
    /// The `match:` block (at least one criterion) and the `exclude:` block.
    pub selector: Selector,
    /// Minimum age in CLOSE_WAIT before the action applies (> 0).
    pub older_than: Duration,
    /// Act only while the process holds at least this many CLOSE_WAIT sockets (default 1).
    pub min_close_wait: u32,
    pub action: Action,
    /// Per-target override of the global `dry_run`.
    pub dry_run: Option<bool>,
    /// Opt-in escalations for a process that keeps leaking fds (see [`Escalate`]).
    pub escalate: Escalate,
}

/// `escalate:` of a target: what to do about a process of the target that holds at least
/// `min_close_wait` sockets in CLOSE_WAIT (or shut down by cwreap and still held) and whose
/// open fds have reached a share of its soft RLIMIT_NOFILE. Neither touches a socket or
/// an fd of the process, so neither can misdeliver data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Escalate {
    /// Raise the soft RLIMIT_NOFILE to the hard limit at this percentage (once per process;
    /// never when the soft limit is 1024 or less).
    pub raise_fd_limit_at: Option<u8>,
    /// Send `signal` through the pidfd at this percentage (once per process).
    pub signal_at: Option<u8>,
    /// Raise the fd limit once the forecast puts EMFILE at most this far away.
    pub raise_before_emfile: Option<Duration>,
    /// Send `signal` once the forecast puts EMFILE at most this far away.
    pub signal_before_emfile: Option<Duration>,
    /// The signal `signal_at` sends (default SIGTERM): a restart before EMFILE.
    pub signal: Signal,
}

impl Escalate {
    pub fn any(&self) -> bool {
        self.raises() || self.signals()
    }

    /// Whether it may raise the fd limit.
    pub fn raises(&self) -> bool {
        self.raise_fd_limit_at.is_some() || self.raise_before_emfile.is_some()
    }

    /// Whether it may send the signal.
    pub fn signals(&self) -> bool {
        self.signal_at.is_some() || self.signal_before_emfile.is_some()
    }
}

/// A signal `signal_at` may send: one that ends or restarts a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Signal {
    #[default]
    Term,
    Int,
    Hup,
    Quit,
    Usr1,
    Usr2,
    Kill,
}

impl Signal {
    pub const ALL: [Signal; 7] = [
        Signal::Term,
        Signal::Int,
        Signal::Hup,
        Signal::Quit,
        Signal::Usr1,
        Signal::Usr2,
        Signal::Kill,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Signal::Term => "SIGTERM",
            Signal::Int => "SIGINT",
            Signal::Hup => "SIGHUP",
            Signal::Quit => "SIGQUIT",
            Signal::Usr1 => "SIGUSR1",
            Signal::Usr2 => "SIGUSR2",
            Signal::Kill => "SIGKILL",
        }
    }

    pub fn number(self) -> i32 {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Int => libc::SIGINT,
            Signal::Hup => libc::SIGHUP,
            Signal::Quit => libc::SIGQUIT,
            Signal::Usr1 => libc::SIGUSR1,
            Signal::Usr2 => libc::SIGUSR2,
            Signal::Kill => libc::SIGKILL,
        }
    }
}

/// Why the daemon never closes fds inside a target (the `escalate.close_after` that was).
pub const NO_CLOSE_IN_DAEMON: &str = "`escalate.close_after` is gone: closing an fd inside a running application is unsafe in managed runtimes (Python, Go, Java and Node later used the reused number and misdelivered or killed other connections), so the daemon never does it; use `raise_fd_limit_at: 80%` and `signal_at: 95%` (a restart before EMFILE), or `cwreap reap --pid PID --close` by hand on a process you will restart anyway";

/// What each escalation does and risks, for `cwreap check`.
pub const RAISE_FD_LIMIT_TEXT: &str = "raise_fd_limit_at: once per process, raises the soft RLIMIT_NOFILE to the hard limit (prlimit), buying time before EMFILE; the hard limit is never changed (limits that changed since they were read are put back and nothing is raised); never when the soft limit is 1024 or less, where select() with FD_SETSIZE would corrupt memory, so it never fires on a service whose limit was not raised (systemd's default LimitNOFILE is 1024:524288). Risk: the leak goes on; it only delays EMFILE. Needs CAP_SYS_RESOURCE (systemd/drop-ins/escalate.conf).";
pub const SIGNAL_TEXT: &str = "signal_at: once per process, sends the signal through the pidfd held since attribution (never to a reused pid), within `limits.max_escalations_per_minute` (a budget apart from the reaps, spent before any reap of the cycle), so the service manager restarts it before EMFILE. In a dry run it is recorded as what would have happened and the real one stays armed for when the policy enforces. Risk: the process's in-flight requests end with it. Needs CAP_KILL (systemd/drop-ins/escalate.conf).";
/// What `check` says about the forecast triggers: it runs once and sees no rate.
pub const BEFORE_EMFILE_TEXT: &str = "*_before_emfile: fires once the forecast puts EMFILE within that time: the growth of the process's open fds over the last minute (one sample per cycle, the estimator `cwreap explain` uses) carried forward to its soft limit. It needs two cycles to see a rate, so keep the window longer than a few intervals. A percentage trigger fires too late when the leak uses up the headroom above it within one interval (leak rate x interval > (100% - signal_at) x limit); the daemon warns when it sees that.";

impl Target {
    /// The dry-run setting in force for this target given the global one. A `--dry-run` on
    /// the command line should win over both: `cli_dry_run || t.effective_dry_run(global)`.
    pub fn effective_dry_run(&self, global: bool) -> bool {
        self.dry_run.unwrap_or(global)
    }

    /// Whether a socket of a matching process is in scope: the socket criteria of
    /// `match` (local and remote ports and addresses) accept it and no exclusion applies.
    pub fn socket_selected(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        self.selector.socket_matches(local, Some(remote))
    }

    /// Whether this target selects `socket`, held by the process `process` describes: its
    /// process criteria accept the process (with the pids the daemon read from the pid
    /// files) and its socket criteria accept the socket ([`Target::socket_selected`]). The
    /// socket belongs to the first target that does.
    pub fn selects(
        &self,
        process: &ProcessFacts,
        pids_from_files: &[i32],
        socket: &SocketFacts,
    ) -> bool {
        self.selector.selects(process, pids_from_files, socket)
    }
}

impl Config {
    /// The target a socket belongs to: the first, in policy order, of `process_targets`
    /// (the targets whose process criteria accept the holding process, ascending) whose
    /// socket criteria accept `socket`.
    pub fn target_for(&self, process_targets: &[usize], socket: &SocketFacts) -> Option<usize> {
        process_targets.iter().copied().find(|&i| {
            self.targets
                .get(i)
                .is_some_and(|t| t.socket_selected(socket.local, socket.remote))
        })
    }
}
