//! The daemon's attribution cache on a real process: reads an fd table only when the
//! process changed, and finds new CLOSE_WAIT sockets either way.

use crate::support::*;
use cwreap::daemon::fd_cache::{FULL_EVERY, FdIndex};
use cwreap_linux::kernel::RealOs;
use cwreap_linux::netns::Namespaces;
use cwreap_linux::procfs::ProcFs;

#[test]
fn steady_state_reads_no_fd_table_and_changes_are_seen() {
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let (_c1, fd1) = fx.close_wait(0);
    let _est = fx.connect(0);
    let proc = ProcFs::default();
    let os = RealOs;
    let pids = [fx.pid()];
    let mut ns = Namespaces::own().expect("netlink");
    let mut index = FdIndex::default();

    let first = index.refresh(&proc, &os, &pids);
    assert_eq!(first.walked, 1);
    let snap = index.snapshot(ns.dump().expect("dump"));
    let held: Vec<i32> = snap
        .sockets
        .iter()
        .flat_map(|s| s.holders.iter())
        .filter(|h| h.pid == fx.pid())
        .map(|h| h.fd)
        .collect();
    assert_eq!(held, vec![fd1]);
    assert!(
        snap.processes[&fx.pid()].handle.is_some(),
        "pidfd lent to the snapshot"
    );
    index.restore(snap.processes);

    // Nothing changed: no fd table is read (until the periodic full pass).
    for _ in 1..FULL_EVERY {
        assert_eq!(index.refresh(&proc, &os, &pids).walked, 0);
    }
    // The periodic full pass reads it again.
    assert_eq!(index.refresh(&proc, &os, &pids).walked, 1);

    // A new connection changes the fd count: the table is read, the new socket found.
    let (_c2, fd2) = fx.close_wait(0);
    assert_eq!(index.refresh(&proc, &os, &pids).walked, 1);
    let snap = index.snapshot(ns.dump().expect("dump"));
    let mut held: Vec<i32> = snap
        .sockets
        .iter()
        .flat_map(|s| s.holders.iter())
        .filter(|h| h.pid == fx.pid())
        .map(|h| h.fd)
        .collect();
    held.sort_unstable();
    assert_eq!(held, vec![fd1, fd2]);
    index.restore(snap.processes);

    // A target that is no longer a target is dropped.
    index.refresh(&proc, &os, &[]);
    assert_eq!(index.socket_fds(), 0);
}
