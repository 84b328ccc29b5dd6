//! Acting on one socket: duplicate, verify, shut down (or, in dry-run, stop just before).
//!
//! This is the only place a socket is shut down, and the only place dry-run branches.

use std::io;

use serde::Serialize;

use crate::inject::{InjectError, InjectReport, Victim};
use crate::netlink::{DiagSocket, TCP_CLOSE_WAIT};
use crate::os::Os;

/// The socket we mean to act on, as attribution saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub pid: i32,
    pub fd: i32,
    pub inode: u64,
    pub cookie: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Verified and shut down.
    Reaped,
    /// Verified; shutdown skipped because of dry-run.
    DryRun,
    /// The process exited or the fd was closed: nothing left to act on.
    Gone,
    /// The fd now refers to something else, or the socket left CLOSE_WAIT: left alone.
    Changed,
    /// A syscall failed (for example EPERM).
    Error,
    /// The daemon's `log` action: reported, not touched.
    Logged,
    /// This action cannot reach the socket (e.g. shutdown of an unaccepted connection).
    Skipped,
}

impl Outcome {
    /// The outcomes of a shutdown (what `reap` summarises).
    pub const ALL: [Outcome; 6] = [
        Outcome::Reaped,
        Outcome::DryRun,
        Outcome::Gone,
        Outcome::Changed,
        Outcome::Skipped,
        Outcome::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Reaped => "reaped",
            Outcome::DryRun => "dry_run",
            Outcome::Gone => "gone",
            Outcome::Changed => "changed",
            Outcome::Error => "error",
            Outcome::Logged => "logged",
            Outcome::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActResult {
    pub outcome: Outcome,
    /// Why, for anything but a clean reap/dry-run.
    pub detail: Option<String>,
    /// The failure was a permission denial (pidfd_getfd EPERM).
    pub permission_denied: bool,
}

impl ActResult {
    pub fn ok(outcome: Outcome) -> Self {
        Self {
            outcome,
            detail: None,
            permission_denied: false,
        }
    }

    pub fn with(outcome: Outcome, detail: impl Into<String>) -> Self {
        Self {
            outcome,
            detail: Some(detail.into()),
            permission_denied: false,
        }
    }
}

pub const PTRACE_HINT: &str = "pidfd_getfd needs ptrace access to the target: run as root or grant CAP_SYS_PTRACE (e.g. `setcap cap_sys_ptrace,cap_dac_read_search+ep $(command -v cwreap)`, or AmbientCapabilities=CAP_SYS_PTRACE in the unit)";

/// Duplicate `exp.fd` out of `process`, check that it is still the socket we attributed
/// (inode, SO_COOKIE, TCP state CLOSE_WAIT), and shut it down unless `dry_run`.
/// The duplicate is closed before returning, whatever happens.
pub fn shutdown_verified<O: Os>(
    os: &O,
    process: &O::Process,
    exp: &Expected,
    dry_run: bool,
) -> ActResult {
    let dup = match os.duplicate(process, exp.fd) {
        Ok(dup) => dup,
        Err(e) => return classify_dup_error(&e),
    };
    let id = match os.identify(&dup) {
        Ok(id) => id,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
            return ActResult::with(
                Outcome::Changed,
                format!("fd {} is no longer a socket", exp.fd),
            );
        }
        Err(e)
            if e.raw_os_error() == Some(libc::ENOPROTOOPT)
                || e.raw_os_error() == Some(libc::EOPNOTSUPP) =>
        {
            return ActResult::with(
                Outcome::Changed,
                format!("fd {} is no longer a TCP socket", exp.fd),
            );
        }
        Err(e) => return ActResult::with(Outcome::Error, format!("inspecting duplicate: {e}")),
    };
    if id.inode != exp.inode {
        return ActResult::with(
            Outcome::Changed,
            format!(
                "fd {} now holds inode {} (expected {})",
                exp.fd, id.inode, exp.inode
            ),
        );
    }
    if id.cookie != exp.cookie {
        return ActResult::with(
            Outcome::Changed,
            format!("socket cookie {} differs from {}", id.cookie, exp.cookie),
        );
    }
    if id.tcp_state != TCP_CLOSE_WAIT {
        return ActResult::with(
            Outcome::Changed,
            format!(
                "socket is in TCP state {} now, not CLOSE_WAIT",
                tcp_state_name(id.tcp_state)
            ),
        );
    }
    if dry_run {
        return ActResult::ok(Outcome::DryRun);
    }
    match os.shutdown(&dup) {
        Ok(()) => ActResult::ok(Outcome::Reaped),
        // Raced with the peer or the owner: the socket is already disconnected.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            ActResult::with(Outcome::Gone, "socket was already disconnected")
        }
        Err(e) => ActResult::with(Outcome::Error, format!("shutdown: {e}")),
    }
}

/// What SOCK_DESTROY needs: find a socket by its exact identity, and destroy it.
/// [`crate::discover::Namespaces`] is the real one (netlink, per network namespace).
pub trait SocketKiller {
    /// The socket as the kernel sees it now (4-tuple and cookie must match), or None.
    fn lookup(&mut self, s: &DiagSocket) -> io::Result<Option<DiagSocket>>;
    fn destroy(&mut self, s: &DiagSocket) -> io::Result<()>;
}

pub const NET_ADMIN_HINT: &str = "SOCK_DESTROY needs CAP_NET_ADMIN: run as root or grant it (AmbientCapabilities=CAP_NET_ADMIN in the unit)";
pub const NO_DESTROY_HINT: &str =
    "this kernel has no SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY is off); use shutdown instead";

/// Reset a CLOSE_WAIT socket through SOCK_DESTROY, after checking that the very socket
/// (same 4-tuple and cookie) still exists and is still in CLOSE_WAIT. The owner is not
/// touched; it sees ECONNABORTED, the peer gets an RST.
pub fn destroy_verified<K: SocketKiller>(k: &mut K, s: &DiagSocket, dry_run: bool) -> ActResult {
    let current = match k.lookup(s) {
        Ok(Some(c)) => c,
        Ok(None) => return ActResult::with(Outcome::Gone, "socket no longer exists"),
        Err(e) => return ActResult::with(Outcome::Error, format!("sock_diag lookup: {e}")),
    };
    if current.cookie != s.cookie {
        return ActResult::with(Outcome::Changed, "socket cookie differs");
    }
    if current.state != TCP_CLOSE_WAIT {
        return ActResult::with(
            Outcome::Changed,
            format!(
                "socket is in TCP state {} now, not CLOSE_WAIT",
                tcp_state_name(current.state)
            ),
        );
    }
    if dry_run {
        return ActResult::ok(Outcome::DryRun);
    }
    match k.destroy(s) {
        Ok(()) => ActResult::ok(Outcome::Reaped),
        Err(e) => match e.raw_os_error() {
            Some(libc::ENOENT) => {
                ActResult::with(Outcome::Gone, "socket vanished before SOCK_DESTROY")
            }
            Some(libc::EOPNOTSUPP) => ActResult::with(
                Outcome::Error,
                format!("SOCK_DESTROY: {e}; {NO_DESTROY_HINT}"),
            ),
            Some(libc::EPERM) | Some(libc::EACCES) => ActResult {
                outcome: Outcome::Error,
                detail: Some(format!("SOCK_DESTROY: {e}; {NET_ADMIN_HINT}")),
                permission_denied: true,
            },
            _ => ActResult::with(Outcome::Error, format!("SOCK_DESTROY: {e}")),
        },
    }
}

/// Per-fd results of one injected close() batch: the target was stopped once for all of
/// `victims`. Closed fds are `reaped`, fds the stopped-process check rejected `changed`; a
/// failed batch gives every fd the same outcome (`gone` if the process exited).
pub fn close_results(
    victims: &[Victim],
    batch: &Result<InjectReport, InjectError>,
) -> Vec<(i32, ActResult)> {
    match batch {
        Ok(r) => r
            .closed
            .iter()
            .map(|fd| {
                let done = format!("closed inside the target; paused {} µs", r.pause_us);
                (*fd, ActResult::with(Outcome::Reaped, done))
            })
            .chain(
                r.skipped
                    .iter()
                    .map(|(fd, why)| (*fd, ActResult::with(Outcome::Changed, why.clone()))),
            )
            .collect(),
        Err(InjectError::Gone) => victims
            .iter()
            .map(|v| (v.fd, ActResult::with(Outcome::Gone, "process exited")))
            .collect(),
        Err(e) => victims
            .iter()
            .map(|v| {
                let res = ActResult {
                    outcome: Outcome::Error,
                    detail: Some(e.to_string()),
                    permission_denied: matches!(e, InjectError::Permission(_)),
                };
                (v.fd, res)
            })
            .collect(),
    }
}

fn classify_dup_error(e: &io::Error) -> ActResult {
    match e.raw_os_error() {
        Some(libc::ESRCH) => ActResult::with(Outcome::Gone, "process exited"),
        Some(libc::EBADF) => ActResult::with(Outcome::Gone, "fd was closed by its owner"),
        Some(libc::EPERM) | Some(libc::EACCES) => ActResult {
            outcome: Outcome::Error,
            detail: Some(format!("pidfd_getfd: {e}; {PTRACE_HINT}")),
            permission_denied: true,
        },
        _ => ActResult::with(Outcome::Error, format!("pidfd_getfd: {e}")),
    }
}

/// Names as in include/net/tcp_states.h, like ss prints them.
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::Identity;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// A recording fake: fds of one process, each either an errno or an identity.
    #[derive(Default)]
    struct FakeOs {
        fds: HashMap<i32, Result<Identity, i32>>,
        shutdown_errno: Option<i32>,
        shut: RefCell<Vec<i32>>,
    }

    impl Os for FakeOs {
        type Process = i32;
        type Dup = (i32, Identity);

        fn open_process(&self, pid: i32) -> io::Result<i32> {
            Ok(pid)
        }
        fn alive(&self, _: &i32) -> bool {
            true
        }
        fn duplicate(&self, _: &i32, fd: i32) -> io::Result<(i32, Identity)> {
            match self.fds.get(&fd) {
                Some(Ok(id)) => Ok((fd, *id)),
                Some(Err(errno)) => Err(io::Error::from_raw_os_error(*errno)),
                None => Err(io::Error::from_raw_os_error(libc::EBADF)),
            }
        }
        fn identify(&self, dup: &(i32, Identity)) -> io::Result<Identity> {
            if dup.1.inode == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOTSOCK));
            }
            Ok(dup.1)
        }
        fn shutdown(&self, dup: &(i32, Identity)) -> io::Result<()> {
            if let Some(errno) = self.shutdown_errno {
                return Err(io::Error::from_raw_os_error(errno));
            }
            self.shut.borrow_mut().push(dup.0);
            Ok(())
        }
    }

    const EXP: Expected = Expected {
        pid: 100,
        fd: 7,
        inode: 5000,
        cookie: 42,
    };

    fn os_with(id: Result<Identity, i32>) -> FakeOs {
        let mut os = FakeOs::default();
        os.fds.insert(7, id);
        os
    }

    fn ident(inode: u64, cookie: u64, tcp_state: u8) -> Identity {
        Identity {
            inode,
            cookie,
            tcp_state,
        }
    }

    #[test]
    fn verified_socket_is_shut_down_once() {
        let os = os_with(Ok(ident(5000, 42, TCP_CLOSE_WAIT)));
        let r = shutdown_verified(&os, &100, &EXP, false);
        assert_eq!(r.outcome, Outcome::Reaped);
        assert_eq!(*os.shut.borrow(), vec![7]);
    }

    #[test]
    fn dry_run_verifies_but_never_shuts_down() {
        let os = os_with(Ok(ident(5000, 42, TCP_CLOSE_WAIT)));
        assert_eq!(
            shutdown_verified(&os, &100, &EXP, true).outcome,
            Outcome::DryRun
        );
        assert!(os.shut.borrow().is_empty());
        // Dry-run still fails where the real run would.
        let os = os_with(Err(libc::EPERM));
        let r = shutdown_verified(&os, &100, &EXP, true);
        assert_eq!(r.outcome, Outcome::Error);
        assert!(r.permission_denied);
    }

    #[test]
    fn any_mismatch_is_changed_and_untouched() {
        for id in [
            ident(5001, 42, TCP_CLOSE_WAIT), // fd reused for another socket
            ident(5000, 43, TCP_CLOSE_WAIT), // inode number recycled, different socket
            ident(5000, 42, 1),              // ESTABLISHED
            ident(5000, 42, 7),              // CLOSE: already shut down
            ident(0, 0, 0),                  // not a socket any more
        ] {
            let os = os_with(Ok(id));
            let r = shutdown_verified(&os, &100, &EXP, false);
            assert_eq!(r.outcome, Outcome::Changed, "{id:?}");
            assert!(r.detail.is_some());
            assert!(os.shut.borrow().is_empty(), "{id:?} was shut down");
        }
    }

    #[test]
    fn errnos_are_classified() {
        let cases = [
            (libc::ESRCH, Outcome::Gone, false),
            (libc::EBADF, Outcome::Gone, false),
            (libc::EPERM, Outcome::Error, true),
            (libc::EMFILE, Outcome::Error, false),
        ];
        for (errno, outcome, perm) in cases {
            let os = os_with(Err(errno));
            let r = shutdown_verified(&os, &100, &EXP, false);
            assert_eq!(
                (r.outcome, r.permission_denied),
                (outcome, perm),
                "errno {errno}"
            );
            if perm {
                assert!(
                    r.detail
                        .as_deref()
                        .is_some_and(|d| d.contains("CAP_SYS_PTRACE"))
                );
            }
        }
    }

    #[test]
    fn shutdown_failures_are_reported() {
        let mut os = os_with(Ok(ident(5000, 42, TCP_CLOSE_WAIT)));
        os.shutdown_errno = Some(libc::ENOTCONN);
        assert_eq!(
            shutdown_verified(&os, &100, &EXP, false).outcome,
            Outcome::Gone
        );
        os.shutdown_errno = Some(libc::ENOMEM);
        assert_eq!(
            shutdown_verified(&os, &100, &EXP, false).outcome,
            Outcome::Error
        );
    }

    #[test]
    fn close_batches_map_to_outcomes() {
        let victims = [
            Victim {
                fd: 4,
                inode: 40,
                cookie: 400,
            },
            Victim {
                fd: 5,
                inode: 50,
                cookie: 500,
            },
        ];
        let report = InjectReport {
            closed: vec![4],
            skipped: vec![(5, "changed: inode differs".into())],
            pause_us: 120,
            threads: 3,
            fds_before: 10,
            fds_after: 9,
        };
        let got = close_results(&victims, &Ok(report));
        assert_eq!(got[0].0, 4);
        assert_eq!(got[0].1.outcome, Outcome::Reaped);
        assert!(
            got[0]
                .1
                .detail
                .as_deref()
                .is_some_and(|d| d.contains("120 µs"))
        );
        assert_eq!((got[1].0, got[1].1.outcome), (5, Outcome::Changed));
        let gone = close_results(&victims, &Err(InjectError::Gone));
        assert!(gone.iter().all(|(_, r)| r.outcome == Outcome::Gone));
        let denied = close_results(&victims, &Err(InjectError::Permission("ptrace".into())));
        assert!(
            denied
                .iter()
                .all(|(_, r)| r.outcome == Outcome::Error && r.permission_denied)
        );
    }

    #[test]
    fn state_names() {
        assert_eq!(tcp_state_name(8), "CLOSE_WAIT");
        assert_eq!(tcp_state_name(200), "UNKNOWN");
    }
}
