//! The test kit, and what only tests of the cwreap library share: attribution of one
//! process's CLOSE_WAIT sockets, as `reap` does it, for tests that then change the world
//! before acting (races, stress).

pub use cwreap_testkit::*;

use cwreap::cli::plan::Filter;
use cwreap::shared::attribute::{Attributor, Scope, Snapshot};
use cwreap_linux::kernel::{Pinned, RealOs};
use cwreap_linux::netlink::Diag;
use cwreap_linux::procfs::ProcFs;

/// Dump CLOSE_WAIT sockets and attribute them to `pid`, pinning it with a pidfd.
pub fn attribute(pid: i32, os: &RealOs) -> Snapshot<Pinned> {
    let sockets = Diag::new().expect("netlink").close_wait().expect("dump");
    let proc = ProcFs::default();
    Attributor {
        proc: &proc,
        os: Some(os),
        self_pid: std::process::id() as i32,
        host: None,
    }
    .attribute(
        cwreap_linux::netns::Found {
            close_wait: sockets,
            listeners: Vec::new(),
        },
        &Scope {
            pids: Some(vec![pid]),
            ..Default::default()
        },
    )
}

/// The `reap --pid PID` filter.
pub fn filter(pid: i32) -> Filter {
    Filter {
        selector: cwreap::shared::selector::Selector {
            pids: vec![pid],
            ..Default::default()
        },
        ..Filter::default()
    }
}
