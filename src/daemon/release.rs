//! After a shutdown: did the owner release the fd? [`ReleaseWatch`] owns the sockets
//! cwreap shut down and is waiting on: `released` as soon as the owner lets go,
//! `still_held` after a grace period. A socket still held is a dead held socket, counted
//! as leaking for as long as the owner holds it ([`super::dead_held`]).

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

/// Whether the owner still holds the fd of a socket cwreap shut down: alive (through the
/// pin kept since the shutdown; `without_pin` is the answer when there is none) and its
/// fd still names the same socket inode.
fn owner_holds<K: ProcRead + Effects>(k: &K, p: &Pending<K::Process>, without_pin: bool) -> bool {
    let alive = p.pin.as_ref().map_or(without_pin, |pin| k.alive(pin));
    alive && matches!(k.fd_socket_inode(p.pid, p.fd), Ok(Some(i)) if i == p.inode)
}

impl<P> ReleaseWatch<P> {
    pub fn watch(&mut self, p: Pending<P>) {
        self.pending.push(p);
    }

    /// Sockets waiting for a verdict.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Verdicts due now: `released` as soon as the owner let go; `still_held` once the
    /// grace period (one interval, at least 1 s) is over. A still-held socket is a dead
    /// held one from then on ([`crate::daemon::dead_held`]).
    pub fn check<K: ProcRead + Effects<Process = P>>(
        &mut self,
        k: &K,
        cfg: &Config,
        now: Boottime,
    ) -> Vec<Verdict> {
        let grace = cfg.interval.max(Duration::from_secs(1));
        let mut out = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            let waited = now.saturating_since(p.at);
            let result = if !owner_holds(k, &p, true) {
                Release::Released
            } else if waited >= grace {
                Release::StillHeld
            } else {
                self.pending.push(p);
                continue;
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
