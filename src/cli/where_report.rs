//! `cwreap explain --where`, the pure part: the leaking sockets of each process grouped by
//! the stack of the read that returned their EOF, library frames folded so the first frame
//! shown is the application's, with the pattern `explain` gives each socket and what the
//! stack means where the premise does not hold (event loops, Go net/http's background
//! read). No I/O: `commands::explain_where` records, symbolizes and hands over plain values.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::cli::diagnosis::advice::advice;
use crate::cli::diagnosis::{Pattern, Runtime};

/// Frames shown per stack after folding.
pub const SHOWN_FRAMES: usize = 5;

/// One symbolized frame.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ShownFrame {
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// The binary or library (its path), or `[unknown]`.
    pub module: String,
    /// A frame of a library or runtime (libc, ld.so, Go's netpoll, libuv, ...).
    #[serde(skip)]
    pub library: bool,
}

impl ShownFrame {
    /// `function (file:line)`, `function (module)` without a line, `0x… (module)` without
    /// a name.
    pub fn text(&self) -> String {
        let name = self.function.as_deref().unwrap_or("??");
        match (&self.file, self.line) {
            (Some(f), Some(l)) => format!("{name} ({f}:{l})"),
            (Some(f), None) => format!("{name} ({f})"),
            _ => format!("{name} ({})", self.module),
        }
    }
}

/// What is known of the read that returned a socket's EOF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EofRead {
    /// Seen in the window, with its stack (innermost first).
    Seen(Vec<ShownFrame>),
    /// Seen in the window, its stack not kept (the ring buffer was full, ...).
    Unkept,
    /// Not seen: the EOF was read before the window opened.
    BeforeWindow,
    /// The FIN is still unread (recv_q ≥ 1): no read has returned the EOF.
    Unread,
}

/// One leaking socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakSocket {
    pub pid: i32,
    pub pattern: Pattern,
    pub eof: EofRead,
    /// The stack of the accept or connect that opened it, when seen in the window.
    pub opened: Option<Vec<ShownFrame>>,
}

/// One process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhereProcessFacts {
    pub pid: i32,
    pub comm: String,
    pub runtime: Runtime,
    /// Why the runtime's frames are missing, and what would give them (Python < 3.12, ...).
    pub runtime_note: Option<String>,
}

/// The sockets of one process whose EOF was read by the same stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WhereGroup {
    pub count: usize,
    pub pattern: &'static str,
    /// Top frames of the EOF read, library frames folded.
    pub eof_read: Vec<ShownFrame>,
    /// Top frames of the open (accept or connect) most of these sockets had, if seen.
    pub opened: Vec<ShownFrame>,
    /// What the stack means: the pattern's advice, and where the reader is a loop, that it is.
    pub advice: String,
}

/// Sockets of a process without an EOF-read stack, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NoStack {
    /// "EOF before the window: no stack".
    pub eof_before_window: usize,
    /// The FIN was never read.
    pub eof_unread: usize,
    /// Seen, but its stack was not kept.
    pub unkept: usize,
}

/// The report of one process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WhereReport {
    pub pid: i32,
    pub comm: String,
    pub runtime: Runtime,
    pub sockets: usize,
    #[serde(rename = "where")]
    pub groups: Vec<WhereGroup>,
    pub no_stack: NoStack,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_note: Option<String>,
}

/// The frames to show: leading library frames folded, then at most [`SHOWN_FRAMES`]. A
/// stack of library frames only is shown as it is.
pub fn fold(frames: &[ShownFrame]) -> Vec<ShownFrame> {
    let first_app = frames.iter().position(|f| !f.library).unwrap_or(0);
    frames
        .iter()
        .skip(first_app)
        .take(SHOWN_FRAMES)
        .cloned()
        .collect()
}

/// Where a loop, not the handler, read the EOF: what that means, from any frame's name.
pub fn loop_note(frames: &[ShownFrame]) -> Option<&'static str> {
    let names = || frames.iter().filter_map(|f| f.function.as_deref());
    if names().any(|n| n.contains("backgroundRead")) {
        return Some(
            "Go net/http's connReader.backgroundRead read the EOF while the handler was still \
running: the handler did not return: honour r.Context() (return when r.Context().Done() closes).",
        );
    }
    if names().any(|n| n.starts_with("uv__read") || n.starts_with("uv__stream_io")) {
        return Some(
            "libuv's loop read the EOF, not a handler of the application: the stack shows the \
loop; look at the 'end' and 'close' handlers of the socket.",
        );
    }
    if names().any(|n| n.contains("io.netty") || n.contains("NioEventLoop")) {
        return Some(
            "Netty's event loop read the EOF: the stack shows the loop; look at the \
channelInactive and exceptionCaught handlers.",
        );
    }
    if names().any(|n| n.contains("asyncio") || n.contains("_selector_events")) {
        return Some(
            "asyncio's loop read the EOF: the stack shows the loop; look at the protocol's \
eof_received() and connection_lost().",
        );
    }
    None
}

/// Group the sockets of each process by their EOF-read stack, most sockets first.
pub fn report(sockets: &[LeakSocket], processes: &[WhereProcessFacts]) -> Vec<WhereReport> {
    let mut out = Vec::new();
    for p in processes {
        let mine: Vec<&LeakSocket> = sockets.iter().filter(|s| s.pid == p.pid).collect();
        if mine.is_empty() {
            continue;
        }
        let mut no_stack = NoStack::default();
        // (shown frames, pattern) → (count, opened stacks by count, the whole stack)
        type Acc<'a> = (usize, BTreeMap<Vec<ShownFrame>, usize>, &'a [ShownFrame]);
        let mut groups: BTreeMap<(Vec<ShownFrame>, Pattern), Acc<'_>> = BTreeMap::new();
        for s in &mine {
            let frames = match &s.eof {
                EofRead::Seen(f) => f,
                EofRead::Unkept => {
                    no_stack.unkept += 1;
                    continue;
                }
                EofRead::BeforeWindow => {
                    no_stack.eof_before_window += 1;
                    continue;
                }
                EofRead::Unread => {
                    no_stack.eof_unread += 1;
                    continue;
                }
            };
            let g = groups
                .entry((fold(frames), s.pattern))
                .or_insert_with(|| (0, BTreeMap::new(), frames.as_slice()));
            g.0 += 1;
            if let Some(o) = &s.opened {
                *g.1.entry(fold(o)).or_default() += 1;
            }
        }
        let mut list: Vec<WhereGroup> = groups
            .into_iter()
            .map(|((eof_read, pattern), (count, opened, whole))| {
                let opened = opened
                    .into_iter()
                    .max_by_key(|(_, n)| *n)
                    .map(|(o, _)| o)
                    .unwrap_or_default();
                let base = advice(pattern, p.runtime);
                let advice = match loop_note(whole) {
                    Some(note) => format!("{note} ({})", base.trim_end_matches('.')),
                    None => base.to_owned(),
                };
                WhereGroup {
                    count,
                    pattern: pattern.name(),
                    eof_read,
                    opened,
                    advice,
                }
            })
            .collect();
        list.sort_by(|a, b| b.count.cmp(&a.count).then(a.eof_read.cmp(&b.eof_read)));
        out.push(WhereReport {
            pid: p.pid,
            comm: p.comm.clone(),
            runtime: p.runtime,
            sockets: mine.len(),
            groups: list,
            no_stack,
            runtime_note: p.runtime_note.clone(),
        });
    }
    out
}

/// The table for people.
pub fn render(reports: &[WhereReport]) -> String {
    let mut s = String::new();
    for r in reports {
        let _ = writeln!(
            s,
            "pid {} ({}, {}): {} leaking socket(s)",
            r.pid,
            r.comm,
            r.runtime.name(),
            r.sockets
        );
        for g in &r.groups {
            let _ = writeln!(s, "  {} socket(s), {}: EOF read at", g.count, g.pattern);
            for f in &g.eof_read {
                let _ = writeln!(s, "      {}", f.text());
            }
            if g.opened.is_empty() {
                let _ = writeln!(s, "    opened: not seen in the window");
            } else {
                let _ = writeln!(s, "    opened at");
                for f in &g.opened {
                    let _ = writeln!(s, "      {}", f.text());
                }
            }
            let _ = writeln!(s, "    {}", g.advice);
        }
        let n = &r.no_stack;
        if n.eof_before_window > 0 {
            let _ = writeln!(
                s,
                "  {} socket(s): EOF before the window: no stack",
                n.eof_before_window
            );
        }
        if n.eof_unread > 0 {
            let _ = writeln!(
                s,
                "  {} socket(s): the FIN is unread, no read returned the EOF: no stack",
                n.eof_unread
            );
        }
        if n.unkept > 0 {
            let _ = writeln!(
                s,
                "  {} socket(s): EOF read in the window, its stack lost (see the counts below)",
                n.unkept
            );
        }
        if let Some(note) = &r.runtime_note {
            let _ = writeln!(s, "  note: {note}");
        }
    }
    s
}

#[cfg(test)]
#[path = "where_report_tests.rs"]
mod tests;
