//! What `scan` prints on a terminal (pure: rows and a screen size in, text out). A list
//! that fits on the screen is printed whole, between a line that says what the rows are
//! and the commands to run next. One that does not becomes the per-process summary, worst
//! first, cut to the screen, with how to list the sockets. A pipe gets neither: scripts
//! parse the plain output.

use std::collections::HashMap;

use crate::cli::plan::{ProcessSummary, Row};
use crate::cli::render::{self, fd_usage, human_age, top_cell};
use crate::shared::attribute::Direction;

/// The terminal stdout goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Screen {
    pub rows: usize,
    pub cols: usize,
}

/// How `scan` writes: in colour or not, and to a terminal of this size or not (`None`: a
/// pipe or a file, which gets the plain output only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Output {
    pub color: bool,
    pub screen: Option<Screen>,
}

impl Output {
    /// A pipe or a file, in colour or not.
    pub fn plain(color: bool) -> Output {
        Output {
            color,
            screen: None,
        }
    }
}

/// What the rows of a socket list are, in plain words; one line of at most 80 columns.
pub const SOCKETS_HEADER: &str =
    "CLOSE_WAIT: the peer closed the connection; the process never called close().";

/// What the rows of the per-process summary are; one line of at most 80 columns.
pub const SUMMARY_HEADER: &str =
    "CLOSE_WAIT per process: the peer closed, and the process never called close().";

/// The threshold the suggested dry run uses: the README's and the man page's example,
/// above common connection-pool idle timeouts.
pub const SUGGESTED_OLDER_THAN: &str = "10m";

/// The rows a text takes on a screen `cols` wide: a longer line wraps.
pub fn screen_rows(text: &str, cols: usize) -> usize {
    let cols = cols.max(1);
    text.lines()
        .map(|l| l.chars().count().div_ceil(cols).max(1))
        .sum()
}

/// Whether `text`, followed by the shell's prompt, fits on `screen`.
pub fn fits(text: &str, screen: Screen) -> bool {
    screen_rows(text, screen.cols) < screen.rows
}

/// What the sockets of one process suggest, from what `scan` reads (explain tells more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// Most were never accepted: they sit in the listener's queue.
    AcceptQueue,
    /// Most have recv_q 0: the process read the peer's EOF and kept the socket.
    EofRead,
    /// Most have the FIN (and maybe data) unread: nobody reads them.
    Unread,
    /// Only dead held sockets: the connections ended, the fds are still held.
    EndedHeld,
}

impl Hint {
    pub fn words(self, pool: bool) -> &'static str {
        match (self, pool) {
            (Hint::AcceptQueue, _) => "never accepted",
            (Hint::EofRead, false) => "EOF read, kept",
            (Hint::EofRead, true) => "pool: EOF read, kept",
            (Hint::Unread, false) => "FIN never read",
            (Hint::Unread, true) => "pool: idle, unread",
            (Hint::EndedHeld, _) => "ended, fd kept",
        }
    }
}

/// Per process: its hint, and whether its sockets are mostly client ends (a pool).
pub fn hints<H>(rows: &[Row<'_, H>]) -> HashMap<i32, (Hint, bool)> {
    #[derive(Default)]
    struct Tally {
        unaccepted: usize,
        eof_read: usize,
        unread: usize,
        outbound: usize,
        live: usize,
    }
    let mut per: HashMap<i32, Tally> = HashMap::new();
    for r in rows {
        let Some(p) = r.process else { continue };
        let t = per.entry(p.pid).or_default();
        if r.dead() {
            continue;
        }
        t.live += 1;
        if r.socket.direction == Direction::Out {
            t.outbound += 1;
        }
        if r.unaccepted {
            t.unaccepted += 1;
        } else if r.socket.diag.recv_q == 0 {
            t.eof_read += 1;
        } else {
            t.unread += 1;
        }
    }
    per.into_iter()
        .map(|(pid, t)| {
            let hint = if t.live == 0 {
                Hint::EndedHeld
            } else if t.unaccepted * 2 > t.live {
                Hint::AcceptQueue
            } else if t.eof_read >= t.unread {
                Hint::EofRead
            } else {
                Hint::Unread
            };
            (pid, (hint, t.outbound * 2 > t.live))
        })
        .collect()
}

/// The commands to run next, for the worst process (the first of the summary).
pub fn next_steps(worst: Option<&ProcessSummary>) -> Vec<String> {
    let Some(w) = worst else {
        return Vec::new();
    };
    let explain = format!("cwreap explain --pid {}", w.pid);
    let reap = format!(
        "cwreap reap --pid {} --older-than {SUGGESTED_OLDER_THAN} --dry-run",
        w.pid
    );
    let width = explain.len().max(reap.len());
    vec![
        format!("Next, for pid {} ({}), the worst:", w.pid, w.comm),
        format!("  {explain:<width$}  which bug leaks them (read-only)"),
        format!("  {reap:<width$}  what a reap would do"),
    ]
}

/// The socket list for a terminal: the plain output between a header and the next steps.
pub fn full(plain: &str, sums: &[ProcessSummary]) -> String {
    let mut out = format!("{SOCKETS_HEADER}\n{plain}");
    for l in next_steps(sums.first()) {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// The per-process summary cut to `screen`: header, the worst processes, totals, how to
/// list the sockets and what to run next. Painted when `color`.
pub fn summary<H>(
    rows: &[Row<'_, H>],
    sums: &[ProcessSummary],
    screen: Screen,
    color: bool,
) -> String {
    let hints = hints(rows);
    let dead_total: usize = sums.iter().map(|s| s.dead).sum();
    let live_total = rows.iter().filter(|r| !r.dead()).count();
    let unowned = rows.iter().filter(|r| r.process.is_none()).count();

    let mut tail = Vec::new();
    let mut totals = format!(
        "{live_total} CLOSE_WAIT socket(s) in {} process(es)",
        sums.len()
    );
    if dead_total > 0 {
        totals.push_str(&format!(", and {dead_total} dead held"));
    }
    if unowned > 0 {
        totals.push_str(&format!("; {unowned} with no owner shown"));
    }
    totals.push_str(". OLDEST is a lower bound.");
    tail.push(totals);
    if dead_total > 0 {
        tail.push(
            "DEAD: the connection ended, the fd is still held; only close() or a restart frees it."
                .to_owned(),
        );
    }
    let one = sums
        .first()
        .map_or_else(|| "PID".to_owned(), |s| s.pid.to_string());
    tail.push(format!(
        "List the sockets: cwreap scan --sockets (all {}), or cwreap scan --pid {one}",
        rows.len()
    ));
    tail.extend(next_steps(sums.first()));

    let header: Vec<&str> = ["PID", "COMM", "CLOSE_WAIT"]
        .into_iter()
        .chain((dead_total > 0).then_some("DEAD"))
        .chain(["OLDEST", "FDS/LIMIT", "HINT", "WHERE"])
        .collect();
    let cells = |s: &ProcessSummary| -> Vec<String> {
        let (hint, pool) = hints.get(&s.pid).copied().unwrap_or((Hint::EofRead, false));
        let mut c = vec![s.pid.to_string(), s.comm.clone(), s.close_wait.to_string()];
        if dead_total > 0 {
            c.push(s.dead.to_string());
        }
        c.extend([
            human_age(s.oldest_ms),
            fd_usage(s.open_fds, s.nofile_soft),
            hint.words(pool).to_owned(),
            top_cell(&s.top),
        ]);
        c
    };
    let right = if dead_total > 0 {
        &[0, 2, 3, 4][..]
    } else {
        &[0, 2, 3][..]
    };

    // Header line, the table's header, then as many processes as the screen has room for
    // beside the tail (and, when some are left out, a line that says so); the prompt keeps
    // the last row.
    let fixed = 2
        + tail
            .iter()
            .map(|l| screen_rows(l, screen.cols))
            .sum::<usize>()
        + 1;
    let room = screen.rows.saturating_sub(fixed + 1);
    let shown = if sums.len() <= room {
        sums.len()
    } else {
        room.saturating_sub(1)
    };
    let mut rows_cells: Vec<Vec<String>> = sums[..shown].iter().map(cells).collect();
    let left_out = &sums[shown..];
    if !left_out.is_empty() {
        let n: usize = left_out.iter().map(|s| s.close_wait + s.dead).sum();
        let mut more = vec![
            "…".to_owned(),
            format!(
                "{} more process(es), {n} socket(s): cwreap scan | less",
                left_out.len()
            ),
        ];
        more.resize(header.len(), String::new());
        rows_cells.push(more);
    }
    let table = render::table(&header, &rows_cells, right);
    let table: String = table.lines().map(|l| cut(l, screen.cols) + "\n").collect();
    let levels: Vec<Option<u64>> = sums[..shown]
        .iter()
        .map(|s| render::fd_percent(s.open_fds, s.nofile_soft))
        .collect();
    let mut out = format!("{SUMMARY_HEADER}\n");
    out.push_str(&render::paint(table, color, &levels));
    out.push('\n');
    for l in tail {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// `line` cut to `cols` characters, the cut marked with `…`.
fn cut(line: &str, cols: usize) -> String {
    if line.chars().count() <= cols || cols == 0 {
        return line.to_owned();
    }
    let mut s: String = line.chars().take(cols - 1).collect();
    s.push('…');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_fit_eighty_columns() {
        for h in [SOCKETS_HEADER, SUMMARY_HEADER] {
            assert!(h.chars().count() <= 80, "{h}");
            assert!(h.contains("close()"), "{h}");
        }
    }

    #[test]
    fn long_lines_take_several_rows() {
        assert_eq!(screen_rows("a\nbb\n", 80), 2);
        assert_eq!(screen_rows(&"x".repeat(81), 80), 2);
        assert_eq!(screen_rows(&"x".repeat(160), 80), 2);
        assert_eq!(screen_rows("\n", 80), 1, "an empty line takes a row");
        let s = Screen { rows: 3, cols: 80 };
        assert!(fits("a\nb\n", s));
        assert!(!fits("a\nb\nc\n", s), "the prompt needs the last row");
    }

    #[test]
    fn cut_marks_the_cut() {
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("abc", 4), "abc");
    }

    #[test]
    fn next_steps_name_the_worst_process() {
        let s = ProcessSummary {
            pid: 4242,
            comm: "node".into(),
            close_wait: 3,
            dead: 0,
            oldest_ms: 1000,
            open_fds: 10,
            nofile_soft: Some(1024),
            top: crate::cli::plan::Top::None,
        };
        let lines = next_steps(Some(&s));
        assert!(
            lines[1]
                .trim_start()
                .starts_with("cwreap explain --pid 4242 ")
        );
        assert!(
            lines[2]
                .trim_start()
                .starts_with("cwreap reap --pid 4242 --older-than 10m --dry-run ")
        );
        assert!(next_steps(None).is_empty());
    }
}
