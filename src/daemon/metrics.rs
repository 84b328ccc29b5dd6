//! Prometheus metrics for `cwreap run`: the registry, and how a cycle's report updates it.
//! [`crate::daemon::endpoint`] serves it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
struct ModeLabels {
    mode: &'static str,
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
    emfile_forecast: Family<TargetLabels, GaugeF>,
    fd_warning: Family<TargetLabels, Gauge>,
    dead_held: Family<TargetLabels, Gauge>,
    cycle_duration: Histogram,
    detection: Histogram,
    cycle_errors: Family<ErrorLabels, Counter>,
    last_cycle: GaugeF,
    refused: Counter,
    skipped_unrecorded: Counter,
    escalations_deferred: Counter,
    events_lost: Counter,
    reconciles: Counter,
    discovery_mode: Family<ModeLabels, Gauge>,
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
        let emfile_forecast = Family::default();
        registry.register(
            "cwreap_emfile_forecast_seconds",
            "Seconds until the first of the target's processes runs out of fds (EMFILE) at the growth of its open fds over the last minute (the estimator of `cwreap explain`); no series while none of them grows",
            emfile_forecast.clone(),
        );
        let fd_warning = Family::default();
        registry.register(
            "cwreap_fd_usage_warning",
            "1 while one of the target's processes is above 80 % of its fd limit and has not fallen below 70 % since (hysteresis: fds swinging around 80 % do not flap), else 0",
            fd_warning.clone(),
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
        let detection = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "cwreap_detection_latency_seconds",
            "With events: from a socket's entry into CLOSE_WAIT (the kernel's time of it) to the daemon knowing its owner (pid, fd), for each socket a target holds",
            detection.clone(),
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
        let events_lost = Counter::default();
        registry.register(
            "cwreap_bpf_events_lost",
            "Socket events the kernel dropped because the ring buffer was full (each followed by a full dump that catches up)",
            events_lost.clone(),
        );
        let reconciles = Counter::default();
        registry.register(
            "cwreap_discovery_reconciles",
            "Full sock_diag dumps the event source did to catch up (after lost events, or a socket an event could not place)",
            reconciles.clone(),
        );
        let discovery_mode = Family::<ModeLabels, Gauge>::default();
        registry.register(
            "cwreap_discovery_mode",
            "How the daemon finds CLOSE_WAIT sockets: 1 for the mode in use (events: the kernel's state changes through BPF; poll: a sock_diag dump every cycle)",
            discovery_mode.clone(),
        );
        let escalations_deferred = Counter::default();
        registry.register(
            "cwreap_escalations_deferred",
            "Escalations due but held back by limits.max_escalations_per_minute (each cycle one waits)",
            escalations_deferred.clone(),
        );
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
                emfile_forecast,
                fd_warning,
                dead_held,
                cycle_duration,
                detection,
                cycle_errors,
                last_cycle,
                refused,
                skipped_unrecorded,
                escalations_deferred,
                events_lost,
                reconciles,
                discovery_mode,
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

    /// Say which discovery runs (`events` or `poll`), for the whole life of the daemon.
    pub fn set_discovery_mode(&self, mode: &'static str) {
        let Ok(m) = self.inner.lock() else { return };
        m.discovery_mode.clear();
        m.discovery_mode.get_or_create(&ModeLabels { mode }).set(1);
    }

    /// Sockets found between cycles (events): how long after entering CLOSE_WAIT each
    /// was known with its owner.
    pub fn observe_detection(&self, latencies: &[std::time::Duration]) {
        let Ok(m) = self.inner.lock() else { return };
        for l in latencies {
            m.detection.observe(l.as_secs_f64());
        }
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
        m.emfile_forecast.clear();
        m.fd_warning.clear();
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
            if let Some(ms) = g.emfile_in_ms {
                m.emfile_forecast.get_or_create(&l).set(ms as f64 / 1000.0);
            }
            m.fd_warning.get_or_create(&l).set(i64::from(g.fd_warning));
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
        m.escalations_deferred
            .inc_by(u64::try_from(report.escalations_deferred).unwrap_or(u64::MAX));
        m.events_lost.inc_by(report.events_lost);
        m.reconciles.inc_by(report.reconciles);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::cycle_report::{ErrorKind, EscalationKind, Release, TargetGauges};
    use crate::shared::act::Outcome;
    use crate::shared::config::Action;

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
                emfile_in_ms: Some(1_800_500),
                fd_warning: true,
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
            "cwreap_emfile_forecast_seconds{target=\"api\"} 1800.5",
            "cwreap_fd_usage_warning{target=\"api\"} 1",
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
        // No leak, no forecast series.
        r.targets.get_mut("api").expect("api").emfile_in_ms = None;
        m.observe(&r);
        let text = m.render();
        assert!(!text.contains("cwreap_emfile_forecast_seconds{"), "{text}");
        assert!(text.contains("cwreap_fd_usage_warning{target=\"api\"} 1"));
    }
}
