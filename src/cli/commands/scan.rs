//! `cwreap scan`: the read-only audit, as a table with a per-process summary, as JSON
//! lines, or as a live `--watch` view.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;

use anyhow::Result;

use cwreap_linux::kernel::Kernel;

use super::common::{
    Status, denied_note, observe, published_note, stalled_note, stdout_color, unprobed_note,
};
use crate::cli::args::ScanArgs;
use crate::cli::first_screen::{self, Output, Screen};
use crate::cli::plan::{self, Filter, Row};
use crate::cli::render;
use crate::shared::age::AgeSource;
use crate::shared::attribute::WalkStats;

pub fn scan(args: &ScanArgs, out: &mut impl Write, err: &mut impl Write) -> Result<Status> {
    let mut k = super::common::cli_kernel(&args.selectors);
    let screen = cwreap_linux::terminal::size(std::io::stdout()).map(|s| Screen {
        rows: s.rows.into(),
        cols: s.cols.into(),
    });
    let output = Output {
        color: stdout_color(),
        screen,
    };
    let status = scan_to(&mut k, args, output, out, err)?;
    published_note(&k, err)?;
    Ok(status)
}

/// [`scan`] on `k`, in colour or not, to a pipe.
#[cfg(test)]
pub fn scan_on<K: Kernel>(
    k: &mut K,
    args: &ScanArgs,
    color: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<Status> {
    scan_to(k, args, Output::plain(color), out, err)
}

/// [`scan`] on `k`, to `output`: a terminal of some size, or a pipe.
pub fn scan_to<K: Kernel>(
    k: &mut K,
    args: &ScanArgs,
    output: Output,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<Status> {
    if let Some(every) = args.watch {
        return watch(k, args, every, output, out, err);
    }
    let (snap, failures, unprobed) = observe(k, false, &args.selectors)?;
    for note in [unprobed_note(&unprobed), stalled_note(&snap.stalled)]
        .into_iter()
        .flatten()
    {
        writeln!(err, "{note}")?;
    }
    for (_, why) in &failures {
        writeln!(err, "warning: {why}")?;
    }
    let filter = args.selectors.filter(args.older_than);
    let rows = plan::select(&snap, &filter);
    if args.json {
        for r in &rows {
            render::write_scan_json(out, r)?;
        }
    } else if rows.is_empty() {
        writeln!(out, "{}", empty_message(&filter, snap.stats.inspected))?;
    } else {
        let sums = plan::summarize(&rows);
        match output.screen {
            // A pipe or a file: exactly the plain report, which scripts parse.
            None => write!(out, "{}", report(&rows, &sums, snap.stats, output.color))?,
            Some(screen) => {
                let plain = report(&rows, &sums, snap.stats, false);
                let whole = first_screen::full(&plain, &sums);
                let named = !args.selectors.pids.is_empty() || !args.selectors.pid_files.is_empty();
                if args.sockets || named || first_screen::fits(&whole, screen) {
                    let report = report(&rows, &sums, snap.stats, output.color);
                    write!(out, "{}", first_screen::full(&report, &sums))?;
                } else {
                    write!(
                        out,
                        "{}",
                        first_screen::summary(&rows, &sums, screen, output.color)
                    )?;
                }
            }
        }
    }
    if let Some(note) = denied_note(snap.stats.denied) {
        writeln!(err, "{note}")?;
    }
    Ok(Status::Ok)
}

/// `scan --watch`: the per-process view, redrawn every `every` like watch(1), with how
/// each process moved since the previous refresh. Runs until interrupted.
fn watch<K: Kernel>(
    k: &mut K,
    args: &ScanArgs,
    every: std::time::Duration,
    output: Output,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<Status> {
    let filter = args.selectors.filter(args.older_than);
    let mut previous: BTreeMap<i32, (usize, usize)> = BTreeMap::new();
    let mut first_refresh = true;
    loop {
        let (snap, failures, _unprobed) = observe(k, false, &args.selectors)?;
        let rows = plan::select(&snap, &filter);
        let sums = plan::summarize(&rows);
        let view: Vec<render::WatchRow> = sums
            .iter()
            .map(|s| {
                let before = previous.get(&s.pid);
                render::WatchRow {
                    summary: s.clone(),
                    close_wait_delta: before.map(|(cw, _)| s.close_wait as i64 - *cw as i64),
                    fds_delta: before.map(|(_, fds)| s.open_fds as i64 - *fds as i64),
                }
            })
            .collect();
        previous = sums
            .iter()
            .map(|s| (s.pid, (s.close_wait, s.open_fds)))
            .collect();
        if output.screen.is_some() {
            // Home the cursor and clear, as watch(1) does.
            write!(out, "\x1b[H\x1b[2J")?;
        } else if !first_refresh {
            // A pipe or a file gets no terminal escapes: one refresh after the other.
            writeln!(out)?;
        }
        first_refresh = false;
        writeln!(
            out,
            "cwreap scan --watch {}    {} CLOSE_WAIT socket(s) in {} process(es)    Ctrl-C to quit",
            humantime::format_duration(every),
            rows.len(),
            sums.len()
        )?;
        writeln!(out)?;
        if view.is_empty() {
            writeln!(out, "{}", empty_message(&filter, snap.stats.inspected))?;
        } else {
            write!(out, "{}", render::watch_table(&view, output.color))?;
        }
        for (_, why) in &failures {
            writeln!(err, "warning: {why}")?;
        }
        out.flush()?;
        std::thread::sleep(every);
    }
}

/// The plain report: every socket, the per-process summary, the totals and what AGE means.
fn report<H>(
    rows: &[Row<'_, H>],
    sums: &[plan::ProcessSummary],
    st: WalkStats,
    color: bool,
) -> String {
    let mut out = String::new();
    out.push_str(&render::scan_table(rows, color));
    out.push('\n');
    out.push_str(&render::summary_table(sums, color));
    out.push('\n');
    let dead = rows.iter().filter(|r| r.dead()).count();
    let live = rows.len() - dead;
    if dead > 0 {
        let _ = writeln!(
            out,
            "{live} CLOSE_WAIT socket(s) and {dead} dead held socket(s) (STATE CLOSE: the connection ended, the fd is still held; only close() or a restart frees it). {}",
            age_note(rows)
        );
    } else {
        let _ = writeln!(out, "{live} CLOSE_WAIT socket(s). {}", age_note(rows));
    }
    if st.vanished + st.denied > 0 {
        let _ = writeln!(
            out,
            "Skipped {} process(es) that exited during the scan and {} that could not be read.",
            st.vanished, st.denied
        );
    }
    out
}

fn empty_message(filter: &Filter, inspected: usize) -> String {
    let narrowed = filter.narrowed();
    let mut msg = String::from("No CLOSE_WAIT sockets");
    if narrowed {
        msg.push_str(" match the selection");
    } else {
        msg.push_str(" on this host (network namespace)");
    }
    if inspected > 0 {
        msg.push_str(&format!(" ({inspected} process(es) inspected)"));
    }
    msg.push('.');
    msg
}

/// What the AGE column means for these rows: exact, or a lower bound (with its source) and,
/// where shown, an upper bound; what a `*` says; how to get exact ages.
fn age_note<H>(rows: &[Row<'_, H>]) -> String {
    let mut sources: Vec<AgeSource> = rows.iter().map(|r| r.age.source).collect();
    sources.sort_unstable();
    sources.dedup();
    let mut note = match sources.as_slice() {
        [AgeSource::Event] => "AGE is exact: the kernel's state change.".to_owned(),
        _ if sources.contains(&AgeSource::LastAck) => "AGE is a lower bound: time since the peer's last ACK (≥); ≤ is an upper bound, the time since data last arrived.".to_owned(),
        _ => "AGE is a lower bound: time since the daemon first saw it in CLOSE_WAIT (≥); ≤ is an upper bound.".to_owned(),
    };
    if rows.iter().any(|r| r.age.keepalive && !r.age.exact()) {
        note.push_str(
            " *: keepalive is armed, and the peer's answers to probes reset the lower bound.",
        );
    }
    note
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use cwreap_linux::kernel::fake::{FakeKernel, Process};

    use super::*;
    use crate::cli::args::{Cli, Command};

    fn args(argv: &[&str]) -> ScanArgs {
        let mut all = vec!["cwreap", "scan"];
        all.extend_from_slice(argv);
        match Cli::try_parse_from(all).expect("valid").command {
            Command::Scan(a) => a,
            _ => panic!("not scan"),
        }
    }

    /// Three servers holding 30, 20 and 10 CLOSE_WAIT sockets; the first also one dead
    /// held socket when `dead`.
    fn host(dead: bool) -> FakeKernel {
        let k = FakeKernel::new();
        for (i, (pid, n)) in [(501, 30), (502, 20), (503, 10)].into_iter().enumerate() {
            let local = format!("10.0.0.{}:8080", i + 1);
            k.spawn(Process::new(pid, &format!("srv{i}")).limits(1024, 4096));
            k.listener(pid, 3, &local);
            k.close_wait_many(pid, 10, n, &local);
        }
        if dead {
            k.dead(501, 900, "10.0.0.1:8080");
        }
        k
    }

    fn run(k: &mut FakeKernel, argv: &[&str], output: Output) -> String {
        let mut out = Vec::new();
        scan_to(k, &args(argv), output, &mut out, &mut Vec::new()).expect("scan");
        String::from_utf8(out).expect("utf-8")
    }

    /// Lines of a socket table (STATE is its eighth column).
    fn socket_rows(text: &str) -> usize {
        text.lines()
            .filter(|l| l.split_whitespace().nth(7) == Some("CLOSE_WAIT"))
            .count()
    }

    const SCREEN: Screen = Screen {
        rows: 24,
        cols: 100,
    };

    fn terminal() -> Output {
        Output {
            color: false,
            screen: Some(SCREEN),
        }
    }

    #[test]
    fn a_pipe_gets_every_socket_and_nothing_else() {
        let text = run(&mut host(false), &[], Output::plain(false));
        let socket_rows = socket_rows(&text);
        assert_eq!(socket_rows, 60, "{text}");
        assert!(!text.contains(first_screen::SOCKETS_HEADER), "{text}");
        assert!(!text.contains(first_screen::SUMMARY_HEADER), "{text}");
        assert!(!text.contains("cwreap explain"), "{text}");
        assert!(
            text.lines()
                .next()
                .is_some_and(|l| l.trim_start().starts_with("PID"))
        );
    }

    #[test]
    fn a_terminal_gets_one_screen_of_processes_and_what_to_run_next() {
        let text = run(&mut host(false), &[], terminal());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() < SCREEN.rows, "{} lines:\n{text}", lines.len());
        assert!(
            lines.iter().all(|l| l.chars().count() <= SCREEN.cols),
            "{text}"
        );
        assert_eq!(lines[0], first_screen::SUMMARY_HEADER);
        assert!(
            lines[1].split_whitespace().eq([
                "PID",
                "COMM",
                "CLOSE_WAIT",
                "OLDEST",
                "FDS/LIMIT",
                "HINT",
                "WHERE"
            ]),
            "no DEAD column without dead sockets: {}",
            lines[1]
        );
        // Worst first, every process, no socket row.
        let pids: Vec<&str> = lines[2..5]
            .iter()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(pids, ["501", "502", "503"], "{text}");
        assert!(lines[2].split_whitespace().nth(2) == Some("30"), "{text}");
        assert_eq!(socket_rows(&text), 0, "no socket rows:\n{text}");
        assert!(
            text.contains("60 CLOSE_WAIT socket(s) in 3 process(es)"),
            "{text}"
        );
        assert!(
            text.contains("cwreap scan --sockets (all 60), or cwreap scan --pid 501"),
            "{text}"
        );
        assert!(text.contains("cwreap explain --pid 501 "), "{text}");
        assert!(
            text.contains("cwreap reap --pid 501 --older-than 10m --dry-run "),
            "{text}"
        );
        assert!(!text.contains('\x1b'), "no colour asked: {text}");
    }

    #[test]
    fn dead_sockets_get_a_column_and_a_line() {
        let text = run(&mut host(true), &[], terminal());
        let header = text.lines().nth(1).unwrap_or_default();
        assert!(header.split_whitespace().any(|c| c == "DEAD"), "{text}");
        let row = text.lines().nth(2).unwrap_or_default();
        assert_eq!(
            row.split_whitespace().take(4).collect::<Vec<_>>(),
            ["501", "srv0", "30", "1"]
        );
        assert!(text.contains("and 1 dead held"), "{text}");
        assert!(text.contains("DEAD: the connection ended"), "{text}");
    }

    #[test]
    fn sockets_or_a_pid_list_every_socket_with_the_header_and_next_steps() {
        for argv in [&["--sockets"][..], &["--pid", "501"][..]] {
            let text = run(&mut host(false), argv, terminal());
            let want = if argv[0] == "--pid" { 30 } else { 60 };
            let socket_rows = socket_rows(&text);
            assert_eq!(socket_rows, want, "{argv:?}:\n{text}");
            assert_eq!(
                text.lines().next(),
                Some(first_screen::SOCKETS_HEADER),
                "{text}"
            );
            assert!(text.contains("cwreap explain --pid 501 "), "{text}");
        }
    }

    #[test]
    fn a_list_that_fits_is_printed_whole() {
        let k = FakeKernel::new();
        k.spawn(Process::new(501, "srv"));
        k.listener(501, 3, "10.0.0.1:8080");
        k.close_wait_many(501, 10, 2, "10.0.0.1:8080");
        let mut k = k;
        let plain = run(&mut k, &[], Output::plain(false));
        let text = run(&mut k, &[], terminal());
        assert!(
            text.starts_with(&format!("{}\n{plain}", first_screen::SOCKETS_HEADER)),
            "{text}"
        );
        assert!(text.ends_with("what a reap would do\n"), "{text}");
        let next = text[first_screen::SOCKETS_HEADER.len() + 1 + plain.len()..]
            .lines()
            .count();
        assert_eq!(
            next, 3,
            "the plain report, then the three lines of next steps:\n{text}"
        );
    }

    #[test]
    fn a_screen_too_small_for_every_process_says_how_many_are_left_out() {
        let k = FakeKernel::new();
        for pid in 600..640 {
            let local = format!("10.0.1.{}:80", pid - 599);
            k.spawn(Process::new(pid, "w"));
            k.listener(pid, 3, &local);
            k.close_wait_many(pid, 10, 2, &local);
        }
        let mut k = k;
        let text = run(&mut k, &[], terminal());
        let lines = text.lines().count();
        assert!(lines < SCREEN.rows, "{lines} lines:\n{text}");
        let more = text
            .lines()
            .find(|l| l.contains("more process(es)"))
            .unwrap_or_else(|| panic!("no line for the processes left out:\n{text}"));
        let shown = text
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("w"))
            .count();
        let left: usize = more
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("{more}"));
        assert_eq!(shown + left, 40, "{text}");
    }

    #[test]
    fn colour_only_where_asked() {
        let text = run(
            &mut host(false),
            &[],
            Output {
                color: true,
                screen: Some(SCREEN),
            },
        );
        assert!(text.contains("\x1b[1m"), "the table header is bold: {text}");
        assert!(text.lines().count() < SCREEN.rows);
    }
}
