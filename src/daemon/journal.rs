//! Native journald logging, when stderr is the journal (`JOURNAL_STREAM` names fd 2's
//! device and inode, as systemd sets it for `StandardError=journal`).
//!
//! Every field of an event becomes a journal field, named as the field in upper case
//! (`outcome` → `OUTCOME`, `pid` → `PID`, the message → `MESSAGE`), so `journalctl -u
//! cwreap CWREAP_TARGET=api OUTCOME=reaped` filters. Two kinds of names are changed so that
//! they cannot clash with a field the journal or tracing-journald gives a meaning: the
//! policy target (`target`) is `CWREAP_TARGET`, since tracing-journald's `TARGET` holds the
//! module path; and a field named as one of the journal's own (`UNIT`, `ERRNO`, `PRIORITY`,
//! ...) gets a `CWREAP_` prefix too. tracing-journald adds `PRIORITY`, `TARGET`,
//! `CODE_FILE`, `CODE_LINE` and `SYSLOG_IDENTIFIER`.
//!
//! As with stderr (see [`super::logging`]), nothing blocks the code that logs: the event's
//! fields are copied into an [`Entry`] and queued; the log writer thread hands each entry to
//! tracing-journald, whose send may block on a stuck journald.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use prometheus_client::metrics::counter::Counter;
use tracing::callsite::{Callsite, Identifier};
use tracing::field::{Field, FieldSet, Visit};
use tracing::metadata::Kind;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};

/// What the log writer thread takes (see [`super::logging`]): a formatted line for stderr,
/// an entry for the journal, or a flush to answer once everything before it is written.
pub enum Msg {
    Line(Vec<u8>),
    Entry(Entry),
    Flush(SyncSender<()>),
}

/// The journal field of the policy target.
pub const TARGET_FIELD: &str = "cwreap_target";

/// Fields the journal (or tracing-journald) gives a meaning of its own: an event field of
/// one of these names is prefixed with `cwreap_`.
const RESERVED: &[&str] = &[
    "target",
    "message_id",
    "priority",
    "code_file",
    "code_line",
    "code_func",
    "errno",
    "invocation_id",
    "user_invocation_id",
    "syslog_facility",
    "syslog_identifier",
    "syslog_pid",
    "syslog_timestamp",
    "syslog_raw",
    "documentation",
    "tid",
    "unit",
    "user_unit",
    "object_pid",
];

/// The journal name of an event field (before tracing-journald puts it in upper case).
pub fn journal_name(field: &'static str) -> &'static str {
    if field == "target" {
        return TARGET_FIELD;
    }
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(field)) {
        return Box::leak(format!("cwreap_{field}").into_boxed_str());
    }
    field
}

/// Whether fd 2 is the journal's stream: `JOURNAL_STREAM` is `DEV:INODE` of it.
pub fn stderr_is_journal() -> bool {
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = var.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// One event, its fields copied: (index in its callsite's fields, value as text).
pub struct Entry {
    meta: &'static Metadata<'static>,
    fields: Vec<(usize, String)>,
}

/// The layer that copies events into [`Entry`]s and queues them (never blocking).
pub struct Capture {
    pub tx: SyncSender<Msg>,
    pub dropped: Counter,
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = Vec::with_capacity(event.metadata().fields().len());
        event.record(&mut Copy(&mut fields));
        let entry = Entry {
            meta: event.metadata(),
            fields,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.tx.try_send(Msg::Entry(entry))
        {
            self.dropped.inc();
        }
    }
}

struct Copy<'a>(&'a mut Vec<(usize, String)>);

impl Visit for Copy<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.index(), value.to_owned()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.index(), format!("{value:?}")));
    }
}

/// The callsite of the renamed field sets: fields are matched to a value set by it, and
/// each entry's fields all come from one set.
struct Renamed;

static RENAMED: Renamed = Renamed;
static RENAMED_META: Metadata<'static> = Metadata::new(
    "journal fields",
    "cwreap",
    Level::INFO,
    None,
    None,
    None,
    FieldSet::new(&[], Identifier(&RENAMED)),
    Kind::EVENT,
);

impl Callsite for Renamed {
    fn set_interest(&self, _: Interest) {}

    fn metadata(&self) -> &Metadata<'_> {
        &RENAMED_META
    }
}

/// The log writer's end: tracing-journald behind a registry of its own, and the journal
/// names of each callsite's fields (made once per callsite: there are finitely many).
pub struct Writer<S> {
    subscriber: S,
    names: HashMap<Identifier, &'static [&'static str]>,
}

/// Connect to the journal's socket; None when it does not answer.
pub fn connect() -> Option<Writer<impl Subscriber>> {
    let layer = tracing_journald::layer()
        .ok()?
        .with_field_prefix(None)
        .with_syslog_identifier("cwreap".into());
    Some(Writer {
        subscriber: tracing_subscriber::registry().with(layer),
        names: HashMap::new(),
    })
}

impl<S: Subscriber> Writer<S> {
    /// Send one entry to the journal (blocking: only the writer thread calls it).
    pub fn send(&mut self, e: &Entry) {
        let names = *self.names.entry(e.meta.callsite()).or_insert_with(|| {
            let names: Vec<&'static str> = e
                .meta
                .fields()
                .iter()
                .map(|f| journal_name(f.name()))
                .collect();
            Box::leak(names.into_boxed_slice())
        });
        let fields = FieldSet::new(names, Identifier(&RENAMED));
        let mut values: Vec<Option<&dyn tracing::Value>> = vec![None; names.len()];
        for (i, v) in &e.fields {
            if let Some(slot) = values.get_mut(*i) {
                *slot = Some(v as &dyn tracing::Value);
            }
        }
        let values = fields.value_set_all(&values);
        self.subscriber.event(&Event::new(e.meta, &values));
    }
}

/// The writer thread under the journal: entries in order, flushes answered after what came
/// before them.
pub fn write_entries(mut journal: Writer<impl Subscriber>, rx: Receiver<Msg>) {
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Entry(e) => journal.send(&e),
            Msg::Flush(ack) => {
                let _ = ack.try_send(());
            }
            Msg::Line(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;
    use std::sync::{Arc, Mutex};

    /// A layer that keeps the field names and values of every event it sees.
    type Fields = Vec<(String, String)>;

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<Fields>>>);

    struct Names<'a>(&'a mut Vec<(String, String)>);

    impl Visit for Names<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push((field.name().to_owned(), format!("{value:?}")));
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.push((field.name().to_owned(), value.to_owned()));
        }
    }

    impl<S: Subscriber> Layer<S> for Seen {
        fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
            let mut fields = Vec::new();
            event.record(&mut Names(&mut fields));
            if let Ok(mut v) = self.0.lock() {
                v.push(fields);
            }
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_entries_and_what_is_queued_is_replayed_renamed() {
        let (tx, rx) = sync_channel(2);
        let dropped = Counter::default();
        let sub = tracing_subscriber::registry().with(Capture {
            tx,
            dropped: dropped.clone(),
        });
        tracing::subscriber::with_default(sub, || {
            for i in 0..5 {
                tracing::info!(
                    target = "api",
                    outcome = "reaped",
                    pid = 7,
                    unit = "x",
                    i,
                    "close_wait action"
                );
            }
        });
        assert_eq!(dropped.get(), 3, "never blocks: the rest is counted");
        let seen = Seen::default();
        let mut w = Writer {
            subscriber: tracing_subscriber::registry().with(seen.clone()),
            names: HashMap::new(),
        };
        for msg in rx.try_iter() {
            if let Msg::Entry(e) = msg {
                w.send(&e);
            }
        }
        let seen = seen.0.lock().expect("seen").clone();
        assert_eq!(seen.len(), 2);
        let want = |i: &str| -> Fields {
            [
                ("message", "close_wait action"),
                ("cwreap_target", "api"),
                ("outcome", "reaped"),
                ("pid", "7"),
                ("cwreap_unit", "x"),
                ("i", i),
            ]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
        };
        assert_eq!(seen[0], want("0"));
        assert_eq!(seen[1], want("1"));
    }

    #[test]
    fn the_policy_target_and_the_journals_own_names_are_renamed() {
        assert_eq!(journal_name("target"), "cwreap_target");
        assert_eq!(journal_name("outcome"), "outcome");
        assert_eq!(journal_name("pid"), "pid");
        assert_eq!(journal_name("unit"), "cwreap_unit");
        assert_eq!(journal_name("errno"), "cwreap_errno");
        assert_eq!(journal_name("message"), "message");
    }
}
