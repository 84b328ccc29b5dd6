//! `cwreap explain`: sample the selected CLOSE_WAIT sockets (once, or once a second for
//! `--for`), read which of them an epoll instance of their owner still watches, and print
//! the diagnosis [`crate::cli::diagnosis`] makes of it. Read-only like `scan`: it never duplicates
//! a socket and never stops a process; it needs the same privilege.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Result;

use cwreap_linux::kernel::{Kernel, ProcRead};

use super::common::{Status, denied_note, observe, published_note, stalled_note, unprobed_note};
use crate::cli::args::ExplainArgs;
use crate::cli::diagnosis::{self, Evidence, ProcessFacts, Sample, Socket, runtime};
use crate::cli::plan::{self, Row};
use crate::shared::attribute::{Direction, Snapshot};

/// Time between two samples of `--for`.
const EVERY: Duration = Duration::from_secs(1);

pub fn explain(args: &ExplainArgs, out: &mut impl Write, err: &mut impl Write) -> Result<Status> {
    let mut k = super::common::cli_kernel(&args.selectors);
    let status = explain_on(&mut k, args, out, err)?;
    published_note(&k, err)?;
    Ok(status)
}

/// [`explain`] on `k`.
pub fn explain_on<K: Kernel>(
    k: &mut K,
    args: &ExplainArgs,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<Status> {
    let filter = args.selectors.filter(None);
    let offsets = sample_offsets(args.window);
    if offsets.len() > 1 && !args.json {
        writeln!(
            err,
            "sampling for {} ({} samples)...",
            humantime::format_duration(args.window.unwrap_or_default()),
            offsets.len()
        )?;
    }
    let start = Instant::now();
    let mut samples: Vec<Sample> = Vec::with_capacity(offsets.len());
    let mut last = None;
    let mut warned = BTreeSet::new();
    for (i, offset) in offsets.iter().enumerate() {
        if let Some(wait) = offset.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let at = start.elapsed();
        let (snap, failures, unprobed) = match observe(k, false, &args.selectors) {
            Ok(v) => v,
            // The first look decides the exit code, as for scan; a later one that fails
            // (a --pid process exited) ends the window early.
            Err(e) if i == 0 => return Err(e),
            Err(e) => {
                writeln!(
                    err,
                    "warning: sampling stopped after {} sample(s): {e:#}",
                    samples.len()
                )?;
                break;
            }
        };
        for note in [unprobed_note(&unprobed), stalled_note(&snap.stalled)]
            .into_iter()
            .flatten()
        {
            if warned.insert(note.clone()) {
                writeln!(err, "{note}")?;
            }
        }
        for (_, why) in failures {
            if warned.insert(why.clone()) {
                writeln!(err, "warning: {why}")?;
            }
        }
        samples.push(sample(at, &snap, &plan::select(&snap, &filter)));
        last = Some(snap);
    }
    let Some(snap) = last else {
        return Ok(Status::Ok);
    };
    let rows = plan::select(&snap, &filter);
    let (sockets, processes) = evidence(&*k, &rows, err)?;
    let reports = diagnosis::explain(&sockets, &processes, &diagnosis::trends(&samples));
    if args.json {
        for r in &reports {
            serde_json::to_writer(&mut *out, r)?;
            out.write_all(b"\n")?;
        }
    } else if reports.is_empty() {
        let narrowed = filter.narrowed();
        writeln!(
            out,
            "No process holds CLOSE_WAIT sockets{}.",
            if narrowed {
                " that match the selection"
            } else {
                " on this host (network namespace)"
            }
        )?;
    } else {
        write!(out, "{}", diagnosis::render(&reports))?;
    }
    let unowned = rows.iter().filter(|r| r.process.is_none()).count();
    if unowned > 0 && !filter.selects_processes() {
        writeln!(
            err,
            "note: {unowned} CLOSE_WAIT socket(s) have no owner that could be read; they are \
not explained."
        )?;
    }
    if let Some(note) = denied_note(snap.stats.denied) {
        writeln!(err, "{note}")?;
    }
    Ok(Status::Ok)
}

/// When to sample, from the start: once without a window; else every [`EVERY`] and once
/// more at its end.
fn sample_offsets(window: Option<Duration>) -> Vec<Duration> {
    let Some(w) = window.filter(|w| !w.is_zero()) else {
        return vec![Duration::ZERO];
    };
    let mut out = Vec::new();
    let mut t = Duration::ZERO;
    while t < w {
        out.push(t);
        t += EVERY;
    }
    out.push(w);
    out
}

/// What the rate and the forecast need of one look: socket identities with their owner,
/// and the open fds of every process attribution read.
fn sample<H>(at: Duration, snap: &Snapshot<H>, rows: &[Row<'_, H>]) -> Sample {
    Sample {
        at,
        sockets: rows
            .iter()
            .map(|r| {
                let d = &r.socket.diag;
                ((d.netns, d.cookie), r.process.map(|p| p.pid))
            })
            .collect(),
        open_fds: snap
            .processes
            .values()
            .map(|p| (p.pid, p.open_fds))
            .collect(),
    }
}

/// The evidence of each socket of the last sample, and the facts of its owners. A process
/// whose epoll instances cannot be read (it exited meanwhile) is left out, with a warning.
pub(super) fn evidence<H>(
    proc: &impl ProcRead,
    rows: &[Row<'_, H>],
    err: &mut impl Write,
) -> Result<(Vec<Socket>, Vec<ProcessFacts>)> {
    // Epoll sets only of the processes that hold an accepted CLOSE_WAIT socket: one read
    // of fdinfo per epoll fd, and nothing for the rest of the host.
    let mut watched: HashMap<i32, Vec<u64>> = HashMap::new();
    let mut gone = BTreeSet::new();
    let holders: BTreeMap<i32, &[i32]> = rows
        .iter()
        .filter(|r| !r.unaccepted)
        .filter_map(|r| r.process.map(|p| (p.pid, p.epoll_fds.as_slice())))
        .collect();
    for (pid, epoll_fds) in holders {
        match proc.epoll_watched(pid, epoll_fds) {
            Ok(inodes) => {
                watched.insert(pid, inodes);
            }
            Err(e) => {
                writeln!(
                    err,
                    "warning: pid {pid}: its epoll instances could not be read ({e}); left out"
                )?;
                gone.insert(pid);
            }
        }
    }
    let mut processes: BTreeMap<i32, ProcessFacts> = BTreeMap::new();
    let mut sockets = Vec::with_capacity(rows.len());
    for r in rows {
        let (Some(holder), Some(p)) = (r.holder, r.process) else {
            continue;
        };
        if gone.contains(&p.pid) {
            continue;
        }
        let inode = r.socket.diag.inode;
        // Registered in an epoll of the process it is shown under, or of another holder
        // whose epolls were read (after fork both may have it).
        let is_watched = !r.unaccepted
            && r.socket.holders.iter().any(|h| {
                watched
                    .get(&h.pid)
                    .is_some_and(|set| set.binary_search(&inode).is_ok())
            });
        sockets.push(Socket {
            pid: p.pid,
            fd: (!r.unaccepted).then_some(holder.fd),
            inode,
            local: r.socket.diag.local,
            remote: r.socket.diag.remote,
            evidence: Evidence {
                recv_q: r.socket.diag.recv_q,
                watched: is_watched,
                unaccepted: r.unaccepted,
                dead: r.dead(),
                outgoing: r.socket.direction == Direction::Out,
            },
            age_min_ms: r.age.min_ms,
        });
        processes.entry(p.pid).or_insert_with(|| {
            // Once per process: its map and a JVM's perf data, each under a deadline.
            let (runtime, full_gc) = runtime_of(proc, p.pid);
            ProcessFacts {
                pid: p.pid,
                comm: p.comm.clone(),
                open_fds: p.open_fds,
                fd_limit: p.nofile_soft,
                runtime,
                full_gc,
            }
        });
    }
    Ok((sockets, processes.into_values().collect()))
}

/// The runtime `pid` runs, and for a JVM its full collections. Each read has a deadline: a
/// process whose map does not come back in time (its mmap lock held) is `unknown`.
fn runtime_of(
    proc: &impl ProcRead,
    pid: i32,
) -> (diagnosis::Identified, Option<diagnosis::FullGc>) {
    let id = match proc.runtime_clues(pid) {
        Ok(clues) => runtime::identify(&clues),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            runtime::unknown("its memory map could not be read in time")
        }
        Err(e) => runtime::unknown(format!("its memory map could not be read: {e}")),
    };
    let full_gc = (id.runtime == diagnosis::Runtime::Jvm)
        .then(|| proc.jvm_gc(pid).ok().flatten())
        .flatten()
        .and_then(|gc| runtime::full_gc(&gc));
    (id, full_gc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_every_second_and_at_the_end() {
        let s = Duration::from_secs;
        assert_eq!(sample_offsets(None), vec![s(0)]);
        assert_eq!(sample_offsets(Some(s(0))), vec![s(0)]);
        assert_eq!(sample_offsets(Some(s(2))), vec![s(0), s(1), s(2)]);
        assert_eq!(
            sample_offsets(Some(Duration::from_millis(1500))),
            vec![s(0), s(1), Duration::from_millis(1500)]
        );
        assert_eq!(
            sample_offsets(Some(Duration::from_millis(300))),
            vec![s(0), Duration::from_millis(300)]
        );
    }
}
