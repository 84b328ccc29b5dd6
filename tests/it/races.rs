//! What happens when the world changes between attribution and action: the fd number is
//! reused for a new connection, the owner closes the fd, the owner exits, the socket leaves
//! CLOSE_WAIT. Driven through the library so the change lands exactly in that window.

use std::time::Duration;

use crate::support::*;
use cwreap::cli::commands::reap_row;
use cwreap::cli::plan::select;
use cwreap::shared::act::{Outcome, Reason};
use cwreap_linux::kernel::RealOs;
use cwreap_linux::tcp;

#[test]
#[ignore = "needs root: the test duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn fd_reused_for_a_new_connection_is_changed_and_left_alone() {
    let os = RealOs;
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let (_old_client, fd) = fx.close_wait(0);
    let snap = attribute(fx.pid(), &os);
    let rows = select(&snap, &filter(fx.pid()));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].holder.map(|h| h.fd), Some(fd));

    // Between attribution and action: the owner closes the fd and the number is reused.
    fx.send(&format!("close {fd}"));
    assert_eq!(fx.expect_line("closed "), fd.to_string());
    let (mut newcomer, new_fd) = fx.connect(0);
    assert_eq!(new_fd, fd, "the kernel hands out the lowest free fd");

    let res = reap_row(&os, &snap, &rows[0], false);
    assert_eq!(res.outcome, Outcome::Changed, "{res:?}");
    assert!(
        matches!(res.reason, Some(Reason::InodeChanged { fd: f, .. }) if f == fd),
        "{res:?}"
    );
    assert!(echoes(&mut newcomer), "the new connection was harmed");
    assert!(!reads_eof(&mut newcomer, Duration::from_millis(200)));
    assert_eq!(ss_count(fx.pid(), "established"), 1);
}

#[test]
#[ignore = "needs root: the test duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn owner_exiting_mid_run_is_gone_not_a_crash() {
    let os = RealOs;
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let _c = fx.close_wait(0);
    let snap = attribute(fx.pid(), &os);
    let rows = select(&snap, &filter(fx.pid()));
    assert_eq!(rows.len(), 1);
    fx.kill();
    let res = reap_row(&os, &snap, &rows[0], false);
    assert_eq!(res.outcome, Outcome::Gone, "{res:?}");
}

#[test]
#[ignore = "needs root: the test duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn fd_closed_by_owner_is_gone() {
    let os = RealOs;
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let (_c, fd) = fx.close_wait(0);
    let snap = attribute(fx.pid(), &os);
    let rows = select(&snap, &filter(fx.pid()));
    fx.send(&format!("close {fd}"));
    fx.expect_line("closed ");
    let res = reap_row(&os, &snap, &rows[0], false);
    assert_eq!(res.outcome, Outcome::Gone, "{res:?}");
}

#[test]
#[ignore = "needs root: the test duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn socket_that_left_close_wait_is_changed() {
    let os = RealOs;
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let (mut client, _fd) = fx.close_wait(0);
    let snap = attribute(fx.pid(), &os);
    let rows = select(&snap, &filter(fx.pid()));
    assert_eq!(
        reap_row(&os, &snap, &rows[0], false).outcome,
        Outcome::Reaped
    );
    assert!(reads_eof(&mut client, Duration::from_secs(5)));
    // Same fd, same inode, same cookie, but no longer CLOSE_WAIT: never shut twice.
    let again = reap_row(&os, &snap, &rows[0], false);
    assert_eq!(again.outcome, Outcome::Changed, "{again:?}");
    assert!(
        again.reason == Some(Reason::StateChanged { state: tcp::CLOSE }),
        "{again:?}"
    );
}

#[test]
#[ignore = "needs root: the test duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn dry_run_verifies_through_the_pidfd_and_stops_there() {
    let os = RealOs;
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let (mut client, _fd) = fx.close_wait(0);
    let snap = attribute(fx.pid(), &os);
    let rows = select(&snap, &filter(fx.pid()));
    assert_eq!(
        reap_row(&os, &snap, &rows[0], true).outcome,
        Outcome::DryRun
    );
    assert!(!reads_eof(&mut client, Duration::from_millis(300)));
    assert_eq!(ss_close_wait(fx.pid()).len(), 1);
}
