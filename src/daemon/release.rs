//! After a shutdown: did the owner release the fd? [`ReleaseWatch`] owns the sockets
//! cwreap shut down and looks at each every cycle: `released` as soon as the owner lets
//! go, `gone` if the owner exits first, `still_held` if its fd still names the socket
//! (a dead held socket) at the end of the window (`still_held_after`: by default 3
//! intervals or 30 s, whichever is longer, so an app that closes on its next heartbeat or
//! poll is not blamed). A socket still held is counted as leaking for as long as the owner
//! holds it ([`super::dead_held`]).

use std::sync::Arc;
use std::time::Duration;

use cwreap_linux::kernel::{Boottime, Effects, ProcRead};

use crate::daemon::cycle_report::Release;
use crate::shared::config::Config;

/// A socket that cwreap shut down, watched until its owner releases the fd or the grace
/// period ends.
pub struct Pending<P> {
    pub target: String,
    pub pid: i32,
    pub fd: i32,
    pub inode: u64,
    pub comm: String,
    /// The process's pin, shared by every socket of it reaped in the same cycle (one fd per
    /// process, not one per socket).
    pub pin: Option<Arc<P>>,
    pub at: Boottime,
}

/// A verdict on one watched socket.
pub struct Verdict {
    pub target: String,
    pub pid: i32,
    pub fd: i32,
    pub inode: u64,
    pub comm: String,
    pub result: Release,
    pub waited: Duration,
}

/// The sockets waiting for a verdict.
pub struct ReleaseWatch<P> {
    pending: Vec<Pending<P>>,
}

impl<P> Default for ReleaseWatch<P> {
    fn default() -> Self {
        ReleaseWatch {
            pending: Vec::new(),
        }
    }
}

/// Where the owner stands with the fd of a socket cwreap shut down: gone (through the
/// pin kept since the shutdown; without one, a pid whose /proc entry is gone), holding it
/// (its fd still names the same socket inode), or not.
fn owner_state<K: ProcRead + Effects>(k: &K, p: &Pending<K::Process>) -> Option<Release> {
    let alive = match p.pin.as_ref() {
        Some(pin) => k.alive(pin),
        None => k.start_time(p.pid).is_ok(),
    };
    if !alive {
        return Some(Release::Gone);
    }
    match k.fd_socket_inode(p.pid, p.fd) {
        Ok(Some(i)) if i == p.inode => None,
        _ => Some(Release::Released),
    }
}

impl<P> ReleaseWatch<P> {
    pub fn watch(&mut self, p: Pending<P>) {
        self.pending.push(p);
    }

    /// Sockets waiting for a verdict.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Verdicts due now: `released` as soon as the owner let go, `gone` if it exited,
    /// `still_held` once [`Config::still_held_window`] is over. A still-held socket is a
    /// dead held one from then on ([`crate::daemon::dead_held`]).
    pub fn check<K: ProcRead + Effects<Process = P>>(
        &mut self,
        k: &K,
        cfg: &Config,
        now: Boottime,
    ) -> Vec<Verdict> {
        let window = cfg.still_held_window();
        let mut out = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            let waited = now.saturating_since(p.at);
            let result = match owner_state(k, &p) {
                Some(r) => r,
                None if waited >= window => Release::StillHeld,
                None => {
                    self.pending.push(p);
                    continue;
                }
            };
            out.push(Verdict {
                target: p.target.clone(),
                pid: p.pid,
                fd: p.fd,
                inode: p.inode,
                comm: p.comm.clone(),
                result,
                waited,
            });
        }
        out
    }
}
