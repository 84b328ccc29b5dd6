//! `cwreap run`: the policy daemon. The decision itself is pure and lives in
//! [`crate::daemon::policy`]; this folder owns everything around it:
//!
//! - [`cycle`]: one cycle, discover → attribute → age → decide → act → report;
//! - [`release`]: after a shutdown, whether the owner released the fd (and escalation);
//! - [`audit`]: the JSON Lines audit log, its writer thread and the intent records;
//!   [`audit_file`]: where it may live, opening and checking it;
//! - [`service`]: the process around the cycles: signals (SIGHUP reload, SIGTERM/SIGINT
//!   stop), sd_notify (READY, STATUS, WATCHDOG), the watchdog fed on progress, the metrics
//!   endpoint; [`notify`]: sd_notify sends that never block;
//! - [`selftest`]: the start-up self-test; [`logging`]: the log sink (a writer thread owns
//!   stderr).
//!
//! No output blocks a cycle: the audit log, stderr and the notify socket each have their
//! own writer or a non-blocking send, and every wait has a deadline.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow};
use tracing::warn;

use cwreap_linux::netns::Namespaces;
use cwreap_linux::os::{Pinned, RealOs};
use cwreap_linux::procfs::ProcFs;

use crate::daemon::fd_cache::FdIndex;
use crate::daemon::metrics::Health;
use crate::daemon::policy::{Ages, Escalated, Headroom, RateLimiter, SocketKey};
use crate::shared::config::Config;

mod audit;
mod audit_file;
mod cycle;
pub mod cycle_report;
mod escalate;
pub mod fd_cache;
mod logging;
pub mod metrics;
mod notify;
pub mod policy;
mod release;
mod selftest;
mod service;

pub use audit_file::problem as audit_log_problem;
pub use selftest::self_test;
pub use service::run;

use audit::AuditLog;

use release::PendingRelease;

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
    /// Shut down but still held, on targets with `escalate`: they count as leaking until
    /// the owner lets go.
    held: Vec<PendingRelease>,
    /// Escalations done per process: pid → (its start time, what was done).
    escalated: HashMap<i32, (u64, Escalated)>,
    /// The audit log's writer (records are queued only when the policy has one).
    audit: AuditLog,
    /// Bumped at each stage and action of a cycle: the watchdog is fed while it moves.
    progress: Arc<AtomicU64>,
    /// Every socket fd of the target processes, kept between cycles (with their pidfds).
    index: FdIndex<Pinned>,
    self_pid: i32,
    /// This cycle's pidfd copies for the release watch, one per process.
    release_pidfds: HashMap<i32, Arc<OwnedFd>>,
    /// Inodes of last cycle's CLOSE_WAIT sockets that no target fd held.
    unowned: HashSet<u64>,
    /// See `Daemon::on_stage`.
    #[cfg(feature = "testing")]
    hook: Option<StageHook>,
}

/// Fixed points of a cycle, where a test seam can act (see `Daemon::on_stage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(dead_code))]
pub enum Point {
    /// The target processes are listed; their fd tables are not read yet.
    Matched,
    /// About to act on the socket that `pid` holds as `fd`.
    BeforeAct { pid: i32, fd: i32 },
    /// An escalation of `pid` was decided and is about to be done.
    BeforeEscalate { pid: i32 },
}

#[cfg(feature = "testing")]
pub use self::Point as Stage;

#[cfg(feature = "testing")]
type StageHook = Box<dyn FnMut(Point) + Send>;

/// Say which targets can never act (an earlier one selects all their sockets).
fn warn_shadowed(cfg: &Config) {
    for s in cfg.shadowed() {
        let target = cfg.targets.get(s.target).map_or("", |t| t.name.as_str());
        warn!(target, "{}", cfg.shadow_message(s));
    }
}

impl Daemon {
    pub fn new(cfg: Config, force_dry_run: bool) -> Result<Self> {
        Self::with_health(cfg, force_dry_run, Health::default())
    }

    /// A daemon whose output counters are `health` (those of the metrics endpoint).
    pub fn with_health(cfg: Config, force_dry_run: bool, health: Health) -> Result<Self> {
        warn_shadowed(&cfg);
        let audit = AuditLog::start(None, health).context("starting the audit writer")?;
        let d = Self {
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
            escalated: HashMap::new(),
            audit,
            progress: Arc::default(),
            index: FdIndex::default(),
            self_pid: std::process::id() as i32,
            release_pidfds: HashMap::new(),
            unowned: HashSet::new(),
            #[cfg(feature = "testing")]
            hook: None,
        };
        let file = audit::open(d.cfg.audit_log.as_deref()).map_err(|e| anyhow!(e))?;
        d.audit.replace(file);
        Ok(d)
    }

    /// Call `hook` at each point of every cycle. A seam for tests: some faults (a target
    /// exiting or closing an fd between attribution and action) happen for real only in a
    /// window of microseconds; the hook lets a test make the change exactly there.
    #[cfg(feature = "testing")]
    pub fn on_stage(&mut self, hook: impl FnMut(Stage) + Send + 'static) {
        self.hook = Some(Box::new(hook));
    }

    /// Dump `d.netns()` through `d` until a dump fails; the daemon then opens sockets of its
    /// own again. A seam for tests of how a cycle handles a failed dump (see
    /// `cwreap_linux::netlink::Diag::over`).
    #[cfg(feature = "testing")]
    pub fn use_diag(&mut self, d: cwreap_linux::netlink::Diag) {
        self.namespaces.insert(d);
    }

    /// A counter that moves while cycles make progress (for the watchdog).
    pub fn progress_counter(&self) -> Arc<AtomicU64> {
        self.progress.clone()
    }

    fn progress(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    fn stage(&mut self, point: Point) {
        self.progress();
        #[cfg(feature = "testing")]
        if let Some(hook) = self.hook.as_mut() {
            hook(point);
        }
        #[cfg(not(feature = "testing"))]
        let _ = point;
    }

    /// Swap in a new, already validated policy (SIGHUP). The audit log is opened again
    /// whether its path changed or not: after logrotate moved it away, records go to a new
    /// file. If it cannot be opened, nothing changes.
    pub fn reload(&mut self, cfg: Config) -> Result<()> {
        let file = audit::open(cfg.audit_log.as_deref()).map_err(|e| anyhow!(e))?;
        self.audit.replace(file);
        if cfg.metrics.listen != self.cfg.metrics.listen {
            warn!("metrics.listen changes take effect at the next restart");
        }
        if cfg.log_format != self.cfg.log_format {
            warn!("log_format changes take effect at the next restart");
        }
        warn_shadowed(&cfg);
        self.cfg = cfg;
        // Sockets only reported under the old policy (dry run, `log`) are judged again by
        // the new one: switching a dry run to enforcing must reap what the dry run showed.
        // Reaped sockets have left CLOSE_WAIT, so they are not acted on twice.
        self.handled.clear();
        Ok(())
    }
}
