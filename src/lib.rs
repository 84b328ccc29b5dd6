//! cwreap: find TCP sockets stuck in CLOSE_WAIT and shut them down from outside the owner,
//! verified socket by socket.
//!
//! The path of one socket: [`netlink`] discovers it, [`snapshot`] attributes it to a
//! (pid, fd), [`select`] decides (pure), [`act`] verifies and shuts it down through the
//! [`os`] seam, [`output`] reports. All raw syscalls are in [`sys`].

pub mod act;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod discover;
pub mod index;
pub mod inject;
pub mod manual;
pub mod metrics;
pub mod netlink;
pub mod os;
pub mod output;
pub mod policy;
pub mod procfs;
pub mod select;
pub mod snapshot;
pub mod sys;
