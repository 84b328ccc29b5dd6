//! Rendering: aligned tables for people, one JSON object per line for machines.

use std::fmt::Write as _;
use std::net::SocketAddr;

use std::io::Write;

use serde::Serialize;

use crate::cli::plan::{Closable, HeldSocket, ProcessSummary, Row, Top, close_age_ms};
use crate::shared::act::ActResult;
use crate::shared::age::Age;
pub use crate::shared::age::human_age;
use crate::shared::attribute::{Direction, Holder};

/// `ip:port`, IPv6 as `[ip]:port` (SocketAddr's Display does exactly that).
pub fn addr(a: &SocketAddr) -> String {
    a.to_string()
}

/// Lay out rows of cells in columns; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>], right_aligned: &[usize]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i + 1 == n {
                if right_aligned.contains(&i) {
                    let _ = write!(s, "{c:>w$}");
                } else {
                    s.push_str(c);
                }
            } else if right_aligned.contains(&i) {
                let _ = write!(s, "{c:>w$}  ");
            } else {
                let _ = write!(s, "{c:<w$}  ");
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// How far apart an age's bounds must be before a table shows the range: closer than this,
/// the lower bound alone says enough.
pub const AGE_RESOLUTION: std::time::Duration = std::time::Duration::from_secs(1);

/// The cells of one socket, shared by scan and reap tables.
fn socket_cells<H>(r: &Row<'_, H>) -> Vec<String> {
    let d = &r.socket.diag;
    let mut pid = opt(r.holder.map(|h| h.pid));
    if r.socket.holders.len() > 1 {
        let _ = write!(pid, "+{}", r.socket.holders.len() - 1);
    }
    let fd = if r.unaccepted {
        "unaccepted".to_string()
    } else {
        opt(r.holder.map(|h| h.fd))
    };
    vec![
        pid,
        fd,
        r.process
            .map_or_else(|| "-".to_string(), |p| p.comm.clone()),
        d.inode.to_string(),
        addr(&d.local),
        if r.dead() {
            "-".to_string()
        } else {
            addr(&d.remote)
        },
        r.socket.direction.as_str().to_string(),
        cwreap_linux::tcp::state_name(d.state).to_string(),
        r.age.display(AGE_RESOLUTION),
        d.recv_q.to_string(),
        d.send_q.to_string(),
        d.netns.to_string(),
    ]
}

const SOCKET_HEADER: [&str; 12] = [
    "PID", "FD", "COMM", "INODE", "LOCAL", "REMOTE", "DIR", "STATE", "AGE", "RECV-Q", "SEND-Q",
    "NETNS",
];

pub fn scan_table<H>(rows: &[Row<'_, H>], color: bool) -> String {
    let cells: Vec<Vec<String>> = rows.iter().map(socket_cells).collect();
    paint(
        table(&SOCKET_HEADER, &cells, &[0, 1, 3, 8, 9, 10]),
        color,
        &[],
    )
}

pub fn fd_usage(open: usize, limit: Option<u64>) -> String {
    match limit {
        Some(l) if l > 0 => format!("{open}/{l} ({}%)", (open as u64 * 100) / l),
        Some(l) => format!("{open}/{l}"),
        None => format!("{open}/unlimited"),
    }
}

/// Whether to colour: only on a terminal, and never when NO_COLOR is set (no-color.org).
pub fn use_color(is_tty: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_tty && no_color.is_none_or(|v| v.is_empty())
}

const BOLD: &str = "\x1b[1m";
const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[1;31m";
const RESET: &str = "\x1b[0m";

/// fd usage in percent of the soft limit, when there is one.
pub fn fd_percent(open: usize, limit: Option<u64>) -> Option<u64> {
    limit
        .filter(|l| *l > 0)
        .map(|l| (open as u64).saturating_mul(100) / l)
}

/// Paint whole lines: the header bold; a row yellow at ≥ 80 % fd usage, red at ≥ 95 %.
pub fn paint(table: String, color: bool, levels: &[Option<u64>]) -> String {
    if !color {
        return table;
    }
    let mut out = String::with_capacity(table.len() + 16 * levels.len());
    for (i, line) in table.lines().enumerate() {
        let code = match i {
            0 => Some(BOLD),
            n => match levels.get(n - 1).copied().flatten() {
                Some(p) if p >= 95 => Some(RED),
                Some(p) if p >= 80 => Some(YELLOW),
                _ => None,
            },
        };
        match code {
            Some(c) => {
                let _ = write!(out, "{c}{line}{RESET}");
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The TOP column: `remote 10.0.0.5:6379 ×12, …` or `port 8080 ×40, …`.
pub fn top_cell(top: &Top) -> String {
    match top {
        Top::None => "-".to_string(),
        Top::Remotes(v) => {
            let items: Vec<String> = v.iter().map(|(r, n)| format!("{r} ×{n}")).collect();
            format!("remote {}", items.join(", "))
        }
        Top::LocalPorts(v) => {
            let items: Vec<String> = v.iter().map(|(p, n)| format!("{p} ×{n}")).collect();
            format!("port {}", items.join(", "))
        }
    }
}

pub fn summary_table(sums: &[ProcessSummary], color: bool) -> String {
    let cells: Vec<Vec<String>> = sums
        .iter()
        .map(|s| {
            vec![
                s.pid.to_string(),
                s.comm.clone(),
                s.close_wait.to_string(),
                s.dead.to_string(),
                human_age(s.oldest_ms),
                fd_usage(s.open_fds, s.nofile_soft),
                top_cell(&s.top),
            ]
        })
        .collect();
    let levels: Vec<Option<u64>> = sums
        .iter()
        .map(|s| fd_percent(s.open_fds, s.nofile_soft))
        .collect();
    paint(
        table(
            &[
                "PID",
                "COMM",
                "CLOSE_WAIT",
                "DEAD",
                "OLDEST",
                "FDS/LIMIT",
                "TOP",
            ],
            &cells,
            &[0, 2, 3, 4],
        ),
        color,
        &levels,
    )
}

/// One process in the `--watch` view, with how it moved since the previous refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchRow {
    pub summary: ProcessSummary,
    /// Change in CLOSE_WAIT count and in open fds since the last refresh (None: new).
    pub close_wait_delta: Option<i64>,
    pub fds_delta: Option<i64>,
}

fn delta(d: Option<i64>) -> String {
    match d {
        None => "new".to_string(),
        Some(0) => "=".to_string(),
        Some(n) if n > 0 => format!("+{n}"),
        Some(n) => n.to_string(),
    }
}

pub fn watch_table(rows: &[WatchRow], color: bool) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let s = &r.summary;
            vec![
                s.pid.to_string(),
                s.comm.clone(),
                s.close_wait.to_string(),
                delta(r.close_wait_delta),
                human_age(s.oldest_ms),
                fd_usage(s.open_fds, s.nofile_soft),
                delta(r.fds_delta),
            ]
        })
        .collect();
    let levels: Vec<Option<u64>> = rows
        .iter()
        .map(|r| fd_percent(r.summary.open_fds, r.summary.nofile_soft))
        .collect();
    paint(
        table(
            &[
                "PID",
                "COMM",
                "CLOSE_WAIT",
                "Δ",
                "OLDEST",
                "FDS/LIMIT",
                "FDS Δ",
            ],
            &cells,
            &[0, 2, 3, 4, 6],
        ),
        color,
        &levels,
    )
}

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn display_opt<T: std::fmt::Display, S: serde::Serializer>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// One `scan --json` line. Serialized straight into the output buffer (no intermediate
/// JSON tree): the fields of DESIGN.md first, then the extras.
#[derive(Serialize)]
pub struct ScanLine<'a> {
    pid: Option<i32>,
    fd: Option<i32>,
    comm: Option<&'a str>,
    inode: u64,
    #[serde(serialize_with = "display")]
    local: &'a SocketAddr,
    /// None for a dead held socket: the kernel names no peer of a CLOSE socket.
    #[serde(serialize_with = "display_opt")]
    remote: Option<&'a SocketAddr>,
    #[serde(flatten)]
    age: Age,
    recv_q: u32,
    send_q: u32,
    netns: u64,
    unaccepted: bool,
    listener_fd: Option<i32>,
    cookie: u64,
    uid: u32,
    holders: &'a [Holder],
    /// `in` for the server's end of a connection, `out` for the client's.
    direction: Direction,
    /// `CLOSE_WAIT`, or `CLOSE` for a dead held socket.
    state: &'static str,
    /// A keepalive timer is armed: probes the peer answers reset the lower bound.
    keepalive: bool,
}

impl<'a> ScanLine<'a> {
    pub fn new<H>(r: &Row<'a, H>) -> Self {
        let d = &r.socket.diag;
        Self {
            pid: r.holder.map(|h| h.pid),
            fd: if r.unaccepted {
                None
            } else {
                r.holder.map(|h| h.fd)
            },
            comm: r.process.map(|p| p.comm.as_str()),
            inode: d.inode,
            local: &d.local,
            remote: (!r.dead()).then_some(&d.remote),
            age: r.age,
            recv_q: d.recv_q,
            send_q: d.send_q,
            netns: d.netns,
            unaccepted: r.unaccepted,
            listener_fd: if r.unaccepted {
                r.holder.map(|h| h.fd)
            } else {
                None
            },
            cookie: d.cookie,
            uid: d.uid,
            holders: &r.socket.holders,
            direction: r.socket.direction,
            state: cwreap_linux::tcp::state_name(d.state),
            keepalive: d.keepalive,
        }
    }
}

/// One `reap --json` line: the scan fields plus what was done.
#[derive(Serialize)]
pub struct ReapLine<'a> {
    #[serde(flatten)]
    socket: ScanLine<'a>,
    action: &'a str,
    outcome: &'static str,
    /// The typed reason's code (see [`crate::shared::act::Reason::code`]).
    reason: Option<&'static str>,
    /// The reason in words.
    error: Option<String>,
}

pub fn write_scan_json<H>(out: &mut impl Write, r: &Row<'_, H>) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, &ScanLine::new(r))?;
    out.write_all(b"\n")
}

pub fn write_reap_json<H>(
    out: &mut impl Write,
    r: &Row<'_, H>,
    action: &str,
    res: &ActResult,
) -> std::io::Result<()> {
    let line = ReapLine {
        socket: ScanLine::new(r),
        action,
        outcome: res.outcome.as_str(),
        reason: res.reason.as_ref().map(crate::shared::act::Reason::code),
        error: res.detail(),
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}

/// One `reap --close` JSON line.
#[derive(Serialize)]
struct CloseLine<'a> {
    pid: i32,
    fd: i32,
    comm: &'a str,
    inode: u64,
    cookie: u64,
    /// `CLOSE_WAIT`, or `CLOSE` for a connection that ended and is still held.
    state: &'static str,
    local: Option<String>,
    remote: Option<String>,
    age_ms: u64,
    action: &'static str,
    outcome: &'static str,
    reason: Option<&'static str>,
    error: Option<String>,
}

pub fn write_close_json(
    out: &mut impl Write,
    h: &HeldSocket,
    kind: Closable,
    res: &ActResult,
) -> std::io::Result<()> {
    let line = CloseLine {
        pid: h.pid,
        fd: h.fd,
        comm: &h.comm,
        inode: h.facts.inode,
        cookie: h.facts.cookie,
        state: kind.state(),
        local: h.facts.local.as_ref().map(addr),
        remote: h.facts.remote.as_ref().map(addr),
        age_ms: close_age_ms(h),
        action: "close",
        outcome: res.outcome.as_str(),
        reason: res.reason.as_ref().map(crate::shared::act::Reason::code),
        error: res.detail(),
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}

pub fn close_table(done: &[(&HeldSocket, Closable, ActResult)]) -> String {
    let cells: Vec<Vec<String>> = done
        .iter()
        .map(|(h, kind, res)| {
            vec![
                h.pid.to_string(),
                h.fd.to_string(),
                h.comm.clone(),
                h.facts.inode.to_string(),
                kind.state().to_string(),
                opt(h.facts.local.as_ref().map(addr)),
                opt(h.facts.remote.as_ref().map(addr)),
                human_age(close_age_ms(h)),
                res.outcome.as_str().to_string(),
                res.detail().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "PID", "FD", "COMM", "INODE", "STATE", "LOCAL", "REMOTE", "AGE", "OUTCOME", "DETAIL",
        ],
        &cells,
        &[0, 1, 3, 7],
    )
}

pub fn reap_table<H>(done: &[(Row<'_, H>, ActResult)], action: &str) -> String {
    let cells: Vec<Vec<String>> = done
        .iter()
        .map(|(r, res)| {
            let mut c = socket_cells(r);
            c.truncate(9);
            c.push(action.to_string());
            c.push(res.outcome.as_str().to_string());
            c.push(res.detail().unwrap_or_default());
            c
        })
        .collect();
    table(
        &[
            "PID", "FD", "COMM", "INODE", "LOCAL", "REMOTE", "DIR", "STATE", "AGE", "ACTION",
            "OUTCOME", "DETAIL",
        ],
        &cells,
        &[0, 1, 3, 8],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(human_age(0), "0ms");
        assert_eq!(human_age(850), "850ms");
        assert_eq!(human_age(42_000), "42s");
        assert_eq!(human_age(185_000), "3m05s");
        assert_eq!(human_age(3_720_000), "1h02m");
        assert_eq!(human_age(2 * 86_400_000 + 3_600_000), "2d01h");
    }

    #[test]
    fn addresses() {
        assert_eq!(addr(&"127.0.0.1:80".parse().expect("v4")), "127.0.0.1:80");
        assert_eq!(addr(&"[::1]:8080".parse().expect("v6")), "[::1]:8080");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["PID", "NAME"],
            &[
                vec!["1".into(), "a".into()],
                vec!["12345".into(), "bb".into()],
            ],
            &[0],
        );
        assert_eq!(t, "  PID  NAME\n    1  a\n12345  bb\n");
    }

    #[test]
    fn color_only_on_a_tty_without_no_color() {
        assert!(use_color(true, None));
        assert!(!use_color(false, None));
        assert!(!use_color(true, Some(std::ffi::OsStr::new("1"))));
        assert!(
            use_color(true, Some(std::ffi::OsStr::new(""))),
            "empty NO_COLOR is unset"
        );
    }

    #[test]
    fn summary_highlights_fd_headroom() {
        let row = |pid: i32, open: usize| ProcessSummary {
            top: Top::LocalPorts(vec![(8080, 1)]),
            pid,
            comm: "app".into(),
            close_wait: 1,
            dead: 0,
            oldest_ms: 1000,
            open_fds: open,
            nofile_soft: Some(100),
        };
        let sums = [row(1, 10), row(2, 85), row(3, 97)];
        let plain = summary_table(&sums, false);
        assert!(!plain.contains('\x1b'));
        let colored = summary_table(&sums, true);
        let lines: Vec<&str> = colored.lines().collect();
        assert!(lines[0].starts_with(BOLD));
        assert!(!lines[1].contains('\x1b'), "10% is not highlighted");
        assert!(lines[2].starts_with(YELLOW), "85%: {}", lines[2]);
        assert!(lines[3].starts_with(RED), "97%: {}", lines[3]);
    }

    #[test]
    fn watch_deltas() {
        assert_eq!(delta(None), "new");
        assert_eq!(delta(Some(0)), "=");
        assert_eq!(delta(Some(3)), "+3");
        assert_eq!(delta(Some(-2)), "-2");
    }

    #[test]
    fn fd_usage_formats() {
        assert_eq!(fd_usage(512, Some(1024)), "512/1024 (50%)");
        assert_eq!(fd_usage(3, None), "3/unlimited");
    }
}
