//! The log subscriber: text or JSON lines on stderr; under journald without timestamps.

use std::io;

use crate::config::LogFormat;

pub(super) fn init(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&io::stderr()))
        .with_target(false);
    // journald stamps every line itself.
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let _ = match (format, under_journal) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Text, true) => builder.without_time().try_init(),
        (LogFormat::Text, false) => builder.try_init(),
    };
}
