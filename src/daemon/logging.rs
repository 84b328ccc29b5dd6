//! The log sink: text or JSON lines on stderr; when stderr is the journal, entries with
//! every field a journal field through journald's native protocol ([`super::journal`]),
//! or, if its socket does not answer, text lines without timestamps.
//!
//! One writer thread owns stderr. tracing's fmt layer formats each event into a line and
//! only enqueues it on a bounded channel, so a stalled reader of stderr (a full pipe, a
//! stuck journald) never blocks a cycle, a scrape or signal handling: while the channel is
//! full, lines are dropped and counted (`cwreap_log_lines_dropped_total`). The writer
//! writes to a duplicate of fd 2; the flags of that open file description are shared with
//! whoever else holds it, so they are never changed (no O_NONBLOCK). The process may exit
//! while the writer is blocked in write(2).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use super::journal::Msg;
use crate::shared::config::LogFormat;

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// The writer's queue, for [`flush`].
static QUEUE_TX: OnceLock<SyncSender<Msg>> = OnceLock::new();

pub(super) fn init(format: LogFormat, dropped: Counter) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&io::stderr());
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    if super::journal::stderr_is_journal()
        && let Some(journal) = super::journal::connect()
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let (tx, rx) = sync_channel(QUEUE);
        let started = std::thread::Builder::new()
            .name("cwreap-log".into())
            .spawn(move || super::journal::write_entries(journal, rx));
        if started.is_ok() {
            let _ = QUEUE_TX.set(tx.clone());
            let capture = super::journal::Capture { tx, dropped };
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(capture)
                .try_init();
            return;
        }
    }
    let Some(sink) = Sink::start(dropped) else {
        // No fd 2 to duplicate: nowhere to log.
        return;
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink)
        .with_ansi(ansi)
        .with_target(false);
    // journald stamps every line itself.
    let _ = match (format, under_journal) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Text, true) => builder.without_time().try_init(),
        (LogFormat::Text, false) => builder.try_init(),
    };
}

/// Wait up to `deadline` for the lines logged so far to be written (at exit). False when
/// the writer did not get there (a stalled reader).
pub(super) fn flush(deadline: Duration) -> bool {
    let Some(tx) = QUEUE_TX.get() else {
        return true;
    };
    let (ack, done) = sync_channel(1);
    tx.try_send(Msg::Flush(ack)).is_ok() && done.recv_timeout(deadline).is_ok()
}

/// tracing's writer: one [`Line`] per event, enqueued when tracing is done with it.
struct Sink {
    tx: SyncSender<Msg>,
    dropped: Counter,
}

impl Sink {
    fn start(dropped: Counter) -> Option<Sink> {
        let fd = io::stderr().as_fd().try_clone_to_owned().ok()?;
        let (tx, rx) = sync_channel(QUEUE);
        let lost = dropped.clone();
        std::thread::Builder::new()
            .name("cwreap-log".into())
            .spawn(move || write_lines(File::from(fd), rx, lost))
            .ok()?;
        let _ = QUEUE_TX.set(tx.clone());
        Some(Sink { tx, dropped })
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            buf: Vec::new(),
            tx: self.tx.clone(),
            dropped: self.dropped.clone(),
        }
    }
}

/// One formatted event, sent to the writer on drop (or dropped and counted).
struct Line {
    buf: Vec<u8>,
    tx: SyncSender<Msg>,
    dropped: Counter,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        match self.tx.try_send(Msg::Line(std::mem::take(&mut self.buf))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

/// The writer thread: blocking writes to stderr, in order, what is waiting written at once.
/// Lines that cannot be written (EPIPE: nobody reads any more) are counted as dropped.
fn write_lines(mut out: File, rx: Receiver<Msg>, dropped: Counter) {
    const BATCH: usize = 64 * 1024;
    let mut buf = Vec::with_capacity(BATCH);
    while let Ok(first) = rx.recv() {
        buf.clear();
        let mut lines = 0u64;
        let mut acks = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Line(line) => {
                    buf.extend_from_slice(&line);
                    lines += 1;
                }
                Msg::Flush(ack) => acks.push(ack),
                Msg::Entry(_) => {}
            }
            if buf.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !buf.is_empty() && out.write_all(&buf).is_err() {
            dropped.inc_by(lines);
        }
        for ack in acks {
            let _ = ack.try_send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter;

    #[test]
    fn a_full_queue_drops_and_counts_lines_instead_of_blocking() {
        let (tx, rx) = sync_channel(2);
        let dropped = Counter::default();
        let sink = Sink {
            tx,
            dropped: dropped.clone(),
        };
        for i in 0..5 {
            let mut line = sink.make_writer();
            writeln!(line, "line {i}").expect("write into memory");
        }
        assert_eq!(dropped.get(), 3);
        let kept: Vec<Vec<u8>> = rx
            .try_iter()
            .filter_map(|m| match m {
                Msg::Line(l) => Some(l),
                Msg::Flush(_) | Msg::Entry(_) => None,
            })
            .collect();
        assert_eq!(kept, [b"line 0\n".to_vec(), b"line 1\n".to_vec()]);
    }
}
