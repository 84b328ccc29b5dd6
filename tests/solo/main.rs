//! Integration tests that need the machine, or the test process, to themselves, in a test
//! binary of their own whose tests run one at a time ([`alone`]):
//!
//! * `load`: `cwreap run` against 40000 connections with two CPU burners beside it, and its
//!   memory measured across 100 cycles;
//! * `inject_kill`: makes the test process a child subreaper (so helpers orphaned by a
//!   killed cwreap become its children), and kills cwreap at moments calibrated on this
//!   machine;
//! * `first_screen`: `cwreap scan` on a terminal with 20000 CLOSE_WAIT sockets on the host;
//! * `bpf`: the BPF programs and the socket iterator, which compares this process's whole
//!   fd table with /proc.
//!
//! Like every test that needs root, those that do are `#[ignore = "needs root: ..."]`
//! (`first_screen` needs none: the leaky servers are this user's).

mod bpf;
mod first_screen;
mod helper_kill_counts;
mod inject_kill;
mod load;
mod stacks;

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Hold the machine for the rest of the test: tests of this binary run one at a time,
/// whatever `--test-threads` says.
fn alone() -> MutexGuard<'static, ()> {
    static MACHINE: Mutex<()> = Mutex::new(());
    MACHINE.lock().unwrap_or_else(PoisonError::into_inner)
}
