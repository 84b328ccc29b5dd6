//! cwreap's integration tests, one module per subject, in one test binary: real leaky
//! servers over loopback, the real `cwreap` binary and library, checked against `ss`, the
//! peers, the logs, the audit file and the metrics.
//!
//! Tests that need root are `#[ignore = "needs root: ..."]`, so a plain `cargo test` runs
//! the rest and lists them as ignored; run everything as root with `cargo test --workspace
//! -- --include-ignored`. A missing tool (ss, a runtime, promtool, tmux, ...) skips a test
//! with a `SKIP` line, and fails it under `CI=true`.

mod support;

mod accept_queue;
mod ages;
mod alerts;
mod bounds;
mod check_listen;
mod config_files;
mod daemon;
mod dead_leader;
mod deploy;
mod docs;
mod escalate;
mod events;
mod explain;
mod explain_runtimes;
mod explain_where;
mod faults;
mod hardening;
mod hardening_paths;
mod incident;
mod index;
mod inject;
mod inject_rseq;
mod journald;
mod manual;
mod metrics;
mod netns_destroy;
mod pid_files;
mod races;
mod readme;
mod readme_cli;
mod reap_close;
mod run_pid_file;
mod runtimes;
mod scan_reap;
mod selectors;
mod stalled_reads;
mod stress;
mod systemd_unit;
mod watch;
