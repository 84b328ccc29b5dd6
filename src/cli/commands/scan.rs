//! `cwreap scan`: the read-only audit, as a table with a per-process summary, as JSON
//! lines, or as a live `--watch` view.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Result;

use cwreap_linux::kernel::Kernel;

use super::common::{
    Status, denied_note, observe, published_note, stalled_note, stdout_color, unprobed_note,
};
use crate::cli::args::ScanArgs;
use crate::cli::plan::{self, Filter, Row};
use crate::cli::render;
use crate::shared::age::AgeSource;

pub fn scan(args: &ScanArgs, out: &mut impl Write, err: &mut impl Write) -> Result<Status> {
    let mut k = super::common::cli_kernel(&args.selectors);
    let status = scan_on(&mut k, args, stdout_color(), out, err)?;
    published_note(&k, err)?;
    Ok(status)
}

/// [`scan`] on `k`, in colour or not.
pub fn scan_on<K: Kernel>(
    k: &mut K,
    args: &ScanArgs,
    color: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<Status> {
    if let Some(every) = args.watch {
        return watch(k, args, every, color, out, err);
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
        write!(out, "{}", render::scan_table(&rows, color))?;
        writeln!(out)?;
        write!(
            out,
            "{}",
            render::summary_table(&plan::summarize(&rows), color)
        )?;
        writeln!(out)?;
        let dead = rows.iter().filter(|r| r.dead()).count();
        let live = rows.len() - dead;
        if dead > 0 {
            writeln!(
                out,
                "{live} CLOSE_WAIT socket(s) and {dead} dead held socket(s) (STATE CLOSE: the connection ended, the fd is still held; only close() or a restart frees it). {}",
                age_note(&rows)
            )?;
        } else {
            writeln!(out, "{live} CLOSE_WAIT socket(s). {}", age_note(&rows))?;
        }
        let st = snap.stats;
        if st.vanished + st.denied > 0 {
            writeln!(
                out,
                "Skipped {} process(es) that exited during the scan and {} that could not be read.",
                st.vanished, st.denied
            )?;
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
    color: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<Status> {
    let filter = args.selectors.filter(args.older_than);
    let mut previous: BTreeMap<i32, (usize, usize)> = BTreeMap::new();
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
        // Home the cursor and clear, as watch(1) does.
        write!(out, "\x1b[H\x1b[2J")?;
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
            write!(out, "{}", render::watch_table(&view, color))?;
        }
        for (_, why) in &failures {
            writeln!(err, "warning: {why}")?;
        }
        out.flush()?;
        std::thread::sleep(every);
    }
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
