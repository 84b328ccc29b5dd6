//! The process around the cycles: load and self-test, the runtime, the metrics endpoint,
//! signals (SIGHUP reload, SIGTERM/SIGINT stop), sd_notify (READY, STATUS, WATCHDOG,
//! RELOADING, STOPPING). Cycles run on a blocking thread, so a slow cycle never stalls
//! signal handling or scrapes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::{error, info, warn};

use super::{Daemon, logging, self_test};
use crate::config::{UsageError, load_config};
use crate::report::CycleReport;

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "sd_notify failed");
    }
}

/// `cwreap run`: load, self-test, notify READY, then cycle until SIGTERM/SIGINT.
pub fn run(config_path: &Path, force_dry_run: bool) -> Result<()> {
    cwreap_linux::sys::limit_heap_growth();
    // systemd's default soft limit is 1024, and every metrics client holds an fd for up to
    // its deadline: a local flood of idle connections would otherwise leave cycles without
    // fds for pidfds, /proc and duplicates.
    cwreap_linux::sys::raise_own_fd_limit();
    let cfg = load_config(config_path).map_err(|e| UsageError(e.to_string()))?;
    logging::init(cfg.log_format);
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
    info!(
        config = %config_path.display(),
        dry_run = daemon.cfg.dry_run || daemon.force_dry_run,
        interval_ms = daemon.cfg.interval.as_millis() as u64,
        targets = daemon.cfg.targets.len(),
        target_names = %daemon.cfg.target_names(5),
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
