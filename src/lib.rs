//! cwreap: find TCP sockets stuck in CLOSE_WAIT and shut them down from outside the owner,
//! verified socket by socket. This crate decides; `cwreap-linux` talks to the kernel.
//!
//! Three rooms, by who uses them:
//! - [`shared`]: what the command line and the daemon both use: the validated policy
//!   ([`shared::config`]), the selector, attribution of sockets to (pid, fd), the verified
//!   action on one socket, and the usage error every command maps to exit code 2;
//! - [`cli`]: the command line: its arguments, the commands (`scan`, `reap`, `explain`,
//!   `check`), the plan of a scan or reap, rendering, the diagnosis behind `explain`, and the
//!   man pages;
//! - [`daemon`]: `cwreap run`: the cycle, the pure policy decision, the fd-table cache, the
//!   audit log, metrics and the service plumbing.
//!
//! `cli` and `daemon` use `shared`; neither uses the other, and `shared` uses neither.

#![forbid(unsafe_code)]

pub mod cli;
pub mod daemon;
pub mod shared;
