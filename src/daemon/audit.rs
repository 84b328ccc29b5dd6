//! The audit log: one JSON object per line for every action, every intent to act and every
//! release check.
//!
//! One writer thread owns the file. Cycles only enqueue records on a bounded queue, so a
//! slow, full or stuck disk never blocks a cycle; a record that finds the queue full is
//! counted as a write error. The writer takes what is queued, writes it as whole lines
//! (O_APPEND) and runs fdatasync after each batch. A write that fails or falls short (a
//! full disk writes part of a line, then ENOSPC) is undone down to the last complete line
//! (ftruncate), and the lost records are counted (`cwreap_audit_write_errors_total`) and
//! reported at most once a minute: a torn record never stays in the file, and the next
//! never merges with one. Actions go on whatever the disk does; the journal has each.
//!
//! Intent: before a cycle changes any socket, the writer must have put an `"event":
//! "intent"` record of each socket it will act on on the disk (written and fdatasync'ed,
//! in queue order). So a daemon killed mid-cycle leaves a record of every socket it
//! touched. The cycle waits for that at most [`INTENT_DEADLINE`]: when the disk does not
//! answer in time (stuck, not failing), the cycle acts on nothing and tries again next
//! cycle (counted as cycle error `audit`); when the disk answers with an error (ENOSPC,
//! EIO), the intents are lost and counted, and the cycle acts, as it does without any
//! audit log.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tracing::{error, warn};

use cwreap_linux::secure_fs;

use crate::daemon::cycle_report::{CycleReport, ErrorKind};
use crate::daemon::metrics::Health;
use crate::daemon::policy::Decision;
use crate::shared::config::{Action, Config, OnAuditFailure};

/// Records waiting for the writer before new ones are counted as lost.
const QUEUE: usize = 16 * 1024;
/// Bytes written (then fdatasync'ed) at once, at most.
const BATCH: usize = 1024 * 1024;
/// How long a cycle waits for its intent records to be on the disk before it gives up
/// acting this cycle.
pub(super) const INTENT_DEADLINE: Duration = Duration::from_secs(2);
/// How long opening the audit log (start-up, SIGHUP) may take.
const OPEN_DEADLINE: Duration = Duration::from_secs(5);
/// Write errors are logged at most this often (they are all counted).
const REPORT_EVERY: Duration = Duration::from_secs(60);

enum Msg {
    Record(String),
    /// Records answered (true: written and synced) once they are on the disk.
    Durable(Vec<String>, SyncSender<bool>),
    /// Answered once everything before it is written and synced.
    Flush(SyncSender<bool>),
    /// Look at the file slot (a reopen).
    Wake,
}

/// What became of records the cycle waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Durability {
    /// On the disk.
    Written,
    /// The disk said no (ENOSPC, EIO): lost, counted, reported.
    Failed,
    /// No answer in time (or the daemon is stopping).
    Unconfirmed,
}

/// An error reported at most once per [`REPORT_EVERY`], with the count of those in between.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    quiet: u64,
}

impl Throttle {
    fn report(&mut self, what: &str, error: &str, lost: u64) {
        if self.last.is_some_and(|t| t.elapsed() < REPORT_EVERY) {
            self.quiet += 1;
            return;
        }
        error!(
            error,
            records_lost = lost,
            similar_errors_not_logged = self.quiet,
            "{what} (reported at most once a minute; all are counted in cwreap_audit_write_errors_total)"
        );
        self.last = Some(Instant::now());
        self.quiet = 0;
    }
}

/// The cycles' end of the audit log: a queue to the writer thread.
#[derive(Clone)]
pub(super) struct AuditLog {
    tx: SyncSender<Msg>,
    /// A file for the writer to switch to (SIGHUP), or None to stop writing.
    next: Arc<Mutex<Option<Option<File>>>>,
    full: Arc<Mutex<Throttle>>,
    health: Health,
}

impl AuditLog {
    /// Start the writer thread, writing to `file` (if any).
    pub(super) fn start(file: Option<File>, health: Health) -> io::Result<AuditLog> {
        let (tx, rx) = sync_channel(QUEUE);
        let next = Arc::new(Mutex::new(None));
        let writer = Writer {
            file,
            next: next.clone(),
            health: health.clone(),
            errors: Throttle::default(),
        };
        std::thread::Builder::new()
            .name("cwreap-audit".into())
            .spawn(move || writer.run(rx))?;
        Ok(AuditLog {
            tx,
            next,
            full: Arc::default(),
            health,
        })
    }

    /// Queue one record; never blocks. A full queue loses it (counted).
    pub(super) fn record(&self, line: &serde_json::Value) {
        if self.tx.try_send(Msg::Record(format!("{line}\n"))).is_err() {
            self.lost(1);
        }
    }

    fn lost(&self, n: u64) {
        self.health.audit_write_errors.inc_by(n);
        if let Ok(mut t) = self.full.lock() {
            t.report(
                "audit records lost: the writer's queue is full (the disk is slow or stuck)",
                "queue full",
                n,
            );
        }
    }

    /// Queue `lines` and wait until they are on the disk, at most until `deadline`, or
    /// until `stop` is set. The wait bumps `progress` as it goes: it ends by itself, so it
    /// is no reason for the watchdog to kill the daemon.
    pub(super) fn durable(
        &self,
        lines: Vec<String>,
        deadline: Instant,
        stop: &AtomicBool,
        progress: &AtomicU64,
    ) -> Durability {
        let n = lines.len() as u64;
        let (ack, answer) = sync_channel(1);
        if self.tx.try_send(Msg::Durable(lines, ack)).is_err() {
            self.lost(n);
            return Durability::Unconfirmed;
        }
        loop {
            progress.fetch_add(1, Ordering::Relaxed);
            let slice = Instant::now() + Duration::from_millis(20);
            match wait_for(&answer, slice.min(deadline)) {
                Durability::Unconfirmed
                    if !stop.load(Ordering::Relaxed) && Instant::now() < deadline => {}
                d => return d,
            }
        }
    }

    /// Wait up to `wait` for everything queued so far to be on the disk (at exit).
    pub(super) fn flush(&self, wait: Duration) -> Durability {
        let (ack, answer) = sync_channel(1);
        if self.tx.try_send(Msg::Flush(ack)).is_err() {
            return Durability::Unconfirmed;
        }
        wait_for(&answer, Instant::now() + wait)
    }

    /// Write to `file` from now on (None: stop writing); the old file is closed.
    pub(super) fn replace(&self, file: Option<File>) {
        if let Ok(mut next) = self.next.lock() {
            *next = Some(file);
        }
        // A full queue wakes the writer anyway.
        let _ = self.tx.try_send(Msg::Wake);
    }
}

fn wait_for(answer: &Receiver<bool>, until: Instant) -> Durability {
    match answer.recv_timeout(until.saturating_duration_since(Instant::now())) {
        Ok(true) => Durability::Written,
        Ok(false) => Durability::Failed,
        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => Durability::Unconfirmed,
    }
}

/// The writer thread's state.
struct Writer {
    file: Option<File>,
    next: Arc<Mutex<Option<Option<File>>>>,
    health: Health,
    errors: Throttle,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut buf = Vec::with_capacity(64 * 1024);
        while let Ok(first) = rx.recv() {
            buf.clear();
            let mut records = 0u64;
            let mut acks = Vec::new();
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Record(line) => {
                        buf.extend_from_slice(line.as_bytes());
                        records += 1;
                    }
                    Msg::Durable(lines, ack) => {
                        for line in lines {
                            buf.extend_from_slice(line.as_bytes());
                            records += 1;
                        }
                        acks.push(ack);
                    }
                    Msg::Flush(ack) => acks.push(ack),
                    Msg::Wake => {}
                }
                if buf.len() < BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if let Some(file) = self.next.lock().ok().and_then(|mut n| n.take()) {
                self.file = file;
                self.repair();
            }
            let ok = self.write(&buf, records);
            for ack in acks {
                let _ = ack.try_send(ok);
            }
        }
    }

    /// A file just taken may end in a torn line (a crash, an earlier full disk): cut it
    /// before the first record, so that record starts a line of its own.
    fn repair(&mut self) {
        let Some(file) = self.file.as_ref() else {
            return;
        };
        match secure_fs::cut_torn_tail(file) {
            Ok(0) => {}
            Ok(bytes) => {
                self.health.audit_torn_lines.inc();
                warn!(
                    bytes,
                    "the audit log ended in a partial line (an earlier crash or full disk); cut it off"
                );
            }
            Err(e) => {
                error!(error = %e, "cannot check the end of the audit log for a partial line");
            }
        }
    }

    /// Append `buf` (`records` whole lines) and fdatasync. On a failed or short write,
    /// cut the file back to its last complete line and count what did not land.
    fn write(&mut self, buf: &[u8], records: u64) -> bool {
        let Some(file) = self.file.as_mut() else {
            return true;
        };
        if buf.is_empty() {
            return true;
        }
        let mut written = 0;
        let failure = loop {
            if written == buf.len() {
                break None;
            }
            match file.write(&buf[written..]) {
                Ok(0) => break Some(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e),
            }
        };
        if let Some(e) = failure {
            let landed = buf[..written].iter().filter(|&&b| b == b'\n').count() as u64;
            let lost = records.saturating_sub(landed);
            self.health.audit_write_errors.inc_by(lost);
            // Counted every time, reported with the write error (at most once a minute).
            let error = match secure_fs::cut_torn_tail(file) {
                Ok(0) => e.to_string(),
                Ok(bytes) => {
                    self.health.audit_torn_lines.inc();
                    format!("{e}; a partial record of {bytes} bytes was cut off")
                }
                Err(cut) => format!("{e}; cutting the partial record off failed too: {cut}"),
            };
            let _ = secure_fs::sync_data(file);
            self.errors
                .report("cannot write the audit log", &error, lost);
            return false;
        }
        if let Err(e) = secure_fs::sync_data(file) {
            self.health.audit_write_errors.inc_by(records);
            self.errors.report(
                "cannot sync the audit log (fdatasync)",
                &e.to_string(),
                records,
            );
            return false;
        }
        true
    }
}

pub(super) fn unix_ts() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Open the audit log of the policy (SIGHUP reopens it; None when there is none). What
/// had to be done about an entry another user planted at its path (moved aside, or records
/// written beside it) is logged as a warning: it never stops a reload.
pub(super) fn open(path: Option<&std::path::Path>) -> Result<Option<File>, String> {
    let Some(path) = path else { return Ok(None) };
    // On its own thread, with a deadline: opening (O_CREAT) writes to the file system,
    // and a stuck one (frozen, a dead NFS server) would hold a reload, and so every
    // cycle, for as long as it stays stuck.
    let (tx, rx) = sync_channel(1);
    let owned = path.to_path_buf();
    std::thread::Builder::new()
        .name("cwreap-audit-open".into())
        .spawn(move || {
            let _ = tx.send(crate::shared::audit_file::open(&owned));
        })
        .map_err(|e| format!("audit_log {}: cannot start a thread: {e}", path.display()))?;
    let opened = match rx.recv_timeout(OPEN_DEADLINE) {
        Ok(opened) => opened?,
        Err(_) => {
            return Err(format!(
                "audit_log {}: opening it took more than {} s (is its file system stuck?); fix: check the disk, then reload",
                path.display(),
                OPEN_DEADLINE.as_secs()
            ));
        }
    };
    for warning in &opened.warnings {
        warn!("{warning}");
    }
    Ok(Some(opened.file))
}

/// Whether a decision changes a socket (and so needs its intent on the disk first).
fn changes_a_socket(d: &Decision) -> bool {
    d.action != Action::Log && !d.dry_run
}

/// The audit log as cycles use it: records reach the writer only while the policy names
/// a log.
#[derive(Clone)]
pub struct Auditor {
    log: AuditLog,
    enabled: bool,
    /// Actions are being skipped for want of a record (said once, until records land).
    skipping: Arc<AtomicBool>,
}

impl Auditor {
    /// Start the writer, with no file yet.
    pub(super) fn start(health: Health) -> io::Result<Auditor> {
        Ok(Auditor {
            log: AuditLog::start(None, health)?,
            enabled: false,
            skipping: Arc::default(),
        })
    }

    /// Write to the policy's `audit_log` from now on (opened again even if the path did not
    /// change: after logrotate moved it away, records go to a new file). Nothing changes
    /// when it cannot be opened.
    pub(super) fn open(&mut self, path: Option<&std::path::Path>) -> Result<(), String> {
        let file = open(path)?;
        self.enabled = file.is_some();
        self.log.replace(file);
        Ok(())
    }

    /// The writer's end, for the last flush at exit.
    pub(super) fn log(&self) -> &AuditLog {
        &self.log
    }

    /// Queue one record, if the policy has an audit log.
    pub(super) fn record(&self, line: serde_json::Value) {
        if self.enabled {
            self.log.record(&line);
        }
    }

    /// Before acting: an intent record for every decision that changes a socket, on the
    /// disk before the first action (see the module documentation). False when nothing
    /// may act this cycle.
    pub(super) fn announce(
        &self,
        cfg: &Config,
        decisions: &[Decision],
        stop: &AtomicBool,
        progress: &AtomicU64,
        report: &mut CycleReport,
    ) -> bool {
        if !self.enabled {
            return true;
        }
        let lines: Vec<String> = decisions
            .iter()
            .filter(|d| changes_a_socket(d))
            .map(|d| {
                format!(
                    "{}\n",
                    serde_json::Value::Object(decision_record(cfg, "intent", d))
                )
            })
            .collect();
        if lines.is_empty() {
            return true;
        }
        let n = lines.len();
        let got = self
            .log
            .durable(lines, Instant::now() + INTENT_DEADLINE, stop, progress);
        progress.fetch_add(1, Ordering::Relaxed);
        match got {
            Durability::Written => {
                self.skipping.store(false, Ordering::Relaxed);
                true
            }
            Durability::Failed if cfg.on_audit_failure == OnAuditFailure::Act => true,
            Durability::Failed => {
                report.skipped_unrecorded += n;
                if !self.skipping.swap(true, Ordering::Relaxed) {
                    error!(
                        actions = n,
                        "the audit log could not record what this cycle would do (a full or failing disk); acting on nothing that changes a socket until it can (on_audit_failure: skip)"
                    );
                }
                false
            }
            Durability::Unconfirmed => {
                if !stop.load(Ordering::Relaxed) {
                    report.error(ErrorKind::Audit);
                    report.deferred += n;
                    warn!(
                        actions = n,
                        deadline_ms = INTENT_DEADLINE.as_millis() as u64,
                        "the audit log did not confirm the intent records in time (slow or stuck disk); acting on nothing this cycle"
                    );
                }
                false
            }
        }
    }
}

/// The name of target `i` (empty if a reload removed it).
pub(super) fn target_name(cfg: &Config, i: usize) -> String {
    cfg.targets
        .get(i)
        .map_or_else(String::new, |t| t.name.clone())
}

/// What an audit record of decision `d` starts with, for an intent and for the action's
/// outcome alike: which socket, of which target, and the action.
pub(super) fn decision_record(
    cfg: &Config,
    event: &str,
    d: &Decision,
) -> serde_json::Map<String, serde_json::Value> {
    let c = &d.candidate;
    let mut line = serde_json::Map::new();
    for (key, value) in [
        ("ts", json!(unix_ts())),
        ("event", json!(event)),
        ("target", json!(target_name(cfg, c.target))),
        ("pid", json!(c.pid)),
        ("fd", json!(if c.unaccepted { None } else { Some(c.fd) })),
        ("unaccepted", json!(c.unaccepted)),
        ("netns", json!(c.netns)),
        ("comm", json!(c.comm)),
        ("inode", json!(c.inode)),
        ("local", json!(c.local.to_string())),
        ("remote", json!(c.remote.to_string())),
        ("age_ms", json!(c.age.min_ms)),
        ("age_max_ms", json!(c.age.max_ms)),
        ("age_source", json!(c.age.source.as_str())),
        ("action", json!(d.action.as_str())),
    ] {
        line.insert(key.to_owned(), value);
    }
    line
}
