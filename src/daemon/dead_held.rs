//! The dead held sockets of the targets, kept between cycles: connections that ended
//! (state CLOSE, in no dump) while a target still holds their fd. Only close() or a
//! restart frees them, so they count as leaking for escalations, in the metrics and in the
//! release verdicts: a socket cwreap shut down whose fd is still held is one of them,
//! `reaped_by: cwreap`.
//!
//! Finding them costs a duplication per socket fd that no dump explains, so the daemon
//! looks where a socket can have died: a CLOSE_WAIT socket that left the dumps while a
//! target still holds its inode (the peer's RST after keepalive, or cwreap's shutdown) is
//! probed at once; every socket fd of the targets is probed at start and at each
//! reconciliation, for sockets that died before the daemon looked or went from
//! ESTABLISHED to CLOSE by a reset.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use tracing::info;

use cwreap_linux::kernel::{Boottime, Kernel};
use cwreap_linux::netlink::DiagSocket;

use crate::daemon::cycle::Targets;
use crate::daemon::fd_cache::FdIndex;
use crate::daemon::policy;
use crate::shared::attribute::{Snapshot, SocketFd};
use crate::shared::config::Config;
use crate::shared::dead::{self, Dead};
use crate::shared::selector::SocketFacts;

/// One dead held socket of a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub inode: u64,
    pub cookie: u64,
    pub local: Option<SocketAddr>,
    /// The peer, when the socket was seen in CLOSE_WAIT before it died.
    pub remote: Option<SocketAddr>,
    /// cwreap shut it down; the owner never closed it.
    pub reaped_by_cwreap: bool,
    pub found_at: Boottime,
}

/// The dead held sockets of the targets, by (pid, fd).
#[derive(Default)]
pub struct DeadHeld {
    held: BTreeMap<(i32, i32), Held>,
}

impl DeadHeld {
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn get(&self, pid: i32, fd: i32) -> Option<&Held> {
        self.held.get(&(pid, fd))
    }

    /// Forget the sockets whose fd was closed (or now names another socket), and those of
    /// processes that are no target any more.
    pub fn prune<K: Kernel>(&mut self, k: &K, targets: &Targets) {
        self.held.retain(|&(pid, fd), h| {
            targets.contains_key(&pid)
                && matches!(k.fd_socket_inode(pid, fd), Ok(Some(i)) if i == h.inode)
        });
    }

    /// Probe `candidates` (socket fds of targets) and keep the dead ones. `last_seen` gives
    /// the peer of sockets seen in CLOSE_WAIT before; `reaped` says which of them cwreap
    /// shut down. Returns how many were new.
    #[allow(clippy::too_many_arguments)]
    pub fn probe<K: Kernel>(
        &mut self,
        k: &mut K,
        snap: &Snapshot<Arc<K::Process>>,
        candidates: &[SocketFd],
        last_seen: &HashMap<u64, DiagSocket>,
        reaped: &HashSet<u64>,
        now: Boottime,
    ) -> Result<usize, dead::ProbeError> {
        let fresh: Vec<SocketFd> = candidates
            .iter()
            .filter(|s| !self.held.contains_key(&(s.pid, s.fd)))
            .copied()
            .collect();
        if fresh.is_empty() {
            return Ok(0);
        }
        let pins: HashMap<i32, &K::Process> = snap
            .processes
            .iter()
            .filter_map(|(pid, p)| p.handle.as_deref().map(|h| (*pid, h)))
            .collect();
        let probed = dead::probe(k, &fresh, &HashMap::new(), &|pid| pins.get(&pid).copied())?;
        let mut added = 0;
        for Dead {
            fd, cookie, local, ..
        } in probed.dead
        {
            let seen = last_seen.get(&fd.inode);
            let h = Held {
                inode: fd.inode,
                cookie,
                local: local.or_else(|| seen.map(|s| s.local)),
                remote: seen.map(|s| s.remote),
                reaped_by_cwreap: reaped.contains(&fd.inode),
                found_at: now,
            };
            info!(
                pid = fd.pid,
                fd = fd.fd,
                inode = fd.inode,
                reaped_by = if h.reaped_by_cwreap { "cwreap" } else { "peer" },
                "dead held socket: the connection ended, the process still holds its fd (only close() or a restart frees it)"
            );
            self.held.insert((fd.pid, fd.fd), h);
            added += 1;
        }
        Ok(added)
    }

    /// Per (pid, target index): the dead held sockets, each under the first target of its
    /// process that selects it (the peer is unknown for sockets never seen in CLOSE_WAIT).
    pub fn per_target(&self, cfg: &Config, targets: &Targets) -> HashMap<(i32, usize), usize> {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut out: HashMap<(i32, usize), usize> = HashMap::new();
        for (&(pid, _), h) in &self.held {
            let Some(ts) = targets.get(&pid) else {
                continue;
            };
            let facts = SocketFacts {
                local: h.local.unwrap_or(unspecified),
                remote: h.remote.unwrap_or(unspecified),
            };
            let owner = [crate::shared::attribute::Holder { pid, fd: 0 }];
            let lookup = |p: i32| (p == pid).then_some(ts.as_slice());
            if let Some((_, t)) = policy::assign(cfg, &owner, &lookup, &facts) {
                *out.entry((pid, t)).or_default() += 1;
            }
        }
        out
    }
}

/// The socket fds of the targets to probe: every one in no CLOSE_WAIT dump when `all`
/// (at start and each reconciliation), else those still holding a socket that left
/// CLOSE_WAIT this cycle (`left`), where a socket can have died.
pub fn candidates<P, H>(
    snap: &Snapshot<H>,
    cache: &FdIndex<P>,
    left: &[DiagSocket],
    all: bool,
) -> Vec<SocketFd> {
    if all {
        let close_wait: HashSet<u64> = snap.sockets.iter().map(|s| s.diag.inode).collect();
        return cache
            .socket_fds_all()
            .into_iter()
            .filter(|s| !close_wait.contains(&s.inode))
            .collect();
    }
    left.iter()
        .filter(|d| d.inode != 0)
        .flat_map(|d| {
            cache.holders(d.inode).iter().map(|h| SocketFd {
                pid: h.pid,
                fd: h.fd,
                inode: d.inode,
            })
        })
        .collect()
}
