//! The process around the cycles: load and self-test, the runtime, the metrics endpoint,
//! signals (SIGHUP reload, SIGTERM/SIGINT stop), sd_notify (READY, STATUS, WATCHDOG,
//! RELOADING, STOPPING). Cycles and reloads run on a blocking thread, so slow work never
//! stalls signal handling or scrapes, and nothing here waits without a deadline: the
//! daemon stops within a second of SIGTERM whatever a cycle, the disk or stderr's reader
//! is doing. The watchdog is fed between cycles, and during a cycle as long as it makes
//! progress (a stage or an action since the last ping).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use sd_notify::NotifyState;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{error, info, warn};

use cwreap_linux::kernel::Linux;

use super::audit::AuditLog;
use super::engine::Daemon;
use super::notify::Notifier;
use super::pid_file::PidFile;
use super::wake::Ring;
use super::where_keep::WhereKeep;
use super::{logging, self_test};
use crate::daemon::cycle_report::CycleReport;
use crate::daemon::metrics::Metrics;
use crate::shared::config::load_config;
use crate::shared::usage::UsageError;

/// After SIGTERM: how long the cycle in progress gets to finish its current action.
const STOP_CYCLE: Duration = Duration::from_millis(400);
/// Then how long the audit writer and the log writer each get to write what is queued.
const STOP_FLUSH: Duration = Duration::from_millis(200);

/// `cwreap run`: load, self-test, notify READY, then cycle until SIGTERM/SIGINT.
/// With `pid_file`, the daemon's pid is written there once SIGHUP is handled (a `kill
/// -HUP` never finds it unprepared) and removed at a clean exit.
pub fn run(config_path: &Path, force_dry_run: bool, pid_file: Option<&Path>) -> Result<()> {
    cwreap_linux::sys::limit_heap_growth();
    // systemd's default soft limit is 1024, and every metrics client holds an fd for up to
    // its deadline: a local flood of idle connections would otherwise leave cycles without
    // fds for pidfds, /proc and duplicates.
    cwreap_linux::sys::raise_own_fd_limit();
    let cfg = load_config(config_path).map_err(|e| UsageError(e.to_string()))?;
    let metrics = Metrics::new();
    let health = metrics.health();
    logging::init(cfg.log_format, health.log_lines_dropped.clone());
    self_test()?;
    let kernel = crate::daemon::discovery::kernel(&cfg)?;
    metrics.set_discovery_mode(cwreap_linux::kernel::Discover::mode(&kernel));
    let mut daemon = Daemon::with_kernel(kernel, cfg, force_dry_run, health.clone())
        .map_err(|e| UsageError(format!("{}: {e:#}", config_path.display())))?;
    daemon.publish_to(cwreap_linux::published::run_dir());
    let mut stacks = keep_stacks(&daemon);
    let audit = daemon.auditor().log().clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(async {
        if let Some(addr) = daemon.cfg().metrics.listen {
            let listener = crate::daemon::endpoint::bind(addr).await.map_err(|e| {
                UsageError(format!(
                    "metrics.listen {addr}: cannot listen ({e}); pick a free address or set `metrics: {{listen: off}}`"
                ))
            })?;
            info!(listen = %addr, "metrics endpoint: GET /metrics");
            tokio::spawn(crate::daemon::endpoint::serve(listener, metrics.clone()));
        }
        let notifier = Notifier::from_env(health.notify_dropped.clone());
        let path = config_path.to_path_buf();
        main_loop(daemon, path, metrics, notifier, pid_file, stacks.as_ref()).await
    });
    if let Some(k) = stacks.as_mut() {
        k.stop();
    }
    // After SIGTERM a cycle may still be running on the blocking pool (the stop flag is
    // only checked between actions, and `shutdown` already gave it its time): dropping the
    // runtime would join that thread, however long the cycle takes.
    rt.shutdown_background();
    let result = result.map(|written: Option<PidFile>| {
        if let Some(f) = written {
            f.remove();
        }
    });
    finish(&audit);
    result
}

/// Last words, each with a deadline: what is queued reaches the audit log and stderr if
/// they take it in time. The process then exits even if a writer is blocked.
fn finish(audit: &AuditLog) {
    let _ = audit.flush(STOP_FLUSH);
    logging::flush(STOP_FLUSH);
}

/// The signals and the service manager, around the daemon's blocking work.
struct Service {
    notifier: Notifier,
    watchdog: Option<Duration>,
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Service {
    fn notify(&self, states: &[NotifyState<'_>]) {
        self.notifier.send(states);
    }

    /// Run `work` on the daemon on a blocking thread, answering SIGTERM/SIGINT and feeding
    /// the watchdog while it makes progress. None when a stop signal ended it.
    async fn blocking<T: Send + 'static>(
        &mut self,
        mut daemon: Daemon<Linux>,
        work: impl FnOnce(&mut Daemon<Linux>, &AtomicBool) -> T + Send + 'static,
    ) -> Result<Option<(Daemon<Linux>, T)>> {
        let flag = self.stop.clone();
        let mut job = tokio::task::spawn_blocking(move || {
            let out = work(&mut daemon, &flag);
            (daemon, out)
        });
        let tick = self.watchdog.map(|w| w / 2);
        let mut pinged = self.progress.load(Ordering::Relaxed);
        loop {
            tokio::select! {
                r = &mut job => return Ok(Some(r.context("the daemon's thread panicked")?)),
                _ = tokio::time::sleep(tick.unwrap_or(Duration::MAX)), if tick.is_some() => {
                    let now = self.progress.load(Ordering::Relaxed);
                    if now != pinged {
                        pinged = now;
                        self.notify(&[NotifyState::Watchdog]);
                    }
                }
                _ = self.term.recv() => {
                    self.shutdown(job, "SIGTERM").await;
                    return Ok(None);
                }
                _ = self.int.recv() => {
                    self.shutdown(job, "SIGINT").await;
                    return Ok(None);
                }
            }
        }
    }

    /// During a cycle: ask it to stop after the current action, and give it a moment.
    async fn shutdown<T>(&self, job: tokio::task::JoinHandle<T>, signal: &str) {
        info!(signal, "stopping after the current action");
        self.notify(&[NotifyState::Stopping]);
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(STOP_CYCLE, job).await;
    }

    /// Between cycles: say so and leave.
    fn stopping(&self, signal: &str) {
        info!(signal, "stopping");
        self.notify(&[NotifyState::Stopping]);
    }
}

/// `where: on`: the stacks of `explain --where` kept while the daemon runs, or why not
/// (said once; the daemon runs on without them).
fn keep_stacks(daemon: &Daemon<Linux>) -> Option<WhereKeep> {
    if !daemon.cfg().where_stacks {
        return None;
    }
    let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let start = cwreap_linux::kernel::ProcRead::start_time(daemon.kernel(), pid).unwrap_or(0);
    let dir = cwreap_linux::published::run_dir();
    match WhereKeep::start(dir.clone(), pid, start) {
        Ok(k) => {
            info!(dir = %dir.display(), "where: the stacks of EOF reads, accepts and connects of the targets are recorded for explain --where");
            Some(k)
        }
        Err(e) => {
            warn!(reason = %e, "where: on, but the programs of explain --where cannot be loaded; it records only while it runs");
            None
        }
    }
}

async fn main_loop(
    daemon: Daemon<Linux>,
    config_path: PathBuf,
    metrics: Metrics,
    notifier: Notifier,
    pid_file: Option<&Path>,
    stacks: Option<&WhereKeep>,
) -> Result<Option<PidFile>> {
    let mut svc = Service {
        notifier,
        watchdog: sd_notify::watchdog_enabled(),
        progress: daemon.progress_counter(),
        stop: Arc::new(AtomicBool::new(false)),
        hup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
        int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
    };
    let written = match pid_file {
        Some(path) => Some(PidFile::write(path).map_err(UsageError)?),
        None => None,
    };
    info!(
        config = %config_path.display(),
        dry_run = daemon.dry_run(),
        interval_ms = daemon.cfg().interval.as_millis() as u64,
        discovery = daemon.discovery_mode(),
        targets = daemon.cfg().targets.len(),
        target_names = %daemon.cfg().target_names(5),
        pid_file = %written.as_ref().map_or(String::new(), |f| f.path().display().to_string()),
        "cwreap started"
    );
    svc.notify(&[NotifyState::Ready]);

    let mut daemon = daemon;
    let mut ring = Ring::of(daemon.kernel());
    loop {
        let Some((d, report)) = svc
            .blocking(daemon, |d: &mut Daemon<Linux>, stop: &AtomicBool| {
                d.cycle(stop)
            })
            .await?
        else {
            return Ok(written);
        };
        daemon = d;
        cycle_done(&svc, &metrics, &report);
        if let Some(k) = stacks {
            k.follow(daemon.target_pids());
        }
        ring.rearm();

        // Sleep until the next cycle, feeding the watchdog and answering signals.
        // The interval is at most a day (config), and the clock is checked anyway: an
        // instant past its range would panic the daemon.
        let now = tokio::time::Instant::now();
        let wake = now
            .checked_add(daemon.cfg().interval)
            .unwrap_or(now + crate::shared::values::MAX_INTERVAL);
        // The pings keep their own clock: events read between cycles end this wait's
        // rounds as often as they come, and must not push the next ping back.
        let tick = svc.watchdog.map_or(daemon.cfg().interval, |w| w / 2);
        let mut ping = now + tick;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => break,
                _ = ring.queued() => {
                    let started = tokio::time::Instant::now();
                    let Some((d, seen)) = svc
                        .blocking(daemon, |d: &mut Daemon<Linux>, _: &AtomicBool| d.detect())
                        .await?
                    else {
                        return Ok(written);
                    };
                    daemon = d;
                    ring.looked(started, started.elapsed());
                    metrics.observe_detection(&seen.latencies);
                }
                _ = tokio::time::sleep_until(ping), if svc.watchdog.is_some() => {
                    svc.notify(&[NotifyState::Watchdog]);
                    ping = tokio::time::Instant::now() + tick;
                }
                _ = svc.hup.recv() => {
                    let Some(d) = reload(&mut svc, daemon, &config_path).await? else {
                        return Ok(written);
                    };
                    daemon = d;
                    break;
                }
                _ = svc.term.recv() => { svc.stopping("SIGTERM"); daemon.withdraw(); return Ok(written); }
                _ = svc.int.recv() => { svc.stopping("SIGINT"); daemon.withdraw(); return Ok(written); }
            }
        }
    }
}

fn cycle_done(svc: &Service, metrics: &Metrics, report: &CycleReport) {
    metrics.observe(report);
    let status = report.status_line();
    svc.notify(&[NotifyState::Status(&status)]);
    if svc.watchdog.is_some() {
        svc.notify(&[NotifyState::Watchdog]);
    }
}

/// SIGHUP: read the policy again and reopen the audit log, on the blocking thread (a FIFO
/// or a stuck disk cannot stall signal handling). A bad policy keeps the old one.
async fn reload(
    svc: &mut Service,
    daemon: Daemon<Linux>,
    config_path: &Path,
) -> Result<Option<Daemon<Linux>>> {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => svc.notify(&[NotifyState::Reloading, now]),
        Err(e) => warn!(error = %e, "cannot read the monotonic clock for RELOADING=1"),
    }
    let path = config_path.to_path_buf();
    let Some((daemon, ())) = svc
        .blocking(daemon, move |d: &mut Daemon<Linux>, _: &AtomicBool| {
            match load_config(&path) {
                Ok(cfg) => match d.reload(cfg) {
                    Ok(()) => info!(config = %path.display(), dry_run = d.dry_run(),
                        targets = d.cfg().targets.len(), target_names = %d.cfg().target_names(5),
                        "config reloaded"),
                    Err(e) => error!(error = %format!("{e:#}"), "config reload failed; keeping the previous config"),
                },
                Err(e) => error!(error = %e, "config reload rejected; keeping the previous config"),
            }
        })
        .await?
    else {
        return Ok(None);
    };
    svc.notify(&[NotifyState::Ready]);
    Ok(Some(daemon))
}
