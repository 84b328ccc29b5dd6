//! `cwreap run`: the policy daemon.
//!
//! - [`engine`]: the [`Daemon`], what it keeps between cycles and one cycle as steps;
//!   [`cycle`]: the steps that need no state; [`policy`]: the pure decision;
//! - [`discovery`]: events (BPF) or polling, decided at start;
//!   [`tracker`]: the CLOSE_WAIT sockets discovery reported, with when each was first
//!   seen; [`wake`]: with events, the ring buffer read as it fills between cycles;
//!   [`where_keep`]: `where: on`, the stacks of `explain --where` kept and published; [`fd_cache`]: every socket fd of the targets, kept between cycles;
//! - [`dead_held`]: the dead held sockets of the targets (ended connections whose fd is
//!   still held);
//! - [`release`]: after a shutdown, whether the owner released the fd;
//!   [`escalate`]: raising fd limits and signalling leaking processes;
//! - [`audit`]: the JSON Lines audit log, its writer thread and the intent records (where
//!   it may live, and opening it, is `crate::shared::audit_file`: `check` asks too);
//! - [`publish`]: the first sight of each socket, published for the command line;
//! - [`cycle_report`]: what one cycle did; [`metrics`]: the Prometheus registry;
//!   [`endpoint`]: the HTTP endpoint that serves it;
//! - [`service`]: the process around the cycles: signals (SIGHUP reload, SIGTERM/SIGINT
//!   stop), sd_notify (READY, STATUS, WATCHDOG), the watchdog fed on progress, the metrics
//!   endpoint; [`notify`]: sd_notify sends that never block; [`pid_file`]: `--pid-file`;
//! - [`selftest`]: the start-up self-test; [`logging`]: the log sink (a writer thread owns
//!   stderr); [`journal`]: native journald entries when stderr is the journal.
//!
//! No output blocks a cycle: the audit log, stderr and the notify socket each have their
//! own writer or a non-blocking send, and every wait has a deadline.

pub mod audit;
pub mod cycle;
pub mod cycle_report;
pub mod dead_held;
pub mod discovery;
pub mod endpoint;
pub mod engine;
pub mod escalate;
pub mod fd_cache;
mod journal;
mod logging;
pub mod metrics;
mod named_pids;
mod notify;
pub mod pid_file;
pub mod policy;
pub mod publish;
pub mod release;
pub mod selftest;
mod service;
mod steady;
#[cfg(test)]
mod tests;
pub mod tracker;
pub mod wake;
pub mod where_keep;

pub use engine::Daemon;
pub use selftest::self_test;
pub use service::run;
