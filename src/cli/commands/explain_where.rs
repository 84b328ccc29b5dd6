//! `cwreap explain --where --for DUR`: attach the BPF programs of `where.bpf.o` for the
//! window, record the user stack of every TCP read that returned EOF and of every accept
//! and connect, then report the sockets still leaking at the end (CLOSE_WAIT, or dead
//! held), each with the stack that read its EOF and the one that opened it, grouped per
//! process ([`crate::cli::where_report`]). The programs keep what they record per socket
//! in the kernel, forgotten as the socket is freed, and send each stack once; the report
//! looks up the sockets it shows. The programs are detached when the command ends.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Result;

use cwreap_linux::bpf::{StackCapture, WhereCounts, WhereOptions, WhereProbe};
use cwreap_linux::kernel::Kernel;

use super::common::{Status, observe};
use crate::cli::args::ExplainArgs;
use crate::cli::diagnosis::Pattern;
use crate::cli::plan;
use crate::cli::where_report::{self, EofRead, LeakSocket, ShownFrame, WhereProcessFacts};
use crate::shared::usage::UsageError;
use crate::shared::where_capture::{self, Recorded, Seen, Trust};
use cwreap_linux::stacks;

/// How often the stacks are drained during the window.
const POLL: Duration = Duration::from_millis(100);
/// How often (at most) the stacks no kept record names any more are forgotten during the
/// window.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

pub fn explain_where<K: Kernel>(
    k: &mut K,
    args: &ExplainArgs,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<Status> {
    let kept = daemon_records();
    let Some(window) = args.window else {
        // The daemon's records alone.
        let (header, rec, counts) = kept.map_err(|why| {
            UsageError(format!(
                "explain --where needs --for DUR (a window to record in), or a daemon running \
with `where: on` beside it: {why}"
            ))
        })?;
        writeln!(
            err,
            "the stacks recorded by the daemon (pid {}, `where: on`)",
            header.pid
        )?;
        let (snap, _failures, _unprobed) = observe(k, false, &args.selectors)?;
        let mut rec = rec;
        report(k, args, &snap, &mut rec, None, out, err)?;
        counts_note("the daemon", &counts, err)?;
        return Ok(Status::Ok);
    };
    let opts = WhereOptions {
        pids: args
            .selectors
            .pids
            .iter()
            .filter_map(|p| u32::try_from(*p).ok())
            .collect(),
        ..WhereOptions::default()
    };
    let mut probe = WhereProbe::load(&opts).map_err(|e| {
        UsageError(format!(
            "explain --where cannot record stacks here: {e}. It needs Linux 6.3 or later \
with BTF (/sys/kernel/btf/vmlinux), and CAP_BPF with CAP_PERFMON (or root)"
        ))
    })?;
    // Also with --json: on stderr, it tells a caller the programs are attached.
    writeln!(
        err,
        "recording EOF reads, accepts and connects for {}...",
        humantime::format_duration(window)
    )?;
    err.flush()?;
    // What a daemon with `where: on` recorded before the window, under what the window
    // records.
    let (mut rec, daemon_counts) = match kept {
        Ok((_, rec, counts)) => (rec, Some(counts)),
        Err(_) => (Recorded::default(), None),
    };
    let mut trust = Trust::default();
    let mut buf = Vec::new();
    let end = Instant::now() + window;
    let mut last_prune = Instant::now();
    let mut prune_gap = PRUNE_EVERY;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        probe.wait(left.min(POLL))?;
        rec.take(&mut probe, &mut trust, &mut buf);
        if last_prune.elapsed() > prune_gap {
            let t = Instant::now();
            rec.prune_against(&mut probe);
            prune_gap = where_capture::read_gap(PRUNE_EVERY, t.elapsed());
            last_prune = Instant::now();
        }
        if left.is_zero() {
            break;
        }
    }
    let counts = probe.counts()?;
    // The sockets as they are now, the programs still attached so that nothing closing
    // meanwhile goes unseen; the report looks them up; then the programs are detached.
    let (snap, _failures, _unprobed) = observe(k, false, &args.selectors)?;
    rec.take(&mut probe, &mut trust, &mut buf);
    report(k, args, &snap, &mut rec, Some(&probe), out, err)?;
    drop(probe);
    counts_note("this window", &counts, err)?;
    if let Some(c) = daemon_counts {
        counts_note("the daemon (`where: on`)", &c, err)?;
    }
    Ok(Status::Ok)
}

/// What a daemon with `where: on` recorded, if one lives beside this command; why not.
fn daemon_records()
-> std::result::Result<(cwreap_linux::published::Header, Recorded, WhereCounts), String> {
    let proc = cwreap_linux::procfs::ProcFs::default();
    let now = cwreap_linux::kernel::Clock::now(&cwreap_linux::kernel::SystemClock);
    let dir = cwreap_linux::published::run_dir();
    let (header, body) =
        cwreap_linux::published::read_where(&dir, &proc, now).map_err(|e| e.to_string())?;
    let (rec, counts) = Recorded::from_bytes(&body)
        .map_err(|why| format!("{}/where is malformed: {why}", dir.display()))?;
    Ok((header, rec, counts))
}

/// The report of the sockets of `snap` still leaking, with the stacks `rec` has of them,
/// each looked up first in what `probe`'s programs keep (the window's records, over the
/// daemon's).
fn report<K: Kernel>(
    k: &mut K,
    args: &ExplainArgs,
    snap: &crate::shared::attribute::Snapshot<K::Process>,
    rec: &mut Recorded,
    probe: Option<&WhereProbe>,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<()> {
    let filter = args.selectors.filter(args.older_than);
    let rows = plan::select(snap, &filter);
    let cookies: HashMap<(i32, u64), u64> = rows
        .iter()
        .filter_map(|r| {
            r.process
                .map(|p| ((p.pid, r.socket.diag.inode), r.socket.diag.cookie))
        })
        .collect();
    let (sockets, processes) = super::explain::evidence(&*k, &rows, err)?;
    let mut symbols = stacks::Symbolizer::new();
    let mut leaks = Vec::with_capacity(sockets.len());
    let mut facts = Vec::with_capacity(processes.len());
    let mut shown: HashMap<u64, Vec<ShownFrame>> = HashMap::new();
    for p in &processes {
        facts.push(WhereProcessFacts {
            pid: p.pid,
            comm: p.comm.clone(),
            runtime: p.runtime.runtime,
            runtime_note: u32::try_from(p.pid)
                .ok()
                .and_then(stacks::runtime_frames_note),
        });
    }
    let runtimes: HashMap<i32, _> = processes
        .iter()
        .map(|p| (p.pid, p.runtime.runtime))
        .collect();
    for s in &sockets {
        let Some(&cookie) = cookies.get(&(s.pid, s.inode)) else {
            continue;
        };
        let runtime = runtimes
            .get(&s.pid)
            .copied()
            .unwrap_or(crate::cli::diagnosis::Runtime::Unknown);
        let pattern = Pattern::of(s.evidence, runtime);
        let pid = u32::try_from(s.pid).unwrap_or_default();
        let fd_key =
            s.fd.and_then(|fd| Some((u32::try_from(s.pid).ok()?, u32::try_from(fd).ok()?)));
        if let Some(probe) = probe {
            rec.look_up(probe, cookie, fd_key);
        }
        let mut stack_of = |seen: &Seen| -> Option<Vec<ShownFrame>> {
            let id = seen.capture?;
            if let Some(f) = shown.get(&id) {
                return Some(f.clone());
            }
            let frames = best_stack(&mut symbols, pid, rec.captures.get(&id)?);
            shown.insert(id, frames.clone());
            Some(frames)
        };
        let eof_seen = rec.eof.get(&cookie).copied();
        let eof = match eof_seen {
            Some(seen) => match stack_of(&seen) {
                Some(f) => EofRead::Seen(f),
                None => EofRead::Unkept,
            },
            None if s.evidence.recv_q > 0 => EofRead::Unread,
            None => EofRead::BeforeWindow,
        };
        let opened = match rec.connect.get(&cookie).copied() {
            Some(seen) => stack_of(&seen),
            None => {
                fd_key
                    .and_then(|key| rec.accept.get(&key).copied())
                    // The accept of an fd number before this socket's EOF; a later one is of
                    // another socket that reused the number.
                    .filter(|a| eof_seen.is_none_or(|e| a.ts_ns <= e.ts_ns))
                    .and_then(|seen| stack_of(&seen))
            }
        };
        leaks.push(LeakSocket {
            pid: s.pid,
            pattern,
            eof,
            opened,
        });
    }
    let reports = where_report::report(&leaks, &facts);
    if args.json {
        for r in &reports {
            serde_json::to_writer(&mut *out, r)?;
            out.write_all(b"\n")?;
        }
    } else if reports.is_empty() {
        writeln!(
            out,
            "No process holds CLOSE_WAIT or dead held sockets{} at the end of the window.",
            if filter.narrowed() {
                " that match the selection"
            } else {
                ""
            }
        )?;
    } else {
        write!(out, "{}", where_report::render(&reports))?;
    }
    Ok(())
}

/// What the programs could not keep, said, never silent.
fn counts_note(whose: &str, c: &WhereCounts, err: &mut impl Write) -> Result<()> {
    writeln!(
        err,
        "{whose}: {} stack(s) recorded, and {} EOF read(s), accept(s) and connect(s) at a \
stack recorded before",
        c.full, c.short
    )?;
    if c.lost > 0 {
        writeln!(
            err,
            "warning: {} stack(s) lost: the ring buffer was full (their sockets show as \
'stack lost')",
            c.lost
        )?;
    }
    if c.seen_full > 0 {
        writeln!(
            err,
            "note: {} stack(s) sent again: the map of stacks already sent was full",
            c.seen_full
        )?;
    }
    if c.socks_full > 0 {
        writeln!(
            err,
            "warning: {} EOF read(s) and connect(s) not kept: the map of open sockets was \
full (their sockets show as 'EOF before the window')",
            c.socks_full
        )?;
    }
    if c.accepts_full > 0 {
        writeln!(
            err,
            "warning: {} accept(s) not kept: the map of accepted fds was full (their \
sockets show no open stack)",
            c.accepts_full
        )?;
    }
    if c.no_stack > 0 {
        writeln!(
            err,
            "note: {} stack(s) without stack bytes (the stack could not be read): frame \
pointers only",
            c.no_stack
        )?;
    }
    if c.malformed > 0 {
        writeln!(err, "warning: {} record(s) did not parse", c.malformed)?;
    }
    Ok(())
}

/// Symbolize `addrs` (innermost first; each looked up one byte back, in the call
/// instruction). Returns the frames and how many leading addresses named a function.
fn symbolize(
    symbols: &mut stacks::Symbolizer,
    pid: u32,
    addrs: &[u64],
) -> (Vec<ShownFrame>, usize) {
    let per_addr = symbols.symbolize(pid, addrs);
    let mut frames = Vec::new();
    let mut valid = 0;
    let mut broken = false;
    for (i, group) in per_addr.iter().enumerate() {
        let named = group.iter().any(|f| f.function.is_some());
        if !named {
            broken = true;
        }
        if !broken {
            valid = i + 1;
        }
        frames.extend(group.iter().map(|f| ShownFrame {
            function: f.function.clone(),
            file: f.file.clone(),
            line: f.line,
            module: f.module.clone(),
            library: stacks::is_library_frame(f),
        }));
    }
    (frames, valid)
}

/// The deeper valid stack of the two methods: frame pointers (with the direct caller of a
/// libc wrapper, which they skip, read at the stack pointer) and CFI.
fn best_stack(symbols: &mut stacks::Symbolizer, pid: u32, c: &StackCapture) -> Vec<ShownFrame> {
    let mut fp = c.frames.clone();
    if let (Some(bytes), Some(&first)) = (c.stack.get(..8), fp.first()) {
        let mut w = [0u8; 8];
        w.copy_from_slice(bytes);
        let at_sp = u64::from_le_bytes(w);
        if at_sp != first && !fp.contains(&at_sp) {
            let (_, named) = symbolize(symbols, pid, &[first, at_sp]);
            if named == 2 {
                fp.insert(1, at_sp);
            }
        }
    }
    let (fp_frames, fp_valid) = symbolize(symbols, pid, &fp);
    let regs = stacks::UserRegs {
        ip: c.ip,
        sp: c.sp,
        bp: c.bp,
    };
    match stacks::unwind_cfi(pid, &regs, &c.stack) {
        Ok(addrs) if !addrs.is_empty() => {
            let (cfi_frames, cfi_valid) = symbolize(symbols, pid, &addrs);
            if cfi_valid > fp_valid {
                cfi_frames
            } else {
                fp_frames
            }
        }
        _ => fp_frames,
    }
}
