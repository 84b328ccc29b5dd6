//! cwreap: find TCP sockets stuck in CLOSE_WAIT and shut them down from outside the owner,
//! verified socket by socket. This crate decides; `cwreap-linux` talks to the kernel.
//!
//! The path of one socket:
//! - **discover**: `cwreap_linux::netns` dumps CLOSE_WAIT sockets per network namespace;
//! - **attribute**: [`snapshot`] finds each socket's (pid, fd) in /proc, pinning each
//!   process with a pidfd first; the daemon keeps that in [`index`] between cycles;
//! - **decide** (pure): [`select`] for the command line, [`policy`] for the daemon, from
//!   the validated [`config`];
//! - **act**: [`act`] verifies each socket through the pidfd and shuts it down (or
//!   destroys it), through the `cwreap_linux::os` seam;
//! - **report**: [`output`] for people and JSON, [`report`] and [`metrics`] for the
//!   daemon, whose loop, audit log and service plumbing are in [`daemon`].
//!
//! [`explain`] diagnoses the leak behind the sockets (read-only, pure). [`cli`] and
//! [`commands`] are the command line; [`manual`] the man pages and completions.

#![forbid(unsafe_code)]

pub mod act;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod explain;
pub mod index;
pub mod manual;
pub mod metrics;
pub mod output;
pub mod policy;
pub mod report;
pub mod select;
pub mod selector;
pub mod snapshot;
