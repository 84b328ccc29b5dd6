//! Prometheus metrics for `cwreap run`: the registry, how a cycle's report updates it, and
//! a minimal read-only HTTP endpoint (`GET /metrics`, anything else 404/405).
//!
//! The endpoint runs on the daemon's runtime while cycles run on a blocking thread, and
//! every connection has a deadline, so a slow or broken client never stalls a cycle. At
//! most [`MAX_CLIENTS`] are served at once. When all are taken, a new connection pushes
//! out the oldest one that has not sent a complete request yet, so idle clients can
//! neither keep a scraper out nor cost fds and memory beyond the cap; a connection is
//! closed at once only when every slot is busy answering.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tracing::{debug, info, warn};

use crate::daemon::cycle_report::CycleReport;

type GaugeF = Gauge<f64, AtomicU64>;

/// The label of every per-target series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    target: String,
    action: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReleaseLabels {
    target: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EscalationLabels {
    target: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
}

struct Inner {
    registry: Registry,
    close_wait: Family<TargetLabels, Gauge>,
    oldest: Family<TargetLabels, GaugeF>,
    reaped: Family<ActionLabels, Counter>,
    released: Family<ReleaseLabels, Counter>,
    escalations: Family<EscalationLabels, Counter>,
    open_fds: Family<TargetLabels, Gauge>,
    fd_limit: Family<TargetLabels, Gauge>,
    new_close_wait: Family<TargetLabels, Counter>,
    fd_usage: Family<TargetLabels, GaugeF>,
    dead_held: Family<TargetLabels, Gauge>,
    cycle_duration: Histogram,
    cycle_errors: Family<ErrorLabels, Counter>,
    last_cycle: GaugeF,
    refused: Counter,
    skipped_unrecorded: Counter,
    evicted: Counter,
}

/// Shared handle: the daemon updates it, the endpoint encodes it.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
    /// The endpoint closed a connection unserved since the last [`Metrics::flood_over`].
    flooded: Arc<AtomicBool>,
    health: Health,
}

/// Counters of the daemon's own outputs, bumped where the trouble happens (the audit
/// writer, the log sink, the sd_notify sender), even in the middle of a cycle. Clones
/// share the counts.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// Audit records that did not reach the file: a failed write or fdatasync (ENOSPC,
    /// EIO), or a full queue.
    pub audit_write_errors: Counter,
    /// Partial lines cut off the end of the audit log (after a crash or a short write).
    pub audit_torn_lines: Counter,
    /// Log lines dropped because the log writer was behind (a stalled reader of stderr).
    pub log_lines_dropped: Counter,
    /// sd_notify messages that could not be sent at once (a full or missing socket).
    pub notify_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let close_wait = Family::default();
        registry.register(
            "cwreap_close_wait_sockets",
            "CLOSE_WAIT sockets held now by the target's processes",
            close_wait.clone(),
        );
        let oldest = Family::default();
        registry.register(
            "cwreap_close_wait_oldest_seconds",
            "Age (lower bound) of the target's oldest CLOSE_WAIT socket",
            oldest.clone(),
        );
        let reaped = Family::default();
        registry.register(
            "cwreap_reaped",
            "Actions taken on CLOSE_WAIT sockets, by action and outcome",
            reaped.clone(),
        );
        let released = Family::default();
        registry.register(
            "cwreap_fd_released",
            "Whether owners closed the fds of sockets cwreap shut down (released / still_held)",
            released.clone(),
        );
        let escalations = Family::default();
        registry.register(
            "cwreap_escalations",
            "Escalations done on leaking processes near their fd limit, by kind (raise_fd_limit, signal)",
            escalations.clone(),
        );
        let open_fds = Family::default();
        registry.register(
            "cwreap_process_open_fds",
            "Open fds of the target's processes (summed)",
            open_fds.clone(),
        );
        let fd_limit = Family::default();
        registry.register(
            "cwreap_process_fd_limit",
            "Soft RLIMIT_NOFILE of the target's processes (summed)",
            fd_limit.clone(),
        );
        let new_close_wait = Family::default();
        registry.register(
            "cwreap_close_wait_new",
            "CLOSE_WAIT sockets that appeared in the target's processes (arrivals, told apart by socket cookie)",
            new_close_wait.clone(),
        );
        let fd_usage = Family::default();
        registry.register(
            "cwreap_process_fd_usage_ratio",
            "Open fds / soft RLIMIT_NOFILE of the target's process nearest its limit (0 when none is known)",
            fd_usage.clone(),
        );
        let dead_held = Family::default();
        registry.register(
            "cwreap_dead_sockets_held",
            "Dead held sockets of the target: connections that ended (state CLOSE, in no sock_diag dump) whose fd a process still holds; only close() or a restart frees them",
            dead_held.clone(),
        );
        let cycle_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "cwreap_cycle_duration_seconds",
            "Wall time of one daemon cycle",
            cycle_duration.clone(),
        );
        let cycle_errors = Family::default();
        registry.register(
            "cwreap_cycle_errors",
            "Errors during cycles, by kind",
            cycle_errors.clone(),
        );
        let last_cycle = GaugeF::default();
        registry.register(
            "cwreap_last_cycle_timestamp_seconds",
            "Unix time at which the last cycle finished",
            last_cycle.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        registry.register(
            "cwreap_build_info",
            "cwreap build information",
            build.clone(),
        );
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        let skipped_unrecorded = Counter::default();
        registry.register(
            "cwreap_actions_skipped_unrecorded",
            "Actions not done because their intent records could not be written to the audit log (a full or failing disk; on_audit_failure: skip)",
            skipped_unrecorded.clone(),
        );
        let refused = Counter::default();
        registry.register(
            "cwreap_metrics_refused_connections",
            "Connections to the metrics endpoint closed unserved because all its client slots were taken: new ones while every slot was answering, and idle ones evicted to make room (also in cwreap_metrics_connections_evicted)",
            refused.clone(),
        );
        let evicted = Counter::default();
        registry.register(
            "cwreap_metrics_connections_evicted",
            "Connections to the metrics endpoint closed before they sent a complete request, the oldest first, to make room for a new one when all its client slots were taken",
            evicted.clone(),
        );
        let health = Health::default();
        registry.register(
            "cwreap_audit_write_errors",
            "Audit records that did not reach the audit log (write or fdatasync failed, or the writer's queue was full)",
            health.audit_write_errors.clone(),
        );
        registry.register(
            "cwreap_audit_torn_lines",
            "Partial lines cut off the end of the audit log (left by a crash or a short write)",
            health.audit_torn_lines.clone(),
        );
        registry.register(
            "cwreap_log_lines_dropped",
            "Log lines dropped because stderr's reader was not keeping up",
            health.log_lines_dropped.clone(),
        );
        registry.register(
            "cwreap_notify_dropped",
            "sd_notify messages dropped because the notify socket could not take them at once",
            health.notify_dropped.clone(),
        );
        Self {
            flooded: Arc::new(AtomicBool::new(false)),
            health,
            inner: Arc::new(Mutex::new(Inner {
                registry,
                close_wait,
                oldest,
                reaped,
                released,
                escalations,
                open_fds,
                fd_limit,
                new_close_wait,
                fd_usage,
                dead_held,
                cycle_duration,
                cycle_errors,
                last_cycle,
                refused,
                skipped_unrecorded,
                evicted,
            })),
        }
    }

    /// One connection closed unserved (the endpoint was full).
    pub fn count_refused(&self) {
        self.flooded.store(true, Ordering::Relaxed);
        if let Ok(m) = self.inner.lock() {
            m.refused.inc();
        }
    }

    /// One idle connection closed to make room for a new one (a refusal too: it goes
    /// unserved).
    pub fn count_evicted(&self) {
        self.count_refused();
        if let Ok(m) = self.inner.lock() {
            m.evicted.inc();
        }
    }

    /// Whether connections were refused or evicted since the last call (and forget it).
    pub fn flood_over(&self) -> bool {
        self.flooded.swap(false, Ordering::Relaxed)
    }

    /// The output counters, for the parts of the daemon that bump them.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Fold one cycle's report in.
    pub fn observe(&self, report: &CycleReport) {
        let Ok(m) = self.inner.lock() else { return };
        // Gauges describe now: targets removed by a reload disappear.
        m.close_wait.clear();
        m.oldest.clear();
        m.open_fds.clear();
        m.fd_limit.clear();
        m.fd_usage.clear();
        m.dead_held.clear();
        for (name, g) in &report.targets {
            let l = TargetLabels {
                target: name.clone(),
            };
            m.close_wait.get_or_create(&l).set(g.close_wait as i64);
            m.oldest.get_or_create(&l).set(g.oldest_ms as f64 / 1000.0);
            m.open_fds.get_or_create(&l).set(g.open_fds as i64);
            m.fd_limit.get_or_create(&l).set(g.fd_limit as i64);
            m.fd_usage.get_or_create(&l).set(g.fd_usage_ratio());
            m.dead_held
                .get_or_create(&l)
                .set(i64::try_from(g.dead_held).unwrap_or(i64::MAX));
            m.new_close_wait
                .get_or_create(&l)
                .inc_by(g.new_close_wait as u64);
        }
        for ((target, action, outcome), n) in &report.outcomes {
            m.reaped
                .get_or_create(&ActionLabels {
                    target: target.clone(),
                    action: action.as_str(),
                    outcome: outcome.as_str(),
                })
                .inc_by(*n as u64);
        }
        m.skipped_unrecorded
            .inc_by(u64::try_from(report.skipped_unrecorded).unwrap_or(u64::MAX));
        for ((target, result), n) in &report.releases {
            m.released
                .get_or_create(&ReleaseLabels {
                    target: target.clone(),
                    result: result.as_str(),
                })
                .inc_by(*n as u64);
        }
        for ((target, kind), n) in &report.escalations {
            m.escalations
                .get_or_create(&EscalationLabels {
                    target: target.clone(),
                    kind: kind.as_str(),
                })
                .inc_by(*n as u64);
        }
        for (kind, n) in &report.errors {
            m.cycle_errors
                .get_or_create(&ErrorLabels {
                    kind: kind.as_str(),
                })
                .inc_by(*n as u64);
        }
        m.cycle_duration.observe(report.duration.as_secs_f64());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        m.last_cycle.set(now);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(m) = self.inner.lock()
            && encode(&mut out, &m.registry).is_err()
        {
            out.clear();
        }
        out
    }
}

/// How long a client may take to send its request and read the answer.
const CLIENT_DEADLINE: Duration = Duration::from_secs(5);
const MAX_REQUEST: usize = 8 * 1024;
/// Most clients served at once. Prometheus needs one; the rest is headroom for people.
pub const MAX_CLIENTS: usize = 64;

/// Bind the endpoint (so a bad address fails at start-up, not later).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// How long the accept loop waits for an evicted connection's task to close it and free
/// its slot (that task only has to be scheduled once; this bounds the wait regardless).
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// Serve until the runtime stops. Each client gets its own task and a deadline; at most
/// [`MAX_CLIENTS`] at once. When all slots are taken, the oldest connection that has not
/// sent a complete request is closed to make room for the new one, so idle connections,
/// however many and however fast they come back, cannot keep a scraper out; and a
/// connection that sent its request is never closed unanswered that way. When every slot
/// is answering, a new connection is closed as soon as it is accepted (leaving it in the
/// listen queue would let the queue, and then the clients' retries, pile up instead).
/// After a flood, freed heap is handed back to the system.
pub async fn serve(listener: TcpListener, metrics: Metrics) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let waiting = Waiting::default();
    // Connections closed unserved, and those of them evicted, since the endpoint was
    // last full (for the log).
    let (mut shed, mut evicted) = (0u64, 0u64);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if shed == 0 {
                    warn!(
                        max_clients = MAX_CLIENTS,
                        "metrics endpoint: too many clients at once; closing the oldest connections that have sent no request yet (new ones while every slot is answering)"
                    );
                }
                shed += 1;
                let Some(slot) = make_room(&slots, &waiting, &metrics).await else {
                    drop(stream);
                    metrics.count_refused();
                    continue;
                };
                evicted += 1;
                slot
            }
        };
        // The flood is over once a connection leaves room for another.
        if shed > 0 && slots.available_permits() > 0 {
            info!(
                refused = shed,
                evicted, "metrics endpoint: serving again after a flood of connections"
            );
            (shed, evicted) = (0, 0);
        }
        let (id, evict) = waiting.join();
        let metrics = metrics.clone();
        let slots_left = slots.clone();
        let waiting = waiting.clone();
        tokio::spawn(async move {
            if tokio::time::timeout(
                CLIENT_DEADLINE,
                handle(stream, &metrics, &waiting, id, evict),
            )
            .await
            .is_err()
            {
                debug!(%peer, "metrics client timed out");
            }
            waiting.take(id);
            drop(slot);
            // The last client of a flood leaves: what the clients' tasks and buffers used
            // is free again, and glibc keeps freed heap unless asked.
            if slots_left.available_permits() == MAX_CLIENTS && metrics.flood_over() {
                cwreap_linux::sys::release_free_heap();
            }
        });
    }
}

/// Every slot is taken: evict the oldest connection still without a complete request and
/// take its slot once its task has closed it. None when every slot is answering a request
/// (or, against all odds, the slot did not come free within [`EVICTION_WAIT`]).
async fn make_room(
    slots: &Arc<Semaphore>,
    waiting: &Waiting,
    metrics: &Metrics,
) -> Option<OwnedSemaphorePermit> {
    if !waiting.evict_oldest() {
        return None;
    }
    metrics.count_evicted();
    let slot = tokio::time::timeout(EVICTION_WAIT, slots.clone().acquire_owned()).await;
    slot.ok()?.ok()
}

/// The connections that have not sent a complete request yet, oldest first (ids grow
/// with each accept): the ones a newcomer may evict when every slot is taken. Evicting
/// one drops its sender, which tells its task to close it; a connection whose request is
/// complete takes itself out ([`Waiting::take`]) and is never evicted after that.
#[derive(Clone, Default)]
struct Waiting(Arc<Mutex<Queue>>);

#[derive(Default)]
struct Queue {
    next: u64,
    conns: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Waiting {
    /// A new connection: its id, and what resolves when it is evicted.
    fn join(&self) -> (u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut q = self.lock();
        let id = q.next;
        q.next += 1;
        q.conns.insert(id, tx);
        (id, rx)
    }

    /// Evict the oldest waiting connection; false when none is waiting.
    fn evict_oldest(&self) -> bool {
        self.lock().conns.pop_first().is_some()
    }

    /// Take connection `id` out (its request is complete, or it is gone): it can no longer
    /// be evicted. False if it was evicted before.
    fn take(&self, id: u64) -> bool {
        self.lock().conns.remove(&id).is_some()
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding it; a poisoned queue is still a consistent one.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The request line of an HTTP request, once its head is complete.
pub fn route(head: &str) -> (&'static str, &'static str) {
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") | ("HEAD", "/metrics") => ("200 OK", "metrics"),
        ("GET", _) | ("HEAD", _) => ("404 Not Found", "not found\n"),
        _ => ("405 Method Not Allowed", "only GET /metrics is served\n"),
    }
}

/// Read the request, unless the connection is evicted first, then answer it.
async fn handle(
    mut stream: TcpStream,
    metrics: &Metrics,
    waiting: &Waiting,
    id: u64,
    evict: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let head = tokio::select! {
        head = read_head(&mut stream) => head?,
        _ = evict => return Ok(()),
    };
    // The client left before a complete request, or it was evicted as the request came.
    let Some(head) = head else { return Ok(()) };
    if !waiting.take(id) {
        return Ok(());
    }
    answer(stream, &head, metrics).await
}

/// The request head, up to its blank line or a little past [`MAX_REQUEST`] bytes; None if
/// the client closed before.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            break;
        }
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

async fn answer(mut stream: TcpStream, head: &str, metrics: &Metrics) -> std::io::Result<()> {
    let (status, kind) = route(head);
    let head_only = head.starts_with("HEAD ");
    let (ctype, body) = if kind == "metrics" {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        )
    } else {
        ("text/plain; charset=utf-8", kind.to_string())
    };
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        resp.push_str(&body);
    }
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::cycle_report::{ErrorKind, EscalationKind, Release, TargetGauges};
    use crate::shared::act::Outcome;
    use crate::shared::config::Action;

    #[test]
    fn routes() {
        assert_eq!(route("GET /metrics HTTP/1.1\r\n\r\n").0, "200 OK");
        assert_eq!(route("GET /metrics?x=1 HTTP/1.1\r\n\r\n").0, "200 OK");
        assert_eq!(route("GET / HTTP/1.1\r\n\r\n").0, "404 Not Found");
        assert_eq!(route("GET /metricsx HTTP/1.1\r\n\r\n").0, "404 Not Found");
        assert_eq!(
            route("POST /metrics HTTP/1.1\r\n\r\n").0,
            "405 Method Not Allowed"
        );
        assert_eq!(route("").0, "405 Method Not Allowed");
    }

    #[test]
    fn the_oldest_waiting_connection_is_evicted_and_a_complete_request_never_is() {
        let w = Waiting::default();
        let (a, mut evict_a) = w.join();
        let (b, evict_b) = w.join();
        let (c, mut evict_c) = w.join();
        assert!(a < b && b < c);
        // b's request is complete: it is answered, never evicted.
        assert!(w.take(b));
        assert!(w.evict_oldest());
        assert_eq!(
            evict_a.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(evict_c.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        assert!(w.evict_oldest());
        assert_eq!(
            evict_c.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        );
        assert!(!w.evict_oldest(), "only b is left, and it is answering");
        drop(evict_b);
        // c completing its request after its eviction is still evicted.
        assert!(!w.take(c));
        assert!(!w.take(a));
    }

    #[test]
    fn report_becomes_metrics() {
        let m = Metrics::new();
        let mut r = CycleReport::default();
        r.targets.insert(
            "api".into(),
            TargetGauges {
                close_wait: 3,
                oldest_ms: 1500,
                open_fds: 40,
                fd_limit: 1024,
                new_close_wait: 2,
                dead_held: 4,
                fullest: (30, 120),
            },
        );
        r.outcomes
            .insert(("api".into(), Action::Shutdown, Outcome::Reaped), 2);
        r.releases.insert(("api".into(), Release::StillHeld), 1);
        r.errors.insert(ErrorKind::Netlink, 1);
        r.escalations
            .insert(("api".into(), EscalationKind::Signal), 1);
        m.observe(&r);
        m.observe(&r);
        let text = m.render();
        for needle in [
            "cwreap_close_wait_sockets{target=\"api\"} 3",
            "cwreap_close_wait_oldest_seconds{target=\"api\"} 1.5",
            "cwreap_reaped_total{target=\"api\",action=\"shutdown\",outcome=\"reaped\"} 4",
            "cwreap_fd_released_total{target=\"api\",result=\"still_held\"} 2",
            "cwreap_process_open_fds{target=\"api\"} 40",
            "cwreap_process_fd_limit{target=\"api\"} 1024",
            "cwreap_close_wait_new_total{target=\"api\"} 4",
            "cwreap_process_fd_usage_ratio{target=\"api\"} 0.25",
            "cwreap_dead_sockets_held{target=\"api\"} 4",
            "cwreap_cycle_errors_total{kind=\"netlink\"} 2",
            "cwreap_escalations_total{target=\"api\",kind=\"signal\"} 2",
            "cwreap_cycle_duration_seconds_count 2",
            "cwreap_build_info{version=",
            "cwreap_last_cycle_timestamp_seconds ",
            "cwreap_audit_write_errors_total 0",
            "cwreap_log_lines_dropped_total 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
        m.health().notify_dropped.inc_by(3);
        assert!(m.render().contains("cwreap_notify_dropped_total 3"));
        // A target gone from the report is gone from the gauges.
        m.observe(&CycleReport::default());
        assert!(
            !m.render()
                .contains("cwreap_close_wait_sockets{target=\"api\"}")
        );
    }
}
