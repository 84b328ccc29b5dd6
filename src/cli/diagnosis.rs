//! `cwreap explain`, the pure part: which bug class leaves each CLOSE_WAIT socket behind,
//! grouped per process, where the sockets come from, how fast new ones arrive and when the
//! process will run out of fds. No I/O here: `commands::explain` samples the kernel and
//! /proc and hands over plain values.
//!
//! The evidence per socket is what the kernel already shows without touching the process:
//! its receive queue (1: only the FIN, never read; 0: the EOF was read; more: unread data
//! and the FIN), whether an epoll instance of the owner still has it registered, whether
//! it was ever accepted, and which end of its connection it is. What it means depends on
//! the owner's runtime ([`runtime`]), and so does the advice ([`advice`]); for a JVM, its
//! full collections tell a Socket it still references from one it dropped.

pub mod advice;
pub mod pattern;
pub mod runtime;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Serialize;

use crate::cli::render::human_age;
pub use crate::shared::forecast::{FdTrend, emfile_in_s};
pub use pattern::{Evidence, Pattern};
pub use runtime::{FullGc, Identified, Runtime};

/// How many remote hosts and local ports a report names.
pub const TOP_N: usize = 5;

/// Lines of the text report are wrapped at this width.
const WIDTH: usize = 92;

/// One CLOSE_WAIT socket of the last sample, under the process it is shown for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    pub pid: i32,
    /// None for an unaccepted connection.
    pub fd: Option<i32>,
    pub inode: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub evidence: Evidence,
    /// The lower bound of its time in CLOSE_WAIT.
    pub age_min_ms: u64,
}

/// One process of the last sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessFacts {
    pub pid: i32,
    pub comm: String,
    pub open_fds: usize,
    /// Soft RLIMIT_NOFILE; None when unlimited or unknown.
    pub fd_limit: Option<u64>,
    pub runtime: Identified,
    /// A JVM's full collections; None for other runtimes, or a JVM that publishes none.
    pub full_gc: Option<FullGc>,
}

/// A socket's identity across samples: (network namespace, socket cookie). Inodes and
/// 4-tuples are reused; a cookie is not, within a namespace.
pub type SocketKey = (u64, u64);

/// One look at the selected CLOSE_WAIT sockets and their owners.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sample {
    /// Time since the first sample.
    pub at: Duration,
    /// Every socket, with the pid it was attributed to (None: no owner found).
    pub sockets: Vec<(SocketKey, Option<i32>)>,
    /// Open fds of the processes this sample saw.
    pub open_fds: BTreeMap<i32, usize>,
}

/// What a series of samples says, per process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trends {
    pub samples: usize,
    /// From the first sample to the last; None with fewer than two.
    pub window: Option<Duration>,
    /// New CLOSE_WAIT sockets per process: keys that no earlier sample had.
    pub arrivals: BTreeMap<i32, usize>,
    pub fds: BTreeMap<i32, FdTrend>,
}

/// Arrivals and fd growth from samples in time order.
pub fn trends(samples: &[Sample]) -> Trends {
    let mut t = Trends {
        samples: samples.len(),
        ..Trends::default()
    };
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return t;
    };
    if samples.len() >= 2 && last.at > first.at {
        t.window = Some(last.at - first.at);
    }
    let mut seen: HashSet<SocketKey> = first.sockets.iter().map(|(k, _)| *k).collect();
    for s in &samples[1..] {
        for (key, pid) in &s.sockets {
            if seen.insert(*key)
                && let Some(pid) = pid
            {
                *t.arrivals.entry(*pid).or_default() += 1;
            }
        }
    }
    let mut firsts: BTreeMap<i32, (usize, Duration)> = BTreeMap::new();
    for s in samples {
        for (&pid, &open) in &s.open_fds {
            let (first, since) = *firsts.entry(pid).or_insert((open, s.at));
            t.fds.insert(
                pid,
                FdTrend {
                    first,
                    last: open,
                    span: s.at.saturating_sub(since),
                },
            );
        }
    }
    t
}

/// New CLOSE_WAIT sockets per minute; unknown without a window.
pub fn leak_per_min(arrivals: usize, window: Option<Duration>) -> Option<f64> {
    let secs = window?.as_secs_f64();
    (secs > 0.0).then(|| arrivals as f64 * 60.0 / secs)
}

/// The `n` most frequent keys with their counts, most frequent first (ties: smaller key).
pub fn top<K: Ord>(keys: impl IntoIterator<Item = K>, n: usize) -> Vec<(K, usize)> {
    let mut counts: BTreeMap<K, usize> = BTreeMap::new();
    for k in keys {
        *counts.entry(k).or_default() += 1;
    }
    let mut v: Vec<(K, usize)> = counts.into_iter().collect();
    // Stable: equal counts keep the key order.
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v.truncate(n);
    v
}

/// The remote host of a socket, IPv4-mapped IPv6 addresses shown as IPv4.
pub fn remote_host(a: &SocketAddr) -> IpAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Sockets per pattern; every pattern is a key, so `jq .patterns.abandoned` is a number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PatternCounts {
    pub eof_ignored: usize,
    pub not_read: usize,
    pub eof_unwatched: usize,
    pub abandoned: usize,
    pub pool_idle: usize,
    pub unaccepted: usize,
    pub dead_held: usize,
}

impl PatternCounts {
    fn slot(&mut self, p: Pattern) -> &mut usize {
        match p {
            Pattern::EofIgnored => &mut self.eof_ignored,
            Pattern::NotRead => &mut self.not_read,
            Pattern::EofUnwatched => &mut self.eof_unwatched,
            Pattern::Abandoned => &mut self.abandoned,
            Pattern::PoolIdle => &mut self.pool_idle,
            Pattern::Unaccepted => &mut self.unaccepted,
            Pattern::DeadHeld => &mut self.dead_held,
        }
    }

    pub fn get(&self, p: Pattern) -> usize {
        match p {
            Pattern::EofIgnored => self.eof_ignored,
            Pattern::NotRead => self.not_read,
            Pattern::EofUnwatched => self.eof_unwatched,
            Pattern::Abandoned => self.abandoned,
            Pattern::PoolIdle => self.pool_idle,
            Pattern::Unaccepted => self.unaccepted,
            Pattern::DeadHeld => self.dead_held,
        }
    }
}

/// A remote host and how many of the sockets go to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteCount {
    pub addr: IpAddr,
    /// The remote port when every socket to this host (two or more) has the same one: an
    /// outgoing connection to a service (a pool to a database, say). None for clients,
    /// whose ports vary.
    pub port: Option<u16>,
    pub count: usize,
}

impl std::fmt::Display for RemoteCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.port, self.addr) {
            (Some(p), IpAddr::V6(a)) => write!(f, "[{a}]:{p} ({})", self.count),
            (Some(p), a) => write!(f, "{a}:{p} ({})", self.count),
            (None, a) => write!(f, "{a} ({})", self.count),
        }
    }
}

/// The `n` remote hosts most sockets go to, with the port when they share one.
pub fn top_remotes(remotes: &[SocketAddr], n: usize) -> Vec<RemoteCount> {
    let mut ports: BTreeMap<IpAddr, Option<u16>> = BTreeMap::new();
    for r in remotes {
        let port = ports.entry(remote_host(r)).or_insert(Some(r.port()));
        if *port != Some(r.port()) {
            *port = None;
        }
    }
    top(remotes.iter().map(remote_host), n)
        .into_iter()
        .map(|(addr, count)| RemoteCount {
            addr,
            port: ports.get(&addr).copied().flatten().filter(|_| count >= 2),
            count,
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortCount {
    pub port: u16,
    pub count: usize,
}

/// One socket in the `--json` line of its process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SocketLine {
    pub fd: Option<i32>,
    pub inode: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// `in` for a server's end, `out` for a client's.
    pub direction: &'static str,
    pub recv_q: u32,
    pub watched: bool,
    pub pattern: Pattern,
    /// A collection may still close it (see [`runtime::gc_may_close`]).
    pub gc_may_close: bool,
}

/// The diagnosis of one process: one `--json` line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub pid: i32,
    pub comm: String,
    /// The runtime the process runs, and what told it.
    pub runtime: Runtime,
    pub runtime_clue: String,
    /// A JVM's full collections: how many, and how long ago the last ended.
    pub gc: Option<FullGc>,
    pub close_wait: usize,
    /// Dead held sockets: connections that ended while the fd stays held.
    pub dead: usize,
    pub patterns: PatternCounts,
    /// New CLOSE_WAIT sockets per minute; None with a single sample.
    pub leak_per_min: Option<f64>,
    /// Seconds until EMFILE at the measured fd growth; None without growth.
    pub emfile_in_s: Option<u64>,
    pub open_fds: usize,
    pub fd_limit: Option<u64>,
    pub top_remotes: Vec<RemoteCount>,
    pub top_local_ports: Vec<PortCount>,
    /// New CLOSE_WAIT sockets seen during the window; None with a single sample.
    pub arrivals: Option<usize>,
    /// Open fds gained during the window (negative: released); None with a single sample.
    pub fd_growth: Option<i64>,
    /// The sampling window in seconds; None with a single sample.
    pub window_s: Option<f64>,
    pub samples: usize,
    pub sockets: Vec<SocketLine>,
}

/// The reports of every process that holds one of `sockets`, most CLOSE_WAIT first.
pub fn explain(sockets: &[Socket], processes: &[ProcessFacts], trends: &Trends) -> Vec<Report> {
    let mut by_pid: BTreeMap<i32, Vec<&Socket>> = BTreeMap::new();
    for s in sockets {
        by_pid.entry(s.pid).or_default().push(s);
    }
    let mut out: Vec<Report> = processes
        .iter()
        .filter_map(|p| {
            let mine = by_pid.get(&p.pid)?;
            Some(report(p, mine, trends))
        })
        .collect();
    out.sort_by(|a, b| {
        (b.close_wait + b.dead)
            .cmp(&(a.close_wait + a.dead))
            .then(a.pid.cmp(&b.pid))
    });
    out
}

fn report(p: &ProcessFacts, mine: &[&Socket], trends: &Trends) -> Report {
    let mut patterns = PatternCounts::default();
    let rt = p.runtime.runtime;
    let mut lines: Vec<SocketLine> = mine
        .iter()
        .map(|s| {
            let e = s.evidence;
            let pattern = Pattern::of(e, rt);
            *patterns.slot(pattern) += 1;
            SocketLine {
                fd: s.fd,
                inode: s.inode,
                local: s.local,
                remote: s.remote,
                direction: if e.outgoing { "out" } else { "in" },
                recv_q: e.recv_q,
                watched: e.watched,
                pattern,
                gc_may_close: !e.unaccepted
                    && runtime::gc_may_close(rt, e.watched, p.full_gc.as_ref(), s.age_min_ms),
            }
        })
        .collect();
    lines.sort_by_key(|l| (l.pattern, l.fd, l.inode));
    let remotes: Vec<SocketAddr> = mine
        .iter()
        .filter(|s| !s.evidence.dead)
        .map(|s| s.remote)
        .collect();
    let top_remotes = top_remotes(&remotes, TOP_N);
    let top_local_ports = top(mine.iter().map(|s| s.local.port()), TOP_N)
        .into_iter()
        .map(|(port, count)| PortCount { port, count })
        .collect();
    let arrivals = trends
        .window
        .map(|_| trends.arrivals.get(&p.pid).copied().unwrap_or(0));
    let fds = trends.fds.get(&p.pid).filter(|f| f.span > Duration::ZERO);
    Report {
        pid: p.pid,
        comm: p.comm.clone(),
        runtime: rt,
        runtime_clue: p.runtime.clue.clone(),
        gc: p.full_gc,
        close_wait: mine.iter().filter(|s| !s.evidence.dead).count(),
        dead: mine.iter().filter(|s| s.evidence.dead).count(),
        patterns,
        leak_per_min: arrivals
            .and_then(|n| leak_per_min(n, trends.window))
            .map(|r| (r * 100.0).round() / 100.0),
        emfile_in_s: fds
            .and_then(|f| emfile_in_s(f, p.fd_limit))
            .map(|s| s.round() as u64),
        open_fds: p.open_fds,
        fd_limit: p.fd_limit,
        top_remotes,
        top_local_ports,
        arrivals,
        fd_growth: fds.map(|f| f.last as i64 - f.first as i64),
        window_s: trends
            .window
            .map(|w| (w.as_secs_f64() * 1000.0).round() / 1000.0),
        samples: trends.samples,
        sockets: lines,
    }
}

/// `+38`, `+2.5`, `+0`.
fn rate(r: f64) -> String {
    if r == 0.0 {
        "+0".into()
    } else if r < 10.0 {
        format!("+{r:.1}")
    } else {
        format!("+{r:.0}")
    }
}

/// The one-line forecast: `pid 4242 (game-srv): +38 CLOSE_WAIT/min, 61200/65536 fds,
/// EMFILE in ~1h54m`.
pub fn forecast_line(r: &Report) -> String {
    format!("pid {} ({}): {}", r.pid, r.comm, figures(r))
}

/// `+38 CLOSE_WAIT/min, 61200/65536 fds, EMFILE in ~1h54m`.
fn figures(r: &Report) -> String {
    let leak = match r.leak_per_min {
        Some(v) => format!("{} CLOSE_WAIT/min", rate(v)),
        None => "CLOSE_WAIT/min unknown".into(),
    };
    let fds = match r.fd_limit {
        Some(l) => format!("{}/{l} fds", r.open_fds),
        None => format!("{}/unlimited fds", r.open_fds),
    };
    let emfile = match (r.emfile_in_s, r.fd_limit, r.window_s) {
        (Some(0), _, _) => "EMFILE now (at the limit)".to_string(),
        (Some(s), _, _) => format!("EMFILE in ~{}", human_age(s.saturating_mul(1000))),
        (None, None, _) => "no fd limit".into(),
        (None, _, None) => "EMFILE unknown".into(),
        (None, _, Some(_)) => "no fd growth".into(),
    };
    format!("{leak}, {fds}, {emfile}")
}

/// Words of `text` in lines of at most `width` columns, each starting with `indent`
/// (the first with `first` instead).
fn wrap(out: &mut String, first: &str, indent: &str, text: &str, width: usize) {
    let mut line = first.to_string();
    let mut words_on_line = 0;
    for word in text.split_whitespace() {
        if words_on_line > 0 && line.chars().count() + 1 + word.chars().count() > width {
            out.push_str(line.trim_end());
            out.push('\n');
            line = indent.to_string();
            words_on_line = 0;
        }
        if !line.is_empty() && !line.ends_with(' ') {
            line.push(' ');
        }
        line.push_str(word);
        words_on_line += 1;
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

/// The runtime line, and what a collector can still do for the sockets nothing watches.
fn render_runtime(out: &mut String, r: &Report) {
    let mut line = format!("{} ({})", r.runtime.name(), r.runtime_clue);
    if let Some(gc) = r.gc {
        let _ = write!(line, "; {} full collection(s)", gc.full_collections);
        if let Some(ms) = gc.last_ended_ms_ago {
            let _ = write!(line, ", the last ended {} ago", human_age(ms));
        }
    }
    wrap(out, "  runtime:", "    ", &line, WIDTH);
    for may in [true, false] {
        let n = r
            .sockets
            .iter()
            .filter(|s| s.gc_may_close == may && s.fd.is_some())
            .filter(|s| !s.watched || r.runtime == Runtime::Go)
            .count();
        if let Some(note) = (n > 0)
            .then(|| advice::gc_note(r.runtime, may, n, r.pid))
            .flatten()
        {
            wrap(out, "  gc:", "    ", &note, WIDTH);
        }
    }
}

/// The readable report: per process the patterns first, then the runtime and the figures;
/// then one forecast line per process, soonest EMFILE first.
pub fn render(reports: &[Report]) -> String {
    let mut out = String::new();
    for r in reports {
        let _ = writeln!(
            out,
            "pid {} ({}): {} CLOSE_WAIT socket(s)",
            r.pid, r.comm, r.close_wait
        );
        for p in Pattern::ALL {
            let n = r.patterns.get(p);
            if n == 0 {
                continue;
            }
            let head = format!("  {n:>5}  {} ({}):", p.name(), p.evidence(r.runtime));
            wrap(
                &mut out,
                &head,
                "         ",
                advice::advice(p, r.runtime),
                WIDTH,
            );
        }
        render_runtime(&mut out, r);
        let _ = writeln!(out, "  rate: {}", figures(r));
        if let Some(w) = r.window_s {
            let _ = writeln!(
                out,
                "  measured: {} new CLOSE_WAIT and {:+} fds in {w:.0}s ({} samples)",
                r.arrivals.unwrap_or(0),
                r.fd_growth.unwrap_or(0),
                r.samples
            );
        }
        let list = |items: Vec<String>| items.join(", ");
        let _ = writeln!(
            out,
            "  top remotes: {}",
            list(r.top_remotes.iter().map(ToString::to_string).collect())
        );
        let _ = writeln!(
            out,
            "  top local ports: {}",
            list(
                r.top_local_ports
                    .iter()
                    .map(|c| format!("{} ({})", c.port, c.count))
                    .collect()
            )
        );
        out.push('\n');
    }
    if reports.first().is_some_and(|r| r.window_s.is_none()) {
        out.push_str(
            "One sample: the leak rate and EMFILE forecast need two. Run with --for 30s to \
measure them.\n",
        );
    } else if !reports.is_empty() {
        out.push_str("Forecast, soonest EMFILE first:\n");
        let mut order: Vec<&Report> = reports.iter().collect();
        order.sort_by_key(|r| (r.emfile_in_s.is_none(), r.emfile_in_s, r.pid));
        for r in order {
            let _ = writeln!(out, "  {}", forecast_line(r));
        }
    }
    out
}

#[cfg(test)]
mod tests;
